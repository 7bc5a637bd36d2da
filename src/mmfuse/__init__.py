"""mmfuse: multimodal fusion learning over text, images and audio.

The public API is re-exported here; importing the package registers every built-in encoder,
fusion method and task, so ``list_fusions()`` is complete without further imports.
"""

__version__ = "0.1.0"

from mmfuse.config import ExperimentConfig, load_config, validate_config
from mmfuse.encoders import ENCODERS
from mmfuse.errors import ConfigError, DataError, MMFuseError
from mmfuse.fusion import FUSIONS, Fusion
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS
from mmfuse.types import Batch, Features


def list_encoders() -> list[str]:
    return ENCODERS.names()


def list_fusions() -> list[str]:
    return FUSIONS.names()


def list_tasks() -> list[str]:
    return TASKS.names()


__all__ = [
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
    "validate_config",
]
