"""Fitting a classifier's temperatures on the validation split after training.

``trainer.calibration``:

- ``none``: the head's logits as trained.
- ``temperature``: one temperature for every sample (Guo et al. 2017), fitted by minimising the
  validation negative log-likelihood of the samples as they come.
- ``per_subset`` (default): one temperature per set of present modalities. Each non-empty subset of
  the model's modalities (and the empty one) is imposed on the whole validation split by hiding the
  others, exactly as ``evaluate --robustness`` hides them, and each resulting presence pattern gets
  the temperature that minimises its NLL. A pattern with fewer than ``MIN_SAMPLES`` validation
  samples, or any pattern of a model with more than ``MAX_SUBSET_MODALITIES`` modalities (2^M fits),
  uses the global temperature. See ``mmfuse.tasks.temperature`` for why one temperature is not enough.

Encoders run once per batch (plus once with everything hidden); each subset re-runs only fusion
and head, so the fit costs a few validation passes of the small part of the model.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Literal

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mmfuse.core.contracts import Batch
from mmfuse.data.dataset import Collator, MultimodalDataset
from mmfuse.data.memory import ArrayDataset, ArrayLoader
from mmfuse.engine.evaluate import hide_modalities, model_device
from mmfuse.model import MultimodalModel
from mmfuse.tasks.classification import ClassificationTask
from mmfuse.tasks.temperature import PresenceTemperature, pattern_name

CalibrationMode = Literal["none", "temperature", "per_subset"]
MIN_SAMPLES = 30
MAX_SUBSET_MODALITIES = 6
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The temperature minimising mean NLL of ``softmax(logits / T)``; bounded to [0.05, 20].

    The NLL is convex in 1/T, so a bounded scalar search over log T finds its minimum.
    """
    logits, targets = logits.double(), targets.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), targets))

    result = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def _loader(model: MultimodalModel, dataset: MultimodalDataset, batch_size: int) -> Iterable[Batch]:
    if isinstance(dataset, ArrayDataset):
        return ArrayLoader(dataset, batch_size, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=Collator(model.preprocessor, model.task))


def _subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    return [c for k in range(len(modalities), -1, -1) for c in itertools.combinations(modalities, k)]


def collect_logits(model: MultimodalModel, dataset: MultimodalDataset, per_subset: bool,
                   batch_size: int = 128) -> dict[str, tuple[Tensor, Tensor]]:
    """Pattern name -> (uncalibrated logits, targets) of the validation samples with that pattern.

    With ``per_subset`` every subset of modalities is imposed in turn (a sample appears once per
    subset, under the pattern it then has); otherwise each sample once, as it comes.
    """
    assert model.fusion is not None
    modalities = list(model.modalities)
    subsets = _subsets(modalities) if per_subset else [tuple(modalities)]
    device = model_device(model)
    chunks: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in _loader(model, dataset, batch_size):
            batch = batch.to(device)
            assert batch.target is not None
            clean = model.encode(batch)
            hidden = model.encode(hide_modalities(batch, modalities)) if per_subset else clean
            for subset in subsets:
                features = {m: clean[m] if m in subset else hidden[m] for m in modalities}
                logits = model.head(model.fusion(features)).float().cpu()
                present = torch.stack([features[m].present.bool().cpu() for m in modalities], dim=1)
                for pattern in present.unique(dim=0):
                    rows = (present == pattern).all(dim=1)
                    name = pattern_name([m for m, p in zip(modalities, pattern.tolist(), strict=True) if p])
                    chunks[name].append((logits[rows], batch.target.cpu()[rows]))
    model.train(was_training)
    return {name: (torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts]))
            for name, parts in chunks.items()}


def calibrate(model: MultimodalModel, val: MultimodalDataset, mode: CalibrationMode,
              batch_size: int = 128) -> PresenceTemperature | None:
    """Fits and installs the temperatures on a classification model; returns them (None: nothing
    to do: mode none, another task, or an empty validation split)."""
    task = model.task
    if mode == "none" or not isinstance(task, ClassificationTask) or len(val) == 0:
        return None
    task.temperature = None  # fit on the head's own logits
    per_subset = mode == "per_subset" and len(model.modalities) <= MAX_SUBSET_MODALITIES
    groups = collect_logits(model, val, per_subset, batch_size)
    pooled_logits = torch.cat([logits for logits, _ in groups.values()])
    pooled_targets = torch.cat([targets for _, targets in groups.values()])
    default = fit_temperature(pooled_logits, pooled_targets)
    by_pattern = {name: fit_temperature(logits, targets) for name, (logits, targets) in groups.items()
                  if per_subset and len(targets) >= MIN_SAMPLES}
    task.temperature = PresenceTemperature(list(model.modalities), default, by_pattern)
    return task.temperature
