"""Video decoding with PyAV: a file -> (T, C, size, size) float32 frames, and its audio track -> a waveform.

Why PyAV: its wheels bundle FFmpeg, so ``pip install 'mmfuse[video]'`` decodes MP4/H.264, WebM,
MKV, AVI, ... with no system library (torchcodec needs a system FFmpeg of a matching version;
torchvision's video reader is deprecated and being removed).

Frames are chosen from the timestamps of the decoded frames (``VideoPrep``): ``frames`` frames at
the middles of equal segments of the clip (uniform, the default), or one every 1/fps seconds from
the start (``fps``). Each chosen frame is then framed and normalised exactly like an image
(``mmfuse.data.image.image_to_tensor``). The audio track is decoded to float samples at the file's
rate and finished by ``mmfuse.data.audio.waveform_from_samples`` (mono, resampled, cropped), so an
``audio`` modality read from a video (``from_video: true``) gets the same features as one read
from a WAV file. A file that cannot be decoded, that has no frames, or (when its audio is asked
for) no audio track raises ``DataError`` naming the file, so ``data.on_error`` can skip it; a frame
over ``MAX_FRAME_PIXELS`` raises ``InputTooLarge``, from the header before decoding and from each frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmfuse.config import AudioPrep, VideoPrep
from mmfuse.core.errors import ConfigError, DataError, InputTooLarge
from mmfuse.data.audio import CropTally, waveform_from_samples
from mmfuse.data.image import image_to_tensor

MAX_FRAME_PIXELS = 40_000_000
"""Largest frame (width x height) decoded, as ``max_image_pixels`` for images: 8K video is 33 M pixels, and
a damaged or hostile header claiming more would make FFmpeg allocate that much for every frame kept."""
MAX_HELD_BYTES = 256 * 1024 * 1024
"""Decoded frames held while a clip is read (``decode_video``): 10 s of 720p at 30 fps held all 300
frames, 440 MB more peak memory for 8 chosen ones; past this the clip is read twice instead."""
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ogv", ".flv", ".3gp")
"""File types a video column usually holds (documentation and examples; PyAV reads whatever FFmpeg reads)."""


def _av() -> Any:
    """The PyAV module, or a ConfigError saying how to install it (it is an optional extra)."""
    try:
        import av
    except ImportError:
        raise ConfigError("video modalities need PyAV: pip install 'mmfuse[video]'") from None
    return av


def _check_file(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"video file not found: {path}")
    if path.stat().st_size == 0:  # an interrupted download or copy: say so, not "invalid data"
        raise DataError(f"video file {path} is empty (0 bytes)")
    return str(path)


# A note on tags, and why every ``av.open`` passes ``metadata_errors="replace"``: PyAV decodes each tag as
# strict UTF-8 on open, so one damaged byte in a tag nothing here reads (a WebM's DURATION, the
# encoder name) raised UnicodeDecodeError out of the decoder (found by tests/test_fuzz_video_text.py).


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without the path it repeats, on one line."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputTooLarge(f"video file {label} has frames of {width}x{height} = {width * height:,} pixels, over "
                            f"the limit of {max_pixels:,}")


def decode_video(path: Path, prep: VideoPrep, max_pixels: int = MAX_FRAME_PIXELS,
                 max_held_bytes: int = MAX_HELD_BYTES) -> list[Image.Image]:
    """The chosen frames of ``path`` as RGB images at their own resolution (see ``select_frames``).

    A frame over ``max_pixels`` is refused from the stream's header before decoding, and from each
    decoded frame (a stream may change its size, a header may lie) before it is kept. Which frames
    are chosen depends on how many there are, known only at the end; the decoded frames are held
    until then while they fit in ``max_held_bytes``, and past that dropped, the clip being read a
    second time for the chosen ones (the same frames: decoding is deterministic).
    """
    av = _av()
    label = _check_file(Path(path))
    try:
        with av.open(label, metadata_errors="replace") as container:  # see the note on tags
            stream, rate = _video_stream(container, label, max_pixels)
            held: list[Any] | None = []
            held_bytes = 0
            times: list[float] = []
            for frame, t in _frames(container, stream, label, prep, rate, max_pixels):
                times.append(t)
                if held is not None:
                    held_bytes += sum(plane.buffer_size for plane in frame.planes)
                    if held_bytes <= max_held_bytes:
                        held.append(frame)
                    else:
                        held = None  # dropped now: the chosen frames are decoded again below
            if not times:
                raise DataError(f"video file {label} has no frames")
            picks = select_frames(times, rate, prep)
            if held is not None:
                return [held[i].to_image() for i in picks]
        with av.open(label, metadata_errors="replace") as container:
            stream, rate = _video_stream(container, label, max_pixels)
            wanted, chosen = set(picks), {}
            for index, (frame, _) in enumerate(_frames(container, stream, label, prep, rate, max_pixels)):
                if index in wanted:
                    chosen[index] = frame.to_image()
                if index >= max(wanted):
                    break
        if len(chosen) != len(wanted):
            raise DataError(f"video file {label} gave fewer frames when read again ({len(chosen)} of the "
                            f"{len(wanted)} chosen); the file changed or decodes differently each time")
        return [chosen[i] for i in picks]
    except av.FFmpegError as exc:
        raise DataError(f"cannot decode video {label}: {_reason(exc)}") from None


def _video_stream(container: Any, label: str, max_pixels: int) -> tuple[Any, float]:
    """The first video stream, its size checked from the header, and its frame rate."""
    if not container.streams.video:
        raise DataError(f"video file {label} has no video stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None:  # FFmpeg found no decoder for it (a damaged or truncated header)
        raise DataError(f"cannot decode video {label}: its video stream has no codec FFmpeg can decode")
    _check_pixels(label, context.width or 0, context.height or 0, max_pixels)
    return stream, _rate(stream)


def _frames(container: Any, stream: Any, label: str, prep: VideoPrep, rate: float,
            max_pixels: int) -> Iterator[tuple[Any, float]]:
    """Each decoded frame of the first ``prep.max_seconds`` and its time from the first frame."""
    start: float | None = None
    for index, frame in enumerate(container.decode(stream)):
        _check_pixels(label, frame.width, frame.height, max_pixels)
        t = float(frame.time) if frame.time is not None else index / rate
        start = t if start is None else start
        if prep.max_seconds is not None and t - start >= prep.max_seconds:
            return
        yield frame, t - start


def _rate(stream: Any) -> float:
    """Frames per second from the header, 25 when it gives none or nonsense (0, negative, huge)."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and 0 < float(rate) <= 1000:
            return float(rate)
    return 25.0


