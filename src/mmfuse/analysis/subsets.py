"""Metrics of a trained model for every subset of its modalities present (the others hidden).

See ``mmfuse.analysis.robustness`` for the three studies this module is one of.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.dataset import MultimodalDataset, Sample
from mmfuse.engine.cached_runner import CachedRunner, task_metrics
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import Task

__all__ = ["CachedRunner", "MissingSubsetsResult", "SubsetScore", "missing_subsets", "subset_name"]

NONE_NAME = "none"
"""The name of the empty subset (every modality hidden)."""


def subset_name(present: Iterable[str]) -> str:
    """'audio+image+text' for a set of modalities, sorted; 'none' for the empty set."""
    names = sorted(present)
    return "+".join(names) if names else NONE_NAME


def enumerate_subsets(modalities: Iterable[str]) -> list[tuple[str, ...]]:
    """The 2^M - 1 non-empty subsets, each sorted, largest first, then alphabetically."""
    names = sorted(set(modalities))
    subsets = [c for k in range(len(names), 0, -1) for c in itertools.combinations(names, k)]
    return sorted(subsets, key=lambda s: (-len(s), s))


@dataclass
class SubsetScore:
    """Metrics with only ``present`` shown to the model; ``per_class`` is the recall of each class."""

    present: tuple[str, ...]
    metrics: dict[str, float]
    per_class: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return subset_name(self.present)


@dataclass
class MissingSubsetsResult:
    """Every task metric for each non-empty subset of present modalities (and for none)."""

    modalities: list[str]
    metric: str
    mode: str
    subsets: list[SubsetScore]
    empty: SubsetScore
    classes: list[str] | None = None

    def score(self, present: Iterable[str]) -> SubsetScore:
        key = tuple(sorted(present))
        if not key:
            return self.empty
        for s in self.subsets:
            if s.present == key:
                return s
        raise KeyError(f"no subset {subset_name(key)}; modalities: {', '.join(self.modalities)}")

    def value(self, present: Iterable[str], metric: str | None = None) -> float:
        return self.score(present).metrics[metric or self.metric]

    @property
    def all(self) -> SubsetScore:
        return self.score(self.modalities)


# ------------------------------------------------------------------------------------ scoring


def _as_samples(data: MultimodalDataset | Sequence[Sample]) -> Sequence[Sample]:
    samples = data.samples if isinstance(data, MultimodalDataset) else data
    if len(samples) == 0:
        raise DataError("cannot evaluate robustness on an empty dataset")
    if any(s.target is None for s in samples):
        raise DataError("robustness evaluation needs a target for every sample")
    return samples


_metrics = task_metrics


def _class_names(task: Task, targets: Tensor) -> list[str] | None:
    """Labels that occur in ``targets`` (classes, or multi-label positives); None for regression."""
    labels: list[str] | None = getattr(task, "labels", None)
    if not labels:
        return None
    if targets.ndim == 1 and not targets.is_floating_point():
        seen = set(targets.tolist())
        return [name for i, name in enumerate(labels) if i in seen]
    if targets.ndim == 2 and targets.shape[1] == len(labels):
        positives = targets.sum(dim=0) > 0
        return [name for i, name in enumerate(labels) if bool(positives[i])]
    return None


def _per_class_recall(task: Task, outputs: Tensor, targets: Tensor,
                      classes: list[str] | None) -> dict[str, float] | None:
    """Recall of each class: the accuracy on the samples of that class (per label for multi-label)."""
    if classes is None:
        return None
    labels: list[str] = task.labels  # type: ignore[attr-defined]
    result = {}
    if targets.ndim == 1:
        predicted = outputs.argmax(dim=-1)
        for name in classes:
            mine = targets == labels.index(name)
            result[name] = float((predicted[mine] == targets[mine]).float().mean())
    else:
        threshold = float(getattr(task, "threshold", 0.5))
        predicted = outputs.sigmoid() >= threshold
        for name in classes:
            i = labels.index(name)
            mine = targets[:, i] > 0.5
            result[name] = float(predicted[mine, i].float().mean())
    return result


def _monitor(model: MultimodalModel) -> tuple[str, str]:
    metric, mode = model.task.monitor
    if mode not in ("max", "min"):
        raise ConfigError(f"task '{model.task.name}' monitors '{metric}' with unknown mode '{mode}'")
    return metric, mode


def missing_subsets(model: MultimodalModel, data: MultimodalDataset | Sequence[Sample] | CachedRunner,
                    batch_size: int = 128) -> MissingSubsetsResult:
    """Every task metric with each non-empty subset of the model's modalities present, and with none."""
    runner = data if isinstance(data, CachedRunner) else CachedRunner(model, _as_samples(data), batch_size)
    metric, mode = _monitor(model)
    modalities = list(model.modalities)
    targets = runner.targets
    classes = _class_names(model.task, targets)
    scores: list[SubsetScore] = []
    for present in [*enumerate_subsets(modalities), ()]:
        outputs = runner.outputs(present)
        scores.append(SubsetScore(present, _metrics(model.task, outputs, targets),
                                  _per_class_recall(model.task, outputs, targets, classes)))
    return MissingSubsetsResult(modalities, metric, mode, scores[:-1], scores[-1], classes)
