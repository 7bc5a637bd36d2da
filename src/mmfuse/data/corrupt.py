"""Corruptions of raw inputs for noise-robustness tests: PIL images, mono waveforms, strings.

Every corruption is ``fn(value, level, rng) -> value`` with ``level`` in [0, 1]:

- level 0 returns the input unchanged (bit-exact), level 1 is the strongest setting;
- the distortion grows monotonically with the level;
- it is deterministic given ``rng``. Each one draws the same random numbers whatever the level
  and only scales how they are used (common random numbers): with the generator that
  ``sample_rng(seed, index)`` gives, the words dropped at level 0.3 are among those dropped at
  0.6, the noise at 0.5 is the noise at 1.0 scaled, and so on, so curves over levels are smooth.

Mappings from level to strength (documented here, relied on by the tests):

- ``gaussian_noise`` (image): additive Gaussian pixel noise, sigma = level x 0.5 x 255, clipped to 0..255.
- ``gaussian_blur`` (image): Gaussian blur, radius = level x min(width, height) / 8 pixels.
- ``occlusion`` (image): one grey (128) rectangle of the image's aspect ratio (a square for square
  images) covering ``level`` of the area, at a random place.
- ``white_noise`` (audio): white noise at SNR = 30 - 40 x level dB relative to the clip's mean
  power (0.1 -> 26 dB, 0.5 -> 10 dB, 1.0 -> -10 dB); level 0 is clean (no noise at all).
- ``time_mask`` (audio): ``level`` of the samples zeroed, in 5 spans (one at a random place in
  each fifth of the clip); at 1.0 the clip is silent.
- ``typos`` (text): round(level x words) random words get one character edit (delete, insert,
  substitute or swap adjacent letters).
- ``word_dropout`` (text): round(level x words) random words removed; at 1.0 the text is empty, so
  the modality is absent for that sample.

Corruptions are registered by name in ``CORRUPTIONS``; ``list_corruptions(kind)`` lists them.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmfuse.core.errors import ConfigError, did_you_mean

IMAGE_NOISE_MAX_SIGMA = 0.5
"""Pixel-noise sigma at level 1, as a fraction of the 0..255 range."""
BLUR_MAX_FRACTION = 1 / 8
"""Blur radius at level 1, as a fraction of the image's shorter side."""
OCCLUSION_FILL = 128
"""Grey of the occluding rectangle: ~0 after the default (x / 255 - 0.5) / 0.5 normalisation (as cutout)."""
SNR_CLEAN_DB = 30.0
SNR_RANGE_DB = 40.0
"""White-noise SNR in dB = SNR_CLEAN_DB - SNR_RANGE_DB x level, for level > 0."""
TIME_MASK_SPANS = 5
_LETTERS = string.ascii_lowercase

CorruptFn = Callable[[Any, float, np.random.Generator], Any]


@dataclass(frozen=True)
class Corruption:
    """A named corruption of one kind of raw input ('image', 'audio' or 'text')."""

    name: str
    kind: str
    fn: CorruptFn
    description: str

    def __call__(self, value: Any, level: float, rng: np.random.Generator) -> Any:
        return self.fn(value, check_level(level), rng)


CORRUPTIONS: dict[str, Corruption] = {}


def register(name: str, kind: str, description: str) -> Callable[[CorruptFn], CorruptFn]:
    """Registers ``fn(value, level, rng)`` under ``name`` for inputs of ``kind``."""

    def decorator(fn: CorruptFn) -> CorruptFn:
        if name in CORRUPTIONS:
            raise ValueError(f"corruption '{name}' is already registered")
        CORRUPTIONS[name] = Corruption(name, kind, fn, description)
        return fn

    return decorator


def list_corruptions(kind: str | None = None) -> list[str]:
    """Registered corruption names, sorted; only those for ``kind`` when given."""
    return sorted(n for n, c in CORRUPTIONS.items() if kind is None or c.kind == kind)


