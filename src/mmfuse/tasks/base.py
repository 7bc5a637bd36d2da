"""The task contract: how raw manifest targets become tensors, the loss, metrics and predictions.

A task has no parameters (the head lives in the model) but it has fitted state (label names,
target normalisation) that is saved next to the weights so predictions decode the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection

from mmfuse.registry import Registry


class Task(ABC):
    name: str = ""

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Width of the logits / predictions the model must produce."""

    @property
    @abstractmethod
    def monitor(self) -> tuple[str, str]:
        """(metric name, 'max' | 'min') used to select the best checkpoint."""

    @abstractmethod
    def fit(self, targets: list[Any]) -> None:
        """Learns label names / normalisation from the training targets."""

    @abstractmethod
    def encode_target(self, raw: Any) -> Tensor:
        """One raw manifest value -> a target tensor; raises ValueError with a clear reason."""

    @abstractmethod
    def loss(self, outputs: Tensor, target: Tensor) -> Tensor: ...

    @abstractmethod
    def metrics(self) -> MetricCollection: ...

    @abstractmethod
    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        """Model outputs -> one JSON-ready prediction per sample."""

    @abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None: ...

    def collate_targets(self, targets: list[Tensor]) -> Tensor:
        return torch.stack(targets)

    def metric_inputs(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """What the torchmetrics collection is updated with (float32 for bf16 runs)."""
        return outputs.float(), target


TASKS: Registry[Task] = Registry("task", entry_point_group="mmfuse.tasks")
