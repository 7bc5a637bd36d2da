"""Image decoding and normalisation: any file Pillow reads -> a (C, size, size) float32 tensor.

Real data sets mix modes (RGBA screenshots, palette GIFs, 16-bit greyscale scans, rotated phone
photos), so every image is brought to one mode and one size before batching. A file that cannot be
decoded, including a truncated one, raises ``DataError`` naming the file, so ``data.on_error``
can skip it or the CLI can report it in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mmfuse.config import ImagePrep
from mmfuse.core.errors import DataError

_HIGH_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def load_image(path: Path, prep: ImagePrep) -> torch.Tensor:
    """Decodes ``path`` into a (prep.channels, prep.size, prep.size) float32 tensor."""
    return _to_tensor(decode_image(path, prep), prep)


def decode_image(path: Path, prep: ImagePrep) -> Image.Image:
    """The decoded, upright 8-bit RGB or L image at its own resolution, before resizing.

    ``image_to_tensor`` of the result equals ``load_image(path)``; corruptions for robustness tests
    work on this in-memory image so a file is decoded once, however many noise levels are tried.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Image.open only reads the header, so truncation shows up here
            upright = ImageOps.exif_transpose(img)
            return _to_mode(upright, prep)
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {path}: {_reason(exc)}") from None


def image_to_tensor(image: Image.Image, prep: ImagePrep) -> torch.Tensor:
    """Same as ``load_image`` for an image already in memory (e.g. from a WebDataset shard)."""
    return _to_tensor(_to_mode(image, prep), prep)


def _to_mode(image: Image.Image, prep: ImagePrep) -> Image.Image:
    """Converts to 8-bit RGB or L, compositing transparency onto white (as HF processors do)."""
    if image.mode in _HIGH_BIT_GREY:
        image = _high_bit_to_l(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "RGB" if prep.mode == "rgb" else "L"
    return image if image.mode == target else image.convert(target)


def _has_transparency(image: Image.Image) -> bool:
    """Alpha channel or a palette/colour-key transparency entry."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """Scales 16-bit greyscale to 8 bits; Pillow's own convert('L') clips at 255 instead."""
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _to_tensor(image: Image.Image, prep: ImagePrep) -> torch.Tensor:
    """Resizes (bilinear) and normalises: (x / 255 - mean) / std, channels first."""
    if image.size != (prep.size, prep.size):
        image = image.resize((prep.size, prep.size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    # mean/std: one value, or one per channel (a pretrained model's processor values).
    mean, std = np.asarray(prep.mean, dtype=np.float32), np.asarray(prep.std, dtype=np.float32)
    normalised: np.ndarray = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def _reason(exc: BaseException) -> str:
    """One line, even when Pillow's message is empty or spans lines."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
