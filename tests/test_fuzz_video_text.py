"""Hypothesis fuzzing of two doors (issue 30, item 6): the video decoder and the text path.

Video: a tiny real MP4 (H.264 + AAC) and WebM (VP8 + Opus), written here with PyAV, are mutated
(bytes flipped or overwritten with extreme values, ranges deleted, duplicated or truncated) and
decoded for frames and for the audio track. Text: the word tokenizer and the preprocessing of a text
modality, and a Hugging Face tokenizer behind ``PretrainedTokenizer``, get arbitrary unicode, lone
surrogates, NULs, control characters and very long words.
Either may succeed or raise the library's own ``DataError`` (``InputTooLarge`` included); any other
exception, or an example slower than its deadline, fails. The whole file takes about 15 s on one
core (``max_examples`` below); the derandomised examples make failures reproducible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfuse.config import AudioPrep, ImagePrep, ModalitySpec, TextPrep, VideoPrep
from mmfuse.core.errors import DataError
from mmfuse.data import video
from mmfuse.data.preprocess import Preprocessor
from mmfuse.data.pretrained_prep import PretrainedTokenizer
from mmfuse.data.text import Tokenizer
from mmfuse.data.video import MAX_FRAME_PIXELS, MAX_HELD_BYTES, decode_video, load_video, load_video_waveform

pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ = settings(max_examples=300, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VIDEO_PREP = VideoPrep(frames=4, size=16)
AUDIO_PREP = AudioPrep(sample_rate=8000, max_seconds=2.0)


def write_clip(path: Path, video_codec: str, audio_codec: str, audio_rate: int) -> bytes:
    """12 frames of 32x32 colour ramp at 12 fps and a 1 s tone, in the container ``path``'s suffix names."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(video_codec, rate=12)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream(audio_codec, rate=audio_rate)
        audio.layout = "mono"
        for t in range(12):
            image = np.full((32, 32, 3), t * 20, dtype=np.uint8)
            image[:, :, 1] = np.arange(32, dtype=np.uint8)[None, :] * 8
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(audio_rate) / audio_rate)).astype(np.float32)
        chunk = 960
        for start in range(0, len(samples), chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + chunk], format="flt", layout="mono")
            frame.sample_rate = audio_rate
            frame.pts = start
            frame.time_base = Fraction(1, audio_rate)
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz-clips")
    made = {"mp4": write_clip(folder / "clip.mp4", "libx264", "aac", 16000),
            "webm": write_clip(folder / "clip.webm", "libvpx", "libopus", 48000)}
    for suffix, data in made.items():  # the seeds decode: frames and the audio track
        path = folder / f"check.{suffix}"
        path.write_bytes(data)
        assert load_video(path, VIDEO_PREP).shape == (4, 3, 16, 16)
        assert load_video_waveform(path, AUDIO_PREP).shape[0] > 0.5 * 8000
    return made


