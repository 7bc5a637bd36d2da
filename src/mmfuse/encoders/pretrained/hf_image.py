"""Hugging Face image encoder ``hf_image`` (ViT, ConvNeXt, ... through AutoModel).

Loading rules and preprocessing checks are shared: see ``hf_common``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.registry import ENCODERS
from mmfuse.data.pretrained_prep import processor_settings
from mmfuse.encoders.base import Encoder, finish_features
from mmfuse.encoders.pretrained.base import DType, Trainable, require_kind
from mmfuse.encoders.pretrained.hf_common import (
    ImagePooling,
    Init,
    _HFEncoder,
    _load_processor,
    _prepare,
    load_hf_model,
)


class HFImageEncoder(_HFEncoder):
    """pixels (B, C, H, W) -> tokens (B, cells or patches, D), pooled (B, D)."""

    kind = "image"

    def __init__(self, top: Any, backbone: Any, processor: Any | None, pooling: ImagePooling,
                 channels_last: bool) -> None:
        super().__init__(top.config, processor)
        self.backbone = backbone
        config = backbone.config
        sizes = getattr(config, "hidden_sizes", None)
        self.out_dim = int(sizes[-1] if sizes and not hasattr(config, "hidden_size") else config.hidden_size)
        self.pooling = pooling
        self.use_channels_last(channels_last)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        pixels = self.pixels_for_backbone(inputs["pixels"])
        with self.backbone_context():
            out = self.backbone(pixel_values=pixels)
        hidden = out.last_hidden_state.float()
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
        pooler = getattr(out, "pooler_output", None)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "auto" and pooler is not None and pooler.flatten(1).shape[1] == tokens.shape[2]:
            pooled = pooler.flatten(1).float()
        else:
            pooled = tokens.mean(dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return finish_features(tokens.contiguous(), mask, pooled, present)


@ENCODERS.register("hf_image")
def hf_image(context: EncoderContext, model: str, trainable: Trainable = "frozen", n_layers: int = 1,
             pooling: ImagePooling = "auto", init: Init = "pretrained", dtype: DType = "float32",
             gradient_checkpointing: bool = False, attn_implementation: str | None = None,
             channels_last: bool = False) -> Encoder:
    """Any transformers vision model: ViT, DeiT, ConvNeXt, ResNet, Swin, CLIP's vision tower."""
    require_kind(context, "image", "hf_image")
    top, source = load_hf_model(model, context, "encoders.image.model", init, attn_implementation)
    backbone = top.vision_model if hasattr(top, "vision_model") and not hasattr(top.config, "num_channels") else top
    config = backbone.config
    channels = int(getattr(config, "num_channels", 3))
    if context.channels != channels:
        raise ConfigError(f"encoder 'hf_image': '{model}' reads {channels}-channel images but data.image.mode "
                          f"gives {context.channels}: set data.image.mode: {'rgb' if channels == 3 else 'grayscale'}")
    fixed = any("position_embedding" in pname for pname, _ in backbone.named_parameters())
    size = getattr(config, "image_size", None)
    size = size[0] if isinstance(size, list | tuple) else size
    if fixed and size and context.image_size != int(size):
        raise ConfigError(f"encoder 'hf_image': '{model}' needs {size}x{size} images but data.image.size is "
                          f"{context.image_size}: set data.image.processor: {model} (or data.image.size: {size})")
    processor = _load_processor("image", source)
    if processor is not None:
        _check_image_normalisation(context, processor, model)
    _prepare(top, "hf_image", gradient_checkpointing)
    encoder = HFImageEncoder(top, backbone, processor, pooling, channels_last)
    encoder.setup("hf_image", trainable, n_layers, dtype)
    return encoder


def _check_image_normalisation(context: EncoderContext, processor: Any, model: str) -> None:
    expected = processor_settings(processor, model)
    channels = context.channels
    mean = tuple(expected["mean"]) * (channels if len(expected["mean"]) == 1 else 1)
    std = tuple(expected["std"]) * (channels if len(expected["std"]) == 1 else 1)
    if not (np.allclose(mean, context.image_mean, atol=1e-4) and np.allclose(std, context.image_std, atol=1e-4)):
        raise ConfigError(f"encoder 'hf_image': data.image normalises with mean {context.image_mean} and std "
                          f"{context.image_std} but '{model}' was trained with mean {mean} and std {std}: "
                          f"set data.image.processor: {model}")
