"""Metrics of a trained model on a dataset, outside any training loop."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmfuse.core.contracts import Batch
from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Collator, MultimodalDataset
from mmfuse.data.lazy import SkipAwareCollator, lazy_base, without_skips
from mmfuse.data.memory import ArrayDataset, ArrayLoader
from mmfuse.model import MultimodalModel


def model_device(model: MultimodalModel) -> torch.device:
    return next(model.parameters()).device


def hide_modalities(batch: Batch, absent: Collection[str]) -> Batch:
    """The same batch with the given modalities marked absent for every sample (test-time ablation)."""
    if not absent:
        return batch
    present = {m: torch.zeros_like(p) if m in absent else p for m, p in batch.present.items()}
    return Batch(batch.inputs, present, batch.target, batch.ids)


def evaluate(model: MultimodalModel, dataset: MultimodalDataset, batch_size: int = 128,
             absent: Collection[str] = ()) -> dict[str, float]:
    """Task metrics (and mean loss) of ``model`` on ``dataset``; needs targets.

    ``absent`` names modalities to hide from every sample, to measure accuracy when they are missing.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    collator, lazy = Collator(model.preprocessor, model.task), lazy_base(dataset)
    loader: Iterable[Batch]
    if isinstance(dataset, ArrayDataset):
        loader = ArrayLoader(dataset, batch_size, shuffle=False)
    elif lazy is not None:  # bad samples of a lazy split are found (and reported) as they are read
        loader = without_skips(lazy, DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                collate_fn=SkipAwareCollator(collator)))
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = model_device(model)
    metrics = model.task.metrics().to(device)
    total_loss, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = hide_modalities(batch.to(device), absent)
            total_loss += float(model.task.eval_step(model, batch, metrics)) * batch.size
            count += batch.size
    model.train(was_training)
    if count == 0:
        raise DataError("every sample of the evaluated split was skipped (data.on_error: skip)")
    results = {name: float(value) for name, value in metrics.compute().items()}
    results["loss"] = total_loss / count
    return results


def predict(model: MultimodalModel, dataset: MultimodalDataset, batch_size: int = 128) -> list[dict[str, Any]]:
    """Decoded predictions for every sample of ``dataset``, with ids."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(model.preprocessor, None))
    device = model_device(model)
    results = []
    for batch in loader:
        for sample_id, item in zip(batch.ids, model.predict(batch.to(device)), strict=True):
            results.append({"id": sample_id, **item})
    return results
