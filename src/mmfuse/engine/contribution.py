"""The end-of-training note on what each modality adds (issue 16): said when one adds next to nothing.

Why at the end of every classification run: a fused model that leans on one modality looks fine in
its metrics table, and the user learns that the others were dead weight only if they think of running
``mmfuse evaluate --robustness``. The check is cheap: on (at most ``MAX_SAMPLES``) validation samples
each encoder runs once (``CachedRunner``) and fusion + head once per subset of modalities present, so
the exact Shapley value of each modality's contribution to accuracy costs 2^M small passes.

Two findings make a note:

* a modality's Shapley value is near zero (below ``NEAR_ZERO`` accuracy, or below ``SHARE`` of what
  all modalities together add over none): it is carried along without being used;
* the best single modality alone is within ``NEAR_ZERO`` of all together: fusion adds nothing.

Either way the note names the options that help (``mmfuse.engine.stall.REMEDIES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmfuse.core.shapley import shapley_values
from mmfuse.data.dataset import MultimodalDataset, SampleView
from mmfuse.engine.cached_runner import CachedRunner, task_metrics
from mmfuse.engine.stall import REMEDIES
from mmfuse.model import MultimodalModel
from mmfuse.tasks.classification import ClassificationTask

MAX_SAMPLES = 2000
MAX_MODALITIES = 6
NEAR_ZERO = 0.01
SHARE = 0.05


@dataclass
class Contributions:
    """Validation accuracy with every modality, with none, with each one alone, and each one's Shapley value."""

    full: float
    empty: float
    alone: dict[str, float]
    shapley: dict[str, float]
    samples: int


def contributions(model: MultimodalModel, dataset: MultimodalDataset) -> Contributions | None:
    """The accuracies and Shapley values, or None where the check does not apply (not a classification,
    fewer than two or more than ``MAX_MODALITIES`` modalities, no fusion, no labelled samples)."""
    modalities = sorted(model.modalities)
    if not isinstance(model.task, ClassificationTask) or model.fusion is None \
            or not 2 <= len(modalities) <= MAX_MODALITIES or len(dataset) == 0:
        return None
    every = dataset.samples  # once: an ArrayDataset builds this sequence on each access
    samples = SampleView(every.__getitem__, min(len(every), MAX_SAMPLES))  # a pack's: read a batch at a time
    if any(sample.target is None for sample in samples):
        return None
    runner = CachedRunner(model, samples)
    cache: dict[frozenset[str], float] = {}

    def accuracy(present: frozenset[str]) -> float:
        if present not in cache:
            cache[present] = task_metrics(model.task, runner.outputs(present), runner.targets)["accuracy"]
        return cache[present]

    shapley = shapley_values(modalities, accuracy)
    return Contributions(full=accuracy(frozenset(modalities)), empty=accuracy(frozenset()),
                         alone={m: accuracy(frozenset({m})) for m in modalities}, shapley=shapley,
                         samples=len(samples))


def contribution_note(found: Contributions | None, remedies: str = REMEDIES) -> str | None:
    """One paragraph when a modality adds next to nothing or fusion adds nothing over the best single
    modality; None otherwise."""
    if found is None:
        return None
    gain = found.full - found.empty
    idle = [m for m, value in found.shapley.items() if value < max(NEAR_ZERO, SHARE * gain)]
    best = max(found.alone, key=lambda m: found.alone[m])
    findings = []
    if found.full - found.alone[best] < NEAR_ZERO:
        findings.append(f"{best} alone reaches {found.alone[best]:.3f}, within {NEAR_ZERO * 100:.0f} point of all "
                        f"modalities together ({found.full:.3f}): fusion adds nothing over it")
    if idle:
        hurts = " (or lower it)" if any(found.shapley[m] < -NEAR_ZERO for m in idle) else ""
        findings.append(f"{', '.join(idle)} add{'s' if len(idle) == 1 else ''} next to nothing{hurts}")
    if not findings:
        return None
    values = ", ".join(f"{m} {v:+.3f}" for m, v in sorted(found.shapley.items()))
    return (f"modality contributions to validation accuracy ({found.samples} samples; Shapley values: {values}; "
            f"all {found.full:.3f}, none {found.empty:.3f}): {'; '.join(findings)}. If every modality should "
            f"matter, options that help: {remedies}")
