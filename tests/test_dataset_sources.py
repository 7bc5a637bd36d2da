"""The MNIST / FSDD readers' in-process caches never serve a file's old content."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from mmfuse.datasets.mnist_fsdd import read_fsdd, read_idx


def _write_idx(path: Path, images: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">III", *images.shape)
    path.write_bytes(header + images.astype(np.uint8).tobytes())


def test_idx_rewritten_with_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    _write_idx(path, np.full((2, 28, 28), 7))
    assert read_idx(path).max() == 7
    stamp = path.stat()
    _write_idx(path, np.full((2, 28, 28), 200))  # same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same mtime
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    assert read_idx(path).max() == 200


def _wav(value: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(800, value, dtype=np.float32), 8000, subtype="FLOAT", format="WAV")
    return buffer.getvalue()


def test_fsdd_clip_rewritten_in_place_is_decoded_again(tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    for digit in range(10):  # the reader insists on every digit
        (folder / f"{digit}_jackson_7.wav").write_bytes(_wav(0.25))
    clip = folder / "3_jackson_7.wav"
    folder_mtime = folder.stat().st_mtime_ns
    assert float(read_fsdd(folder)[3].samples.max()) == 0.25
    stamp = clip.stat()
    clip.write_bytes(_wav(0.5))
    os.utime(clip, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert folder.stat().st_mtime_ns == folder_mtime  # the folder's own stamp did not change
    clips = read_fsdd(folder)
    assert (clips[3].digit, float(clips[3].samples.max())) == (3, 0.5)
    assert float(clips[4].samples.max()) == 0.25
