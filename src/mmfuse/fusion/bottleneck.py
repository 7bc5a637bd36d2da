"""Bottleneck-token fusion (MBT): modalities exchange information only through a few shared tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import masked_mean, stack_presence
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion
from mmfuse.fusion.transformer import TokenEmbedding, TransformerBlock, check_width


@dataclass
class BottleneckStates:
    """What the bottleneck transformer computes before its head.

    cls:        modality -> (B, dim) final CLS token of each modality's stream.
    bottleneck: (B, n_bottlenecks, dim) final shared fusion tokens; None without fusion layers.
    """

    cls: dict[str, Tensor]
    bottleneck: Tensor | None


@FUSIONS.register("bottleneck")
class BottleneckFusion(Fusion):
    """Multimodal Bottleneck Transformer (Nagrani et al. 2021, "Attention Bottlenecks for Multimodal
    Fusion", MBT).

    tokens (B, T_m, D_m) per modality -> Linear to (B, T_m, dim) + sinusoidal positions + modality
    embedding, a learned CLS token prepended -> (B, 1 + T_m, dim). ``layers`` pre-norm self-attention
    blocks with separate weights per modality; the first ``fusion_layer`` are modality-separate. In
    each later layer every modality self-attends over [its CLS and tokens; ``n_bottlenecks`` shared
    fusion tokens] and the bottleneck tokens become the mean of the modalities' updated copies: the
    bottleneck is the only path between modalities. Readout: the mean of the present modalities'
    final CLS tokens, concatenated with the mean of the final bottleneck tokens (so that even a single
    fusion layer, whose updated bottleneck no CLS reads, fuses) -> LayerNorm -> MLP -> (B, out_dim).

    Missing modalities: an absent modality's tokens are never keys, its bottleneck copy is excluded
    from the bottleneck mean (a sample with no modality present keeps the learned initial bottleneck)
    and its CLS token is excluded from the CLS mean (zeros when nothing is present). With
    ``fusion_layer == layers`` there is no exchange at all, no bottleneck, and the readout is the CLS
    mean alone.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 fusion_layer: int = 1, n_bottlenecks: int = 4, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_width("bottleneck", dim, heads)
        if layers < 1 or not 0 <= fusion_layer <= layers:
            raise ConfigError(f"bottleneck: need layers >= 1 and 0 <= fusion_layer <= layers "
                              f"(got layers={layers}, fusion_layer={fusion_layer})")
        if n_bottlenecks < 1:
            raise ConfigError(f"bottleneck: n_bottlenecks must be >= 1 (got {n_bottlenecks})")
        self.fusion_layer = fusion_layer
        self.embed = TokenEmbedding(self.dims, dim)
        self.cls = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in self.modalities})
        self.blocks = nn.ModuleDict({
            m: nn.ModuleList([TransformerBlock(dim, heads, dropout, cross=False) for _ in range(layers)])
            for m in self.modalities
        })
        fuses = fusion_layer < layers
        self.bottlenecks: nn.Parameter | None = nn.Parameter(torch.randn(n_bottlenecks, dim) * 0.02) if fuses else None
        self.norm = nn.LayerNorm(dim)
        readout = 2 * dim if fuses else dim
        self.head = nn.Sequential(nn.Dropout(dropout), mlp(readout, hidden, out_dim, dropout))

    def encode(self, features: dict[str, Features]) -> BottleneckStates:
        """Runs the per-modality streams and the bottleneck exchange; see ``BottleneckStates``."""
        self.check_inputs(features)
        seqs, valids = {}, {}
        for m in self.modalities:
            x, valid = self.embed(m, features[m])
            seqs[m] = torch.cat([self.cls[m].to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
            valids[m] = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        present = stack_presence(features, self.modalities)
        anything = present.any(dim=1)[:, None, None]
        z: Tensor | None = None
        if self.bottlenecks is not None:
            first = seqs[self.modalities[0]]
            z = self.bottlenecks.to(first.dtype).expand(first.shape[0], -1, -1)
        blocks = {m: cast(nn.ModuleList, self.blocks[m]) for m in self.modalities}
        for index in range(len(blocks[self.modalities[0]])):
            if index < self.fusion_layer or z is None:
                seqs = {m: blocks[m][index](s, s, valids[m]) for m, s in seqs.items()}
                continue
            copies = []
            for m in self.modalities:
                length = seqs[m].shape[1]
                joint = torch.cat([seqs[m], z], dim=1)
                joint_valid = torch.cat([valids[m], torch.ones_like(valids[m][:, :1]).expand(-1, z.shape[1])], dim=1)
                out = blocks[m][index](joint, joint, joint_valid)
                seqs[m] = out[:, :length]
                copies.append(out[:, length:].flatten(1))
            mean = masked_mean(torch.stack(copies, dim=1), present).view_as(z)
            z = torch.where(anything, mean, z)
        return BottleneckStates(cls={m: self.norm(s[:, 0]) for m, s in seqs.items()},
                                bottleneck=None if z is None else self.norm(z))

    def forward(self, features: dict[str, Features]) -> Tensor:
        states = self.encode(features)
        readout = masked_mean(torch.stack([states.cls[m] for m in self.modalities], dim=1),
                                       stack_presence(features, self.modalities))
        if states.bottleneck is not None:
            readout = torch.cat([readout, states.bottleneck.mean(dim=1)], dim=-1)
        return self.head(readout)
