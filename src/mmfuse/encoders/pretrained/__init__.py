"""Pretrained encoders (Hugging Face, timm, sentence-transformers, GE2E) that load from a local source.

Importing this registers them; ``base`` holds what they share (freezing, layer selection, dtype).
"""

from mmfuse.encoders.pretrained import ge2e, hf_audio, hf_image, hf_text, timm_image
from mmfuse.encoders.pretrained.base import (
    DTYPES,
    PRETRAINED_ENCODERS,
    DType,
    PretrainedEncoder,
    Trainable,
    layer_stack,
    require_kind,
    set_trainable,
)

__all__ = [
    "DTYPES", "PRETRAINED_ENCODERS", "DType", "PretrainedEncoder", "Trainable", "ge2e", "hf_audio", "hf_image",
    "hf_text", "layer_stack", "require_kind", "set_trainable", "timm_image",
]
