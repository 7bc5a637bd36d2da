"""Issue 30, item 6 (the server's half): fuzzing that stays in the default run, bounded in time.

- schemathesis, driven from the app's own OpenAPI schema, against a real uvicorn server on
  127.0.0.1: positive and negative cases of every operation. No 5xx, no traceback or address.
- hypothesis for each decoder an upload reaches (image, audio, .npy and JSON features, the JSON body
  parser): random bytes and mutated real PNG/JPEG/GIF/BMP/TIFF/WAV/FLAC/.npy files. Each either
  returns or raises ``DataError`` (``InputTooLarge`` included) and nothing else, and what it
  allocates (tracemalloc: numpy, scipy and Python objects) stays within a fixed bound.

Every run draws the same examples (``derandomize``), so a failure reproduces and the time is fixed.
"""

from __future__ import annotations

import io
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
import soundfile as sf
from hostile_helpers import LEAKS, hc, hostile_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from serve_helpers import running_server

from mmfuse.config import AudioPrep, ImagePrep
from mmfuse.core.errors import DataError
from mmfuse.data.audio import decode_waveform_bytes
from mmfuse.data.image import decode_image_bytes, image_to_tensor
from mmfuse.serve.app import create_app
from mmfuse.serve.decode import features_array
from mmfuse.serve.jsonlimits import JsonInvalid, JsonLimits, JsonTooLarge, parse_json
from mmfuse.serve.settings import ServeSettings

BUDGET = 8 * 1024 * 1024
"""The decode budget the decoders are fuzzed under; allocation may reach a small multiple of it."""
ALLOCATION_BOUND = 4 * BUDGET
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def real_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    files = {}
    for name, form, mode in (("png", "PNG", "RGB"), ("jpeg", "JPEG", "RGB"), ("gif", "GIF", "P"), ("bmp", "BMP", "RGB"),
                             ("tiff", "TIFF", "RGB"), ("png16", "PNG", "I;16")):
        buffer = io.BytesIO()
        image = picture.convert(mode) if mode != "I;16" else Image.fromarray(
            rng.integers(0, 65535, (24, 32), dtype=np.uint16))
        image.save(buffer, format=form)
        files[name] = buffer.getvalue()
    wave = (0.3 * np.sin(np.arange(4000) / 5.0)).astype(np.float32)
    for name, form, subtype in (("wav", "WAV", "PCM_16"), ("wav_float", "WAV", "FLOAT"), ("flac", "FLAC", "PCM_16")):
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([wave, wave], axis=1), 16000, format=form, subtype=subtype)
        files[name] = buffer.getvalue()
    files["npy"] = hc.npy(rng.normal(size=(3, 8)).astype(np.float32))
    return files


FILES = real_files()
IMAGES = [FILES[k] for k in ("png", "jpeg", "gif", "bmp", "tiff", "png16")]
SOUNDS = [FILES[k] for k in ("wav", "wav_float", "flac")]


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int, words: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    for at, value in words:  # sizes, rates and counts sit in the first bytes of every header
        at %= max(1, min(64, len(out) - 4))
        out[at: at + 4] = value.to_bytes(4, "little")
    return bytes(out[: max(1, cut % (len(out) + 1))])


