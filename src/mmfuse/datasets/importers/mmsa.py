"""CMU-MOSI / MOSEI / CH-SIMS feature pickles, as MMSA and MultiBench publish them.

Layouts followed (read with ``safe_pickle``, never plain ``pickle.load``):

- **MMSA** (thuiar/MMSA, README "Datasets" and ``MMSA/data_loader.py``; files ``aligned_50.pkl`` /
  ``unaligned_50.pkl`` / ``unaligned_39.pkl``): a dict ``{'train', 'valid', 'test'}``, each a
  dict of ``raw_text`` (N,) str (object array), ``text`` (N, T, 768) BERT (or GloVe) features,
  ``text_bert`` (N, 3, T) token ids / attention mask / segment ids, ``audio`` (N, Ta, Da),
  ``vision`` (N, Tv, Dv), ``id`` (N,) str, ``regression_labels`` (N,) in [-3, 3] (SIMS: [-1, 1]),
  optional ``classification_labels`` (CH-SIMS: also ``regression_labels_T/A/V``, per
  modality, written as ``label_T`` ...); the unaligned files add ``audio_lengths`` /
  ``vision_lengths`` (valid steps first, zero padding after). The attention mask of
  ``text_bert`` gives the text length.
- **MultiBench** (pliang279/MultiBench ``datasets/affect/get_data.py``; ``mosi_raw.pkl``,
  ``mosei_senti_data.pkl``): splits ``train``/``valid``/``test`` with ``vision``, ``audio``,
  ``text`` (N, T, D), ``labels`` (N, 1, 1) and ``id``. Padding is *leading* zeros: as its loader
  does, a sample whose text is all zeros is dropped, and the padding is cut at the first non-zero
  step (of the text for all three when they share T, the aligned case; per modality otherwise).

Output: ``text`` (raw text, when present), ``<m>_features`` per feature modality, ``label`` (the
regression score), split ``valid`` -> ``val``. A modality without padding is written as one
(N, T, D) array per split referenced as ``features/<m>_<split>.npy#row``; one whose lengths vary
is trimmed and written one ``.npy`` per sample (``features/<m>/<split>/<row>.npy``), since a row
of a padded array would feed the padding as data. NaN/inf values (MOSEI's COVAREP has some) are
set to 0 as MMSA's loader does, and counted in the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.safe_pickle import safe_load
from mmfuse.datasets.importers.writer import ImportWriter

SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}
FEATURE_KEYS = ("text", "audio", "vision")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _sample_id(value: Any) -> str:
    """MMSA ids are strings; MultiBench's may be arrays of parts (video id, clip): joined by '_'."""
    if isinstance(value, np.ndarray | list | tuple):
        return "_".join(_text(part) for part in np.asarray(value).ravel())
    return _text(value)


def _labels(path: Path, split: str, data: dict[str, Any]) -> np.ndarray:
    for key in ("regression_labels", "labels"):
        if key in data:
            labels = np.asarray(data[key], dtype=np.float64)
            return labels.reshape(len(labels), -1)[:, 0]
    raise DataError(f"{path} split '{split}': no 'regression_labels' (MMSA) or 'labels' (MultiBench); "
                    f"keys: {', '.join(sorted(data))}")


