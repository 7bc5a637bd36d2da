"""Attention-based fusion over token sequences: cross-modal (MulT), co-attention, bottleneck tokens (MBT).

All three read ``Features.tokens`` (B, T_m, D_m) with ``mask`` (B, T_m); token lengths and widths may
differ per modality. A token is a valid key only where ``mask & present``: an absent sample's tokens
are replaced by zeros with ``torch.where`` before anything reads them (never multiplied by a mask,
since NaN * 0 = NaN), and every attention appends one learned, always-valid "sink" key/value to
its keys, so a query whose partner modality is absent attends to the sink instead of a softmax
over nothing (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.errors import ConfigError
from mmfuse.fusion.base import FUSIONS, Fusion, masked_modality_mean, mlp, stack_presence
from mmfuse.types import Features


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


def masked_token_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of (B, T, D) over valid tokens -> (B, D); a row without valid tokens gives zeros."""
    total = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    return total / valid.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)


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
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in modalities})
        self.mix = nn.Sequential(nn.Dropout(dropout), mlp(len(modalities) * dim, hidden, out_dim, dropout))

    def forward(self, states: dict[str, Tensor], features: dict[str, Features]) -> Tensor:
        parts = [torch.where(features[m].present[:, None], states[m], self.missing[m].to(states[m].dtype))
                 for m in self.modalities]
        return self.mix(torch.cat(parts, dim=-1))


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
            states[m] = masked_token_mean(self.norm(h), valid_m)
        return states

    def forward(self, features: dict[str, Features]) -> Tensor:
        return self.head(self.target_states(features), features)


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
        return {m: masked_token_mean(self.norm(x[m]), valid[m]) for m in self.modalities}

    def forward(self, features: dict[str, Features]) -> Tensor:
        return self.head(self.modality_states(features), features)


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
            mean = masked_modality_mean(torch.stack(copies, dim=1), present).view_as(z)
            z = torch.where(anything, mean, z)
        return BottleneckStates(cls={m: self.norm(s[:, 0]) for m, s in seqs.items()},
                                bottleneck=None if z is None else self.norm(z))

    def forward(self, features: dict[str, Features]) -> Tensor:
        states = self.encode(features)
        readout = masked_modality_mean(torch.stack([states.cls[m] for m in self.modalities], dim=1),
                                       stack_presence(features, self.modalities))
        if states.bottleneck is not None:
            readout = torch.cat([readout, states.bottleneck.mean(dim=1)], dim=-1)
        return self.head(readout)