EXTREMES = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00",
            b"\x00\x00\x00\x01", b"\xff", b"\x00"]


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """One of the seed clips with 1-4 mutations, two thirds of them in the first or last 600 bytes, where
    the headers are (a WebM's at the start; the MP4 written here has its index, the moov box, at the end)."""
    suffix = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[suffix])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        region = draw(st.sampled_from(["head", "tail", "anywhere"]))
        low = max(0, len(data) - 600) if region == "tail" else 0
        high = min(len(data), 600) if region == "head" else len(data)
        where = draw(st.integers(low, high - 1))
        kind = draw(st.sampled_from(["flip", "extreme", "delete", "duplicate", "truncate", "random"]))
        if kind == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "extreme":
            value = draw(st.sampled_from(EXTREMES))
            data[where:where + len(value)] = value
        elif kind == "delete":
            del data[where:where + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[where:where] = data[where:where + draw(st.integers(1, 256))]
        elif kind == "truncate":
            del data[where:]
        else:
            data[where:where + 8] = draw(st.binary(min_size=1, max_size=8))
    return suffix, bytes(data)


def decode_all(path: Path) -> None:
    """Frames and audio track, each either decoded into sane tensors or refused with a DataError."""
    try:
        frames = load_video(path, VIDEO_PREP)
        assert frames.dtype == torch.float32 and frames.shape[1:] == (3, 16, 16)
        assert 1 <= frames.shape[0] <= VIDEO_PREP.frames and bool(torch.isfinite(frames).all())
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    try:
        wave = load_video_waveform(path, AUDIO_PREP)
        assert wave.dtype == np.float32 and wave.ndim == 1 and bool(np.isfinite(wave).all())
        assert len(wave) <= AUDIO_PREP.max_seconds * AUDIO_PREP.sample_rate + 1
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_mutated_videos_decode_or_raise_a_data_error(clips: dict[str, bytes], tmp_path: Path) -> None:
    @FUZZ
    @given(mutated(clips))
    def check(case: tuple[str, bytes]) -> None:
        suffix, data = case
        path = tmp_path / f"fuzzed.{suffix}"
        path.write_bytes(data)
        decode_all(path)

    started = time.monotonic()
    check()
    assert time.monotonic() - started < 25


def test_a_damaged_tag_does_not_stop_decoding(clips: dict[str, bytes], tmp_path: Path) -> None:
    """Found by the fuzzer: one byte of the WebM's DURATION tag made invalid UTF-8 raised UnicodeDecodeError
    from PyAV's av.open. Nothing reads the tags, so the clip decodes as the undamaged one does."""
    data = clips["webm"]
    where = data.index(b"00:00:01") + 6
    damaged, clean = tmp_path / "damaged.webm", tmp_path / "clean.webm"
    damaged.write_bytes(data[:where] + b"\xff" + data[where + 1:])
    clean.write_bytes(data)
    assert torch.equal(load_video(damaged, VIDEO_PREP), load_video(clean, VIDEO_PREP))
    assert np.array_equal(load_video_waveform(damaged, AUDIO_PREP), load_video_waveform(clean, AUDIO_PREP))


@pytest.mark.parametrize("suffix", ["mp4", "webm"])
def test_every_truncation_of_a_clip_is_decoded_or_refused(clips: dict[str, bytes], tmp_path: Path,
                                                         suffix: str) -> None:
    """Interrupted downloads: the clip cut at 24 points, from its first byte to one short of the end."""
    data = clips[suffix]
    for cut in sorted({*np.linspace(1, len(data) - 1, 22).astype(int), 8, 64}):
        path = tmp_path / f"cut{cut}.{suffix}"
        path.write_bytes(data[:cut])
        decode_all(path)


def vp8_clip(path: Path, width: int, height: int, frames: int = 2) -> bytes:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=1)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame(width, height, "yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def test_a_frame_over_the_pixel_cap_is_refused_from_the_header_and_from_each_frame(tmp_path: Path) -> None:
    """The WebM header's PixelWidth/PixelHeight (EBML ids B0, BA) are rewritten to lie both ways: a header
    claiming 127x127 over 32x32 frames is refused before decoding; one claiming 16x16 over 2048x1024
    frames is refused at the first frame decoded."""
    wide = tmp_path / "wide.webm"
    data = vp8_clip(wide, 2048, 1024)
    assert len(decode_video(wide, VIDEO_PREP)) == VIDEO_PREP.frames  # 2.1 M pixels: under the default cap
    with pytest.raises(DataError) as refused:
        decode_video(wide, VIDEO_PREP, max_pixels=1_000_000)
    assert str(refused.value) == (f"video file {wide} has frames of 2048x1024 = 2,097,152 pixels, over the limit "
                                  "of 1,000,000")
    small_header = tmp_path / "small-header.webm"
    small_header.write_bytes(data.replace(b"\xb0\x82\x08\x00", b"\xb0\x81\x10").replace(b"\xba\x82\x04\x00",
                                                                                        b"\xba\x81\x10"))
    with pytest.raises(DataError) as per_frame:
        decode_video(small_header, VIDEO_PREP, max_pixels=1_000_000)
    assert "has frames of 2048x1024 = 2,097,152 pixels, over the limit of 1,000,000" in str(per_frame.value)
    small = tmp_path / "small.webm"
    big_header = tmp_path / "big-header.webm"
    big_header.write_bytes(vp8_clip(small, 32, 32).replace(b"\xb0\x81\x20", b"\xb0\x81\x7f")
                           .replace(b"\xba\x81\x20", b"\xba\x81\x7f"))
    assert len(decode_video(big_header, VIDEO_PREP)) == VIDEO_PREP.frames  # its frames are 32x32
    with pytest.raises(DataError) as from_header:
        decode_video(big_header, VIDEO_PREP, max_pixels=10_000)
    assert "has frames of 127x127 = 16,129 pixels, over the limit of 10,000" in str(from_header.value)
    assert MAX_FRAME_PIXELS == 40_000_000


def test_a_clip_over_the_held_frames_budget_is_read_twice_to_the_same_frames(
        clips: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames are held until the clip's end decides which are chosen; past ``max_held_bytes`` they are
    dropped and the chosen ones decoded again: the images must be exactly those of one pass."""
    reads: list[int] = []
    frames = video._frames

    def counted(*args: Any) -> Iterator[tuple[Any, float]]:
        reads.append(1)
        return frames(*args)

    monkeypatch.setattr(video, "_frames", counted)
    for suffix, data in clips.items():
        path = tmp_path / f"clip.{suffix}"
        path.write_bytes(data)
        for prep in (VIDEO_PREP, VideoPrep(frames=5, size=16, fps=4.0), VideoPrep(frames=20, size=16)):
            reads.clear()
            once = decode_video(path, prep)
            assert len(reads) == 1
            twice = decode_video(path, prep, max_held_bytes=2000)  # one 32x32 yuv420p frame is 1,536 bytes
            assert len(reads) == 3
            assert len(once) == len(twice) and (prep.fps is not None or len(once) == prep.frames)
            for a, b in zip(once, twice, strict=True):
                assert np.array_equal(np.asarray(a), np.asarray(b))
    assert MAX_HELD_BYTES == 256 * 1024 * 1024


# --- text ------------------------------------------------------------------------------------------------

TEXT_PREP = TextPrep(max_length=16, min_freq=1, max_vocab=200)
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
"""Any code point, lone surrogates (Cs), NUL and other controls (Cc), private use, unassigned."""
long_words = st.builds(lambda c, n, rest: c * n + rest, st.characters(codec=None), st.integers(1, 200_000), any_text)


@pytest.fixture(scope="module")
def fitted() -> Tokenizer:
    corpus = ["a fierce street", "ünïcödé wörds", "日本語のテキスト", "emoji 🙂 and \x00 nul", "\ud800 lone"]
    return Tokenizer.fit(corpus, TEXT_PREP)


@FUZZ
@given(st.one_of(any_text, long_words))
def test_the_word_tokenizer_takes_any_unicode(text: str) -> None:
    tokenizer = Tokenizer.fit(["a fierce street", "\ud800 lone \x00", text], TEXT_PREP)
    ids = tokenizer.encode(text)
    assert len(ids) <= TEXT_PREP.max_length and all(0 < i < tokenizer.vocab_size for i in ids)
    assert all(not t.isspace() and t for t in tokenizer.tokenize(text))
    saved = json.loads(json.dumps(tokenizer.to_dict()))  # as preprocessing.json holds it
    assert Tokenizer.from_dict(saved).encode(text) == ids


@FUZZ
@given(text=st.one_of(any_text, long_words))
def test_a_text_modality_encodes_any_unicode_or_says_it_holds_nothing(text: str, fitted: Tokenizer) -> None:
    prep = Preprocessor(modalities={"text": ModalitySpec(kind="text", column="text")}, text=TEXT_PREP,
                        image=ImagePrep(), audio=AudioPrep(), tokenizers={"text": fitted})
    try:
        encoded = prep.encode("text", text)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    if encoded is not None:
        ids = encoded["input_ids"]
        assert ids.dtype == torch.long and 1 <= ids.numel() <= TEXT_PREP.max_length


@pytest.fixture(scope="module")
def pretrained() -> PretrainedTokenizer:
    """A Hugging Face fast tokenizer built in memory (no download): word-level, whitespace-split."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "street": 3}, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, pad_token="[PAD]", unk_token="[UNK]")
    return PretrainedTokenizer("in-memory", TEXT_PREP.max_length, hf)


@FUZZ
@given(text=st.one_of(any_text, long_words))
def test_a_pretrained_tokenizer_takes_any_unicode(text: str, pretrained: PretrainedTokenizer) -> None:
    """Found by fuzzing: a lone surrogate (JSON may escape one) raised TypeError from the Rust tokenizer."""
    ids = pretrained.encode(text)
    assert len(ids) <= TEXT_PREP.max_length and all(0 <= i < pretrained.vocab_size for i in ids)
    assert pretrained.encode("a \ud800 street") == pretrained.encode("a \ufffd street") == [2, 1, 3]


def test_a_long_text_is_tokenised_only_as_far_as_it_is_kept(fitted: Tokenizer) -> None:
    """50 MB of words: truncation to max_length must not first split the whole text (it did: 1.3 s, 400 MB)."""
    text = "street " * 7_000_000
    started = time.perf_counter()
    assert fitted.encode(text) == [fitted.encode("street")[0]] * TEXT_PREP.max_length
    assert time.perf_counter() - started < 0.5
