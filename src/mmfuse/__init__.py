"""mmfuse: multimodal fusion learning over text, images and audio.

The public API is re-exported here lazily (PEP 562), so ``mmfuse --version`` or ``mmfuse data
synth`` do not pay for importing torch and Lightning. Any access to a registry imports its
package, which registers every built-in, so ``list_fusions()`` is always complete.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmfuse.core.version import __version__

_EXPORTS = {
    "Batch": "mmfuse.core.contracts",
    "Features": "mmfuse.core.contracts",
    "ConfigError": "mmfuse.core.errors",
    "DataError": "mmfuse.core.errors",
    "MMFuseError": "mmfuse.core.errors",
    "ExperimentConfig": "mmfuse.config",
    "load_config": "mmfuse.config",
    "validate_config": "mmfuse.config",
    "ENCODERS": "mmfuse.encoders",
    "FUSIONS": "mmfuse.fusion",
    "Fusion": "mmfuse.fusion",
    "TASKS": "mmfuse.tasks",
    "MultimodalModel": "mmfuse.model",
    "train": "mmfuse.engine.fit",
}

if TYPE_CHECKING:
    from mmfuse.config import ExperimentConfig, load_config, validate_config
    from mmfuse.core.contracts import Batch, Features
    from mmfuse.core.errors import ConfigError, DataError, MMFuseError
    from mmfuse.encoders import ENCODERS
    from mmfuse.engine.fit import train
    from mmfuse.fusion import FUSIONS, Fusion
    from mmfuse.model import MultimodalModel
    from mmfuse.tasks import TASKS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmfuse' has no attribute '{name}'")


def list_encoders() -> list[str]:
    from mmfuse.encoders import ENCODERS

    return ENCODERS.names()


def list_fusions() -> list[str]:
    from mmfuse.fusion import FUSIONS

    return FUSIONS.names()


def list_tasks() -> list[str]:
    from mmfuse.tasks import TASKS

    return TASKS.names()


__all__ = [
    "ENCODERS",
    "FUSIONS",
    "TASKS",
    "Batch",
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "Features",
    "Fusion",
    "MMFuseError",
    "MultimodalModel",
    "__version__",
    "list_encoders",
    "list_fusions",
    "list_tasks",
    "load_config",
    "train",
    "validate_config",
]
