"""Graph fusion: modalities as nodes with attention-weighted message passing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import masked_mean, stack_presence
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion
from mmfuse.fusion.transformer import FeedForward, check_width


class GraphAttentionLayer(nn.Module):
    """One round of multi-head attention message passing over a masked adjacency.

    nodes (B, N, dim), adjacency (B, N, N) bool (``adjacency[b, i, j]``: node i receives from node j)
    -> (B, N, dim). Messages are weighted by softmax attention over each node's neighbours (GAT,
    Veličković et al. 2018, with scaled dot-product scores as in Shi et al. 2021's graph transformer),
    then a residual update and a residual FFN. Every row of the adjacency must have at least one
    True entry (a self-loop), so no softmax runs over nothing.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ff = FeedForward(dim, dropout)

    def forward(self, nodes: Tensor, adjacency: Tensor) -> Tensor:
        batch, n, dim = nodes.shape
        q, k, v = self.qkv(self.norm(nodes)).view(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        messages = F.scaled_dot_product_attention(q, k, v, attn_mask=adjacency[:, None])
        nodes = nodes + self.drop(self.out(messages.transpose(1, 2).reshape(batch, n, dim)))
        return self.ff(nodes)


@FUSIONS.register("graph")
class GraphFusion(Fusion):
    """Graph fusion: each modality is a node of a fully connected graph (in the spirit of Mai et al.
    2020's graph fusion network and MultiBench's graph-based fusion), updated by ``layers`` rounds of
    multi-head attention message passing (GAT-style, Veličković et al. 2018).

    pooled (B, D_m) per modality -> Linear + LayerNorm to (B, dim) + a learned node embedding ->
    nodes (B, M, dim) in sorted modality order -> ``layers`` GraphAttentionLayers over the adjacency
    ``present_i & present_j`` (self-loops included) -> LayerNorm -> mean over present nodes ->
    MLP -> (B, out_dim).

    Missing modalities: an absent node neither sends nor receives messages (masked adjacency; it
    keeps only a self-loop so its own row stays finite) and is excluded from the readout, so a sample
    whose only present node is A is computed exactly as A's node alone. A sample with no modality
    present reads out the zero vector. Only ``pooled`` features are used (not tokens).
    """

    def __init__(self, dims: dict[str, int], out_dim: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_width("graph", dim, heads)
        if layers < 1:
            raise ConfigError(f"graph: layers must be >= 1 (got {layers})")
        self.project = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for m, d in self.dims.items()
        })
        self.node = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in self.modalities})
        self.layers = nn.ModuleList([GraphAttentionLayer(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), mlp(dim, hidden, out_dim, dropout))

    def node_states(self, features: dict[str, Features]) -> tuple[Tensor, Tensor]:
        """Final node states (B, M, dim) in sorted modality order, and presence (B, M) bool."""
        self.check_inputs(features)
        nodes = []
        for m in self.modalities:
            f = features[m]
            pooled = torch.where(f.present[:, None], f.pooled, torch.zeros((), dtype=f.pooled.dtype,
                                                                            device=f.pooled.device))
            nodes.append(self.project[m](pooled) + self.node[m])
        h = torch.stack(nodes, dim=1)
        present = stack_presence(features, self.modalities)
        eye = torch.eye(len(self.modalities), dtype=torch.bool, device=h.device)
        adjacency = (present[:, :, None] & present[:, None, :]) | eye
        for layer in self.layers:
            h = layer(h, adjacency)
        return self.norm(h), present

    def forward(self, features: dict[str, Features]) -> Tensor:
        h, present = self.node_states(features)
        return self.head(masked_mean(h, present))
