"""Tasks: targets, losses, metrics and decoding. Importing this registers every built-in task."""

from mmfuse.tasks import autoencoder, captioning, classification, contrastive, regression, sentiment
from mmfuse.tasks.base import TASKS, HeadTask, Task

__all__ = [
    "TASKS", "HeadTask", "Task", "autoencoder", "captioning", "classification", "contrastive", "regression",
    "sentiment",
]
