"""The fusion contract shared by every method.

``Fusion(dims, out_dim, **options)``: ``dims`` maps each modality to its encoder width;
``forward(features) -> (B, out_dim)`` takes a ``Features`` per modality (absent samples have
``present=False``). Methods iterate modalities in sorted order and must never read the values of
an absent sample. A decision-level method (``late``) outputs the task's predictions directly, so
the model gives it ``out_dim = number of task outputs`` and no head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError


class Fusion(nn.Module):
    decision_level: ClassVar[bool] = False

    def __init__(self, dims: dict[str, int], out_dim: int) -> None:
        super().__init__()
        if not dims:
            raise ConfigError(f"{type(self).__name__} needs at least one modality")
        self.modalities = sorted(dims)
        self.dims = {m: dims[m] for m in self.modalities}
        self.out_dim = out_dim

    def check_inputs(self, features: dict[str, Features]) -> None:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"{type(self).__name__}: no features for modalities {missing}")


def projector(in_dim: int, out_dim: int) -> nn.Module:
    """Linear + LayerNorm: maps a modality's pooled features to the common fusion width."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))


def masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """Softmax over dim 1 (modalities) of ``logits`` (B, M, ...) restricted to ``present`` (B, M).

    Absent modalities get exactly 0; a row with no modality present gets all zeros (never NaN).
    """
    keep = present.reshape(present.shape + (1,) * (logits.dim() - 2))
    floor = torch.finfo(logits.dtype).min
    weights = torch.softmax(torch.where(keep, logits, torch.full((), floor, dtype=logits.dtype,
                                                                      device=logits.device)), dim=1)
    return torch.where(keep, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


def check_positive(method: str, **options: int) -> None:
    for key, value in options.items():
        if value <= 0:
            raise ConfigError(f"{method}: option '{key}' must be > 0, got {value}")