def select_frames(times: list[float], rate: float, prep: VideoPrep) -> list[int]:
    """Indices of the frames to keep, given every decoded frame's time (s from the first frame).

    Uniform (``fps`` null): the frame at the middle of each of ``frames`` equal segments, so a clip
    with fewer frames repeats some and every clip gives exactly ``frames``. ``fps``: the last frame
    shown at each time k / fps (k = 0, 1, ...) that lies within the clip, at most ``frames``.
    """
    n = len(times)
    if prep.fps is None:
        return [min(n - 1, math.floor((k + 0.5) * n / prep.frames)) for k in range(prep.frames)]
    duration = times[-1] + 1.0 / rate
    sorted_times = np.asarray(times)
    picks = []
    for k in range(prep.frames):
        t = k / prep.fps
        if t >= duration:
            break
        picks.append(max(0, int(np.searchsorted(sorted_times, t + 1e-6, side="right")) - 1))
    return picks


def frames_to_tensor(frames: list[Image.Image], prep: VideoPrep) -> torch.Tensor:
    """(T, C, size, size) float32: each frame resized, cropped and normalised as ``data.image`` would."""
    return torch.stack([image_to_tensor(frame, prep) for frame in frames])


def load_video(path: Path, prep: VideoPrep) -> torch.Tensor:
    """Decodes ``path`` into (T, C, size, size) float32 frames (T = prep.frames, or fewer with fps)."""
    return frames_to_tensor(decode_video(path, prep), prep)


def load_video_waveform(path: Path, prep: AudioPrep, crops: CropTally | None = None) -> np.ndarray:
    """The audio track of ``path`` as ``load_waveform`` gives a WAV: mono float32 at ``prep.sample_rate``,
    cropped to ``max_seconds`` (only that much, plus a little context for resampling, is decoded).

    Samples before time 0 (an AAC encoder's priming, when the file says so) are dropped.
    """
    av = _av()
    label = _check_file(Path(path))
    try:
        with av.open(label, metadata_errors="replace") as container:  # see the note on tags
            if not container.streams.audio:
                raise DataError(f"video file {label} has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # float planar, the file's own rate and layout
            chunks: list[np.ndarray] = []
            kept, sr, limit = 0, 0, 0
            for frame in container.decode(stream):
                if not sr:
                    sr = int(frame.sample_rate)
                    limit = math.ceil(prep.max_seconds * sr) + sr // 50 + 1
                skip = round(-float(frame.time) * sr) if frame.time is not None and frame.time < 0 else 0
                for out in resampler.resample(frame):
                    array = out.to_ndarray()[:, skip:]
                    skip = max(0, skip - out.samples)
                    chunks.append(array[:, : limit - kept])
                    kept += chunks[-1].shape[1]
                if kept >= limit:
                    break
            total = kept
            if stream.duration is not None and stream.time_base is not None and sr:
                total = max(kept, int(float(stream.duration * stream.time_base) * sr))
    except av.FFmpegError as exc:
        raise DataError(f"cannot decode the audio track of video {label}: {_reason(exc)}") from None
    if not chunks or not sr:
        raise DataError(f"video file {label} has an audio track with no samples")
    samples = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)  # (frames, channels)
    return waveform_from_samples(samples, sr, total, f"{label} (audio track)", prep, crops)
