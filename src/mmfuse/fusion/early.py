"""Early fusion: concatenate every modality's projected vector, then mix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.layers import mlp
from mmfuse.core.masking import MissingEmbedding, present_pooled
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion, projector


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """Early fusion: project each modality's pooled features, concatenate, mix with an MLP.

    pooled (B, D_m) per modality -> Linear+LayerNorm to (B, proj_dim) -> concat in sorted modality
    order (B, M * proj_dim) -> MLP -> (B, out_dim). An absent modality is replaced by a learned
    per-modality "missing" embedding, so the network can tell "absent" from any real input and the
    absent sample's values never reach the output.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, proj_dim: int = 64, hidden: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        self.project = nn.ModuleDict({m: projector(d, proj_dim) for m, d in self.dims.items()})
        self.missing = MissingEmbedding(self.modalities, proj_dim)
        self.mix = nn.Sequential(nn.Dropout(dropout), mlp(len(self.modalities) * proj_dim, hidden, out_dim, dropout))

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        parts = []
        for m in self.modalities:
            f = features[m]
            projected = self.project[m](present_pooled(f))
            parts.append(self.missing(m, projected, f.present))
        return self.mix(torch.cat(parts, dim=-1))
