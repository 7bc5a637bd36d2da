"""video_frames: any image encoder run on every frame, then temporal pooling or a small Transformer.

pixels (B, T, C, H, W), frame_mask (B, T) -> tokens (B, T, D) (one per frame), mask (B, T),
pooled (B, D). The frames of the batch are folded into the image encoder's batch (B * T images),
but only the real frames of present samples run: padding frames (``fps`` sampling of a short clip)
and absent samples cost nothing and cannot move a BatchNorm statistic. The frame encoder is any
registered image encoder (``image_cnn``, ``lenet``, ``hf_image``, ``timm_image``, a plugin) with its
own options. Each frame gives its ``pooled`` vector (``frame_features: pooled``), or all its tokens
concatenated (``flatten``: a CNN's cells in order, then projected to ``dim``): pooled CNN features
are blind to *where* things are in the frame (max or mean over cells), so motion such as "moves left"
is only visible to the temporal model through ``flatten``.

``temporal: mean`` averages the frames (order-blind: a clip and its reverse look the same);
``temporal: transformer`` adds learned frame positions and a small Transformer over the frames, so
motion and order count. Frozen (``freeze: true``, or a pretrained frame encoder with
``trainable: frozen`` and ``temporal: mean``), its outputs can be stored by the feature cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.masking import masked_mean
from mmfuse.core.registry import ENCODERS
from mmfuse.encoders.base import Encoder, finish_features

Temporal = Literal["mean", "transformer"]
FrameFeatures = Literal["pooled", "flatten"]


class VideoFrameEncoder(Encoder):
    """A frame encoder applied per frame, an optional projection, then mean or Transformer over time."""

    kind = "video"
    export_blocker = ("its frame encoder runs only on the real frames of present clips, a data-dependent "
                      "selection that a graph export cannot follow; video models run in PyTorch only")

    def __init__(self, frame_encoder: Encoder, max_frames: int, temporal: Temporal, dim: int | None,
                 layers: int, heads: int, dropout: float, frame_features: FrameFeatures = "pooled",
                 frame_width: int = 0) -> None:
        """``frame_width``: the width of one frame's features (the encoder's out_dim, or tokens x out_dim
        for ``flatten``)."""
        super().__init__()
        self.frame_encoder = frame_encoder
        self.frame_features = frame_features
        self.frame_width = frame_width or frame_encoder.out_dim
        self.out_dim = dim or self.frame_width
        self.proj: nn.Module = nn.Linear(self.frame_width, dim) if dim else nn.Identity()
        self.temporal = temporal
        self.transformer: nn.TransformerEncoder | None = None
        if temporal == "transformer":
            self.position = nn.Parameter(torch.randn(max_frames, self.out_dim) * 0.02)
            layer = nn.TransformerEncoderLayer(self.out_dim, heads, 2 * self.out_dim, dropout, batch_first=True,
                                               norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(self.out_dim)

    def save_assets(self, folder: Path) -> None:
        """The frame encoder's architecture files (a pretrained backbone's config), as an image encoder saves them."""
        save_assets = getattr(self.frame_encoder, "save_assets", None)
        if callable(save_assets):
            save_assets(folder)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        pixels, frame_mask = inputs["pixels"], inputs["frame_mask"]
        batch, steps = frame_mask.shape
        valid = frame_mask & present[:, None]
        flat = pixels.reshape(batch * steps, *pixels.shape[2:])
        rows = valid.reshape(-1).nonzero().flatten()
        per_frame = flat.new_zeros(batch * steps, self.frame_width)
        if rows.numel():
            ones = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
            frames = self.frame_encoder({"pixels": flat.index_select(0, rows)}, ones)
            values = frames.pooled if self.frame_features == "pooled" else frames.tokens.flatten(1)
            per_frame = per_frame.index_copy(0, rows, values.to(per_frame.dtype))
        x = self.proj(per_frame.reshape(batch, steps, -1))
        if self.transformer is not None:
            if steps > self.position.shape[0]:
                raise ConfigError(f"video_frames: a batch has {steps} frames per clip but the encoder was built for "
                                  f"{self.position.shape[0]} (data.video.frames)")
            # A clip with no real frame would attend over nothing (NaN): let it attend to its first
            # position; finish_features zeroes its outputs.
            attend = valid.clone()
            attend[:, 0] |= ~valid.any(dim=1)
            x = self.norm(self.transformer(x + self.position[:steps], src_key_padding_mask=~attend))
        return finish_features(x, valid, masked_mean(x, valid), present)


@ENCODERS.register("video_frames")
def video_frames(context: EncoderContext, frame_encoder: str = "image_cnn", frame_options: dict[str, Any] | None = None,
                 temporal: Temporal = "mean", dim: int | None = None, layers: int = 1, heads: int = 4,
                 dropout: float = 0.1, frame_features: FrameFeatures = "pooled") -> Encoder:
    """``frame_encoder`` (an image encoder's registry name) with ``frame_options`` on each frame, then
    ``temporal`` pooling; ``dim`` projects the frame features first (null: the frame encoder's width;
    required with ``frame_features: flatten``)."""
    if context.kind != "video":
        raise ConfigError(f"encoder 'video_frames' reads video but the modality is of kind '{context.kind}'")
    if frame_encoder == "video_frames":
        raise ConfigError("video_frames: frame_encoder must be an image encoder, not video_frames itself")
    if temporal not in ("mean", "transformer"):
        raise ConfigError(f"video_frames: temporal must be mean or transformer, got '{temporal}'")
    options = ENCODERS.validate_options(frame_encoder, frame_options or {}, "frame_options")
    frame_context = EncoderContext(kind="image", channels=context.channels, image_size=context.image_size,
                                   image_mean=context.image_mean, image_std=context.image_std, assets=context.assets)
    encoder = ENCODERS.create(frame_encoder, context=frame_context, **options)
    if not isinstance(encoder, Encoder) or encoder.kind != "image":
        raise ConfigError(f"video_frames: frame_encoder '{frame_encoder}' is not an image encoder")
    if frame_features not in ("pooled", "flatten"):
        raise ConfigError(f"video_frames: frame_features must be pooled or flatten, got '{frame_features}'")
    frame_width = encoder.out_dim
    if frame_features == "flatten":
        if dim is None:
            raise ConfigError("video_frames: frame_features flatten needs dim (the width its concatenated tokens "
                              "are projected to)")
        frame_width = _token_count(encoder, context) * encoder.out_dim
    width = dim or frame_width
    if temporal == "transformer" and width % heads:
        raise ConfigError(f"video_frames: the temporal transformer's width ({width}) must be divisible by "
                          f"heads ({heads}); set dim or heads")
    if dim is not None and dim < 1:
        raise ConfigError(f"video_frames: dim must be >= 1, got {dim}")
    return VideoFrameEncoder(encoder, max(1, context.max_length), temporal, dim, layers, heads, dropout,
                             frame_features, frame_width)


def _token_count(encoder: Encoder, context: EncoderContext) -> int:
    """How many tokens the frame encoder gives per frame: one dry run on a blank frame (eval, no grad)."""
    was_training = encoder.training
    blank = torch.zeros(1, context.channels, context.image_size, context.image_size)
    with torch.no_grad():
        tokens = encoder.eval()({"pixels": blank}, torch.ones(1, dtype=torch.bool)).tokens
    encoder.train(was_training)
    return int(tokens.shape[1])
