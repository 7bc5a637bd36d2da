"""The typed containers that travel between pipeline stages.

Modalities travel as ``dict[str, ...]`` keyed by modality name and are always iterated in sorted
key order, so no result depends on dict insertion order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
             audio: mel, frame_mask). Absent samples hold zeros and have present=False.
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
