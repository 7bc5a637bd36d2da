"""Tasks: targets, losses, metrics and decoding. Importing this registers every built-in task."""

from mmfuse.core.registry import TASKS
from mmfuse.tasks import autoencoder, captioning, classification, contrastive, regression, sentiment
from mmfuse.tasks.base import HeadTask, Task

__all__ = [
    "TASKS", "HeadTask", "Task", "autoencoder", "captioning", "classification", "contrastive", "regression",
    "sentiment",
]
