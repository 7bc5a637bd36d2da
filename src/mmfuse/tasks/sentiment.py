"""Sentiment intensity regression with the metrics CMU-MOSI / MOSEI papers report.

The target is one score in [-3, 3] (MOSI's scale). Training is plain regression (MSE on the
standardised score); what differs is the report, which follows MMSA's ``eval_mosi_regression``
(the definitions MulT, MISA, Self-MM and most later papers use, so numbers are comparable):

- ``mae``, ``pearson``: on the raw scores.
- ``acc2`` / ``f1`` ("Has0" in MMSA): prediction >= 0 vs < 0 against target >= 0 vs < 0, over
  every sample; a neutral (0) target counts as positive.
- ``acc2_nonzero`` / ``f1_nonzero`` ("Non0" in MMSA, the binary accuracy MulT reports):
  samples whose target is exactly 0 are left out; prediction > 0 vs target > 0.
- ``acc7``: scores clipped to [-3, 3] and rounded to the nearest integer (halves to even, as
  numpy does), then compared as 7 classes.
- F1 scores are the support-weighted mean of the two classes' F1 (sklearn ``average='weighted'``,
  as MMSA computes them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy, MulticlassF1Score

from mmfuse.core.registry import TASKS
from mmfuse.tasks.base import Task
from mmfuse.tasks.regression import RegressionTask, _MeanPearson


def _binary(preds: Tensor, target: Tensor, nonzero: bool) -> tuple[Tensor, Tensor]:
    """Has0: (>= 0, >= 0) over all samples; Non0: (> 0, > 0) over samples with a non-zero target."""
    if nonzero:
        keep = target != 0
        return (preds[keep] > 0).long(), (target[keep] > 0).long()
    return (preds >= 0).long(), (target >= 0).long()


class SentimentAcc2(BinaryAccuracy):
    """Binary accuracy of the sentiment sign (see the module docstring for Has0 vs Non0)."""

    def __init__(self, nonzero: bool) -> None:
        super().__init__()
        self.nonzero = nonzero

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = _binary(preds, target, self.nonzero)
        if p.numel():
            super().update(p, t)


class SentimentF1(MulticlassF1Score):
    """Support-weighted F1 of the two sentiment signs (sklearn's ``average='weighted'``)."""

    def __init__(self, nonzero: bool) -> None:
        super().__init__(num_classes=2, average="weighted")
        self.nonzero = nonzero

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = _binary(preds, target, self.nonzero)
        if p.numel():
            super().update(p, t)


class SentimentAcc7(MulticlassAccuracy):
    """7-class accuracy: clip to [-3, 3], round to the nearest integer, compare."""

    def __init__(self) -> None:
        super().__init__(num_classes=7, average="micro")

    def update(self, preds: Tensor, target: Tensor) -> None:
        def to_class(x: Tensor) -> Tensor:
            return (torch.round(x.float().clamp(-3.0, 3.0)) + 3).long()

        super().update(to_class(preds), to_class(target))


class SentimentTask(RegressionTask):
    """One sentiment score per sample (MOSI: [-3, 3]); MSE training, MOSI-style metrics."""

    name = "sentiment"

    def __init__(self, standardize: bool = True) -> None:
        super().__init__(num_targets=1, standardize=standardize)

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            "mae": MeanAbsoluteError(),
            "pearson": _MeanPearson(num_outputs=1),
            "acc2": SentimentAcc2(nonzero=False),
            "acc2_nonzero": SentimentAcc2(nonzero=True),
            "f1": SentimentF1(nonzero=False),
            "f1_nonzero": SentimentF1(nonzero=True),
            "acc7": SentimentAcc7(),
        }, compute_groups=False)

    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        decoded = super().decode(outputs)
        for item in decoded:
            item["sentiment"] = "positive" if item["value"] >= 0 else "negative"
        return decoded


@TASKS.register("sentiment")
def sentiment(standardize: bool = True) -> Task:
    return SentimentTask(standardize=standardize)
