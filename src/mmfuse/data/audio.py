"""Audio decoding and log-mel features: any WAV/FLAC/OGG -> a (n_mels, frames) float32 tensor.

Decoding uses ``soundfile`` and resampling ``scipy.signal.resample_poly`` (torchaudio is not
practical to install beside our torch). The mel filterbank comes from
``transformers.audio_utils`` (Slaney scale and norm, as librosa), so features computed here match
the usual reference implementations. Frames follow ``AudioPrep.max_frames``: a signal of n samples
gives ``n // hop_length + 1`` frames, so a clip of exactly ``max_seconds`` fills ``max_frames``.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from mmfuse.config import AudioPrep
from mmfuse.core.errors import ConfigError, DataError, InputTooLarge

LOG_FLOOR = 1e-6
"""Added to mel power before the log: silence maps to log(1e-6) ~ -13.8 instead of -inf.

Full-scale tones give mel power around 1e2, so the floor keeps ~80 dB of dynamic range (more than
most recordings' noise floor) and bounds the features for from-scratch encoders.
"""

SILENCE_LOG_MEL = math.log(LOG_FLOOR)
"""The log-mel value of digital silence: the natural padding value for a batch of spectrograms."""

_DECODE_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError)
MAX_RATIO_TERM = 1000
"""Largest up/down factor of a resampling: the filter has ~20 x max(up, down) taps, so an odd rate
(999,983 Hz -> 16 kHz is 16000/999983) would cost seconds and gigabytes. Past it the ratio is the
closest fraction with terms <= 1000: a relative rate error below 1e-3 (under 2 cents of pitch; 1.25e-4
for 8,001 Hz -> 16 kHz, 1.4e-6 for 44,099 Hz). Every common rate pair (8, 11.025, 16, 22.05, 32,
44.1, 48, 96 kHz ...) reduces to smaller terms and stays exact."""

_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")

HeaderCheck = Callable[[int, int, int], None]
"""Called with (sample rate, channels, frames) from a file's header, before any sample is read."""


@dataclass
class CropTally:
    """Clips cropped to ``max_seconds`` so far, so a run can say so once instead of once per clip."""

    count: int = 0
    longest_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.longest_seconds = max(self.longest_seconds, seconds)

    def message(self, prep: AudioPrep) -> str | None:
        """The one line a run prints about cropping, or None when nothing was cropped."""
        if not self.count:
            return None
        clips = "1 audio clip was" if self.count == 1 else f"{self.count} audio clips were"
        return (f"{clips} longer than data.audio.max_seconds and {'was' if self.count == 1 else 'were'} cropped "
                f"to {'its' if self.count == 1 else 'their'} first {prep.max_seconds:g} s "
                f"(the longest was {self.longest_seconds:.4g} s)")


def load_audio(path: Path, prep: AudioPrep) -> torch.Tensor:
    """Decodes, resamples and crops ``path``; returns its (n_mels, frames <= max_frames) log-mel."""
    features = log_mel(load_waveform(path, prep), prep)
    assert features.shape[1] <= prep.max_frames, "cropping must bound the frame count"
    return features


def load_waveform(path: Path, prep: AudioPrep, crops: CropTally | None = None) -> np.ndarray:
    """Mono float32 samples at ``prep.sample_rate``, cropped (from the start) to ``max_seconds``.

    A clip that is cropped is counted in ``crops`` (with its full length), for the run to report.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    samples, sr, total = _read(path, str(path), prep.max_seconds)
    return _finish(samples, sr, total, str(path), prep, crops)


def decode_waveform_bytes(data: bytes, label: str, prep: AudioPrep, max_seconds: float | None = None,
                          max_bytes: int | None = None, rates: tuple[int, int] | None = None) -> np.ndarray:
    """``load_waveform`` of an uploaded file held in memory (the HTTP server's inputs); ``label``
    names it in errors. From the header, before any sample is read: a clip lasting more than
    ``max_seconds``, at a sample rate above ``rates[1]`` or whose decoding would hold more than
    ``max_bytes`` (``decode_cost``) raises ``InputTooLarge``; a rate below ``rates[0]`` ``DataError``.
    Only the kept crop is ever decoded, so memory stays bounded either way."""

    def check(sr: int, channels: int, frames: int) -> None:
        if rates is not None and sr > rates[1]:
            raise InputTooLarge(f"audio {label} has a sample rate of {sr:,} Hz; the limit is {rates[1]:,} Hz")
        if rates is not None and sr < rates[0]:
            raise DataError(f"audio {label} has a sample rate of {sr:,} Hz, below the minimum of {rates[0]:,} Hz")
        if max_seconds is not None and frames / sr > max_seconds:
            raise InputTooLarge(f"audio {label} lasts {frames / sr:.4g} s; the limit is {max_seconds:g} s")
        cost = decode_cost(sr, channels, frames, prep)
        if max_bytes is not None and cost > max_bytes:
            raise InputTooLarge(f"audio {label} ({channels} channels at {sr:,} Hz) would take {cost:,} bytes "
                                f"to decode; the limit is {max_bytes:,}")

    samples, sr, total = _read(io.BytesIO(data), label, prep.max_seconds, check)
    if max_seconds is not None and total / sr > max_seconds:  # a stream whose header gave no length
        raise InputTooLarge(f"audio {label} lasts {total / sr:.4g} s; the limit is {max_seconds:g} s")
    return _finish(samples, sr, total, label, prep, None)


def decode_cost(sr: int, channels: int, frames: int, prep: AudioPrep) -> int:
    """Bytes that decoding and resampling a clip will hold at once, from its header: the frames read
    (the crop and its margin; all of them when the header gives no length) x channels as float32, the
    mono mix, and the resampled clip in float64 (scipy's working type) and float32."""
    read = _read_limit(prep.max_seconds, sr)
    if frames > 0:
        read = min(read, frames)
    resampled = math.ceil(read * prep.sample_rate / sr) if sr != prep.sample_rate else 0
    return read * channels * 4 + read * 4 + resampled * 12


def waveform_from_samples(samples: np.ndarray, sr: int, total: int, label: str, prep: AudioPrep,
                          crops: CropTally | None = None) -> np.ndarray:
    """``load_waveform`` of samples decoded elsewhere (a video's audio track, ``mmfuse.data.video``):
    (frames, channels) float32 at ``sr`` Hz, ``total`` frames in the whole clip -> the mono waveform
    at ``prep.sample_rate``, cropped, with the same checks, resampling and crop count."""
    return _finish(samples, sr, total, label, prep, crops)


def _finish(samples: np.ndarray, sr: int, total: int, label: str, prep: AudioPrep,
            crops: CropTally | None) -> np.ndarray:
    """(frames, channels) as read -> the mono waveform at ``prep.sample_rate``, cropped."""
    if crops is not None and total > prep.max_seconds * sr:
        crops.add(total / sr)
    if samples.shape[0] == 0:
        raise DataError(f"audio file {label} has no samples")
    if not np.isfinite(samples).all():
        raise DataError(f"audio file {label} has non-finite samples (NaN or inf)")
    mono = samples.mean(axis=1, dtype=np.float32)
    if sr != prep.sample_rate:
        if not prep.resample:
            raise DataError(
                f"{label}: sample rate {sr} Hz, expected {prep.sample_rate} Hz "
                "(set data.audio.resample: true to resample)"
            )
        if not Fraction(1, MAX_RATIO_TERM) <= Fraction(prep.sample_rate, sr) <= MAX_RATIO_TERM:
            raise DataError(f"{label}: sample rate {sr:,} Hz is more than {MAX_RATIO_TERM}x away from "
                            f"{prep.sample_rate:,} Hz; it cannot be resampled")
        mono = _resample(mono, sr, prep.sample_rate)
    return np.ascontiguousarray(mono[: max_samples(prep)], dtype=np.float32)


def max_samples(prep: AudioPrep) -> int:
    """Samples kept per clip; the same rounding as ``AudioPrep.max_frames`` so the two agree."""
    return int(prep.max_seconds * prep.sample_rate)


def _read_limit(max_seconds: float, sr: int) -> int:
    """Frames read for a crop of ``max_seconds``: a small margin past it gives resampling real
    context at the crop edge, so it never comes out one sample short."""
    return math.ceil(max_seconds * sr) + sr // 50 + 1


def _read(source: Path | io.BytesIO, label: str, max_seconds: float,
          check: HeaderCheck | None = None) -> tuple[np.ndarray, int, int]:
    """(frames, channels) float32, the file's rate and its length in frames, reading only what the
    crop will keep; ``check`` sees the header first and may refuse the file."""
    try:
        with sf.SoundFile(source if isinstance(source, io.BytesIO) else str(source)) as f:
            sr = int(f.samplerate)
            if sr <= 0:
                raise DataError(f"cannot decode audio {label}: sample rate {sr} Hz")
            if check is not None:
                check(sr, int(f.channels), int(f.frames))
            data = f.read(frames=_read_limit(max_seconds, sr), dtype="float32", always_2d=True)
            total = max(int(f.frames), data.shape[0])  # frames may be unknown (0) for some streams
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode audio {label}: {_reason(exc)}") from None
    return data, sr, total


def _resample(samples: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Polyphase resampling by the reduced ratio to_sr/from_sr (anti-aliased, exact length), or by
    its closest fraction with terms <= ``MAX_RATIO_TERM`` when the exact one is costly."""
    ratio = Fraction(to_sr, from_sr)
    if max(ratio.numerator, ratio.denominator) > MAX_RATIO_TERM:
        ratio = _bounded_ratio(ratio)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def _bounded_ratio(ratio: Fraction) -> Fraction:
    """The closest fraction to ``ratio`` (within 1/1000..1000) with both terms <= ``MAX_RATIO_TERM``."""
    if ratio >= 1:
        return 1 / (1 / ratio).limit_denominator(MAX_RATIO_TERM)
    return ratio.limit_denominator(MAX_RATIO_TERM)


def log_mel(waveform: np.ndarray | torch.Tensor, prep: AudioPrep) -> torch.Tensor:
    """(n_mels, len // hop_length + 1) float32 log-mel power spectrogram of a 1-D waveform.

    Centred frames (reflect padding, constant padding for signals too short to reflect), periodic
    Hann window, power spectrum, Slaney mel filters, then ``log(mel + LOG_FLOOR)``. Runs on the
    waveform's device when given a tensor.
    """
    signal = torch.as_tensor(waveform, dtype=torch.float32)
    if signal.ndim != 1:
        raise ValueError(f"log_mel expects a 1-D waveform, got shape {tuple(signal.shape)}")
    if signal.numel() == 0:
        raise DataError("cannot compute a log-mel spectrogram of an empty waveform")
    power = _power_spectrogram(signal, prep.n_fft, prep.hop_length)
    filters = mel_filters(prep.sample_rate, prep.n_fft, prep.n_mels, prep.f_min, prep.f_max)
    mel = filters.to(signal.device) @ power
    return torch.log(mel + LOG_FLOOR)


def _power_spectrogram(signal: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """(n_fft // 2 + 1, len // hop + 1) |STFT|^2.

    Padding n_fft // 2 on the left and the rest on the right centres frame t on sample t * hop and
    gives exactly len // hop + 1 frames for even and odd n_fft alike (torch's own center=True
    gives one fewer for odd n_fft). Reflection needs more samples than the pad, so very short
    signals are zero-padded instead of crashing.
    """
    left, right = n_fft // 2, n_fft - n_fft // 2
    mode = "reflect" if signal.shape[-1] > right else "constant"
    # (..., n) -> (rows, 1, n): one batched STFT for equal-length signals (see ``log_mel_batch``).
    rows = signal.reshape(-1, 1, signal.shape[-1])
    padded = torch.nn.functional.pad(rows, (left, right), mode=mode)[:, 0]
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=signal.device)
    spec = torch.stft(padded, n_fft, hop_length=hop_length, window=window, center=False, return_complex=True)
    power = spec.abs().pow(2)
    return power.reshape(*signal.shape[:-1], *power.shape[-2:])


def log_mel_batch(waveforms: Sequence[np.ndarray], prep: AudioPrep) -> list[torch.Tensor]:
    """``log_mel`` of many 1-D waveforms, one batched STFT per group of equal length.

    The same values as ``log_mel`` on each (bit-identical in our tests), about twice as fast for the
    hundreds of short clips a robustness sweep re-featurises per noise level.
    """
    out: list[torch.Tensor | None] = [None] * len(waveforms)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(waveforms):
        if np.ndim(w) != 1:
            raise ValueError(f"log_mel expects a 1-D waveform, got shape {np.shape(w)}")
        if np.size(w) == 0:
            raise DataError("cannot compute a log-mel spectrogram of an empty waveform")
        groups.setdefault(int(np.size(w)), []).append(i)
    filters = mel_filters(prep.sample_rate, prep.n_fft, prep.n_mels, prep.f_min, prep.f_max)
    for indices in groups.values():
        signals = torch.from_numpy(np.stack([np.asarray(waveforms[i], dtype=np.float32) for i in indices]))
        mel = torch.log(filters @ _power_spectrogram(signals, prep.n_fft, prep.hop_length) + LOG_FLOOR)
        for row, i in enumerate(indices):
            out[i] = mel[row]
    return [m for m in out if m is not None]


@functools.lru_cache(maxsize=16)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 Slaney mel filterbank, built once per setting.

    The returned tensor is shared by every caller through the cache: do not modify it in place.
    """
    top = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < top <= sample_rate / 2:
        raise ConfigError(
            f"data.audio: need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2:g} Hz, "
            f"got f_min={f_min:g}, f_max={top:g}"
        )
    from transformers.audio_utils import mel_filter_bank  # lazy: transformers is slow to import

    bank = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=f_min,
        max_frequency=top,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(np.ascontiguousarray(bank.T, dtype=np.float32))


def _reason(exc: BaseException) -> str:
    """One line, even when libsndfile's message is empty or spans lines, without the repr of the
    in-memory file soundfile puts in it (``<_io.BytesIO object at 0x...>``: a heap address)."""
    text = " ".join(_REPR.sub("", str(exc)).split())
    return text or type(exc).__name__
