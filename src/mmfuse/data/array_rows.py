"""Image and audio modalities stored as arrays (``file.npy#row`` or one ``.npy`` per sample).

Builders such as AV-MNIST store 70,000 images and spectrograms as two arrays per split rather
than 140,000 small files. A field of an image or audio modality may therefore name an array
(read by ``mmfuse.data.arrays``, memory-mapped for row references) instead of a PNG or a WAV:

- image: (H, W), a flat (H*W,) square, (H, W, C) or (C, H, W) with C in 1/3, holding 0..255 pixel
  values (as MNIST and MultiBench store them); it becomes an 8-bit PIL image, so resizing,
  normalisation and robustness corruptions are exactly those of image files;
- audio: a precomputed (n_mels, T) spectrogram, used as the log-mel features as is: ``n_mels``
  must equal ``data.audio.n_mels`` and T is cropped to ``max_frames`` like a long clip.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from mmfuse.config import AudioPrep
from mmfuse.core.errors import DataError
from mmfuse.data.arrays import ARRAY_SUFFIXES, load_array, parse_reference


def is_array_reference(value: str) -> bool:
    """True when a field names an array file (``x.npy``, ``x.safetensors`` or ``x.npy#row``)."""
    path, _row = parse_reference(str(value))
    return path.suffix.lower() in ARRAY_SUFFIXES


def load_image_array(value: str) -> Image.Image:
    """The array a field names as an 8-bit greyscale or RGB image."""
    array = load_array(value, ndims=(1, 2, 3))
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if side * side != array.size:
            raise DataError(f"{value}: a flat image array needs a square number of pixels, got {array.size}")
        array = array.reshape(side, side)
    if array.ndim == 3:
        if array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.shape[2] not in (1, 3):
            raise DataError(f"{value}: an image array needs 1 or 3 channels, got shape {array.shape}")
        if array.shape[2] == 1:
            array = array[:, :, 0]
    if array.min() < 0 or array.max() > 255:
        raise DataError(f"{value}: image arrays hold 0..255 pixel values, got {array.min():g}..{array.max():g}")
    return Image.fromarray(np.rint(array).astype(np.uint8))


def load_spectrogram_array(value: str, prep: AudioPrep) -> np.ndarray:
    """The (n_mels, T) spectrogram a field names, checked against ``data.audio``."""
    array = load_array(value, ndims=(2,))
    if array.shape[0] != prep.n_mels:
        raise DataError(f"{value}: spectrogram has {array.shape[0]} rows but data.audio.n_mels is {prep.n_mels}")
    if array.shape[1] == 0:
        raise DataError(f"{value}: spectrogram has no frames")
    return array


def spectrogram_tensor(array: np.ndarray, prep: AudioPrep) -> torch.Tensor:
    """A precomputed spectrogram as the audio encoders' ``mel`` input, cropped to ``max_frames``."""
    return torch.from_numpy(np.ascontiguousarray(array[:, : prep.max_frames], dtype=np.float32))
