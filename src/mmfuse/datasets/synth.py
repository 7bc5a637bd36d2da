"""The embedded synthetic tri-modal data set: PNG + WAV + text, written as real files.

Each modality carries exactly one binary factor of the 8-class label (image: shape, audio: pitch,
text: mood), so no single modality gets above 25% accuracy and no pair above 50%: only a model
that really fuses all three can solve it. Everything else in a sample (colours, sizes, positions,
loudness, timing, nouns, filler words) is drawn independently of the label, so it is pure
nuisance. The files go through the same loaders as user data, which makes the set an end-to-end
test of the whole pipeline rather than of an in-memory shortcut.

Generation is a pure function of the seed: the same seed gives byte-identical files, so caches
and benchmark numbers are reproducible.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from mmfuse.config import SynthConfig
from mmfuse.core.atomic import staged_folder
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import DataError

__all__ = ["LABEL_FACTORS", "generate_synthetic", "synthetic_dataset"]

LABEL_FACTORS: tuple[str, ...] = ("shape", "pitch", "mood")

# Bump when the generated content changes, so stale caches are never reused.
_FORMAT_VERSION = "v3"
MANIFEST_NAME = "manifest.jsonl"

_SHAPES = ("circle", "square")
_PITCHES = ("low", "high")
_MOODS = ("calm", "stormy")

IMAGE_SIZE = 32
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0

# Bright colours on a dark background keep the shape visible whatever the colour, and the colour
# is drawn independently of the label, so it is a nuisance the image encoder must ignore.
_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (60, 90, 240),
    "yellow": (235, 220, 40),
    "magenta": (225, 50, 220),
    "cyan": (40, 215, 225),
}
_PITCH_RANGES_HZ: dict[str, tuple[float, float]] = {"low": (220.0, 440.0), "high": (880.0, 1760.0)}
_MOOD_WORDS: dict[str, tuple[str, ...]] = {
    "calm": ("calm", "quiet", "gentle", "peaceful", "soft", "still", "serene", "mellow"),
    "stormy": ("stormy", "loud", "fierce", "wild", "harsh", "angry", "violent", "furious"),
}
_NOUNS = (
    "sea", "city", "forest", "morning", "crowd", "river", "room", "street", "sky", "garden", "market",
    "night",
)  # fmt: skip
_DEGREES = ("", "rather ", "very ", "quite ", "somewhat ", "truly ")
_TIMES = ("this evening", "today", "again", "at dawn", "tonight", "lately", "once more")
_TEMPLATES = (
    "the {noun} feels {deg}{adj} {time}",
    "{art} {deg}{adj} {noun}",
    "everyone said the {noun} was {deg}{adj}",
    "it was {art} {deg}{adj} {noun} {time}",
    "we walked through the {adj} {noun} {time}",
    "the {noun} seemed {deg}{adj} to me",
    "{time} the {noun} is {deg}{adj}",
    "nobody expected such {art} {deg}{adj} {noun}",
)

_AUDIO_CHUNK = 128  # clips synthesised per vectorised block; fixed so the noise stream is stable
_FADE_SECONDS = 0.01
_MAX_BURST_SECONDS = 0.7
_IMAGE_NOISE_SIGMA = 8.0  # in 0..255 pixel units


def _validate(n_samples: int, seed: int, missing_rate: float) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 8:
        raise DataError(f"synthetic data needs n_samples >= 8 (one per class), got {n_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"synthetic data needs a non-negative integer seed, got {seed!r}")
    if not 0.0 <= float(missing_rate) < 1.0:
        raise DataError(f"synthetic missing_rate must be in [0, 1), got {missing_rate!r}")


def _balanced_factors(n: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """(n, 3) factor indices; cycling the 8 combinations keeps class counts within 1 of each other."""
    combos = np.array(list(itertools.product(range(2), repeat=3)), dtype=np.int64)
    factors = combos[np.arange(n) % len(combos)]
    return factors[rng.permutation(n)]


def _presence_mask(n: int, missing_rate: float, rng: np.random.Generator) -> NDArray[np.bool_]:
    """Independent per-modality drop-out, redrawn where a sample would lose every modality."""
    present = rng.random((n, 3)) >= missing_rate
    empty = ~present.any(axis=1)
    while empty.any():
        present[empty] = rng.random((int(empty.sum()), 3)) >= missing_rate
        empty = ~present.any(axis=1)
    return present


def _splits(n: int) -> list[str]:
    """80/10/10 over the already shuffled order, so splits are random but exactly sized."""
    n_train = round(0.8 * n)
    n_val = round(0.1 * n)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


# --------------------------------------------------------------------------------------- images


def _render_images(
    shapes: NDArray[np.int64], rng: np.random.Generator
) -> tuple[list[NDArray[np.uint8]], list[str]]:
    """(32, 32, 3) uint8 images and their colour names.

    The square's half-side is the circle radius times sqrt(pi)/2, so both shapes cover the same
    area on average and only the outline, not the size, tells them apart.
    """
    n = len(shapes)
    colour_names = list(_PALETTE)
    colour_idx = rng.integers(0, len(colour_names), n)
    radius = rng.uniform(9.0, 13.0, n)
    extent = np.where(shapes == 0, radius, radius * np.sqrt(np.pi) / 2)
    # Keep the whole shape inside the image: the centre stays `extent` away from every edge.
    free = (IMAGE_SIZE - 1) - 2 * extent
    centre = extent[:, None] + rng.random((n, 2)) * free[:, None]
    background = rng.uniform(0.0, 70.0, (n, 1)) + rng.uniform(0.0, 20.0, (n, 3))  # grey level + tint
    images = []
    for i in range(n):
        mask = _shape_mask(int(shapes[i]), float(centre[i, 0]), float(centre[i, 1]), float(extent[i]))
        pixels = np.broadcast_to(background[i], (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
        pixels[mask] = _PALETTE[colour_names[colour_idx[i]]]
        pixels += rng.normal(0.0, _IMAGE_NOISE_SIGMA, pixels.shape)
        images.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return images, [colour_names[k] for k in colour_idx]


def _shape_mask(shape: int, cx: float, cy: float, extent: float) -> NDArray[np.bool_]:
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    box = (round(cx - extent), round(cy - extent), round(cx + extent), round(cy + extent))
    draw = ImageDraw.Draw(canvas)
    if shape == 0:
        draw.ellipse(box, fill=255)
    else:
        draw.rectangle(box, fill=255)
    return np.asarray(canvas) > 127


# ---------------------------------------------------------------------------------------- audio


def _render_audio(
    pitches: NDArray[np.int64], rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """(n, 16000) float32 clips (a harmonic tone burst at a random time, plus white noise) and f0s.

    The fundamental is the only label cue: the two pitch bands (220..440 and 880..1760 Hz) leave a
    gap of an octave between them, while loudness, timing, timbre and noise are random.
    """
    n = len(pitches)
    lo = np.array([_PITCH_RANGES_HZ[p][0] for p in _PITCHES])[pitches]
    hi = np.array([_PITCH_RANGES_HZ[p][1] for p in _PITCHES])[pitches]
    f0 = lo + rng.random(n) * (hi - lo)
    n_harmonics = rng.integers(1, 3, n)
    harmonic_amp = rng.uniform(0.1, 0.6, (n, 2)) * (np.arange(2)[None, :] < n_harmonics[:, None])
    phases = rng.uniform(0.0, 2 * np.pi, (n, 3))
    duration = rng.uniform(0.3, _MAX_BURST_SECONDS, n)
    onset = rng.random(n) * (CLIP_SECONDS - duration)
    amplitude = rng.uniform(0.2, 0.6, n)
    noise_amp = rng.uniform(0.01, 0.03, n)

    n_frames = round(SAMPLE_RATE * CLIP_SECONDS)
    onset_frame = np.rint(onset * SAMPLE_RATE).astype(np.int64)
    clips = np.empty((n, n_frames), dtype=np.float32)
    for start in range(0, n, _AUDIO_CHUNK):
        s = slice(start, min(start + _AUDIO_CHUNK, n))
        partial_amp = np.concatenate([np.ones((s.stop - s.start, 1)), harmonic_amp[s]], axis=1)
        gain = amplitude[s] / partial_amp.sum(axis=1)  # the burst's peak never exceeds `amplitude`
        burst = _tone_bursts(f0[s], partial_amp * gain[:, None], phases[s], duration[s])
        block = noise_amp[s, None].astype(np.float32) * rng.standard_normal(
            (s.stop - s.start, n_frames), dtype=np.float32
        )
        for row, i in enumerate(range(s.start, s.stop)):
            o = onset_frame[i]
            block[row, o : o + burst.shape[1]] += burst[row, : n_frames - o]
        clips[s] = block
    return clips, f0


def _tone_bursts(
    f0: NDArray[np.float64],
    partial_amp: NDArray[np.float64],
    phases: NDArray[np.float64],
    duration: NDArray[np.float64],
) -> NDArray[np.float32]:
    """(n, 0.7 s) bursts in local time; only the burst window is synthesised, which halves the cost.

    float32 is plenty here (phase error < 0.01 rad) and makes the sines several times faster.
    """
    n_window = round(_MAX_BURST_SECONDS * SAMPLE_RATE)
    t = (np.arange(n_window, dtype=np.float32) / np.float32(SAMPLE_RATE))[None, :]
    tone = np.zeros((len(f0), n_window), dtype=np.float32)
    for k in range(partial_amp.shape[1]):
        omega = (2 * np.pi * (k + 1) * f0[:, None]).astype(np.float32)
        phase = phases[:, k : k + 1].astype(np.float32)
        tone += partial_amp[:, k : k + 1].astype(np.float32) * np.sin(omega * t + phase)
    return tone * _burst_envelope(t, duration[:, None].astype(np.float32))


def _burst_envelope(pos: NDArray[np.float32], duration: NDArray[np.float32]) -> NDArray[np.float32]:
    """Raised-cosine fades so the burst has no clicks that would leak broadband energy.

    Bursts last far longer than two fades, so the distance to the nearer edge decides the ramp.
    """
    edge = np.clip(np.minimum(pos, duration - pos) / _FADE_SECONDS, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * edge)).astype(np.float32)


# ----------------------------------------------------------------------------------------- text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _render_texts(moods: NDArray[np.int64], rng: np.random.Generator) -> list[str]:
    """One sentence per sample; only the adjective's group depends on the label."""
    n = len(moods)
    picks = {
        "template": rng.integers(0, len(_TEMPLATES), n),
        "adj": rng.integers(0, len(_MOOD_WORDS["calm"]), n),
        "noun": rng.integers(0, len(_NOUNS), n),
        "deg": rng.integers(0, len(_DEGREES), n),
        "time": rng.integers(0, len(_TIMES), n),
    }
    texts = []
    for i in range(n):
        adj = _MOOD_WORDS[_MOODS[moods[i]]][picks["adj"][i]]
        deg = _DEGREES[picks["deg"][i]]
        texts.append(
            _TEMPLATES[picks["template"][i]].format(
                noun=_NOUNS[picks["noun"][i]],
                adj=adj,
                deg=deg,
                time=_TIMES[picks["time"][i]],
                art=_article(deg or adj),
            )
        )
    return texts


