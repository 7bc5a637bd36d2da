"""The encoder contract: inputs of one modality in, ``Features`` out.

An encoder is built from an ``EncoderContext`` (what preprocessing decided: vocabulary size,
image channels, mel bands) plus its own options, so the config only names what a user chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmfuse.registry import Registry
from mmfuse.types import Features


@dataclass(frozen=True)
class EncoderContext:
    """Facts about the preprocessed input that an encoder needs to size its layers."""

    kind: str
    vocab_size: int = 0
    max_length: int = 0
    channels: int = 0
    image_size: int = 0
    n_mels: int = 0
    max_frames: int = 0
    tokenizer: str = ""
    """'' for the built-in word tokenizer, else the pretrained tokenizer's source (TextPrep.tokenizer)."""
    image_mean: tuple[float, ...] = ()
    image_std: tuple[float, ...] = ()
    audio_features: str = "log_mel"
    sample_rate: int = 0
    n_fft: int = 0
    hop_length: int = 0
    assets: str = ""
    """Set when a saved model is restored: the folder holding this encoder's saved architecture files
    (pretrained encoders then build from it, and their weights come from model.safetensors)."""
    feature_dim: int = 0


class Encoder(nn.Module):
    """Base class: ``forward(inputs, present) -> Features`` with ``out_dim``-wide features.

    ``kind`` names the modality kind the encoder consumes, so a config that puts an image encoder
    on an audio column fails at build time with a clear message.
    """

    kind: str = ""
    out_dim: int
    _frozen_all: bool = False

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


ENCODERS: Registry[Encoder] = Registry("encoder", reserved=("context",), entry_point_group="mmfuse.encoders")


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid tokens; rows with no valid token give zeros (never NaN)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def finish_features(tokens: Tensor, mask: Tensor, pooled: Tensor, present: Tensor) -> Features:
    """Zeros absent rows so that nothing downstream can read values of a missing modality."""
    keep = present.to(tokens.dtype)
    return Features(
        tokens=tokens * keep[:, None, None],
        mask=mask & present[:, None],
        pooled=pooled * keep[:, None],
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
