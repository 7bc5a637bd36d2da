"""Multi-class and multi-label classification."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

from mmfuse.core.registry import TASKS
from mmfuse.tasks.base import HeadTask, Task
from mmfuse.tasks.temperature import PresenceTemperature

_INTEGER = re.compile(r"[+-]?[0-9]+")
EXPLICIT_NO_LABELS = "[]"
"""A multi-label target written as this text (CSV/TSV) means "no labels", like an empty JSON list."""


def _label_text(raw: Any) -> str:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        raise ValueError("the target is empty")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return str(raw).strip()


class ClassificationTask(HeadTask):
    """Single-label classification over fitted label names; softmax cross-entropy.

    After training, ``temperature`` (fitted on the validation split, see ``tasks/temperature.py``)
    rescales the logits by the sample's set of present modalities; until then it is None and the
    outputs are the head's own logits.
    """

    name = "classification"

    def __init__(self, labels: list[str] | None = None, label_smoothing: float = 0.0) -> None:
        self.labels: list[str] = list(labels or [])
        self.label_smoothing = label_smoothing
        self.temperature: PresenceTemperature | None = None

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def monitor(self) -> tuple[str, str]:
        return "accuracy", "max"

    def fit(self, targets: list[Any]) -> None:
        """Label names from the non-empty targets; an empty one is reported with its row when encoded."""
        if self.labels:
            return
        names = set()
        for target in targets:
            try:
                names.add(_label_text(target))
            except ValueError:
                continue
        # Integer-looking labels sort numerically so label 10 does not come before label 2.
        # Ties ("1", "01") are broken by the text, so the order never depends on set iteration order.
        self.labels = sorted(names, key=lambda s: (0, int(s), s) if _INTEGER.fullmatch(s) else (1, 0, s))
        if len(self.labels) < 2:
            raise ValueError(f"classification needs at least 2 labels in the training data, found {self.labels}")

    def encode_target(self, raw: Any) -> Tensor:
        label = _label_text(raw)
        try:
            return torch.tensor(self.labels.index(label))
        except ValueError:
            raise ValueError(f"label '{label}' is not one of the {len(self.labels)} training labels") from None

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), target, label_smoothing=self.label_smoothing)

    def calibrate(self, logits: Tensor, present: dict[str, Tensor]) -> Tensor:
        """The head's logits divided by the temperature of each sample's presence pattern."""
        return logits if self.temperature is None else self.temperature.scale(logits, present)

    def metric_inputs(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Probabilities: the calibration error reads them as such (given logits, torchmetrics would
        take small ones for probabilities); the arg-max metrics are the same either way."""
        return outputs.float().softmax(dim=-1), target

    def metrics(self) -> MetricCollection:
        """Decision metrics plus ``ece``: expected calibration error (15 equal-width confidence bins,
        top-label, L1), lower is better: how far the confidence of the predicted label is from how
        often it is right."""
        n = self.num_outputs
        return MetricCollection({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "macro_f1": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average="macro"),
            "recall": MulticlassRecall(n, average="macro"),
            "ece": MulticlassCalibrationError(n, n_bins=15, norm="l1"),
        })

    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        probs = outputs.float().softmax(dim=-1).cpu()
        return [
            {"label": self.labels[int(row.argmax())],
             "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, row, strict=True)}}
            for row in probs
        ]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"labels": self.labels}
        if self.temperature is not None:
            state["temperature"] = self.temperature.state()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.labels = list(state["labels"])
        self.temperature = PresenceTemperature.from_state(state["temperature"]) if "temperature" in state else None


class MultilabelTask(HeadTask):
    """Any number of labels per sample, given as a list or a separator-joined string; sigmoid BCE.

    "No labels" must be written: an empty list (JSON/Parquet ``[]``) or the text ``[]`` (CSV/TSV,
    whose cells are text). A missing target (null, NaN, an empty cell or blank text) is an error
    naming the row, or a counted skip under ``data.on_error: skip``: an empty cell is as likely
    a forgotten annotation as a sample with no labels, and reading it as all-negative would teach
    the model wrong answers without a word.
    """

    name = "multilabel"

    def __init__(self, labels: list[str] | None = None, separator: str = "|", threshold: float = 0.5) -> None:
        self.labels: list[str] = list(labels or [])
        self.separator = separator
        self.threshold = threshold

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def monitor(self) -> tuple[str, str]:
        return "macro_f1", "max"

    def _split(self, raw: Any) -> list[str]:
        """The labels of one target; raises ValueError for a missing one (see the class docstring)."""
        if isinstance(raw, list | tuple):
            return [str(i).strip() for i in raw if str(i).strip()]
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or not str(raw).strip():
            raise ValueError("the target is empty (write [] for a sample with no labels)")
        text = str(raw).strip()
        if text == EXPLICIT_NO_LABELS:
            return []
        labels = [part.strip() for part in text.split(self.separator) if part.strip()]
        if not labels:
            raise ValueError(f"target {raw!r} names no label (write [] for a sample with no labels)")
        return labels

    def fit(self, targets: list[Any]) -> None:
        """Label names from the usable targets; a missing one is reported with its row when encoded."""
        if self.labels:
            return
        names: set[str] = set()
        for target in targets:
            try:
                names.update(self._split(target))
            except ValueError:
                continue
        self.labels = sorted(names)
        if not self.labels:
            raise ValueError("multilabel found no labels in the training data")

    def encode_target(self, raw: Any) -> Tensor:
        target = torch.zeros(len(self.labels))
        for label in self._split(raw):
            if label not in self.labels:
                raise ValueError(f"label '{label}' is not one of the {len(self.labels)} training labels")
            target[self.labels.index(label)] = 1.0
        return target

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs.float(), target)

    def metrics(self) -> MetricCollection:
        n = self.num_outputs
        return MetricCollection({
            "accuracy": MultilabelAccuracy(n, threshold=self.threshold, average="micro"),
            "exact_match": MultilabelExactMatch(n, threshold=self.threshold),
            "macro_f1": MultilabelF1Score(n, threshold=self.threshold, average="macro"),
            "precision": MultilabelPrecision(n, threshold=self.threshold, average="macro"),
            "recall": MultilabelRecall(n, threshold=self.threshold, average="macro"),
        })

    def metric_inputs(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return outputs.float().sigmoid(), target.long()

    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        probs = outputs.float().sigmoid().cpu()
        return [
            {"labels": [n for n, p in zip(self.labels, row, strict=True) if p >= self.threshold],
             "probabilities": {n: round(float(p), 6) for n, p in zip(self.labels, row, strict=True)}}
            for row in probs
        ]

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def load_state(self, state: dict[str, Any]) -> None:
        self.labels = list(state["labels"])


@TASKS.register("classification")
def classification(labels: list[str] | None = None, label_smoothing: float = 0.0) -> Task:
    return ClassificationTask(labels=labels, label_smoothing=label_smoothing)


@TASKS.register("multilabel")
def multilabel(labels: list[str] | None = None, separator: str = "|", threshold: float = 0.5) -> Task:
    return MultilabelTask(labels=labels, separator=separator, threshold=threshold)