def _lengths(data: dict[str, Any], key: str, array: np.ndarray, multibench: bool,
             aligned_start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of the valid steps of every sample of ``data[key]`` (N, T, D)."""
    n, steps = array.shape[:2]
    starts, stops = np.zeros(n, dtype=np.int64), np.full(n, steps, dtype=np.int64)
    if multibench:
        if aligned_start is not None:
            starts = aligned_start
        else:
            nonzero = np.abs(array).reshape(n, steps, -1).sum(axis=2) != 0
            starts = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), steps)
    elif f"{key}_lengths" in data:
        stops = np.clip(np.asarray(data[f"{key}_lengths"], dtype=np.int64).reshape(n), 0, steps)
    elif key == "text" and "text_bert" in data:
        mask = np.asarray(data["text_bert"])
        if mask.ndim == 3 and mask.shape[1] == 3 and mask.shape[2] == steps:
            stops = np.clip(mask[:, 1, :].sum(axis=1).astype(np.int64), 0, steps)
    return starts, stops


def _first_nonzero(array: np.ndarray) -> np.ndarray:
    n, steps = array.shape[:2]
    nonzero = np.abs(array).reshape(n, steps, -1).sum(axis=2) != 0
    return np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), steps)


def _write_modality(writer: ImportWriter, key: str, split: str, array: np.ndarray, keep: np.ndarray,
                    starts: np.ndarray, stops: np.ndarray) -> dict[int, str | None]:
    """Writes the kept rows' features; returns row index -> manifest reference (None: empty)."""
    array = array.astype(np.float32, copy=True)
    bad = ~np.isfinite(array)
    if bad.any():
        writer.note(f"{key} ({split}): {int(bad.sum())} NaN/inf feature values set to 0 (as MMSA's loader does)")
        array[bad] = 0.0
    rows = np.flatnonzero(keep)
    steps = array.shape[1]
    if bool((starts[rows] == 0).all() and (stops[rows] == steps).all()):
        name = writer.save_array(f"features/{key}_{split}.npy", array[rows])
        return {int(row): f"{name}#{i}" for i, row in enumerate(rows)}
    refs: dict[int, str | None] = {}
    for row in rows:
        start, stop = int(starts[row]), int(stops[row])
        refs[int(row)] = (writer.save_array(f"features/{key}/{split}/{row}.npy", array[row, start:stop])
                          if stop > start else None)
    return refs


def _import_split(path: Path, writer: ImportWriter, split_key: str, data: dict[str, Any], multibench: bool) -> None:
    split = SPLITS[split_key]
    labels = _labels(path, split_key, data)
    n = len(labels)
    writer.seen(n)
    raw_text = data.get("raw_text")
    # CH-SIMS adds one score per modality (regression_labels_T/_A/_V): kept as label_T, ...
    unimodal = {key.removeprefix("regression_labels_"): np.asarray(data[key], dtype=np.float64).reshape(n, -1)[:, 0]
                for key in sorted(data) if key.startswith("regression_labels_")}
    ids = data.get("id")
    keep = np.ones(n, dtype=bool)
    features = {key: np.asarray(data[key]) for key in FEATURE_KEYS
                if key in data and np.asarray(data[key]).ndim == 3 and np.asarray(data[key]).dtype.kind in "fiu"}
    for key, array in features.items():
        if len(array) != n:
            raise DataError(f"{path} split '{split_key}': '{key}' has {len(array)} rows but there are {n} labels")
    for row in range(n):
        where = f"{path} split '{split_key}' row {row}"
        if not math.isfinite(labels[row]):
            writer.problem(f"label is {labels[row]}", where)
            keep[row] = False
        elif multibench and "text" in features and not np.abs(features["text"][row]).sum():
            writer.skip("MultiBench: text features all zero (its loader's drop_entry)", where)
            keep[row] = False
    if writer.options.limit is not None:
        keep &= np.cumsum(keep) <= writer.options.limit
    shared_t = len({a.shape[1] for a in features.values()}) == 1
    aligned_start = _first_nonzero(features["text"]) if multibench and shared_t and "text" in features else None
    refs = {key: _write_modality(writer, key, split, array, keep,
                                 *_lengths(data, key, array, multibench, aligned_start))
            for key, array in features.items()}
    for kept in np.flatnonzero(keep):
        i = int(kept)
        sample_id = _sample_id(ids[i]) if ids is not None else f"{split}-{i}"
        entry: dict[str, Any] = {"id": sample_id, "split": split, "label": round(float(labels[i]), 6)}
        if raw_text is not None:
            entry["text"] = _text(raw_text[i]).strip() or None
        for key in features:
            entry[f"{key}_features"] = refs[key][i]
        for key, values in unimodal.items():
            entry[f"label_{key}"] = round(float(values[i]), 6)
        writer.add(entry)


def import_mmsa(source: Path, writer: ImportWriter) -> None:
    """Imports one MMSA or MultiBench affect pickle (see the module docstring)."""
    if source.is_dir():
        pickles = sorted(p.name for p in source.glob("*.pkl"))
        raise DataError(f"{source} is a folder: give one pickle file" + (f" (found {', '.join(pickles)})" if pickles
                                                                          else ""))
    data = safe_load(source)
    if not isinstance(data, dict) or not any(key in data for key in SPLITS):
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{source}: expected a dict of splits 'train'/'valid'/'test', got {keys}")
    first = next(value for key, value in data.items() if key in SPLITS)
    multibench = isinstance(first, dict) and "labels" in first and "regression_labels" not in first
    found: set[str] = set()
    for split_key, split_data in data.items():
        if split_key not in SPLITS:
            continue
        if not isinstance(split_data, dict):
            raise DataError(f"{source} split '{split_key}': expected a dict of arrays, got {type(split_data).__name__}")
        _import_split(source, writer, split_key, split_data, multibench)
        found.update(key for key in FEATURE_KEYS if key in split_data and np.asarray(split_data[key]).ndim == 3)
    writer.note(f"layout: {'MultiBench' if multibench else 'MMSA'}")
    _suggest(writer, sorted(found), source.stem)


def _suggest(writer: ImportWriter, keys: list[str], stem: str) -> None:
    if not keys:
        writer.note("no feature arrays found: no example config (the raw text is in column 'text')")
        return
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "label",
                 "modalities": {key: {"kind": "features", "column": f"{key}_features"} for key in keys},
                 "features": {"max_length": 512}, "batch_size": 32},
        "encoders": {key: {"name": "sequence", "dim": 32, "layers": 1, "heads": 4} for key in keys},
        "fusion": {"name": "concat", "out_dim": 64},
        "task": {"name": "sentiment"},
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 30, "patience": 8, "output_dir": f"runs/{stem}"},
    }, f"Written by `mmfuse data import mmsa`: the feature modalities of {stem}, sentiment metrics\n"
       "(MAE, Pearson, Acc-2 Has0/Non0, F1, Acc-7). Train with: mmfuse train -c config.yaml")