# ---------------------------------------------------------------------------------------- write


def _write_png(path: Path, pixels: NDArray[np.uint8]) -> None:
    # PIL writes no timestamp or text chunks unless asked, so the bytes depend only on the pixels.
    # Encoding in memory and writing once is ~3x faster than letting the encoder write to disk.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    path.write_bytes(buffer.getvalue())


def _write_wav(path: Path, clip: NDArray[np.float32]) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    path.write_bytes(buffer.getvalue())


def generate_synthetic(
    out_dir: Path, n_samples: int = 3000, seed: int = 0, missing_rate: float = 0.0
) -> Path:
    """Writes the dataset into out_dir; returns the manifest path.

    ``out_dir`` must be new or empty: stale files from an earlier run would contradict a null
    field in the new manifest. The manifest is written last, so its presence means "complete".
    """
    _validate(n_samples, seed, missing_rate)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: synthetic data must be generated into a new or empty folder")
    # Independent streams per concern, so e.g. changing the text templates leaves images unchanged.
    rng_factors, rng_mask, rng_image, rng_audio, rng_text = np.random.default_rng(seed).spawn(5)
    factors = _balanced_factors(n_samples, rng_factors)
    present = _presence_mask(n_samples, float(missing_rate), rng_mask)
    images, colours = _render_images(factors[:, 0], rng_image)
    clips, f0 = _render_audio(factors[:, 1], rng_audio)
    texts = _render_texts(factors[:, 2], rng_text)

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(exist_ok=True)
    width = max(5, len(str(n_samples - 1)))
    rows = []
    for i, split in enumerate(_splits(n_samples)):
        sid = f"s{i:0{width}d}"
        shape, pitch, mood = _SHAPES[factors[i, 0]], _PITCHES[factors[i, 1]], _MOODS[factors[i, 2]]
        image_rel = audio_rel = None
        if present[i, 1]:
            image_rel = f"images/{sid}.png"
            _write_png(out_dir / image_rel, images[i])
        if present[i, 2]:
            audio_rel = f"audio/{sid}.wav"
            _write_wav(out_dir / audio_rel, clips[i])
        row = {
            "id": sid,
            "split": split,
            "text": texts[i] if present[i, 0] else None,
            "image": image_rel,
            "audio": audio_rel,
            "label": f"{shape}-{pitch}-{mood}",
            "shape": shape,
            "pitch": pitch,
            "mood": mood,
            "colour": colours[i],
            "caption": f"{_article(colours[i])} {colours[i]} {shape} with a {pitch} tone in a {mood} mood",
            # Extra targets so multi-label and regression run on the same embedded data.
            "tags": f"{shape}|{pitch}|{mood}",
            "frequency_hz": round(float(f0[i]), 2),
        }
        rows.append(json.dumps(row, ensure_ascii=False))
    manifest = out_dir / MANIFEST_NAME
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------------------------------- cache


