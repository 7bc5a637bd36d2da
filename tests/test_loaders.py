"""Per-modality preprocessing: word tokenizer, image decoding, audio decoding and log-mel."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmfuse.config import AudioPrep, ImagePrep, TextPrep
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.data.audio import SILENCE_LOG_MEL, load_audio, load_waveform, log_mel, mel_filters
from mmfuse.data.image import image_to_tensor, load_image
from mmfuse.data.text import Tokenizer

# ----------------------------------------------------------------------------- text

CORPUS = ["The cat sat on the mat.", "the dog sat", "A cat, a dog!", "zebra"]


def test_tokenize_splits_words_and_punctuation() -> None:
    tok = Tokenizer(["[PAD]", "[UNK]"], lowercase=True, max_length=10)
    assert tok.tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert Tokenizer(["[PAD]", "[UNK]"], lowercase=False, max_length=10).tokenize("Hi") == ["Hi"]


def test_fit_is_deterministic_and_orders_by_count_then_alphabet() -> None:
    prep = TextPrep()
    a = Tokenizer.fit(CORPUS, prep)
    b = Tokenizer.fit(list(reversed(CORPUS)), prep)
    assert a.vocab == b.vocab
    # the: 3; a, cat, dog, sat: 2; the rest once, each group alphabetical
    assert a.vocab[:7] == ["[PAD]", "[UNK]", "the", "a", "cat", "dog", "sat"]
    assert a.vocab[7:] == sorted(a.vocab[7:])


def test_min_freq_and_max_vocab() -> None:
    tok = Tokenizer.fit(CORPUS, TextPrep(min_freq=2))
    assert tok.vocab == ["[PAD]", "[UNK]", "the", "a", "cat", "dog", "sat"]
    small = Tokenizer.fit(CORPUS, TextPrep(max_vocab=4))
    assert small.vocab == ["[PAD]", "[UNK]", "the", "a"]
    assert small.vocab_size == 4


def test_unknown_words_map_to_unk_and_empty_text_to_nothing() -> None:
    tok = Tokenizer.fit(CORPUS, TextPrep())
    ids = tok.encode("The unicorn sat")
    assert ids == [tok.vocab.index("the"), Tokenizer.UNK_ID, tok.vocab.index("sat")]
    assert tok.encode("") == []
    assert tok.encode("   \n") == []
    assert Tokenizer.PAD_ID not in tok.encode("the cat sat on the mat")


def test_encode_truncates_to_max_length() -> None:
    tok = Tokenizer.fit(CORPUS, TextPrep(max_length=3))
    assert len(tok.encode("the cat sat on the mat")) == 3


def test_round_trip_through_json_gives_identical_encodings() -> None:
    tok = Tokenizer.fit(CORPUS, TextPrep(max_length=5, lowercase=False))
    restored = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    for text in [*CORPUS, "unseen words here", "The THE the"]:
        assert restored.encode(text) == tok.encode(text)
    assert restored.vocab == tok.vocab and restored.lowercase is False and restored.max_length == 5


def test_from_dict_rejects_malformed_state() -> None:
    with pytest.raises(DataError, match="vocab"):
        Tokenizer.from_dict({"lowercase": True, "max_length": 4})
    with pytest.raises(DataError, match="PAD"):
        Tokenizer.from_dict({"vocab": ["a", "b"], "lowercase": True, "max_length": 4})


# ----------------------------------------------------------------------------- image


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_rgb_constant_colour_exact_values(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (10, 7), (200, 100, 50)), tmp_path / "c.png")
    prep = ImagePrep(size=16, mean=0.5, std=0.25)
    x = load_image(path, prep)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, value in enumerate((200, 100, 50)):
        expected = (value / 255 - 0.5) / 0.25
        assert torch.allclose(x[c], torch.full((16, 16), expected), atol=1e-6)


def test_grayscale_shape_and_values(tmp_path: Path) -> None:
    path = _save(Image.new("L", (5, 5), 64), tmp_path / "g.png")
    x = load_image(path, ImagePrep(size=8, mode="grayscale"))
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x, torch.full((1, 8, 8), (64 / 255 - 0.5) / 0.5), atol=1e-6)
    # an RGB file asked for as greyscale uses Pillow's luma conversion
    rgb = _save(Image.new("RGB", (5, 5), (200, 100, 50)), tmp_path / "rgb.png")
    luma = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    assert isinstance(luma, int)
    y = load_image(rgb, ImagePrep(size=5, mode="grayscale"))
    assert torch.allclose(y, torch.full((1, 5, 5), (luma / 255 - 0.5) / 0.5), atol=1e-6)
    # greyscale file asked for as RGB gives three equal channels
    z = load_image(path, ImagePrep(size=4))
    assert z.shape == (3, 4, 4) and torch.equal(z[0], z[2])


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent
    x = load_image(_save(image, tmp_path / "a.png"), ImagePrep(size=2, mean=0.0, std=1.0))
    # resize of a 2x1 to 2x2 only stretches rows; columns keep their colour
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[:, 0, 1], torch.tensor([1.0, 1.0, 1.0]))


def test_palette_and_16_bit_inputs(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 128, 255] + [0] * 765)
    x = load_image(_save(palette, tmp_path / "p.png"), ImagePrep(size=4, mean=0.0, std=1.0))
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    gif = load_image(_save(palette, tmp_path / "p.gif"), ImagePrep(size=4, mean=0.0, std=1.0))
    assert torch.allclose(gif, x)
    deep = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))
    path16 = _save(deep, tmp_path / "deep.png")
    assert Image.open(path16).mode.startswith("I")
    y = load_image(path16, ImagePrep(size=6, mode="grayscale", mean=0.0, std=1.0))
    assert torch.allclose(y, torch.ones(1, 6, 6))
    mid = Image.fromarray(np.full((6, 6), 1000, dtype=np.uint16))  # would clip to white without scaling
    z = load_image(_save(mid, tmp_path / "mid.png"), ImagePrep(size=6, mode="grayscale", mean=0.0, std=1.0))
    assert torch.allclose(z, torch.full((1, 6, 6), round(1000 / 257) / 255))


def test_resize_to_square(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    x = load_image(_save(image, tmp_path / "r.jpg"), ImagePrep(size=12))
    assert x.shape == (3, 12, 12)
    assert torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    in_memory = image_to_tensor(image, ImagePrep(size=12))
    assert in_memory.shape == (3, 12, 12)


def test_in_memory_matches_file(tmp_path: Path) -> None:
    image = Image.new("RGB", (9, 9), (10, 20, 30))
    prep = ImagePrep(size=5)
    assert torch.equal(image_to_tensor(image, prep), load_image(_save(image, tmp_path / "m.png"), prep))


def test_missing_image_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match="image file not found") as info:
        load_image(path, ImagePrep())
    assert str(path) in str(info.value)


def test_corrupt_image_names_path(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="cannot decode image") as info:
        load_image(path, ImagePrep())
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_names_path(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(Image.fromarray(noise), tmp_path / f"full{suffix}")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot decode image") as info:
        load_image(path, ImagePrep())
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- audio

SR = 16000


def _tone(freq: float, sr: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav(path: Path, data: np.ndarray, sr: int) -> Path:
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


def _mel_bin_of(freq: float, prep: AudioPrep) -> int:
    """The mel filter with the largest weight at the FFT bin nearest ``freq``."""
    fft_bin = round(freq * prep.n_fft / prep.sample_rate)
    bank = mel_filters(prep.sample_rate, prep.n_fft, prep.n_mels, prep.f_min, prep.f_max)
    return int(bank[:, fft_bin].argmax())


def test_tone_peaks_in_its_mel_bin(tmp_path: Path) -> None:
    prep = AudioPrep()
    features = load_audio(_wav(tmp_path / "a.wav", _tone(440, SR, 1.0), SR), prep)
    assert features.shape == (prep.n_mels, prep.max_frames) and features.dtype == torch.float32
    assert int(features.mean(dim=1).argmax()) == _mel_bin_of(440, prep)
    other = log_mel(_tone(2000, SR, 1.0), prep)
    assert int(other.mean(dim=1).argmax()) == _mel_bin_of(2000, prep)


def test_8khz_file_is_resampled(tmp_path: Path) -> None:
    prep = AudioPrep()
    native = load_audio(_wav(tmp_path / "16k.wav", _tone(440, SR, 1.0), SR), prep)
    path = _wav(tmp_path / "8k.wav", _tone(440, 8000, 1.0), 8000)
    wave = load_waveform(path, prep)
    assert wave.dtype == np.float32 and wave.shape == (SR,)
    resampled = load_audio(path, prep)
    assert resampled.shape == native.shape
    assert int(resampled.mean(dim=1).argmax()) == int(native.mean(dim=1).argmax())
    # where the tone has energy both agree closely (above 4 kHz the 8 kHz file has nothing)
    assert abs(float(resampled.mean(dim=1).max() - native.mean(dim=1).max())) < 0.1


def test_stereo_mixes_to_mono(tmp_path: Path) -> None:
    left = _tone(440, SR, 0.5)
    right = np.full_like(left, 0.25)
    wave = load_waveform(_wav(tmp_path / "st.wav", np.stack([left, right], axis=1), SR), AudioPrep())
    assert wave.shape == left.shape
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-7)


def test_rate_mismatch_without_resample_names_both_rates(tmp_path: Path) -> None:
    path = _wav(tmp_path / "8k.wav", _tone(440, 8000, 0.5), 8000)
    with pytest.raises(DataError, match="resample") as info:
        load_waveform(path, AudioPrep(resample=False))
    message = str(info.value)
    assert "8000 Hz" in message and "16000 Hz" in message and str(path) in message


@pytest.mark.parametrize(
    ("seconds", "n_fft", "hop"), [(1.0, 400, 160), (0.37, 400, 160), (0.5, 401, 100), (0.25, 512, 128)]
)
def test_crop_gives_exactly_max_frames(tmp_path: Path, seconds: float, n_fft: int, hop: int) -> None:
    prep = AudioPrep(max_seconds=seconds, n_fft=n_fft, hop_length=hop)
    features = load_audio(_wav(tmp_path / "long.wav", _tone(300, SR, 2.5), SR), prep)
    assert features.shape == (prep.n_mels, prep.max_frames)
    resampled = load_audio(_wav(tmp_path / "long8k.wav", _tone(300, 8000, 2.5), 8000), prep)
    assert resampled.shape == (prep.n_mels, prep.max_frames)


def test_short_clip_is_not_padded_and_very_short_does_not_crash(tmp_path: Path) -> None:
    prep = AudioPrep()
    half = load_audio(_wav(tmp_path / "half.wav", _tone(440, SR, 0.5), SR), prep)
    assert half.shape == (prep.n_mels, 8000 // prep.hop_length + 1)
    for n in (1, 50, 200, 201):
        assert log_mel(np.ones(n, dtype=np.float32), prep).shape == (prep.n_mels, n // prep.hop_length + 1)


def test_silence_maps_to_the_floor() -> None:
    features = log_mel(np.zeros(1600, dtype=np.float32), AudioPrep())
    assert torch.allclose(features, torch.full_like(features, SILENCE_LOG_MEL))


def test_empty_audio_names_path(tmp_path: Path) -> None:
    path = _wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(DataError, match="no samples") as info:
        load_audio(path, AudioPrep())
    assert str(path) in str(info.value)


def test_corrupt_and_missing_audio_name_path(tmp_path: Path) -> None:
    corrupt = tmp_path / "junk.wav"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="cannot decode audio") as info:
        load_audio(corrupt, AudioPrep())
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)
    missing = tmp_path / "gone.wav"
    with pytest.raises(DataError, match="audio file not found") as info:
        load_audio(missing, AudioPrep())
    assert str(missing) in str(info.value)


def test_non_finite_samples_are_rejected(tmp_path: Path) -> None:
    data = _tone(440, SR, 0.1)
    data[10] = np.nan
    path = _wav(tmp_path / "nan.wav", data, SR)
    with pytest.raises(DataError, match="non-finite") as info:
        load_waveform(path, AudioPrep())
    assert str(path) in str(info.value)


def _reference_slaney_bank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """librosa's algorithm written out: Slaney mel scale, triangles on FFT bins, area norm."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        log_region = f >= 1000.0
        mel = f / (200.0 / 3)
        mel[log_region] = 15.0 + np.log(f[log_region] / 1000.0) / (np.log(6.4) / 27.0)
        return mel

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        log_region = m >= 15.0
        f = m * (200.0 / 3)
        f[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m[log_region] - 15.0))
        return f

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(*hz_to_mel(np.array([f_min, f_max])), n_mels + 2))
    bank = np.zeros((n_mels, fft_freqs.size))
    for i in range(n_mels):
        lower = (fft_freqs - edges[i]) / (edges[i + 1] - edges[i])
        upper = (edges[i + 2] - fft_freqs) / (edges[i + 2] - edges[i + 1])
        bank[i] = np.maximum(0, np.minimum(lower, upper)) * 2.0 / (edges[i + 2] - edges[i])
    return bank


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "f_min", "f_max"), [(16000, 400, 40, 0.0, None), (8000, 256, 32, 50.0, 3800.0)]
)
def test_mel_filterbank_matches_reference(
    sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None
) -> None:
    bank = mel_filters(sr, n_fft, n_mels, f_min, f_max)
    assert bank.shape == (n_mels, n_fft // 2 + 1) and bank.dtype == torch.float32
    assert (bank.sum(dim=1) > 0).all()
    reference = _reference_slaney_bank(sr, n_fft, n_mels, f_min, sr / 2 if f_max is None else f_max)
    np.testing.assert_allclose(bank.numpy(), reference, rtol=1e-4, atol=1e-7)
    assert mel_filters(sr, n_fft, n_mels, f_min, f_max) is bank  # cached


def test_bad_frequency_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="f_max"):
        log_mel(np.ones(400, dtype=np.float32), AudioPrep(f_max=9000.0))


