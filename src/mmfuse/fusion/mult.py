"""Cross-modal attention fusion (MulT)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import FUSIONS
from mmfuse.fusion.base import Fusion
from mmfuse.fusion.transformer import (
    PresenceConcatHead,
    TokenEmbedding,
    TransformerBlock,
    check_width,
)


@FUSIONS.register("mult")
class MulTFusion(Fusion):
    """Multimodal Transformer (Tsai et al. 2019, "Multimodal Transformer for Unaligned Multimodal
    Language Sequences").

    tokens (B, T_m, D_m) per modality -> Linear to (B, T_m, dim) + sinusoidal positions + modality
    embedding. For every ordered pair (source n -> target m, n != m) a cross-modal transformer of
    ``layers`` pre-norm blocks in which m's stream queries n's (low-level, embedded) tokens. A target's
    M-1 streams are concatenated (B, T_m, (M-1) * dim), projected back to dim, passed through
    ``self_layers`` self-attention blocks and masked-mean pooled over m's valid tokens -> (B, dim).
    The M target vectors are concatenated (sorted order) -> MLP -> (B, out_dim).

    Missing modalities: an absent source contributes no keys (its stream's queries see only the
    learned sink key, so they carry no information from it); an absent target's vector is replaced by
    a learned "missing" embedding. Padding tokens are never keys and are excluded from pooling. With
    a single modality the target's own tokens stand in for the (non-existent) cross-modal streams.
    """

    def __init__(self, dims: dict[str, int], out_dim: int, dim: int = 64, heads: int = 4, layers: int = 1,
                 self_layers: int = 1, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(dims, out_dim)
        check_width("mult", dim, heads)
        if layers < 1 or self_layers < 0:
            raise ConfigError(f"mult: layers must be >= 1 and self_layers >= 0 (got {layers}, {self_layers})")
        self.embed = TokenEmbedding(self.dims, dim)
        self.cross = nn.ModuleDict({
            f"{n}->{m}": nn.ModuleList([TransformerBlock(dim, heads, dropout, cross=True) for _ in range(layers)])
            for m in self.modalities for n in self.modalities if n != m
        })
        n_streams = max(1, len(self.modalities) - 1)
        self.merge = nn.ModuleDict({m: nn.Linear(n_streams * dim, dim) for m in self.modalities})
        self.self_attention = nn.ModuleDict({
            m: nn.ModuleList([TransformerBlock(dim, heads, dropout, cross=False) for _ in range(self_layers)])
            for m in self.modalities
        })
        self.norm = nn.LayerNorm(dim)
        self.head = PresenceConcatHead(self.modalities, dim, hidden, out_dim, dropout)

    def target_states(self, features: dict[str, Features]) -> dict[str, Tensor]:
        """Each target modality's pooled cross-modal representation, modality -> (B, dim)."""
        self.check_inputs(features)
        embedded = {m: self.embed(m, features[m]) for m in self.modalities}
        states = {}
        for m in self.modalities:
            x_m, valid_m = embedded[m]
            streams = []
            for n in self.modalities:
                if n == m:
                    continue
                x_n, valid_n = embedded[n]
                z = x_m
                for block in cast(nn.ModuleList, self.cross[f"{n}->{m}"]):
                    z = block(z, x_n, valid_n)
                streams.append(z)
            h = self.merge[m](torch.cat(streams, dim=-1) if streams else x_m)
            for block in cast(nn.ModuleList, self.self_attention[m]):
                h = block(h, h, valid_m)
            states[m] = masked_mean(self.norm(h), valid_m)
        return states

    def forward(self, features: dict[str, Features]) -> Tensor:
        return self.head(self.target_states(features), features)