def _cache_root(config: SynthConfig) -> Path:
    if config.cache_dir is not None:
        return Path(config.cache_dir).expanduser()
    return cache_dir("synth")


def _cache_name(config: SynthConfig) -> str:
    return f"{_FORMAT_VERSION}-n{config.n_samples}-s{config.seed}-m{float(config.missing_rate)!r}"


def synthetic_dataset(config: SynthConfig) -> Path:
    """Returns the manifest path of the cached dataset for this config, generating it once.

    The set is built in a temporary sibling folder and renamed into place only when complete, so
    an interrupted run can never leave a half-written folder that a later run would trust.
    """
    _validate(config.n_samples, config.seed, config.missing_rate)
    return cached_build(_cache_root(config) / _cache_name(config), "synthetic data",
                        lambda tmp: generate_synthetic(tmp, config.n_samples, config.seed, config.missing_rate))


def cached_build(final: Path, what: str, build: Callable[[Path], object]) -> Path:
    """``final``'s manifest, after ``build(staging_folder)`` wrote it there once (staged, renamed into place)."""
    manifest = final / MANIFEST_NAME
    if manifest.is_file():
        return manifest
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{final.parent}: cannot create the {what} cache folder ({exc})") from exc
    if final.exists():  # only possible if something other than us wrote or damaged it
        shutil.rmtree(final, ignore_errors=True)
    with staged_folder(final, keep_existing=True) as tmp:
        build(tmp)
    return manifest
