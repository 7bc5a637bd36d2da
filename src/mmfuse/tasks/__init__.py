"""Tasks: targets, losses, metrics and decoding. Importing this registers every built-in task."""

from mmfuse.tasks import classification, regression
from mmfuse.tasks.base import TASKS, Task

__all__ = ["TASKS", "Task", "classification", "regression"]