def get_corruption(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption '{name}'{did_you_mean(name, CORRUPTIONS)}; "
                          f"valid choices: {', '.join(list_corruptions())}")
    return CORRUPTIONS[name]


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` under ``seed``: independent streams, same numbers on every call."""
    return np.random.default_rng([int(seed), int(index)])


def check_level(level: float) -> float:
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ConfigError(f"corruption level must be in [0, 1], got {level:g}")
    return level


def _count(level: float, n: int) -> int:
    """round(level x n), halves rounded up, so 0.5 of 3 words is 2 (not Python's banker's rounding)."""
    return min(n, math.floor(level * n + 0.5))


# ----------------------------------------------------------------------------------------- images


def _image_array(image: Image.Image) -> tuple[np.ndarray, str]:
    mode = image.mode if image.mode in ("RGB", "L") else "RGB"
    return np.asarray(image.convert(mode) if mode != image.mode else image, dtype=np.float32), mode


@register("gaussian_noise", "image", "Gaussian pixel noise, sigma = level x 0.5 x 255")
def gaussian_noise(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    if level == 0:
        return image
    pixels, mode = _image_array(image)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32)
    noisy = pixels + noise * np.float32(level * IMAGE_NOISE_MAX_SIGMA * 255.0)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode=mode)


@register("gaussian_blur", "image", "Gaussian blur, radius = level x shorter side / 8")
def gaussian_blur(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    if level == 0:
        return image
    radius = level * BLUR_MAX_FRACTION * min(image.size)
    return image.filter(ImageFilter.GaussianBlur(radius=radius))


@register("occlusion", "image", "a grey rectangle covering `level` of the area at a random place")
def occlusion(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    u = rng.random(2)  # drawn before the level check so every level uses the same numbers
    if level == 0:
        return image
    width, height = image.size
    w = min(width, round(math.sqrt(level) * width))
    h = min(height, round(math.sqrt(level) * height))
    x0 = math.floor(u[0] * (width - w + 1))
    y0 = math.floor(u[1] * (height - h + 1))
    out = image.copy()
    if w > 0 and h > 0:
        bands = len(out.getbands())
        fill: int | tuple[int, ...] = OCCLUSION_FILL if bands == 1 else (OCCLUSION_FILL,) * bands
        ImageDraw.Draw(out).rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=fill)
    return out


# ------------------------------------------------------------------------------------------ audio


def snr_db(level: float) -> float:
    """The white-noise SNR for a level > 0: 30 dB at level 0+ falling linearly to -10 dB at level 1."""
    return SNR_CLEAN_DB - SNR_RANGE_DB * level


@register("white_noise", "audio", "white noise at SNR = 30 - 40 x level dB (level 1 = -10 dB)")
def white_noise(waveform: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Noise at ``snr_db(level)`` dB relative to the clip's mean power (a silent clip stays silent)."""
    if level == 0 or waveform.size == 0:
        return waveform
    noise = rng.standard_normal(waveform.shape).astype(np.float64)
    noise /= math.sqrt(float(np.mean(noise**2))) or 1.0  # exactly unit power, so the SNR is exact
    signal_power = float(np.mean(waveform.astype(np.float64) ** 2))
    noise_power = signal_power / 10 ** (snr_db(level) / 10)
    return (waveform + noise * math.sqrt(noise_power)).astype(waveform.dtype)


@register("time_mask", "audio", "`level` of the clip zeroed in 5 random spans")
def time_mask(waveform: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(TIME_MASK_SPANS)
    if level == 0 or waveform.size == 0:
        return waveform
    out = waveform.copy()
    n = out.shape[-1]
    bounds = np.linspace(0, n, TIME_MASK_SPANS + 1).astype(int)
    for k in range(TIME_MASK_SPANS):
        start, stop = int(bounds[k]), int(bounds[k + 1])
        span = _count(level, stop - start)
        offset = start + math.floor(u[k] * (stop - start - span + 1))
        out[..., offset: offset + span] = 0
    return out


# ------------------------------------------------------------------------------------------- text


def _edit(word: str, op: int, position: float, letter: int) -> str:
    """One character edit that always changes the word: 0 delete, 1 insert, 2 substitute, 3 swap."""
    i = min(len(word) - 1, math.floor(position * len(word)))
    if op == 0 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == 1:
        return word[:i] + _LETTERS[letter] + word[i:]
    if op == 3 and len(word) > 1:
        j = min(i, len(word) - 2)
        if word[j] != word[j + 1]:
            return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    new = _LETTERS[letter]
    if new == word[i].lower():
        new = _LETTERS[(letter + 1) % len(_LETTERS)]
    return word[:i] + new + word[i + 1:]


@register("typos", "text", "round(level x words) random words get one character edit")
def typos(text: str, level: float, rng: np.random.Generator) -> str:
    words = text.split()
    n = len(words)
    order = rng.permutation(n)
    ops, positions, letters = rng.integers(0, 4, n), rng.random(n), rng.integers(0, len(_LETTERS), n)
    if level == 0:
        return text
    for i in order[: _count(level, n)]:
        words[i] = _edit(words[i], int(ops[i]), float(positions[i]), int(letters[i]))
    return " ".join(words)


@register("word_dropout", "text", "round(level x words) random words removed (all removed: text absent)")
def word_dropout(text: str, level: float, rng: np.random.Generator) -> str:
    words = text.split()
    order = rng.permutation(len(words))
    if level == 0:
        return text
    dropped = set(order[: _count(level, len(words))].tolist())
    return " ".join(w for i, w in enumerate(words) if i not in dropped)
