"""Data for a run: records per split, fitted preprocessing, datasets and loaders."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.augment import with_augmentation
from mmfuse.data.dataset import Collator, MultimodalDataset, SkipReport
from mmfuse.data.lazy import LazyDataset, lazy_base
from mmfuse.data.manifest import Record, iter_manifest
from mmfuse.data.memory import ArrayDataset, ArrayLoader, cached_arrays
from mmfuse.data.preprocess import Preprocessor
from mmfuse.tasks import TASKS, Task

log = logging.getLogger(__name__)
"""Warnings about the data of a run (overlapping splits, cropped clips): printed once per run."""

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def split_records(config: ExperimentConfig) -> Iterator[tuple[str, Record]]:
    """(split, record) in manifest order, before a validation split is carved out of train.

    A generator, so that a check over 200k rows (``mmfuse.engine.pack_check``) never holds them all;
    ``load_records`` collects it.
    """
    data = config.data
    read = dict(modalities=data.modalities, id_column=data.id_column, target_column=data.target_column)
    if data.train is not None:
        for name, path in (("train", data.train), ("val", data.val), ("test", data.test)):
            if path is not None:
                yield from ((name, record) for record in iter_manifest(path, **read))  # type: ignore[arg-type]
        return
    if data.synthetic is not None:
        from mmfuse.datasets.synth import synthetic_dataset

        manifest = synthetic_dataset(data.synthetic)
    else:
        assert data.manifest is not None
        manifest = data.manifest
    for record in iter_manifest(manifest, split_column=data.split_column, **read):  # type: ignore[arg-type]
        split = SPLIT_NAMES.get((record.split or "").lower())
        if split is None:
            raise DataError(f"{record.where}: split '{record.split}' is not one of train/val/test")
        yield split, record


def validation_positions(config: ExperimentConfig, n_train: int) -> list[int]:
    """Positions (sorted) of the training records that become the validation split when the data has none."""
    if n_train == 0:
        raise DataError("the data has no training samples")
    if config.data.val_fraction <= 0:
        raise ConfigError("no validation data: give data.val, a 'val' split, or data.val_fraction > 0")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return sorted(order[:max(1, round(n_train * config.data.val_fraction))])


def load_records(config: ExperimentConfig) -> dict[str, list[Record]]:
    """Records per split ('train', 'val', 'test'), from a split column or separate manifests."""
    splits: dict[str, list[Record]] = {}
    for split, record in split_records(config):
        splits.setdefault(split, []).append(record)
    if not splits.get("train"):
        raise DataError("the data has no training samples")
    if "val" not in splits:
        train = splits["train"]
        positions = validation_positions(config, len(train))
        val = set(positions)
        splits["val"] = [train[i] for i in positions]
        splits["train"] = [r for i, r in enumerate(train) if i not in val]
    check_overlap(splits, config.data.allow_overlap)
    return splits


def check_overlap(splits: dict[str, list[Record]], allow: bool, examples: int = 5) -> None:
    """Ids shared between splits: a DataError with the count and a few ids, or a warning if allowed.

    A sample in train and in val or test makes their metrics measure memorisation; separate
    manifests per split make that easy to do by accident (one manifest cannot: ids are unique).
    """
    names = [name for name in ("train", "val", "test") if name in splits]
    ids = {name: {r.id for r in splits[name]} for name in names}
    pairs = [(a, b, len(ids[a] & ids[b])) for i, a in enumerate(names) for b in names[i + 1:]]
    shared = sorted(set().union(*(ids[a] & ids[b] for a, b, _ in pairs)))
    if not shared:
        return
    counts = ", ".join(f"{a} and {b}: {n}" for a, b, n in pairs if n)
    what = (f"{len(shared)} sample id{'s' if len(shared) > 1 else ''} appear{'' if len(shared) > 1 else 's'} "
            f"in more than one split ({counts}), e.g. {', '.join(shared[:examples])}")
    if not allow:
        raise DataError(f"{what}; set data.allow_overlap: true if that is intended")
    log.warning("%s (data.allow_overlap: true)", what)


@dataclass
class PreparedData:
    """Preprocessed datasets plus the fitted preprocessing they were built with."""

    preprocessor: Preprocessor
    task: Task
    datasets: dict[str, MultimodalDataset]

    @property
    def skipped(self) -> dict[str, SkipReport]:
        return {name: ds.report for name, ds in self.datasets.items() if ds.report.count}


def prepare_data(config: ExperimentConfig) -> PreparedData:
    """Reads the manifests, fits vocabulary and labels on train, preprocesses every split once.

    With ``data.pack`` the splits are read from the pack instead (``mmfuse.engine.pack``), once it is
    known to have been packed from this config's data and preprocessing.
    """
    if config.data.pack is not None:
        from mmfuse.engine.pack import open_pack  # it builds on this module

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


def new_preprocessor(config: ExperimentConfig) -> Preprocessor:
    """The config's preprocessing, not fitted yet."""
    return Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio,
                        features=config.data.features, video=config.data.video)


def fit_preprocessing(config: ExperimentConfig, splits: dict[str, list[Record]]) -> tuple[Preprocessor, Task]:
    """Vocabularies, feature widths and labels fitted on the training records (shared with packing)."""
    preprocessor = new_preprocessor(config)
    preprocessor.fit(splits["train"])
    task = TASKS.create(config.task.name, **config.task.options)
    # A JSON NaN target stays NaN in the records (errors show it as written); fitting sees it as missing.
    fit_targets = [None if isinstance(t, float) and math.isnan(t) else t for t in (r.target for r in splits["train"])]
    try:
        task.fit([t for t in fit_targets if t is not None] if config.data.on_error == "skip" else fit_targets)
    except ValueError as exc:
        raise DataError(f"training targets (column '{config.data.target_column}'): {exc}") from None
    if config.data.on_error == "raise":
        check_targets(splits, task)
    return preprocessor, task


def check_targets(splits: dict[str, list[Record]], task: Task) -> None:
    """Raises a DataError naming the first row whose target the task cannot encode.

    The datasets would raise the same error, but only after preprocessing (decoding every image and
    clip) up to that row: targets are cheap to check first.
    """
    for records in splits.values():
        for record in records:
            try:
                task.encode_target(record.target)
            except ValueError as exc:
                raise DataError(f"{record.where}: {exc}") from None


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
