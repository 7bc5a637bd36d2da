"""Late (decision-level) fusion."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.layers import mlp
from mmfuse.core.masking import masked_mean, present_pooled, stack_presence
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion


@FUSIONS.register("late", common=(), why="its width is the task's number of outputs")
class LateFusion(Fusion):
    """Each modality predicts on its own; predictions are averaged over the present modalities.

    pooled (B, D_m) per modality -> per-modality MLP -> (B, out_dim) logits -> masked mean over
    present modalities -> (B, out_dim). ``out_dim`` is the task's number of outputs (the model passes
    it), so a config's ``fusion.out_dim`` is refused; no MLP head follows it, so the task's
    ``head_hidden``/``head_dropout`` are refused too (``hidden``/``dropout`` size the per-modality
    heads). Averaging logits is a product of experts: each modality votes with its log-odds, and an
    absent modality simply does not vote. A sample with no modality present gets all-zero logits (a
    uniform prediction), never NaN.
    """

    decision_level = True

    def __init__(self, dims: dict[str, int], out_dim: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        self.heads = nn.ModuleDict({m: mlp(d, hidden, out_dim, dropout) for m, d in self.dims.items()})

    def forward(self, features: dict[str, Features]) -> Tensor:
        self.check_inputs(features)
        votes = torch.stack([self.heads[m](present_pooled(features[m])) for m in self.modalities], dim=1)
        return masked_mean(votes, stack_presence(features, self.modalities))

