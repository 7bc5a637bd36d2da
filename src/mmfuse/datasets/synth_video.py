"""The embedded synthetic video set: real MP4 files (frames + soundtrack) and a caption, 8 classes.

It mirrors ``mmfuse.datasets.synth``: each modality carries exactly one binary factor of the
8-class label, so no single modality gets above 25% accuracy and only a model that fuses all three
solves it.

- video (the frames): a shape moving **left or right** across the clip. Every single frame is
  equally likely under both directions (start and end positions are mirror images), so only the
  order of the frames tells the direction: a frame encoder with order-blind pooling cannot learn
  it, a temporal model can.
- audio (the video's own soundtrack, ``from_video: true``): a tone burst of **low or high** pitch.
- text (the ``caption`` column): a sentence whose adjective is **calm or stormy**.

Shape, colour, size, height, speed, background, loudness, timing and the other words are drawn
independently of the label: nuisance. Files are MPEG-4 Part 2 video with a 16-bit PCM track in an
MP4 container, written by PyAV with FFmpeg's bit-exact flags on one thread, so the same seed gives
byte-identical files (PCM rather than AAC: an AAC track starts with encoder priming, which would
shift the audio by 1024 samples).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.datasets.synth import MANIFEST_NAME, cached_build

__all__ = ["LABEL_FACTORS", "generate_synthetic_video", "synthetic_video_dataset"]

LABEL_FACTORS: tuple[str, ...] = ("direction", "pitch", "mood")
_FORMAT_VERSION = "v1"  # bump when the generated content changes, so stale caches are never reused

FRAMES = 16
FPS = 16
SIZE = 32
SAMPLE_RATE = 8000
CLIP_SECONDS = 1.0

_DIRECTIONS = ("left", "right")
_PITCHES = ("low", "high")
_MOODS = ("calm", "stormy")
_PITCH_RANGES_HZ = {"low": (200.0, 400.0), "high": (800.0, 1600.0)}
_PALETTE = ((230, 40, 40), (40, 210, 60), (60, 90, 240), (235, 220, 40), (225, 50, 220), (40, 215, 225))
_MOOD_WORDS = {
    "calm": ("calm", "quiet", "gentle", "peaceful", "soft", "still"),
    "stormy": ("stormy", "loud", "fierce", "wild", "harsh", "violent"),
}
_NOUNS = ("sea", "city", "forest", "street", "sky", "garden", "market", "river")
_TEMPLATES = ("a {adj} {noun}", "the {noun} looks {adj}", "a {adj} {noun} at night", "such a {adj} {noun} today")
_NOISE_SIGMA = 8.0


def _validate(n_samples: int, seed: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 8:
        raise DataError(f"synthetic video data needs n_samples >= 8 (one per class), got {n_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"synthetic video data needs a non-negative integer seed, got {seed!r}")


def _balanced_factors(n: int, rng: np.random.Generator) -> NDArray[np.int64]:
    combos = np.array(list(itertools.product(range(2), repeat=3)), dtype=np.int64)
    return combos[np.arange(n) % len(combos)][rng.permutation(n)]


def _splits(n: int) -> list[str]:
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


def _render_clip(direction: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """(FRAMES, SIZE, SIZE, 3) uint8: one shape crossing a noisy background, left (0) or right (1)."""
    radius = rng.uniform(3.5, 6.0)
    travel = rng.uniform(12.0, SIZE - 2 * radius - 2)
    first = rng.uniform(radius + 1, SIZE - 1 - radius - travel)  # the start of a rightward path
    xs = first + travel * np.linspace(0.0, 1.0, FRAMES)
    if direction == 0:  # leftward: the mirror image, so single frames look alike for both directions
        xs = (SIZE - 1) - xs
    y = rng.uniform(radius + 1, SIZE - 1 - radius)
    square = bool(rng.integers(0, 2))
    colour = _PALETTE[int(rng.integers(0, len(_PALETTE)))]
    background = rng.uniform(0.0, 70.0) + rng.uniform(0.0, 20.0, 3)
    clip = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for t, x in enumerate(xs):
        canvas = Image.new("L", (SIZE, SIZE), 0)
        box = (round(x - radius), round(y - radius), round(x + radius), round(y + radius))
        draw = ImageDraw.Draw(canvas)
        (draw.rectangle if square else draw.ellipse)(box, fill=255)
        pixels = np.broadcast_to(background, (SIZE, SIZE, 3)).copy()
        pixels[np.asarray(canvas) > 127] = colour
        pixels += rng.normal(0.0, _NOISE_SIGMA, pixels.shape)
        clip[t] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return clip


def _render_audio(pitch: int, rng: np.random.Generator) -> tuple[NDArray[np.float32], float]:
    """(SAMPLE_RATE,) float32: a tone burst (f0 in the low or high band, 1-2 harmonics) plus noise."""
    lo, hi = _PITCH_RANGES_HZ[_PITCHES[pitch]]
    f0 = lo + rng.random() * (hi - lo)
    n = round(SAMPLE_RATE * CLIP_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    duration = rng.uniform(0.3, 0.7)
    onset = rng.random() * (CLIP_SECONDS - duration)
    envelope = ((t >= onset) & (t < onset + duration)).astype(np.float64)
    fade = np.clip(np.minimum(t - onset, onset + duration - t) / 0.01, 0.0, 1.0)
    envelope *= 0.5 - 0.5 * np.cos(np.pi * fade)
    second = rng.uniform(0.0, 0.5) * rng.integers(0, 2)
    tone = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)) + second * np.sin(4 * np.pi * f0 * t)
    amplitude = rng.uniform(0.2, 0.6) / (1.0 + second)
    wave = amplitude * envelope * tone + rng.uniform(0.01, 0.03) * rng.standard_normal(n)
    return np.clip(wave, -1.0, 1.0).astype(np.float32), f0


def _caption(mood: int, rng: np.random.Generator) -> str:
    words = _MOOD_WORDS[_MOODS[mood]]
    template = _TEMPLATES[int(rng.integers(0, len(_TEMPLATES)))]
    return template.format(adj=words[int(rng.integers(0, len(words)))], noun=_NOUNS[int(rng.integers(0, len(_NOUNS)))])


def write_video(path: Path, frames: NDArray[np.uint8], audio: NDArray[np.float32] | None, fps: int = FPS,
                sample_rate: int = SAMPLE_RATE) -> None:
    """Writes (T, H, W, 3) uint8 frames (+ a mono float soundtrack) as MPEG-4 video + PCM audio in MP4.

    Bit-exact muxing and one encoder thread: the bytes depend only on the inputs. Also what the tests
    use to make videos without an audio track (``audio=None``) or with no video stream (no frames:
    the muxer leaves the empty stream out).
    """
    try:
        import av
    except ImportError:
        raise ConfigError("writing videos needs PyAV: pip install 'mmfuse[video]'") from None
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height = int(frames.shape[2]), int(frames.shape[1])
        video.pix_fmt = "yuv420p"
        video.thread_count = 1
        video.options = {"qscale": "2", "flags": "+bitexact"}
        sound: Any = None
        if audio is not None:
            sound = container.add_stream("pcm_s16le", rate=sample_rate)
            sound.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None and audio is not None:
            pcm = np.clip(np.rint(audio * 32767), -32768, 32767).astype(np.int16)[None, :]
            chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            chunk.sample_rate = sample_rate
            for packet in sound.encode(chunk):
                container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


def generate_synthetic_video(out_dir: Path, n_samples: int = 400, seed: int = 0) -> Path:
    """Writes the set into ``out_dir`` (new or empty): ``videos/<id>.mp4`` and ``manifest.jsonl`` (last).

    Columns: id, split, video (path), caption (text), label (8 classes) and its three factors.
    """
    _validate(n_samples, seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: synthetic video data must be generated into a new or empty folder")
    rng_factors, rng_video, rng_audio, rng_text = np.random.default_rng(seed).spawn(4)
    factors = _balanced_factors(n_samples, rng_factors)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n_samples - 1)))
    rows = []
    for i, split in enumerate(_splits(n_samples)):
        sid = f"v{i:0{width}d}"
        direction, pitch, mood = (int(f) for f in factors[i])
        audio, f0 = _render_audio(pitch, rng_audio)
        relative = f"videos/{sid}.mp4"
        write_video(out_dir / relative, _render_clip(direction, rng_video), audio)
        rows.append(json.dumps({
            "id": sid, "split": split, "video": relative, "caption": _caption(mood, rng_text),
            "label": f"{_DIRECTIONS[direction]}-{_PITCHES[pitch]}-{_MOODS[mood]}",
            "direction": _DIRECTIONS[direction], "pitch": _PITCHES[pitch], "mood": _MOODS[mood],
            "frequency_hz": round(float(f0), 2),
        }))
    manifest = out_dir / MANIFEST_NAME
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def synthetic_video_dataset(n_samples: int = 400, seed: int = 0, root: Path | None = None) -> Path:
    """The manifest of the cached set for (n_samples, seed) under ``root`` (default: the synthetic data
    cache, ``$MMFUSE_CACHE/synth``, which ``mmfuse cache`` lists), generated once in a staging folder
    and renamed into place."""
    _validate(n_samples, seed)
    base = Path(root).expanduser() if root is not None else cache_dir("synth")
    return cached_build(base / f"video-{_FORMAT_VERSION}-n{n_samples}-s{seed}", "synthetic video",
                        lambda tmp: generate_synthetic_video(tmp, n_samples, seed))
