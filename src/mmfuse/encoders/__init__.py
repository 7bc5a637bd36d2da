"""Encoders: one per modality, each returning ``Features``. Importing this registers the built-ins."""

from mmfuse.core.registry import ENCODERS
from mmfuse.encoders import builtin, features, pretrained, video
from mmfuse.encoders.base import Encoder, absent_features

__all__ = ["ENCODERS", "Encoder", "absent_features", "builtin", "features", "pretrained", "video"]
