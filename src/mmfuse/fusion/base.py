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

from mmfuse.errors import ConfigError
from mmfuse.registry import Registry
from mmfuse.types import Features


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


FUSIONS: Registry[Fusion] = Registry("fusion", reserved=("dims", "out_dim"), entry_point_group="mmfuse.fusion")


def stack_presence(features: dict[str, Features], modalities: list[str]) -> Tensor:
    """(B, M) bool presence matrix in the given modality order."""
    return torch.stack([features[m].present for m in modalities], dim=1)


def masked_modality_mean(values: Tensor, present: Tensor) -> Tensor:
    """Mean of (B, M, D) over present modalities; a row with none present gives zeros, not NaN."""
    keep = present.unsqueeze(-1)
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=1)
    return total / keep.to(values.dtype).sum(dim=1).clamp(min=1.0)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Module:
    """Linear when hidden == 0, else Linear-GELU-Dropout-Linear."""
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def present_pooled(f: Features) -> Tensor:
    """``f.pooled`` with absent rows replaced by zeros (via ``torch.where``, so NaN/inf cannot leak).

    Cleaning the input before any layer also keeps the backward pass finite: a NaN row pushed
    through a Linear would make the weight gradient NaN even if its output were discarded later.
    """
    return torch.where(f.present[:, None], f.pooled, torch.zeros((), dtype=f.pooled.dtype, device=f.pooled.device))
