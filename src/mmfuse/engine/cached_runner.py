"""A trained model run on fixed samples many times, each encoder's features computed once.

In the engine (not in ``mmfuse.analysis``, which builds its robustness studies on it) because the end
of training uses it too: the note on each modality's contribution (``mmfuse.engine.contribution``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence

import torch
from torch import Tensor

from mmfuse.core.contracts import Batch, Features
from mmfuse.data.dataset import Collator, Sample
from mmfuse.engine.evaluate import hide_modalities, model_device
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import HeadTask, Task


@contextlib.contextmanager
def _inference(model: MultimodalModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class CachedRunner:
    """Runs ``model`` on fixed samples many times, each encoder's features computed once.

    A modality's features do not depend on the other modalities, and hiding a modality from every
    sample gives the same all-absent features ``model.encode`` makes for it, so each study only
    re-runs what changes: fusion and head for a subset, one encoder for a corrupted modality.
    """

    def __init__(self, model: MultimodalModel, samples: Sequence[Sample], batch_size: int = 128) -> None:
        self.model, self.batch_size = model, batch_size
        self.collate = Collator(model.preprocessor, model.task)
        self.device = model_device(model)
        self.clean: list[dict[str, Features]] = []
        self.hidden: list[dict[str, Features]] = []
        targets = []
        with _inference(model):  # only features and targets are kept, not the input tensors
            for start in range(0, len(samples), batch_size):
                batch = self._collate(samples[start:start + batch_size])
                assert batch.target is not None
                self.clean.append(model.encode(batch))
                self.hidden.append(model.encode(hide_modalities(batch, model.modalities)))
                targets.append(batch.target.cpu())
        self.targets = torch.cat(targets)

    def _collate(self, samples: Sequence[Sample]) -> Batch:
        return self.collate(list(samples)).to(self.device)

    def _head(self, features: dict[str, Features]) -> Tensor:
        assert self.model.fusion is not None, "robustness studies need a model with a fusion"
        outputs = self.model.head(self.model.fusion(features))
        if isinstance(self.model.task, HeadTask):  # as model(batch) reports them
            outputs = self.model.task.calibrate(outputs, {m: f.present for m, f in features.items()})
        return outputs.float().cpu()

    def outputs(self, present: Collection[str]) -> Tensor:
        """Outputs with only ``present`` modalities shown (as ``evaluate(absent=the others)``)."""
        with _inference(self.model):
            return torch.cat([
                self._head({m: clean[m] if m in present else hidden[m] for m in self.model.modalities})
                for clean, hidden in zip(self.clean, self.hidden, strict=True)
            ])

    def outputs_replacing(self, modality: str, samples: Sequence[Sample]) -> Tensor:
        """Outputs with ``modality``'s inputs taken from ``samples`` (same order) and the rest clean."""
        others = [m for m in self.model.modalities if m != modality]
        result = []
        with _inference(self.model):
            for k, clean in enumerate(self.clean):
                batch = self._collate(samples[k * self.batch_size:(k + 1) * self.batch_size])
                replaced = self.model.encode(hide_modalities(batch, others))[modality]
                result.append(self._head({**clean, modality: replaced}))
        return torch.cat(result)


def task_metrics(task: Task, outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Every metric of ``task`` on these outputs, as plain floats."""
    metrics = task.metrics()
    metrics.update(*task.metric_inputs(outputs, targets))
    return {name: float(value) for name, value in metrics.compute().items()}
