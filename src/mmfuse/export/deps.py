"""The optional packages export needs, imported on first use with an install hint.

``onnx``, ``onnxscript`` and ``onnxruntime`` are the ``mmfuse[onnx]`` extra: importing mmfuse must
not need them, and a user who lacks one should read how to get it rather than a bare ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmfuse.core.errors import MMFuseError


def require(module: str) -> ModuleType:
    """``import module``, or an MMFuseError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MMFuseError(f"ONNX export needs the '{module}' package: pip install 'mmfuse[onnx]'") from None
