"""Modality importance: ablation deltas and exact Shapley values over modalities, overall and per class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmfuse.analysis.subsets import MissingSubsetsResult, SubsetScore
from mmfuse.core.shapley import shapley_values

__all__ = ["ImportanceResult", "shapley_importance", "shapley_values"]


@dataclass
class ImportanceResult:
    """Ablation deltas and Shapley values per modality; positive = the modality helps.

    In metric units, with the sign flipped for a metric where lower is better (``mode == 'min'``).
    ``per_class_*`` map class -> modality -> value, on that class's recall.
    """

    metric: str
    mode: str
    modalities: list[str]
    full: float
    empty: float
    ablation: dict[str, float]
    shapley: dict[str, float]
    classes: list[str] | None = None
    per_class_ablation: dict[str, dict[str, float]] | None = None
    per_class_shapley: dict[str, dict[str, float]] | None = None


def shapley_importance(subsets: MissingSubsetsResult) -> ImportanceResult:
    """Ablation deltas and exact Shapley values over modalities from the subset metrics.

    The value of the empty coalition is the metric with every modality hidden (chance level).
    """
    sign = 1.0 if subsets.mode == "max" else -1.0
    modalities = subsets.modalities
    everything = frozenset(modalities)

    def game(value_of: Callable[[SubsetScore], float]) -> tuple[dict[str, float], dict[str, float]]:
        def v(s: frozenset[str]) -> float:
            return value_of(subsets.score(s))

        ablation = {m: v(everything) - v(everything - {m}) for m in modalities}
        return ablation, shapley_values(modalities, v)

    ablation, shapley = game(lambda s: sign * s.metrics[subsets.metric])
    per_ablation = per_shapley = None
    if subsets.classes is not None:
        per_ablation, per_shapley = {}, {}
        for c in subsets.classes:
            per_ablation[c], per_shapley[c] = game(lambda s, c=c: (s.per_class or {})[c])  # type: ignore[misc]
    return ImportanceResult(
        metric=subsets.metric, mode=subsets.mode, modalities=list(modalities),
        full=subsets.all.metrics[subsets.metric], empty=subsets.empty.metrics[subsets.metric],
        ablation=ablation, shapley=shapley, classes=subsets.classes,
        per_class_ablation=per_ablation, per_class_shapley=per_shapley,
    )