def uploads(originals: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, or a real file with flipped bytes, large 32-bit words in its header and a cut."""
    word = st.sampled_from([0, 1, 255, 65535, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    mutated = st.builds(_mutate, st.sampled_from(originals),
                        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
                        st.integers(0, 10**6), st.lists(st.tuples(st.integers(0, 63), word), max_size=3))
    return st.binary(max_size=512) | mutated


def bounded(call: Callable[[], Any]) -> Any:
    """``call()``; fails if it raised anything but ``DataError`` or allocated past ``ALLOCATION_BOUND``."""
    tracemalloc.reset_peak()
    try:
        result = call()
    except DataError as exc:
        result = exc
        assert str(exc) and "\n" not in str(exc) and not LEAKS.search(str(exc)), str(exc)
    peak = tracemalloc.get_traced_memory()[1]
    assert peak < ALLOCATION_BOUND, f"allocated {peak:,} bytes"
    return result


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.usefixtures("traced")
def test_image_decoder_raises_only_data_errors() -> None:
    prep = ImagePrep(size=32)

    @FUZZ
    @given(uploads(IMAGES))
    def check(data: bytes) -> None:
        image = bounded(lambda: decode_image_bytes(data, "upload.png", prep, 250_000, BUDGET))
        if not isinstance(image, DataError):
            assert image_to_tensor(image, prep).shape == (3, 32, 32)

    check()


@pytest.mark.usefixtures("traced")
def test_audio_decoder_raises_only_data_errors() -> None:
    prep = AudioPrep(sample_rate=16000, max_seconds=1.0)

    @FUZZ
    @given(uploads(SOUNDS))
    def check(data: bytes) -> None:
        wave = bounded(lambda: decode_waveform_bytes(data, "upload.wav", prep, 5.0, BUDGET, (8000, 192000)))
        if not isinstance(wave, DataError):
            assert wave.dtype == np.float32 and wave.ndim == 1 and 0 < wave.size <= 16000
            assert np.isfinite(wave).all()

    check()


@pytest.mark.usefixtures("traced")
def test_npy_and_json_features_raise_only_data_errors() -> None:
    json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=6), max_leaves=40)

    @FUZZ
    @given(uploads([FILES["npy"], hc.npy(np.zeros(8, np.float64)), hc.npy(np.zeros((2, 8), np.int16))]), json_values)
    def check(data: bytes, value: Any) -> None:
        array = bounded(lambda: features_array(data, "upload.npy", BUDGET))
        if not isinstance(array, DataError):
            assert array.dtype == np.float32 and np.isfinite(array).all()
        listed = bounded(lambda: features_array(value if isinstance(value, list) else [value], "vec", BUDGET))
        if not isinstance(listed, DataError):
            assert listed.dtype == np.float32 and np.isfinite(listed).all()

    check()


@pytest.mark.usefixtures("traced")
def test_json_parser_raises_only_its_two_errors() -> None:
    limits = JsonLimits(max_depth=8, max_number_chars=64, max_values=1000)
    pieces = st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b"9" * 70, b"-", b"e", b"NaN",
                              b'"text"', b"\xff", b" ", b"null", b"1e400"])

    documents = st.recursive(st.integers() | st.text(max_size=3), lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=3), inner, max_size=3))

    @FUZZ
    @given(st.lists(pieces, max_size=60).map(b"".join) | st.binary(max_size=200)
           | documents.map(lambda v: json.dumps(v).encode()))
    def check(body: bytes) -> None:
        tracemalloc.reset_peak()
        try:
            parse_json(body, limits)
        except (JsonTooLarge, JsonInvalid) as exc:
            assert "\n" not in str(exc) and not LEAKS.search(str(exc))
        assert tracemalloc.get_traced_memory()[1] < 4 * 1024 * 1024

    check()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = hostile_model(tmp_path_factory)
    application = create_app(model, ServeSettings(max_body_bytes=1024 * 1024, threads=1))
    with running_server(application) as url:
        yield url


def test_schemathesis_finds_no_server_error(server: str, tmp_path: Path) -> None:
    """Cases generated from ``/openapi.json`` (valid and invalid) for every operation, sent to the server."""
    schema = schemathesis.openapi.from_dict(requests.get(server + "/openapi.json", timeout=10).json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /predict", "GET /health", "GET /ready", "GET /info", "GET /metrics"}
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen: dict[str, int] = {}
    session = requests.Session()
    started = time.monotonic()

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server, session=session, timeout=30)
        seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
        assert not LEAKS.search(response.text), response.text[:300]

    check()
    assert sum(seen.values()) >= 200 and time.monotonic() - started < 60
    assert {"200", "422"} <= set(seen), seen  # both valid and refused requests were generated
