"""Co-attention fusion: every pair of modalities attends to each other."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion
from mmfuse.fusion.transformer import Attention, FeedForward, PresenceConcatHead, TokenEmbedding, check_width


@FUSIONS.register("coattention")
class CoAttentionFusion(Fusion):
    """Co-attention: two-way cross-attention between every pair of modalities (ViLBERT's
    co-attentional transformer layers, Lu et al. 2019; hierarchical co-attention, Lu et al. 2016).

    tokens (B, T_m, D_m) per modality -> Linear to (B, T_m, dim) + sinusoidal positions + modality
    embedding. Each of ``layers`` co-attention layers updates all modalities at once: for every
    unordered pair {a, b}, a's tokens attend to b's and b's attend to a's (both directions read the
    layer's input states, separate weights per direction); a modality's update is the mean of its
    cross-attention outputs over the partners present in that sample, followed by a residual FFN.
    Each modality's tokens are then masked-mean pooled -> (B, dim), concatenated in sorted order (a
    learned "missing" embedding for an absent modality) -> MLP -> (B, out_dim).

    Missing modalities: an absent partner's update is excluded from the mean (and its tokens are
    never valid keys; a learned sink key keeps attention finite); an absent modality's own vector is
    replaced by its missing embedding. Directions are named ``"source->target"`` in ``self.co``.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, dim: int = 64, heads: int = 4, layers: int = 1,
                 hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_width("coattention", dim, heads)
        if layers < 1:
            raise ConfigError(f"coattention: layers must be >= 1 (got {layers})")
        self.pairs = [(a, b) for i, a in enumerate(self.modalities) for b in self.modalities[i + 1:]]
        self.embed = TokenEmbedding(self.dims, dim)
        self.co = nn.ModuleList([
            nn.ModuleDict({f"{s}->{t}": Attention(dim, heads, dropout, cross=True)
                           for a, b in self.pairs for s, t in ((a, b), (b, a))})
            for _ in range(layers)
        ])
        self.ff = nn.ModuleList([nn.ModuleDict({m: FeedForward(dim, dropout) for m in self.modalities})
                                 for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = PresenceConcatHead(self.modalities, dim, hidden, out_dim, dropout)

    def modality_states(self, features: dict[str, Features]) -> dict[str, Tensor]:
        """Each modality's pooled co-attended representation, modality -> (B, dim)."""
        self.check_inputs(features)
        embedded = {m: self.embed(m, features[m]) for m in self.modalities}
        x = {m: e[0] for m, e in embedded.items()}
        valid = {m: e[1] for m, e in embedded.items()}
        present = {m: features[m].present for m in self.modalities}
        for co_module, ff_module in zip(self.co, self.ff, strict=True):
            co, ff = cast(nn.ModuleDict, co_module), cast(nn.ModuleDict, ff_module)
            total = {m: torch.zeros_like(x[m]) for m in self.modalities}
            count = {m: torch.zeros_like(present[m], dtype=x[m].dtype) for m in self.modalities}
            for a, b in self.pairs:
                for s, t in ((a, b), (b, a)):
                    update = co[f"{s}->{t}"](x[t], x[s], valid[s])
                    keep = present[s][:, None, None]
                    total[t] = total[t] + torch.where(keep, update, torch.zeros_like(update))
                    count[t] = count[t] + present[s].to(count[t].dtype)
            x = {m: ff[m](x[m] + total[m] / count[m].clamp(min=1.0)[:, None, None]) for m in self.modalities}
        return {m: masked_mean(self.norm(x[m]), valid[m]) for m in self.modalities}

    def forward(self, features: dict[str, Features]) -> Tensor:
        return self.head(self.modality_states(features), features)
