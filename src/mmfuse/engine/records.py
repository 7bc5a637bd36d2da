"""Records per split and the preprocessing fitted on them: what every way of preparing a run's data shares.

Why a module of its own: the per-sample path (``mmfuse.engine.data``), packing (``mmfuse.engine.pack``)
and the pack check (``mmfuse.engine.pack_check``) all read the configured splits into ``Record``s and
fit (or create) the same ``Preprocessor`` and task on them, and ``prepare_data`` opens a pack when
``data.pack`` is set. With these functions in ``data.py`` that made a circle (data -> pack -> data),
hidden by an import inside ``prepare_data``; here they sit below all three, which import them.
``PreparedData``, the fitted preprocessing plus the datasets built with it, is the result both
``prepare_data`` and ``open_pack`` return, so it lives here too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.dataset import MultimodalDataset, SkipReport
from mmfuse.data.manifest import Record, iter_manifest
from mmfuse.data.preprocess import Preprocessor
from mmfuse.tasks import TASKS, Task

log = logging.getLogger(__name__)
"""Warnings about the records of a run (ids shared between splits): printed once per run."""

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
