"""Readers of the two sources AV-MNIST is built from: MNIST IDX files and Free Spoken Digit Dataset WAVs.

Both accept the layouts the sources ship in (plain, gzipped, zip or tar archives of the files).
"""

from __future__ import annotations

import functools
import gzip
import io
import re
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from mmfuse.core.errors import DataError
from mmfuse.core.identity import stat_stamp

FSDD_TEST_TAKES = range(0, 5)
SAMPLE_RATE = 8000
IMAGE_SIDE = 28


# ------------------------------------------------------------------------------------------ MNIST

_MNIST_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_mnist_file(root: Path, split: str, what: str) -> Path:
    """The IDX file in ``root`` or torchvision's ``root/MNIST/raw``, gzipped or not."""
    folders = [root, root / "raw", root / "MNIST" / "raw"]
    for folder in folders:
        for name in _MNIST_NAMES[(split, what)]:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    names = ", ".join(f"{n}[.gz]" for n in _MNIST_NAMES[(split, what)])
    raise DataError(f"MNIST: no {split} {what} file ({names}) in {root}, {root}/raw or {root}/MNIST/raw")


def read_idx(path: Path) -> NDArray[np.uint8]:
    """An IDX file (optionally gzipped) as a read-only uint8 array; the header is checked, not assumed.

    Cached for the process per file identity (``stat_stamp``: inode, size, mtime and ctime, so a file
    rewritten in place is read again): decompressing MNIST takes longer than a small build.
    """
    path = Path(path).resolve()
    return _read_idx_cached(path, stat_stamp(path))


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, _stamp: tuple[int, ...]) -> NDArray[np.uint8]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{path}: IDX header says {dims} ({count} bytes) but the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist(root: Path | str, split: Literal["train", "test"]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of one MNIST split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST folder not found: {root}")
    images = read_idx(_find_mnist_file(root, split, "images"))
    labels = read_idx(_find_mnist_file(root, split, "labels")).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"MNIST {split} images: expected (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"MNIST {split}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"MNIST {split} labels: values outside 0-9")
    return images, labels


# ------------------------------------------------------------------------------------------- FSDD

_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


@dataclass
class FSDDClip:
    digit: int
    speaker: str
    take: int
    samples: NDArray[np.float32]


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _wav_members(source: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(file name, reader) for every .wav in a folder (recursively) or a .zip / .tar[.gz] archive."""
    if source.is_dir():
        for path in sorted(source.rglob("*.wav")):
            yield path.name, path.read_bytes
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for name in sorted(archive.namelist()):
                if name.endswith(".wav"):
                    yield Path(name).name, _constant(archive.read(name))
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".wav"):
                    handle = archive.extractfile(member)
                    assert handle is not None
                    yield Path(member.name).name, _constant(handle.read())
    else:
        raise DataError(f"FSDD: {source} is neither a folder nor a .zip/.tar archive")


def read_fsdd(source: Path | str) -> list[FSDDClip]:
    """Every ``{digit}_{speaker}_{take}.wav`` of FSDD, sorted by (digit, speaker, take).

    ``source`` is the upstream repo folder, its ``recordings/`` folder, or the upstream archive.
    Clips must be mono-able 8 kHz audio (FSDD's format); anything else is a DataError naming the file.
    The decoded clips are kept for the process per identity of every file read (``stat_stamp`` of
    the archive, or of each WAV in a folder: a clip rewritten in place is decoded again), so
    repeated builds (tests, a calibration sweep) decode the 3,000 files once.
    """
    source = Path(source).resolve()
    if not source.exists():
        raise DataError(f"FSDD folder or archive not found: {source}")
    stamp = (tuple(stat_stamp(p) for p in sorted(source.rglob("*.wav"))) if source.is_dir()
             else (stat_stamp(source),))
    return list(_read_fsdd_cached(source, stamp))


@functools.lru_cache(maxsize=2)
def _read_fsdd_cached(source: Path, _stamp: tuple[tuple[int, ...], ...]) -> tuple[FSDDClip, ...]:
    clips: dict[tuple[int, str, int], FSDDClip] = {}
    for name, read in _wav_members(source):
        match = _FSDD_NAME.match(name)
        if match is None:
            continue
        try:
            data, rate = sf.read(io.BytesIO(read()), dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, ValueError) as exc:
            raise DataError(f"FSDD: cannot decode {name}: {exc}") from None
        if rate != SAMPLE_RATE:
            raise DataError(f"FSDD: {name} is {rate} Hz, expected {SAMPLE_RATE} Hz")
        if data.shape[0] == 0:
            raise DataError(f"FSDD: {name} has no samples")
        key = (int(match.group(1)), match.group(2), int(match.group(3)))
        clips[key] = FSDDClip(*key, samples=np.ascontiguousarray(data.mean(axis=1), dtype=np.float32))
    if not clips:
        raise DataError(f"FSDD: no '{{digit}}_{{speaker}}_{{take}}.wav' recordings found in {source}")
    digits = {k[0] for k in clips}
    if digits != set(range(10)):
        raise DataError(f"FSDD: recordings of digits {sorted(set(range(10)) - digits)} are missing in {source}")
    for clip in clips.values():
        clip.samples.flags.writeable = False  # shared by the cache: nobody may modify a clip
    return tuple(clips[k] for k in sorted(clips))


def fsdd_split(clips: list[FSDDClip], split: str) -> list[FSDDClip]:
    """The official FSDD split: takes 0-4 are test, 5-49 (and above) train."""
    return [c for c in clips if (c.take in FSDD_TEST_TAKES) == (split == "test")]
