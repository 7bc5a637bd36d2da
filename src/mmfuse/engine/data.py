"""Data for a run: datasets and loaders built from the records and preprocessing of ``mmfuse.engine.records``.

``prepare_data`` is the one entry point training, evaluation and bench use: it preprocesses the
manifests' splits, or opens a pack (``mmfuse.engine.pack``) when ``data.pack`` is set. Reading the
records and fitting the preprocessing live in ``records`` because packing needs them too, so this
module imports both and neither imports it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.errors import DataError
from mmfuse.data.augment import with_augmentation
from mmfuse.data.dataset import Collator, MultimodalDataset
from mmfuse.data.lazy import LazyDataset, lazy_base
from mmfuse.data.manifest import Record
from mmfuse.data.memory import ArrayDataset, ArrayLoader, cached_arrays
from mmfuse.data.preprocess import Preprocessor
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.records import PreparedData, fit_preprocessing, load_records
from mmfuse.tasks import Task

log = logging.getLogger(__name__)
"""Warnings about the data of a run (cropped clips): printed once per run."""


def prepare_data(config: ExperimentConfig) -> PreparedData:
    """Reads the manifests, fits vocabulary and labels on train, preprocesses every split once.

    With ``data.pack`` the splits are read from the pack instead (``mmfuse.engine.pack``), once it is
    known to have been packed from this config's data and preprocessing.
    """
    if config.data.pack is not None:
        return _augmented(config, open_pack(config, config.data.pack))
    splits = load_records(config)
    preprocessor, task = fit_preprocessing(config, splits)
    datasets = {name: split_dataset(config, records, preprocessor, task) for name, records in splits.items()}
    cropped = preprocessor.crops.message(config.data.audio)
    if cropped:  # once per run, not once per clip
        log.warning("%s", cropped)
    if len(datasets["train"]) == 0:
        raise DataError("every training sample was skipped; see the errors above")
    return _augmented(config, PreparedData(preprocessor, task, datasets))


def warn_lazy_crops(config: ExperimentConfig, data: PreparedData) -> None:
    """The cropped-clips line ``prepare_data`` prints eagerly, for lazy splits once they have been read."""
    if any(lazy_base(d) is not None for d in data.datasets.values()):
        cropped = data.preprocessor.crops.message(config.data.audio)
        if cropped:
            log.warning("%s", cropped)


def _augmented(config: ExperimentConfig, data: PreparedData) -> PreparedData:
    """``data.augment`` applied to the training split as it is read (``mmfuse.data.augment``)."""
    train = with_augmentation(data.datasets["train"], config.data.augment, data.preprocessor, config.seed)
    return PreparedData(data.preprocessor, data.task, {**data.datasets, "train": train})



SKIPPED_FILE = "skipped.jsonl"


def write_skipped(data: PreparedData, folder: Path) -> Path | None:
    """Writes ``folder/skipped.jsonl``, one line per skipped sample: split, file, row, id and reason.

    With ``data.on_error: skip`` a run otherwise reports only how many samples it left out; the file
    says which and why. When nothing was skipped, a list left by an earlier run in the same folder
    is removed, since it would describe other data. Returns the file's path, or None.
    """
    path = Path(folder) / SKIPPED_FILE
    lines = [json.dumps({"split": split, **entry}) for split, report in data.skipped.items()
             for entry in report.entries()]
    if not lines:
        path.unlink(missing_ok=True)
        return None
    return write_text_atomic(path, "\n".join(lines) + "\n")


def split_dataset(config: ExperimentConfig, records: list[Record], preprocessor: Preprocessor,
                  task: Task) -> MultimodalDataset:
    """One split, preprocessed: per-sample (``MultimodalDataset``), stacked tensors (``data.in_memory``) or
    decoded when read (``data.mode: lazy``)."""
    if config.data.in_memory:
        return cached_arrays(records, preprocessor, task, config.data.on_error, config.data.in_memory_cache)
    if config.data.mode == "lazy":
        return LazyDataset(records, preprocessor, task, on_error=config.data.on_error)
    return MultimodalDataset(records, preprocessor, task, on_error=config.data.on_error)


def make_loader(dataset: MultimodalDataset, collator: Collator, batch_size: int, shuffle: bool,
                num_workers: int) -> DataLoader[Any] | ArrayLoader:
    """Batches of a split: slices of its tensors on the fast path, else a DataLoader over samples."""
    if isinstance(dataset, ArrayDataset):
        return ArrayLoader(dataset, batch_size, shuffle)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
