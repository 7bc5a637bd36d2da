"""Image decoding, resizing and normalisation: any file Pillow reads -> a (C, size, size) float32 tensor.

Real data sets mix modes (RGBA screenshots, palette GIFs, 16-bit greyscale scans, rotated phone
photos), so every image is brought to one mode and one size before batching. A file that cannot be
decoded, including a truncated one, raises ``DataError`` naming the file, so ``data.on_error``
can skip it or the CLI can report it in one line.

Uploads (``decode_image_bytes``, the HTTP server's inputs) are untrusted: only common raster formats
are opened, and their cost is bounded from the header before a pixel is decoded: pixels, and the
bytes the decoded image will hold. Messages never carry an object's repr (no memory addresses).
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mmfuse.config import ImagePrep
from mmfuse.core.errors import DataError, InputTooLarge

_HIGH_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)
"""What Pillow's parsers raise on a malformed file (struct/Index/KeyError from EXIF and TIFF tags)."""
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
"""What an upload may be: no format that runs a program (EPS runs Ghostscript) or that few clients send."""
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
"""Bytes per pixel as Pillow stores a mode; every other mode takes 4 (RGB is stored as RGBX)."""
_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


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
    return _decode(path, str(path), prep, None)


def decode_image_bytes(data: bytes, label: str, prep: ImagePrep, max_pixels: int | None = None,
                       max_bytes: int | None = None) -> Image.Image:
    """``decode_image`` of an uploaded file held in memory (the HTTP server's inputs); ``label`` names
    it in errors. Only ``UPLOAD_FORMATS`` are read. An image of more than ``max_pixels``, or one whose
    decoded pixels would take more than ``max_bytes`` (``decoded_bytes``), raises ``InputTooLarge``
    from its header, before any pixel is decoded: a small PNG can claim gigapixels (a decompression
    bomb), and a 16-bit one twice the bytes of an 8-bit one."""
    return _decode(io.BytesIO(data), label, prep, max_pixels, max_bytes, UPLOAD_FORMATS)


def decoded_bytes(image: Image.Image) -> int:
    """The bytes Pillow will hold for ``image``'s pixels once loaded, known from the header alone."""
    return image.width * image.height * _PIXEL_BYTES.get(image.mode, 4)


def _decode(source: Path | io.BytesIO, label: str, prep: ImagePrep, max_pixels: int | None,
            max_bytes: int | None = None, formats: tuple[str, ...] | None = None) -> Image.Image:
    try:
        with Image.open(source, formats=formats) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise InputTooLarge(f"image {label} has {img.width}x{img.height} = {img.width * img.height:,} "
                                    f"pixels; the limit is {max_pixels:,}")
            if max_bytes is not None and decoded_bytes(img) > max_bytes:
                raise InputTooLarge(f"image {label} ({img.width}x{img.height}, mode {img.mode}) would decode to "
                                    f"{decoded_bytes(img):,} bytes; the limit is {max_bytes:,}")
            img.load()  # decode now: Image.open only reads the header, so truncation shows up here
            upright = ImageOps.exif_transpose(img)
            return _to_mode(upright, prep)
    except Image.DecompressionBombError as exc:  # past Pillow's own cap, before ours could look
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "more pixels than Pillow's cap"
        limit = f"; the limit is {max_pixels:,}" if max_pixels is not None else ""
        raise InputTooLarge(f"image {label} claims {size}{limit} (a decompression bomb)") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {label}: {_reason(exc)}") from None


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
    """Scales 16-bit greyscale to 8 bits (round(v / 257)); Pillow's own convert('L') clips at 255 instead.

    Integer arithmetic on blocks of about a million pixels read from Pillow one at a time:
    (2v + 257) // 514 equals rint(v / 257) for every 16-bit v (v / 257 is never exactly a half), and
    besides the 8-bit result nothing of the image's size is allocated (float64 copies of the whole
    image took 1.1 GB for a 36 M pixel PNG).
    """
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, width))
    for top in range(0, height, rows):
        block = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        out[top: top + rows] = (2 * np.clip(block, 0, 65535).astype(np.uint32) + 257) // 514
    return Image.fromarray(out)


def resize_and_crop(image: Image.Image, prep: ImagePrep) -> Image.Image:
    """The ``size`` x ``size`` image: resized as ``prep.resize`` says, then centre-cropped.

    Sizes and offsets follow Hugging Face image processors exactly (the long side of a
    shortest-edge resize is truncated, the crop's top-left offset rounded down), so a pretrained
    model sees the framing it was trained on and not a squashed image.
    """
    target = prep.resize_size or prep.size
    width, height = image.size
    if prep.resize == "shortest_edge":
        short, long = min(width, height), max(width, height)
        new_long = int(target * long / short)
        new_size = (target, new_long) if width <= height else (new_long, target)
    else:
        new_size = (target, target)
    if image.size != new_size:
        image = image.resize(new_size, _RESAMPLE[prep.resample])
    if image.size != (prep.size, prep.size):
        left, top = (image.width - prep.size) // 2, (image.height - prep.size) // 2
        image = image.crop((left, top, left + prep.size, top + prep.size))
    return image


def _to_tensor(image: Image.Image, prep: ImagePrep) -> torch.Tensor:
    """Resizes and crops (``resize_and_crop``) and normalises: (x / 255 - mean) / std, channels first."""
    image = resize_and_crop(image, prep)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    # mean/std: one value, or one per channel (a pretrained model's processor values).
    mean, std = np.asarray(prep.mean, dtype=np.float32), np.asarray(prep.std, dtype=np.float32)
    normalised: np.ndarray = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def _reason(exc: BaseException) -> str:
    """One line, even when Pillow's message is empty or spans lines."""
    text = " ".join(_REPR.sub("", str(exc)).split())
    return text or type(exc).__name__
