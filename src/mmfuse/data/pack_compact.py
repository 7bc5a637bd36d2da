"""Compact pack members: the same tensors in fewer bytes, losslessly, and read back bit for bit.

Why: a pack stored every tensor as the float32 or int64 the model reads. Images are normalised 8-bit
pixels, so 4 bytes per value carry 1 byte of information; token ids and masks are int64 although a
vocabulary fits 16 bits; and zstd shrinks what is left (log-mel frames, padding) a good part more.
Three steps, each taken only when it is exact (checked when the member is written):

- **pixels as uint8**: a float32 tensor (channels at axis -3: images and video frames) that is exactly
  ``(u / 255 - mean) / std`` of some uint8 ``u`` with the preprocessor's ``data.image`` mean and std is
  stored as ``u``, and the same float32 operations rebuild it at load (bitwise; verified at write, and
  a tensor that does not round-trip is stored as it is);
- **narrow integers**: an integer tensor is stored in the narrowest integer type that holds its values;
- **zstd** (level 3) over the ``.npy`` bytes, kept only where it saves a tenth or more; the member is then
  ``<name>.npy.zst``, readable by ``zstd -d`` and any zstd library.

What was done to a member is recorded in the sample's JSON header (``stored``: member -> dtype it is
read as, and the normalisation when pixels were stored), so the reader needs nothing but the shard.
Decompression is bounded: the frame must state its content size, no larger than ``MAX_MEMBER_BYTES``,
before anything is allocated (a zstd bomb or a lying frame is a ``ValueError``, reported by the caller
with the sample named).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

LEVEL = 3
MAX_MEMBER_BYTES = 256 * 1024 * 1024
"""Largest decompressed member: far above any sample's tensor (a 64-frame 224x224 video is 38 MB in float32)."""
MIN_SAVING = 0.8
"""Compressed bytes kept only below this share of the raw ones: decompressing costs read time (measured
~46 us for a 32 KB log-mel that zstd shrank by a tenth: a third of reading the whole sample), so a
member is compressed only where it saves a fifth or more (pixels, masks and padded ids do)."""
_LOCAL = threading.local()
_INTEGERS = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64)


@dataclass(frozen=True)
class Compactor:
    """How a pack's members are stored; ``mean``/``std``: the preprocessor's image normalisation."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def narrow(self, array: np.ndarray) -> tuple[np.ndarray, dict[str, Any] | None]:
        """The array as stored (uint8 pixels, a narrower integer type) and how to read it back, or None."""
        if array.dtype == np.float32 and self.mean is not None and self.std is not None and array.ndim >= 3:
            pixels = self._pixels(array)
            if pixels is not None:
                return pixels, {"as": "float32", "pixels": [list(self.mean), list(self.std)]}
        if np.issubdtype(array.dtype, np.integer) and array.size:
            low, high = int(array.min()), int(array.max())
            for kind in _INTEGERS:
                info = np.iinfo(kind)
                if np.dtype(kind).itemsize < array.dtype.itemsize and info.min <= low and high <= info.max:
                    return array.astype(kind), {"as": str(array.dtype)}
        return array, None

    def _pixels(self, array: np.ndarray) -> np.ndarray | None:
        channels = array.shape[-3]
        mean, std = (np.asarray(v, dtype=np.float32) for v in (self.mean, self.std))  # type: ignore[arg-type]
        if mean.size not in (1, channels) or std.size not in (1, channels):
            return None
        shape = (-1, 1, 1)
        guess = np.rint((array * std.reshape(shape) + mean.reshape(shape)) * 255.0)
        if not np.isfinite(guess).all() or guess.min() < 0 or guess.max() > 255:
            return None
        pixels = guess.astype(np.uint8)
        if not np.array_equal(rebuild_pixels(pixels, mean, std).view(np.uint32), array.view(np.uint32)):
            return None
        return pixels

    def compress(self, npy: bytes) -> bytes | None:
        """``npy`` compressed (with its content size in the frame), or None when that saves too little."""
        packed = _compressor().compress(npy)
        return packed if len(packed) < MIN_SAVING * len(npy) else None


def _compressor() -> zstandard.ZstdCompressor:
    compressor = getattr(_LOCAL, "compressor", None)
    if compressor is None:
        compressor = _LOCAL.compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    return compressor


def compactor_for(preprocessor: Any) -> Compactor:
    """The compactor of a pack made with ``preprocessor`` (its ``data.image`` mean and std)."""
    return Compactor(_floats(preprocessor.image.mean), _floats(preprocessor.image.std))


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in value) if isinstance(value, (tuple, list)) else (float(value),)


def rebuild_pixels(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(u / 255 - mean) / std`` in float32, channels at axis -3: the operations ``data/image.py`` applies.

    Looked up, not computed: each channel's 256 possible values are worked out once with those same
    float32 operations (so bit for bit what the formula gives), and each pixel is an index into them,
    one pass instead of four over the image.
    """
    table = _pixel_table(tuple(mean.reshape(-1).tolist()), tuple(std.reshape(-1).tolist()))
    if table.shape[0] == 1:
        return table[0].take(pixels)  # type: ignore[no-any-return]
    out = np.empty(pixels.shape, dtype=np.float32)
    for channel in range(pixels.shape[-3]):
        table[channel].take(pixels[..., channel, :, :], out=out[..., channel, :, :])
    return out


@functools.lru_cache(maxsize=64)
def _pixel_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    levels = np.arange(256, dtype=np.float32)[None, :]
    column = (-1, 1)
    means, stds = (np.asarray(v, dtype=np.float32).reshape(column) for v in (mean, std))
    table = (levels / 255.0 - means) / stds
    table.setflags(write=False)
    return table  # type: ignore[no-any-return]


def decompress(data: bytes | memoryview) -> bytes:
    """A ``.npy.zst`` member's ``.npy`` bytes; ValueError unless the frame states a bounded content size."""
    try:
        size = zstandard.frame_content_size(data[:18])
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame ({exc})") from None
    if size < 0:
        raise ValueError("the zstd frame does not state its decompressed size")
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"the zstd frame would decompress to {size:,} bytes, more than a member can be "
                         f"({MAX_MEMBER_BYTES:,})")
    decompressor = getattr(_LOCAL, "decompressor", None)
    if decompressor is None:  # one per thread: making one per member cost as much as decompressing
        decompressor = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    try:
        out = decompressor.decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstd frame ({exc})") from None
    if len(out) != size:
        raise ValueError(f"the zstd frame gave {len(out):,} bytes, it states {size:,}")
    return out


def restore(array: np.ndarray, spec: Any) -> np.ndarray:
    """The array a compact member was made from (``spec``: its entry of the header's ``stored``)."""
    if spec is None:
        return array
    if not isinstance(spec, dict) or not isinstance(spec.get("as"), str):
        raise ValueError("a 'stored' entry of the sample header is not a mapping with 'as'")
    pixels = spec.get("pixels")
    if pixels is not None:
        if array.dtype != np.uint8 or array.ndim < 3 or not (isinstance(pixels, list) and len(pixels) == 2):
            raise ValueError("stored pixels that are not a uint8 array with a mean and std")
        mean, std = (np.asarray(v, dtype=np.float32) for v in pixels)
        if mean.ndim != 1 or std.ndim != 1 or {mean.size, std.size} - {1, array.shape[-3]}:
            raise ValueError("stored pixels whose mean or std do not match their channels")
        return rebuild_pixels(array, mean, std)
    wanted = np.dtype(spec["as"])
    if not (np.issubdtype(wanted, np.integer) and np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"a narrowed member read as {wanted}: only integers are narrowed")
    return array.astype(wanted)
