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
from collections.abc import Sequence
from dataclasses import dataclass
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


def decode_waveform_bytes(data: bytes, label: str, prep: AudioPrep, max_seconds: float | None = None) -> np.ndarray:
    """``load_waveform`` of an uploaded file held in memory (the HTTP server's inputs); ``label``
    names it in errors. A clip whose header says it lasts more than ``max_seconds`` raises
    ``InputTooLarge`` (only the kept crop is ever decoded, so memory stays bounded either way)."""
    samples, sr, total = _read(io.BytesIO(data), label, prep.max_seconds)
    if max_seconds is not None and total / sr > max_seconds:
        raise InputTooLarge(f"audio {label} lasts {total / sr:.4g} s; the limit is {max_seconds:g} s")
    return _finish(samples, sr, total, label, prep, None)


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
        mono = _resample(mono, sr, prep.sample_rate)
    return np.ascontiguousarray(mono[: max_samples(prep)], dtype=np.float32)


def max_samples(prep: AudioPrep) -> int:
    """Samples kept per clip; the same rounding as ``AudioPrep.max_frames`` so the two agree."""
    return int(prep.max_seconds * prep.sample_rate)


def _read(source: Path | io.BytesIO, label: str, max_seconds: float) -> tuple[np.ndarray, int, int]:
    """(frames, channels) float32, the file's rate and its length in frames, reading only what the
    crop will keep.

    A small margin past ``max_seconds`` is read so resampling has real context at the crop edge
    and never comes out one sample short.
    """
    try:
        with sf.SoundFile(source if isinstance(source, io.BytesIO) else str(source)) as f:
            sr = int(f.samplerate)
            limit = math.ceil(max_seconds * sr) + sr // 50 + 1
            data = f.read(frames=limit, dtype="float32", always_2d=True)
            total = max(int(f.frames), data.shape[0])  # frames may be unknown (0) for some streams
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode audio {label}: {_reason(exc)}") from None
    return data, sr, total


def _resample(samples: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Polyphase resampling by the reduced ratio to_sr/from_sr (anti-aliased, exact length)."""
    g = math.gcd(from_sr, to_sr)
    return resample_poly(samples, to_sr // g, from_sr // g).astype(np.float32)


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
    """One line, even when libsndfile's message is empty or spans lines."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
