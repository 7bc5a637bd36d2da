"""Transformer pieces shared by the token-level fusion methods (mult, coattention, bottleneck, graph).

Token-level methods read ``Features.tokens`` (B, T_m, D_m) with ``mask`` (B, T_m); token lengths
and widths may differ per modality. A token is a valid key only where ``mask & present``: an absent
sample's tokens are replaced by zeros with ``torch.where`` before anything reads them (never
multiplied by a mask, since NaN * 0 = NaN), and every attention appends one learned, always-valid
"sink" key/value to its keys, so a query whose partner modality is absent attends to the sink
instead of a softmax over nothing (NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import MissingEmbedding


def check_width(name: str, dim: int, heads: int) -> None:
    """Clear errors for a width that the attention heads cannot split."""
    if dim < 1 or heads < 1:
        raise ConfigError(f"{name}: dim and heads must be positive (got dim={dim}, heads={heads})")
    if dim % heads:
        raise ConfigError(f"{name}: dim ({dim}) must be divisible by heads ({heads})")


def sinusoidal_positions(length: int, dim: int, like: Tensor) -> Tensor:
    """(length, dim) fixed sine/cosine positions (Vaswani et al. 2017), in ``like``'s dtype/device."""
    position = torch.arange(length, device=like.device, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=like.device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table.to(like.dtype)


class TokenEmbedding(nn.Module):
    """Per-modality token projection to a shared width.

    tokens (B, T_m, D_m) -> (B, T_m, dim): Linear + fixed sinusoidal positions + a learned modality
    embedding. Returns the embedded tokens and the valid-key mask ``mask & present`` (B, T_m);
    invalid positions (padding, absent samples) are zeroed before the projection so their values
    cannot reach anything.
    """

    def __init__(self, dims: dict[str, int], dim: int) -> None:
        super().__init__()
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in dims})

    def forward(self, modality: str, f: Features) -> tuple[Tensor, Tensor]:
        valid = f.mask.bool() & f.present[:, None]
        tokens = torch.where(valid[..., None], f.tokens, torch.zeros((), dtype=f.tokens.dtype, device=f.tokens.device))
        x = self.project[modality](tokens)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x) + self.modality[modality]
        return x, valid


class Attention(nn.Module):
    """Pre-norm multi-head attention update (no residual): queries (B, Tq, dim), keys (B, Tk, dim) -> (B, Tq, dim).

    ``key_valid`` (B, Tk) marks the keys that may be attended. One learned "sink" key/value pair is
    appended to every key sequence and is always valid, so a query with no valid key (its partner
    modality is absent) attends to the sink alone and gets a finite update that carries no
    information about the partner. With ``cross=False`` this is self-attention and ``context`` must
    be ``x`` itself. Scores and weighting are ``F.scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.heads = heads
        self.cross = cross
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else nn.Identity()
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.sink = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, key_valid: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q_in = self.norm_q(x)
        kv_in = self.norm_kv(context) if self.cross else q_in
        sink = self.sink.to(x.dtype)[:, None, None, :].expand(2, batch, 1, dim)
        key, value = self.key_value(kv_in).chunk(2, dim=-1)
        key, value = torch.cat([key, sink[0]], dim=1), torch.cat([value, sink[1]], dim=1)
        valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], dim=1)[:, None, None, :]

        def split(t: Tensor) -> Tensor:  # (B, T, dim) -> (B, heads, T, dim / heads)
            return t.view(batch, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.query(q_in)), split(key), split(value), attn_mask=valid)
        return self.drop(self.out(attended.transpose(1, 2).reshape(batch, length, dim)))


class FeedForward(nn.Module):
    """Pre-norm residual position-wise MLP: x + Dropout(FFN(LN(x))), (B, T, dim) -> (B, T, dim).

    Dropout only on the residual branches (not on attention weights or inside the FFN): on a CPU
    the random masks cost as much as the matmuls at these sizes.
    """

    def __init__(self, dim: int, dropout: float, mult: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block, self- or cross-attention: x + Attn(LN x, LN ctx), then + FFN."""

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, dropout, cross)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor, key_valid: Tensor) -> Tensor:
        return self.ff(x + self.attention(x, context, key_valid))


class PresenceConcatHead(nn.Module):
    """Per-modality vectors (B, dim) -> concat in sorted order, a learned "missing" embedding in place of
    an absent modality -> MLP -> (B, out_dim)."""

    def __init__(self, modalities: list[str], dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.modalities = modalities
        self.missing = MissingEmbedding(modalities, dim)
        self.mix = nn.Sequential(nn.Dropout(dropout), mlp(len(modalities) * dim, hidden, out_dim, dropout))

    def forward(self, states: dict[str, Tensor], features: dict[str, Features]) -> Tensor:
        parts = [self.missing(m, states[m], features[m].present) for m in self.modalities]
        return self.mix(torch.cat(parts, dim=-1))
