"""Reading one pre-extracted array per sample: a ``.npy`` / ``.safetensors`` file, or a row of one.

A manifest field of a ``features`` modality (and any builder that stores arrays) names either

- ``path/to/sample.npy``: the whole file is the sample's array;
- ``path/to/sample.safetensors``: a file holding exactly one tensor;
- ``path/to/train.npy#12``: row 12 of one array file per split (shape (N, ...)), which is memory-
  mapped (``np.load(mmap_mode='r')``) and opened once per process, so a data set of thousands of
  samples does not re-open (or re-read) a file per sample. Each use checks the file's identity
  (device, inode, size, mtime and ctime: ``os.utime`` can restore an mtime, never a ctime), so
  a file replaced or rewritten meanwhile is mapped afresh instead of served from the old map.

Relative paths were already resolved against the manifest's folder by ``read_manifest``. Every
problem (missing file, bad row index, wrong dtype or number of dimensions, NaN/inf values) is a
``DataError`` naming the file and, for a row reference, the row.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mmfuse.core.errors import DataError

ARRAY_SUFFIXES = (".npy", ".safetensors")

_MMAP_CACHE: dict[Path, np.ndarray] = {}
_MMAP_STAMPS: dict[Path, tuple[int, ...]] = {}  # the identity of the file each map was opened from
_MMAP_LOCK = threading.Lock()


def parse_reference(value: str) -> tuple[Path, int | None]:
    """Splits ``file.npy#12`` into (path, 12); a plain path gives (path, None).

    Only a suffix of digits after the last ``#`` is a row, so a file name that contains ``#``
    elsewhere still works.
    """
    path, sep, row = value.rpartition("#")
    if sep and path and row.strip().lstrip("-").isdigit():
        return Path(path), int(row)
    if sep and path and not row.strip():
        raise DataError(f"{value}: empty row index after '#'")
    return Path(value), None


def _open_mmap(path: Path) -> np.ndarray:
    """The memory-mapped array of a whole-split file, opened once and cached per resolved path."""
    key = path.resolve()
    with _MMAP_LOCK:
        try:
            stat = os.stat(key)
        except OSError:
            raise DataError(f"array file not found: {path}") from None
        stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        cached = _MMAP_CACHE.get(key)
        if cached is not None and _MMAP_STAMPS.get(key) == stamp:
            return cached
        if not key.is_file():
            raise DataError(f"array file not found: {path}")
        if key.suffix.lower() != ".npy":
            raise DataError(f"{path}: a row reference ('file#row') needs a .npy file, not '{key.suffix}'")
        try:
            array = np.load(key, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read array file {path}: {exc}") from None
        _MMAP_CACHE[key], _MMAP_STAMPS[key] = array, stamp
        return array


def clear_cache() -> None:
    """Forgets every memory-mapped file (frees the maps; a replaced file is noticed without this)."""
    with _MMAP_LOCK:
        _MMAP_CACHE.clear()
        _MMAP_STAMPS.clear()


def _read_whole(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"array file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise DataError(f"{path}: a .safetensors feature file must hold exactly one tensor, "
                                f"found {len(tensors)} ({', '.join(sorted(tensors)) or 'none'})")
            return next(iter(tensors.values()))
    except DataError:
        raise
    except Exception as exc:  # numpy and safetensors raise several types for a corrupt file
        raise DataError(f"cannot read array file {path}: {exc}") from None
    raise DataError(f"{path}: unsupported array file type '{suffix}' (use {', '.join(ARRAY_SUFFIXES)})")


def load_array(value: str | Path, ndims: tuple[int, ...] = (1, 2), dtype: type = np.float32,
               check_finite: bool = True) -> np.ndarray:
    """The array a manifest field names, checked, as a fresh ``dtype`` array (never a view of a mmap).

    ``ndims`` lists the accepted numbers of dimensions of one sample (for a row reference, of the
    row). Integer, bool and float arrays are converted to ``dtype``; anything else (strings,
    objects, complex) is an error.
    """
    path, row = parse_reference(str(value))
    where = f"{path}" if row is None else f"{path} row {row}"
    if row is None:
        array = _read_whole(path)
    else:
        whole = _open_mmap(path)
        if whole.ndim == 0:
            raise DataError(f"{where}: the file holds a scalar, not one row per sample")
        if not 0 <= row < whole.shape[0]:
            rows = whole.shape[0]
            raise DataError(f"{where}: row index out of range (the file has {rows} rows, 0-{rows - 1})")
        array = whole[row]
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_):
        raise DataError(f"{where}: dtype {array.dtype} is not numeric (expected floats)")
    if array.ndim not in ndims:
        expected = " or ".join(f"{n}-D" for n in ndims)
        raise DataError(f"{where}: expected a {expected} array, got shape {tuple(array.shape)}")
    out: np.ndarray = np.array(array, dtype=dtype, copy=True)
    if check_finite and not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise DataError(f"{where}: {bad} NaN/inf value(s)")
    return out
