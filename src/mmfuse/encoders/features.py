"""Encoders for pre-extracted feature arrays (the ``features`` modality kind).

Inputs are what ``Collator`` builds for that kind: ``values`` (B, T, D) float32 zero-padded to the
batch's longest sequence and ``mask`` (B, T) bool, True for real steps. A (D,) vector per sample is
a sequence of one step (T=1). Both encoders normalise each step over D with a LayerNorm first:
OpenFace/COVAREP-style features mix dimensions whose scales differ by orders of magnitude, and a
per-step norm (unlike batch statistics) never lets one sample influence another.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import ENCODERS
from mmfuse.encoders.base import Encoder, finish_features


def _require_features(context: EncoderContext, name: str) -> None:
    if context.kind != "features":
        raise ConfigError(f"encoder '{name}' reads features but the modality is of kind '{context.kind}'")
    if context.feature_dim <= 0:
        raise ConfigError(f"encoder '{name}': the feature width is unknown (fit the preprocessor first)")


class FeatureIdentityEncoder(Encoder):
    """Per-step LayerNorm + a linear projection; pooled = masked mean over the valid steps.

    values (B, T, D), mask (B, T) -> tokens (B, T, dim), pooled (B, dim). ``dim=0`` keeps the
    features as they are (out_dim = D; ``norm`` still applies when set).
    """

    kind = "features"

    def __init__(self, feature_dim: int, dim: int, norm: bool, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim or feature_dim
        self.norm = nn.LayerNorm(feature_dim) if norm else nn.Identity()
        self.proj = nn.Linear(feature_dim, dim) if dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        values, mask = inputs["values"], inputs["mask"]
        x = self.dropout(self.proj(self.norm(values))) * mask[..., None].to(values.dtype)
        return finish_features(x, mask, masked_mean(x, mask), present)


class FeatureSequenceEncoder(Encoder):
    """Per-step LayerNorm, projection, learned positions and a small pre-norm Transformer encoder.

    values (B, T, D), mask (B, T) -> tokens (B, T, dim), pooled (B, dim) = masked mean. Padding
    steps are excluded from attention and from the mean, so a sequence gives the same features
    however much its batch pads it. ``layers=0`` is projection + positions only.
    """

    kind = "features"

    def __init__(self, feature_dim: int, max_length: int, dim: int, layers: int, heads: int,
                 ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim
        self.norm_in = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, dim)
        self.position = nn.Embedding(max_length, dim)
        self.encoder: nn.Module | None = None
        if layers:
            layer = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        values, mask = inputs["values"], inputs["mask"]
        steps = values.shape[1]
        if steps > self.position.num_embeddings:
            raise ValueError(f"sequence of {steps} steps exceeds max_length {self.position.num_embeddings}")
        positions = torch.arange(steps, device=values.device)
        x = self.proj(self.norm_in(values)) + self.position(positions)[None]
        if self.encoder is not None:
            # A row with no valid step would softmax over nothing (NaN): let it attend to its first
            # (padding) position; finish_features zeroes such rows.
            attend = mask.clone()
            attend[:, 0] |= ~mask.any(dim=1)
            x = self.encoder(x, src_key_padding_mask=~attend)
        x = self.norm_out(x) * mask[..., None].to(x.dtype)
        return finish_features(x, mask, masked_mean(x, mask), present)


@ENCODERS.register("identity")
def identity(context: EncoderContext, dim: int = 64, norm: bool = True, dropout: float = 0.0) -> Encoder:
    """Pre-extracted features, projected to ``dim`` (0 = unchanged), mean-pooled over steps."""
    _require_features(context, "identity")
    if dim < 0:
        raise ConfigError(f"identity: dim must be >= 0 (0 keeps the feature width), got {dim}")
    return FeatureIdentityEncoder(context.feature_dim, dim, norm, dropout)


@ENCODERS.register("sequence")
def sequence(context: EncoderContext, dim: int = 64, layers: int = 1, heads: int = 4, ff_mult: int = 2,
             dropout: float = 0.1) -> Encoder:
    """Pre-extracted feature sequences through a small Transformer encoder (``layers=0``: none)."""
    _require_features(context, "sequence")
    if dim <= 0 or layers < 0:
        raise ConfigError(f"sequence: dim must be > 0 and layers >= 0, got dim={dim}, layers={layers}")
    if layers and dim % heads:
        raise ConfigError(f"sequence: dim ({dim}) must be divisible by heads ({heads})")
    return FeatureSequenceEncoder(context.feature_dim, max(1, context.max_length), dim, layers, heads, ff_mult,
                                  dropout)
