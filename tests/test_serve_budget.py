"""Issue 30, item 3: an upload's cost is bounded from its header, in bytes, before it is decoded.

Images: width x height x the bytes per pixel Pillow holds (16-bit greyscale 2, RGB/RGBA 4); the
16-bit scaling no longer makes float64 copies (a 6000 x 6000 PNG of 70 KB cost 1.1 GB). Audio:
frames x channels x 4 plus the resampled clip, and a bounded sample rate; an odd rate no longer
builds a filter of millions of taps.
"""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from hostile_helpers import hc
from PIL import Image

from mmfuse.config import AudioPrep, ImagePrep
from mmfuse.core.errors import DataError, InputTooLarge
from mmfuse.data.audio import decode_cost, decode_waveform_bytes
from mmfuse.data.image import _high_bit_to_l, decode_image_bytes, decoded_bytes

PREP = ImagePrep(size=32)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("mode", "per_pixel"), [("L", 1), ("P", 1), ("I;16", 2), ("RGB", 4), ("RGBA", 4), ("LA", 4)])
def test_decoded_bytes_are_what_pillow_holds(mode: str, per_pixel: int) -> None:
    image = Image.open(io.BytesIO(png(Image.new(mode, (30, 20)))))
    assert decoded_bytes(image) == 600 * per_pixel
    image.load()
    assert decoded_bytes(image) == 600 * per_pixel


def test_an_image_over_the_byte_budget_is_refused_from_its_header() -> None:
    deep = hc.png16(3000, 3000)  # 9 M pixels (under a 40 M cap), 18 MB decoded, 30 KB on the wire
    with pytest.raises(InputTooLarge) as refused:
        decode_image_bytes(deep, "deep.png", PREP, 40_000_000, 16_000_000)
    assert str(refused.value) == ("image deep.png (3000x3000, mode I;16) would decode to 18,000,000 bytes; "
                                  "the limit is 16,000,000")
    colour = png(Image.new("RGBA", (2000, 1000)))
    with pytest.raises(InputTooLarge, match="would decode to 8,000,000 bytes; the limit is 7,999,999"):
        decode_image_bytes(colour, "rgba.png", PREP, 40_000_000, 7_999_999)
    assert decode_image_bytes(colour, "rgba.png", PREP, 40_000_000, 8_000_000).size == (2000, 1000)


def test_sixteen_bit_scaling_is_exact_and_makes_no_float_copy() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (300, 257), dtype=np.uint16)
    values[0, :4] = (0, 128, 65535, 257 * 200 + 128)
    expected = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(_high_bit_to_l(Image.fromarray(values))), expected)
    big = hc.png16(6000, 6000)  # the 77 KB image: 36 M pixels
    tracemalloc.start()
    try:
        image = decode_image_bytes(big, "deep.png", PREP, 40_000_000, 256 * 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and image.size == (6000, 6000)
    assert peak < 1.5 * 36_000_000, f"numpy allocated {peak:,} bytes (float64 copies took 24+ bytes a pixel)"


def wav(rate: int, frames: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((frames, channels), np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_audio_cost_counts_channels_and_the_resampled_clip() -> None:
    prep = AudioPrep(sample_rate=16000, max_seconds=2.0)
    read = 2 * 48000 + 48000 // 50 + 1  # the crop and its margin: 96,961 frames
    assert decode_cost(48000, 64, 10**6, prep) == read * 64 * 4 + read * 4 + (-(-read * 16000 // 48000)) * 12
    assert decode_cost(16000, 1, 100, prep) == 100 * 4 + 100 * 4  # no resampling, a short clip
    many = wav(48000, 48000, channels=64)
    with pytest.raises(InputTooLarge) as refused:
        decode_waveform_bytes(many, "many.wav", prep, 60.0, 4_000_000, (8000, 192000))
    # 48,000 frames (the whole clip, under the crop) x 64 channels x 4 + the mono mix + 16,000 resampled x 12
    assert str(refused.value) == ("audio many.wav (64 channels at 48,000 Hz) would take 12,672,000 bytes to "
                                  "decode; the limit is 4,000,000")
    wave = decode_waveform_bytes(many, "many.wav", prep, 60.0, 16_000_000, (8000, 192000))
    assert wave.shape == (16000,)


@pytest.mark.parametrize(("rate", "message"), [
    (192_001, "sample rate of 192,001 Hz; the limit is 192,000 Hz"),
    (7_999, "sample rate of 7,999 Hz, below the minimum of 8,000 Hz"),
])
def test_sample_rates_outside_the_range_are_refused(rate: int, message: str) -> None:
    prep = AudioPrep(sample_rate=16000, max_seconds=1.0)
    with pytest.raises(DataError, match=message) as refused:
        decode_waveform_bytes(wav(rate, 100), "r.wav", prep, 60.0, 10**9, (8000, 192000))
    assert isinstance(refused.value, InputTooLarge) == (rate > 192_000)


def test_an_odd_rate_resamples_cheaply_and_common_ones_exactly() -> None:
    """191,999 Hz -> 16 kHz reduces to 16000/191999 (a filter of ~3.8 M taps); it is resampled by the
    closest fraction with terms <= 1000 (1/12) instead. 44.1 kHz -> 16 kHz stays 160/441."""
    from scipy.signal import resample_poly

    prep = AudioPrep(sample_rate=16000, max_seconds=1.0)
    began = time.perf_counter()
    odd = decode_waveform_bytes(wav(191_999, 191_999), "odd.wav", prep, 60.0, 10**9, (8000, 192000))
    assert time.perf_counter() - began < 0.5 and odd.shape == (16000,)
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, tone, 44100, format="WAV", subtype="FLOAT")
    common = decode_waveform_bytes(buffer.getvalue(), "a.wav", prep, 60.0, 10**9, (8000, 192000))
    exact = resample_poly(tone, 160, 441).astype(np.float32)[:16000]
    assert np.array_equal(common, exact)
