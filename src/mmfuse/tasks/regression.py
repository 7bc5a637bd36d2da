"""Regression on one or more numeric targets."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, PearsonCorrCoef

from mmfuse.core.registry import TASKS
from mmfuse.tasks.base import HeadTask, Task


def as_written(value: Any) -> str:
    """A target as a manifest spells it: text quoted, NaN/Infinity as JSON writes them, lists itemwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(as_written(v) for v in value) + "]"
    return repr(value)


class _MeanPearson(PearsonCorrCoef):
    """Pearson correlation averaged over the K targets: one scalar, as logging and reports need."""

    def compute(self) -> Tensor:
        return super().compute().mean()


class RegressionTask(HeadTask):
    """Predicts K numbers (a float, or a list of K floats per sample) with an MSE loss.

    Targets are standardised with the training mean/std (so one learning rate suits any scale);
    metrics and predictions are reported in the original units.
    """

    name = "regression"

    def __init__(self, num_targets: int = 1, standardize: bool = True) -> None:
        self.num_targets = num_targets
        self.standardize = standardize
        self.mean = [0.0] * num_targets
        self.std = [1.0] * num_targets

    @property
    def num_outputs(self) -> int:
        return self.num_targets

    @property
    def monitor(self) -> tuple[str, str]:
        return "mae", "min"

    def _values(self, raw: Any) -> list[float]:
        """The K finite numbers of one target; ValueError showing the bad value as written."""
        if raw is None:
            raise ValueError("the target is empty")
        values = list(raw) if isinstance(raw, list | tuple) else [raw]
        if len(values) != self.num_targets:
            raise ValueError(f"expected {self.num_targets} target value(s), got {len(values)}")
        try:
            floats = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"target {as_written(raw)} is not a number") from None
        if not all(math.isfinite(v) for v in floats):
            raise ValueError(f"target {as_written(raw)} is not a finite number")
        return floats

    def fit(self, targets: list[Any]) -> None:
        """Mean and std of the usable targets; a bad one is reported with its row when encoded.

        Failing here would name no row, and would stop ``data.on_error: skip`` from skipping it.
        """
        if not self.standardize:
            return
        usable = []
        for target in targets:
            try:
                usable.append(self._values(target))
            except ValueError:
                continue
        if not usable:
            raise ValueError("regression found no numeric target in the training data")
        data = torch.tensor(usable, dtype=torch.float64)
        self.mean = data.mean(dim=0).tolist()
        self.std = data.std(dim=0).clamp(min=1e-8).nan_to_num(1.0).tolist()

    def encode_target(self, raw: Any) -> Tensor:
        return torch.tensor(self._values(raw), dtype=torch.float32)

    def _normalise(self, target: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, device=target.device, dtype=target.dtype)
        std = torch.tensor(self.std, device=target.device, dtype=target.dtype)
        return (target - mean) / std

    def denormalise(self, outputs: Tensor) -> Tensor:
        outputs = outputs.float()
        mean = torch.tensor(self.mean, device=outputs.device)
        std = torch.tensor(self.std, device=outputs.device)
        return outputs * std + mean

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(outputs.float(), self._normalise(target.float()))

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
            "pearson": _MeanPearson(num_outputs=self.num_targets),
        })

    def metric_inputs(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        preds = self.denormalise(outputs)
        if self.num_targets == 1:
            return preds[:, 0], target[:, 0]
        return preds, target

    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        values = self.denormalise(outputs).cpu()
        return [{"value": float(row[0]) if self.num_targets == 1 else [float(v) for v in row]} for row in values]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def load_state(self, state: dict[str, Any]) -> None:
        self.mean = list(state["mean"])
        self.std = list(state["std"])


@TASKS.register("regression")
def regression(num_targets: int = 1, standardize: bool = True) -> Task:
    return RegressionTask(num_targets=num_targets, standardize=standardize)
