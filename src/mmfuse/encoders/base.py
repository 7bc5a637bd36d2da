"""The encoder contract: inputs of one modality in, ``Features`` out.

An encoder is built from an ``EncoderContext`` (what preprocessing decided: vocabulary size,
image channels, mel bands) plus its own options, so the config only names what a user chooses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.masking import zero_absent


class Encoder(nn.Module):
    """Base class: ``forward(inputs, present) -> Features`` with ``out_dim``-wide features.

    ``kind`` names the modality kind the encoder consumes, so a config that puts an image encoder
    on an audio column fails at build time with a clear message.
    """

    kind: str = ""
    out_dim: int
    _frozen_all: bool = False
    export_blocker: str = ""
    """Why a graph export (ONNX) cannot follow this encoder, in words for the user; empty when it can."""

    def freeze(self) -> Encoder:
        """Stops every parameter from training and keeps the module in eval mode from now on.

        Eval mode too (no dropout, fixed BatchNorm statistics), so the encoder is a fixed function
        of its input: the feature cache relies on that to store its outputs once (``data.cache``).
        """
        self.requires_grad_(False)
        self._frozen_all = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self._frozen_all)

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that would train; empty for a frozen encoder."""
        return [name for name, p in self.named_parameters() if p.requires_grad]




def finish_features(tokens: Tensor, mask: Tensor, pooled: Tensor, present: Tensor) -> Features:
    """Zeros absent rows so that nothing downstream can read values of a missing modality.

    ``torch.where``, not a multiplication by the mask: NaN or inf in an absent row stays NaN after
    ``* 0``, and would reach any fusion that forgot to look at ``present``.
    """
    return Features(
        tokens=zero_absent(tokens, present),
        mask=mask & present[:, None],
        pooled=zero_absent(pooled, present),
        present=present,
    )


def absent_features(batch_size: int, dim: int, device: torch.device, dtype: torch.dtype) -> Features:
    """Features for a modality that no sample in the batch has (e.g. predict with text only)."""
    return Features(
        tokens=torch.zeros(batch_size, 1, dim, device=device, dtype=dtype),
        mask=torch.zeros(batch_size, 1, dtype=torch.bool, device=device),
        pooled=torch.zeros(batch_size, dim, device=device, dtype=dtype),
        present=torch.zeros(batch_size, dtype=torch.bool, device=device),
    )
