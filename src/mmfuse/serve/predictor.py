"""A loaded model behind the server: runs batches of samples and explains one by Shapley values.

The model runs in PyTorch, or as an exported ONNX graph through onnxruntime (``mmfuse serve
--onnx``); either way the saved folder supplies the preprocessing and the task that decodes the
outputs, so both backends answer with the same JSON.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfuse.analysis.importance import shapley_values
from mmfuse.core.contracts import Batch
from mmfuse.core.errors import MMFuseError
from mmfuse.core.version import __version__
from mmfuse.data.dataset import Collator, Sample
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import HeadTask

OutputsFunction = Callable[[Batch], Tensor]


class Predictor:
    def __init__(self, model: MultimodalModel, onnx: Path | None = None, threads: int | None = None) -> None:
        """``onnx``: a graph written by ``mmfuse export`` from this model folder, run instead of PyTorch
        (with ``threads`` onnxruntime threads; None: one per core)."""
        self.model = model
        self.preprocessor = model.preprocessor
        self.collator = Collator(model.preprocessor, None)
        self._outputs: OutputsFunction | None = None
        self.backend = "pytorch"
        if onnx is not None:
            if not isinstance(model.task, HeadTask):
                raise MMFuseError(f"--onnx serves classification and regression models; this one's task is "
                                  f"'{model.task.name}'")
            from mmfuse.export.onnx import OnnxRunner

            runner = OnnxRunner(onnx, threads=threads)
            if list(runner.modalities) != list(model.modalities):
                raise MMFuseError(f"{onnx} reads {', '.join(runner.modalities)} but the model folder reads "
                                  f"{', '.join(model.modalities)}: the graph was exported from another model")
            self._outputs = runner
            self.backend = "onnxruntime"

    @classmethod
    def load(cls, model_dir: Path, onnx: Path | None = None, threads: int | None = None) -> Predictor:
        return cls(MultimodalModel.from_pretrained(model_dir), onnx, threads)

    @property
    def kinds(self) -> dict[str, str]:
        """Each modality the model reads -> its kind (text, image, audio, features)."""
        return {m: self.preprocessor.kind(m) for m in self.model.modalities}

    @property
    def explainable(self) -> bool:
        return isinstance(self.model.task, HeadTask)

    def info(self) -> dict[str, Any]:
        task = self.model.task
        return {"mmfuse_version": __version__, "backend": self.backend, "modalities": self.kinds,
                "task": task.name, "labels": list(getattr(task, "labels", []) or []) or None,
                "fusion": self.model.spec.fusion.name, "explain": self.explainable}

    def predict(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """One decoded prediction per sample (the same JSON as ``mmfuse predict``)."""
        batch = self.collator(samples)
        if self._outputs is None:
            with torch.inference_mode():
                return self.model.predict(batch)
        assert isinstance(self.model.task, HeadTask)
        decoded = self.model.task.decode(self._outputs(batch))
        for i, item in enumerate(decoded):
            item["modalities"] = [m for m in self.model.modalities if bool(batch.present[m][i])]
        return decoded


def explanation_samples(sample: Sample) -> list[Sample]:
    """The sample with every subset of its present modalities (all of them first): the coalitions
    whose predictions ``contributions`` turns into Shapley values. 2^k samples for k modalities."""
    return [Sample(sample.id, {m: v if m in s else None for m, v in sample.inputs.items()})
            for s in _coalitions(sample)]


def _coalitions(sample: Sample) -> list[frozenset[str]]:
    """Every subset of the sample's present modalities, all of them first, the empty set last."""
    present = sorted(m for m, v in sample.inputs.items() if v is not None)
    return [frozenset(c) for k in range(len(present), -1, -1) for c in itertools.combinations(present, k)]


def contributions(sample: Sample, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Each present modality's exact Shapley contribution to the prediction, from the predictions of
    ``explanation_samples(sample)`` (same order). The contributions add up to ``with_all - with_none``.

    Classification explains the probability of the predicted label (the most probable one, for
    multi-label), regression the predicted value (one contribution per target for several).
    """
    subsets = _coalitions(sample)
    present = sorted(subsets[0])
    by_subset = dict(zip(subsets, predictions, strict=True))
    full = predictions[0]
    if "probabilities" in full:
        probabilities: dict[str, float] = full["probabilities"]
        label = full["label"] if "label" in full else max(probabilities, key=lambda name: probabilities[name])
        quantity = f"probability of '{label}'"
        values = [lambda p: float(p["probabilities"][label])]
    elif "value" in full:
        width = len(full["value"]) if isinstance(full["value"], list) else 0
        quantity = "predicted value" if not width else "predicted values"
        values = ([lambda p: float(p["value"])] if not width
                  else [lambda p, i=i: float(p["value"][i]) for i in range(width)])  # type: ignore[misc]
    else:
        raise MMFuseError("explain needs a classification or regression prediction")
    per_output = [shapley_values(present, lambda s, f=f: f(by_subset[s])) for f in values]  # type: ignore[misc]
    ends = [(f(full), f(by_subset[frozenset()])) for f in values]
    scalar = len(values) == 1 and not isinstance(full.get("value"), list)

    def pick(items: list[Any]) -> Any:
        return items[0] if scalar else items

    return {
        "contributions": {m: pick([round(phi[m], 6) for phi in per_output]) for m in present},
        "explained": {"quantity": quantity, "with_all": pick([round(a, 6) for a, _ in ends]),
                      "with_none": pick([round(b, 6) for _, b in ends])},
    }
