"""Encoders: one per modality, each returning ``Features``. Importing this registers the built-ins."""

from mmfuse.encoders import builtin, features, ge2e, hf, timm_image
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderContext, absent_features, masked_mean

__all__ = [
    "ENCODERS", "Encoder", "EncoderContext", "absent_features", "builtin", "features", "ge2e", "hf",
    "masked_mean", "timm_image",
]
