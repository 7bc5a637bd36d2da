"""The typed containers that travel between pipeline stages.

Modalities travel as ``dict[str, ...]`` keyed by modality name and are always iterated in sorted
key order, so no result depends on dict insertion order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class Features:
    """What every encoder returns for a batch of B samples.

    tokens:  (B, T, D) sequence features, T=1 for encoders with no sequence.
    mask:    (B, T) bool, True where a token is real (not padding).
    pooled:  (B, D) one vector per sample.
    present: (B,) bool, False where the sample lacks this modality; such rows carry no information
             and every fusion method must ignore their values.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    present: Tensor

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[-1])


@dataclass
class Batch:
    """A collated batch.

    inputs:  modality -> named input tensors (text: input_ids, attention_mask; image: pixels;
             audio: mel, frame_mask; video: pixels (B, T, C, H, W), frame_mask (B, T)).
             Absent samples hold zeros and have present=False.
    present: modality -> (B,) bool.
    target:  (B,) long for multi-class, (B, C) float for multi-label, (B, K) float for regression;
             None when predicting.
    ids:     the manifest ids, for reporting.
    """

    inputs: dict[str, dict[str, Tensor]]
    present: dict[str, Tensor]
    target: Tensor | None = None
    ids: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(next(iter(self.present.values())))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            inputs={m: {k: v.to(device) for k, v in d.items()} for m, d in self.inputs.items()},
            present={m: p.to(device) for m, p in self.present.items()},
            target=None if self.target is None else self.target.to(device),
            ids=self.ids,
        )

@dataclass(frozen=True)
class EncoderContext:
    """Facts about the preprocessed input that an encoder needs to size its layers."""

    kind: str
    vocab_size: int = 0
    max_length: int = 0
    """Tokens (text), steps (features) or frames per clip (video)."""
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


class TargetCodec(Protocol):
    """What the data pipeline needs from a task: turn a manifest target into a tensor, and batch them.

    Every task implements it; the data layer depends on this contract, not on the tasks package.
    """

    def encode_target(self, raw: Any) -> torch.Tensor: ...

    def collate_targets(self, targets: list[torch.Tensor]) -> torch.Tensor: ...


class FusionModule(Protocol):
    """What a task may use of the model's fusion: ``Features`` per modality in, (B, out_dim) out.

    Every ``mmfuse.fusion`` method implements it. Tasks sit beside the fusion package and may not
    import it, so they call the fusion through this contract (``mmfuse.tasks.base.FusedModel``).
    """

    @property
    def out_dim(self) -> int:
        """Width of the fused vector (for a decision-level method: the task's number of outputs)."""
        ...

    @property
    def decision_level(self) -> bool:
        """True when the output is already the task's prediction (``late``): a head adds nothing."""
        ...

    def __call__(self, features: dict[str, Features]) -> Tensor: ...
