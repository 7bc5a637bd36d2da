"""Presence-aware tensor helpers: the one place where "absent" is turned into arithmetic.

Every encoder, fusion method and task reads presence through these functions, so the rule "an
absent row's values (zeros, garbage, NaN, inf) never reach a result" is written once. Selections
use ``torch.where`` rather than multiplication by the mask: ``NaN * 0`` is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features


def zero_absent(values: Tensor, present: Tensor) -> Tensor:
    """``values`` with every row whose ``present`` is False replaced by zeros (NaN/inf included).

    ``present`` is (B,) or matches the leading dims of ``values``; it broadcasts over the rest.
    """
    keep = present.reshape(present.shape + (1,) * (values.dim() - present.dim()))
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, N, D) over the N positions where ``mask`` (B, N) is True.

    Rows with nothing valid give zeros, never NaN, and masked positions' values (even NaN) are
    ignored. Used for token pooling (N = tokens) and for averaging over modalities (N = modalities).
    """
    weights = mask.to(values.dtype).unsqueeze(-1)
    total = zero_absent(values, mask).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)


def stack_presence(features: dict[str, Features], modalities: list[str]) -> Tensor:
    """(B, M) bool presence matrix in the given modality order."""
    return torch.stack([features[m].present for m in modalities], dim=1)


def present_pooled(f: Features) -> Tensor:
    """``f.pooled`` with absent rows replaced by zeros, so NaN/inf cannot leak.

    Cleaning the input before any layer also keeps the backward pass finite: a NaN row pushed
    through a Linear would make the weight gradient NaN even if its output were discarded later.
    """
    return zero_absent(f.pooled, f.present)


def drop_modalities(present: dict[str, Tensor], rate: float) -> dict[str, Tensor]:
    """Hides each present modality of each sample with probability ``rate`` (modality dropout).

    A sample never loses all of its modalities: if every one would be dropped, one of those it had,
    chosen at random, stays. Teaches the model to predict from any subset it may meet at test time.
    """
    if rate <= 0:
        return present
    names = sorted(present)
    original = torch.stack([present[m] for m in names], dim=1)
    kept = original & (torch.rand(original.shape, device=original.device) >= rate)
    rescue_scores = torch.rand(original.shape, device=original.device).masked_fill(~original, -1.0)
    rescued = nn.functional.one_hot(rescue_scores.argmax(dim=1), len(names)).bool() & original
    kept = torch.where(kept.any(dim=1, keepdim=True), kept, rescued)
    return {m: kept[:, i] for i, m in enumerate(names)}


class MissingEmbedding(nn.Module):
    """One learned vector per modality that stands in for that modality's absent rows.

    With it a network can tell "absent" from any real input (a zero vector is a real input too),
    and nothing of an absent row's own values survives the substitution.
    """

    def __init__(self, modalities: list[str], dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.embedding = nn.ParameterDict({m: nn.Parameter(torch.empty(dim)) for m in modalities})
        for param in self.embedding.values():
            nn.init.normal_(param, std=std)

    def __getitem__(self, modality: str) -> nn.Parameter:
        """The learned vector of ``modality`` (to inspect or edit it)."""
        return self.embedding[modality]

    def forward(self, modality: str, values: Tensor, present: Tensor) -> Tensor:
        """(B, dim) ``values`` with absent rows replaced by the modality's learned embedding."""
        return torch.where(present[:, None], values, self.embedding[modality].to(values.dtype))

    def stacked(self, modalities: list[str], dtype: torch.dtype) -> Tensor:
        """(M, dim): the embeddings of ``modalities`` in that order."""
        return torch.stack([self.embedding[m] for m in modalities]).to(dtype)