# ----------------------------------------------------------------------------- caches of decoded files


def _rewrite_keeping_stat(path: Path, write: Callable[[Path], object]) -> None:
    """Rewrites ``path`` (through a sibling + rename, as mmfuse's writers do) with the old size and mtime."""
    before = path.stat()
    fresh = path.with_name(f"new-{path.name}")
    write(fresh)
    os.replace(fresh, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_in_memory_cache_is_keyed_by_content_not_size_and_mtime(tmp_path: Path) -> None:
    """A file rewritten with the same size and mtime must not be served from the array cache."""
    from mmfuse.config import ModalitySpec
    from mmfuse.data.manifest import read_manifest
    from mmfuse.data.memory import cached_arrays
    from mmfuse.data.preprocess import Preprocessor

    for i in range(3):  # BMP is uncompressed: another colour gives a file of exactly the same size
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / f"im{i}.bmp")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "image": f"im{i}.bmp"}) + "\n" for i in range(3)))
    modalities = {"image": ModalitySpec(kind="image", column="image")}
    prep = ImagePrep(size=4, mean=0.0, std=1.0)

    def arrays() -> torch.Tensor:
        records = read_manifest(manifest, modalities, target_column=None)
        preprocessor = Preprocessor(modalities, TextPrep(), prep, AudioPrep())
        preprocessor.fit(records)
        return cached_arrays(records, preprocessor, None, "raise", tmp_path / "cache").inputs["image"]["pixels"]

    assert float(arrays()[1, 0, 0, 0]) == pytest.approx(10 / 255)
    _rewrite_keeping_stat(tmp_path / "im1.bmp", lambda p: Image.new("RGB", (4, 4), (200, 0, 0)).save(p, "BMP"))
    assert float(arrays()[1, 0, 0, 0]) == pytest.approx(200 / 255)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a new entry; the old one is never read again


def test_row_file_replaced_with_same_size_and_mtime_is_reread(tmp_path: Path) -> None:
    """The per-process memory map of a 'file.npy#row' file must follow a replaced file."""
    from mmfuse.data import arrays

    path = tmp_path / "rows.npy"
    np.save(path, np.zeros((3, 4), dtype=np.float32))
    arrays.clear_cache()
    assert arrays.load_array(f"{path}#1").tolist() == [0.0] * 4
    _rewrite_keeping_stat(path, lambda p: np.save(p, np.full((3, 4), 7.0, dtype=np.float32)))
    assert arrays.load_array(f"{path}#1").tolist() == [7.0] * 4
    arrays.clear_cache()
