"""Hostile and malformed ``POST /predict`` requests, built in code (nothing large is stored).

``corpus()`` is the regression corpus: each case with the status and the message it must get
(the six causes of 500s from issue 30 first, then every limit and every decoder's failure).
``fuzz_cases()`` adds fuzzer-style requests: real PNG/JPEG/WAV/FLAC/.npy files with random byte
flips, truncations and spliced headers, and random JSON; any 4xx or a 200 is a right answer for those.
Used by ``benchmarks/serve_hostile.py`` and ``tests/test_serve_hostile.py``; the model they are built
for reads ``text``, ``image``, ``audio`` and an 8-wide features modality ``vec``.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

VEC_WIDTH = 8


@dataclass
class Case:
    name: str
    request: dict[str, Any]
    """httpx keyword arguments; ``chunks`` (a list of bytes) is sent as a chunked body."""
    status: int | None = None
    """The status it must get; None: any 4xx, or 200 (a fuzzed file that still decodes)."""
    message: str = ""
    """A part of the ``detail`` it must get."""
    params: dict[str, str] = field(default_factory=dict)


def as_json(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": "application/json"}}


def upload(name: str, filename: str, data: bytes) -> dict[str, Any]:
    return {"files": {name: (filename, data)}}


def wav(rate: int = 16000, frames: int = 2000, channels: int = 1, claimed_rate: int | None = None,
        claimed_data_bytes: int | None = None, nan: bool = False) -> bytes:
    """A 16-bit PCM WAV (a float one with ``nan``), its header optionally lying about the rate or length."""
    buffer = io.BytesIO()
    samples = (0.3 * np.sin(np.arange(frames) / 7.0)).astype(np.float32)
    if nan:
        samples[5] = np.nan
    sf.write(buffer, np.repeat(samples[:, None], channels, axis=1), rate, format="WAV",
             subtype="FLOAT" if nan else "PCM_16")
    data = bytearray(buffer.getvalue())
    if claimed_rate is not None:
        struct.pack_into("<II", data, 24, claimed_rate, min(claimed_rate * 2 * channels, 2**32 - 1))
    if claimed_data_bytes is not None:
        struct.pack_into("<I", data, data.index(b"data") + 4, claimed_data_bytes)
    return bytes(data)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb when the data is tiny."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def png16(width: int, height: int) -> bytes:
    """A real 16-bit greyscale PNG of zeros: ~70 KB for 6000 x 6000 (36 M pixels, under the pixel cap)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * width)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_claiming(width, height, 16, 0, body)


def gif_claiming(width: int, height: int) -> bytes:
    """A 1x1 GIF whose screen and frame descriptors claim ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    struct.pack_into("<HH", data, 6, width, height)
    frame = data.index(b",")  # the image descriptor: ',' left top width height
    struct.pack_into("<HH", data, frame + 5, width, height)
    return bytes(data)


def npy_header(descr: str, shape: tuple[int, ...], version: int = 1) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text.encode()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def real_files(image: bytes, audio: bytes) -> dict[str, bytes]:
    """One real file per decoder, from a sample's PNG and WAV: PNG, JPEG, WAV, FLAC and .npy."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    jpeg = io.BytesIO()
    picture.save(jpeg, format="JPEG", quality=80)
    samples, rate = sf.read(io.BytesIO(audio), dtype="float32")
    flac = io.BytesIO()
    sf.write(flac, samples, rate, format="FLAC")
    return {"png": image, "jpeg": jpeg.getvalue(), "wav": audio, "flac": flac.getvalue(),
            "npy": npy(np.linspace(-1, 1, VEC_WIDTH, dtype=np.float32))}


def corpus() -> list[Case]:
    """Every hostile request with its answer; the first six were 500s before issue 30."""
    vec = ", ".join(["1"] * (VEC_WIDTH - 1))
    cases = [
        Case("json nested 1,000 deep", as_json(b'{"vec": ' + b"[" * 1000 + b"]" * 1000 + b"}"), 413,
             "field 'vec': JSON nested deeper than the limit of 8 levels"),
        Case("json integer of 4,301+ digits", as_json(b'{"vec": [' + b"9" * 5000 + b"]}"), 413,
             "field 'vec': a JSON number of 5,000 characters; the limit is 64"),
        Case("wav claiming 2^31-1 Hz", upload("audio", "fast.wav", wav(claimed_rate=2**31 - 1)), 413,
             "sample rate of 2,147,483,647 Hz; the limit is 192,000 Hz"),
        Case("features value 1e400", as_json(f'{{"vec": [1e400, {vec}]}}'.encode()), 422,
             "field 'vec': vec holds NaN, infinite or out-of-range values"),
        Case("features integer 10^400", as_json(b'{"vec": [1' + b"0" * 400 + b", " + vec.encode() + b"]}"), 413,
             "field 'vec': a JSON number of 401 characters"),
        Case(".npy header claiming 1e11 floats", upload("vec", "huge.npy", npy_header("<f4", (10**11,)) + b"\0" * 8),
             413, "huge.npy: an array of (100000000000,) is 400,000,000,000 bytes as float32"),
        Case("wav at 999,983 Hz", upload("audio", "odd.wav", wav(claimed_rate=999_983)), 413,
             "sample rate of 999,983 Hz; the limit is 192,000 Hz"),
        Case("wav claiming 2^31 Hz", upload("audio", "neg.wav", wav(claimed_rate=2**31)), None),
        Case("wav at 1 Hz", upload("audio", "slow.wav", wav(claimed_rate=1)), 422,
             "sample rate of 1 Hz, below the minimum of 8,000 Hz"),
        Case("wav data chunk claiming 4 GB", upload("audio", "long.wav", wav(claimed_data_bytes=2**32 - 2)), None),
        Case("wav of 61 s", upload("audio", "minute.wav", wav(rate=8000, frames=8000 * 61)), 413,
             "lasts 61 s; the limit is 60 s"),
        Case("wav with NaN samples", upload("audio", "nan.wav", wav(nan=True)), 422, "nan.wav has non-finite samples"),
        Case("audio garbage", upload("audio", "x.wav", b"RIFF\x10\x00\x00\x00WAVEjunk" * 8), 422,
             "cannot decode audio x.wav"),
        Case("audio empty file", upload("audio", "empty.wav", b""), 422, "cannot decode audio empty.wav"),
        Case("png bomb 30000x30000", upload("image", "bomb.png", png_claiming(30000, 30000)), 413,
             "image bomb.png claims 900,000,000 pixels; the limit is 40,000,000 (a decompression bomb)"),
        Case("png 7000x7000 over the pixel cap", upload("image", "big.png", png_claiming(7000, 7000)), 413,
             "49,000,000 pixels; the limit is 40,000,000"),
        Case("gif claiming 65535x65535", upload("image", "bomb.gif", gif_claiming(65535, 65535)), 413,
             "claims 4,294,836,225 pixels"),
        Case("png garbage after the signature", upload("image", "junk.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), 422,
             "cannot decode image junk.png"),
        Case("png truncated", upload("image", "cut.png", png16(64, 64)[:60]), 422, "cannot decode image cut.png"),
        Case("eps is not an upload format", upload("image", "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"),
             422, "cannot decode image x.eps: cannot identify image file"),
        Case("image that is text", upload("image", "notes.txt", b"hello, world"), 422,
             "cannot decode image notes.txt: cannot identify image file"),
        Case("json nested objects 5,000 deep", as_json(b'{"text": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001), 413,
             "field 'text': JSON nested deeper than the limit of 8 levels"),
        Case("json array nested 100,000 deep", as_json(b"[" * 100_000), 413,
             "the JSON body: JSON nested deeper than the limit of 8 levels"),
        Case("json over a million values", as_json(b'{"vec": [' + b"0," * 1_000_000 + b"0]}"), 413,
             "field 'vec': more than 1,000,000 JSON values; the limit is 1,000,000"),
        Case("json NaN", as_json(b'{"vec": [NaN]}'), 422, "NaN is not a JSON value"),
        Case("json Infinity", as_json(b'{"vec": [-Infinity]}'), 422, "-Infinity is not a JSON value"),
        Case("json not UTF-8", as_json(b'{"text": "\xff\xfe"}'), 422, "not valid JSON (not UTF-8)"),
        Case("json UTF-16", as_json('{"text": "hi"}'.encode("utf-16")), 422, "not valid JSON (not UTF-8)"),
        Case("json truncated", as_json(b'{"text": "a'), 422, "the body is not valid JSON"),
        Case("json top-level list", as_json(b'["text"]'), 422, "must be an object of fields, not list"),
        Case("json number 10^60 as a feature", as_json(f'{{"vec": [1{"0" * 60}, {vec}]}}'.encode()), 422,
             "out-of-range values"),
        Case("features ragged", as_json(b'{"vec": [[1, 2], [3]]}'), 422, "vec is not a numeric array"),
        Case("features of strings", as_json(b'{"vec": ["a", "b"]}'), 422, "vec is not a numeric array"),
        Case("features of objects", as_json(b'{"vec": [{}, {}]}'), 422, "vec is not a numeric array"),
        Case("features 3-D", as_json(b'{"vec": [[[1, 2]]]}'), 422, "features must be (T, D) or (D,)"),
        Case("features empty", as_json(b'{"vec": []}'), 422, "must be a non-empty (D,) or (T, D) list"),
        Case("features of the wrong width", as_json(b'{"vec": [1, 2]}'), 422, "field 'vec'"),
        Case(".npy claiming more than it holds", upload("vec", "short.npy", npy_header("<f4", (1000,)) + b"\0" * 40),
             422, "short.npy: the .npy header claims (1000,) float32 = 4,000 bytes but 40 follow it"),
        Case(".npy of objects", upload("vec", "obj.npy", npy_header("|O", (8,)) + b"\0" * 64), 422,
             "obj.npy holds object values, not plain numbers"),
        Case(".npy structured", upload("vec", "rec.npy", npy_header("[('a', '<f4')]", (8,)).replace(b"'[(", b"[(")
                                       .replace(b")]'", b")]") + b"\0" * 32), 422, "rec.npy"),
        Case(".npy 3-D", upload("vec", "cube.npy", npy(np.zeros((2, 2, 2), np.float32))), 422,
             "cube.npy: features must be (T, D) or (D,), the file's header says (2, 2, 2)"),
        Case(".npy version 3", upload("vec", "v3.npy", npy_header("<f4", (8,), version=3) + b"\0" * 32), 422,
             "v3.npy: .npy format version 3.0 is not read here"),
        Case(".npy bad header", upload("vec", "bad.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n"), 422,
             "bad.npy is not a readable .npy file"),
        Case(".npy a pickle", upload("vec", "p.npy", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."), 422,
             "p.npy is not a readable .npy file"),
        Case(".npy float64 1e300", upload("vec", "big.npy", npy(np.full(VEC_WIDTH, 1e300))), 422,
             "big.npy holds NaN, infinite or out-of-range values"),
        Case("text field of 1.1 MB", {"data": {"text": "a" * 1_100_000}}, 413,
             "field 'text': text of 1,100,000 characters; the limit is 20,000"),
        Case("text as a list", as_json(b'{"text": ["a"]}'), 422, "field 'text' must be a string, not list"),
        Case("image as a number", as_json(b'{"image": 12}'), 422, "field 'image' must be a base64 string"),
        Case("bad base64", as_json(b'{"audio": "@@@"}'), 422, "field 'audio' is not valid base64"),
        Case("image as a form text", {"data": {"image": "abc"}}, 422, "field 'image' must be a file upload"),
        Case("features form field nested", {"data": {"vec": "[" * 50 + "]" * 50}}, 413,
             "field 'vec': JSON nested deeper than the limit of 8 levels"),
        Case("field given twice", {"files": [("image", ("a.png", b"x")), ("image", ("b.png", b"y"))]}, 422,
             "field 'image' is given twice"),
        Case("unknown field with control characters", as_json(json.dumps({"\x00\x1b[31m" + "x" * 200: 1}).encode()),
             422, "unknown field '??[31mxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'; this model reads audio, image"),
        Case("form with 50 fields", {"data": {f"f{i}": "x" for i in range(50)}}, 413,
             "the form has more fields than the limit of 5; this model reads audio, image, text, vec"),
        Case("form with 20 files", {"files": [("image", (f"{i}.png", b"x")) for i in range(20)]}, 413,
             "the form has more files than the limit of 5"),
        Case("multipart without a boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
             422, "malformed multipart body"),
        Case("multipart garbage", {"content": b"\xff" * 300, "headers": {
            "content-type": "multipart/form-data; boundary=abc"}}, 422, "malformed multipart body: Invalid multipart data."),
        Case("content type text/plain", {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415,
             "content type 'text/plain' is not accepted"),
        Case("no content type", {"content": b"hi"}, 415, "content type '(none)'"),
        Case("explain=maybe", as_json(b'{"text": "hi"}'), 422, "query parameter 'explain': Input should be a valid "
             "boolean", {"explain": "maybe"}),
        Case("chunked body over the cap", {"chunks": [b"a" * 65536] * 40, "headers": {
            "content-type": "application/json"}}, 413, "exceeds the limit"),
    ]
    return cases


def fuzz_cases(files: dict[str, bytes], n: int, seed: int = 0) -> list[Case]:
    """``n`` fuzzer-style requests from real files: flipped bytes, truncations, spliced headers, and
    random JSON bodies. Deterministic from ``seed``."""
    rng = random.Random(seed)
    field_of = {"png": "image", "jpeg": "image", "wav": "audio", "flac": "audio", "npy": "vec"}
    cases = []
    for i in range(n):
        kind = rng.choice([*field_of, "json"])
        if kind == "json":
            cases.append(Case(f"fuzz {i}: random JSON", as_json(_random_json(rng))))
            continue
        data = bytearray(files[kind])
        how = rng.choice(("flip", "truncate", "header", "splice"))
        if how == "flip":
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif how == "header":  # large values into the first 64 bytes, where sizes and rates live
            at = rng.randrange(0, min(60, len(data) - 4))
            data[at: at + 4] = struct.pack("<I", rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 65535, rng.randrange(2**32))))
        else:
            other = files[rng.choice(list(field_of))]
            data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]
        cases.append(Case(f"fuzz {i}: {kind} {how}", upload(field_of[kind], f"f{i}.{kind}", bytes(data))))
    return cases


def _random_json(rng: random.Random, depth: int = 0) -> bytes:
    atoms = [b"null", b"true", b"1e999", b"-0", b"1" * rng.randint(1, 80), b'"\\ud800"', b'"x"', b"[]", b"{}",
             b"1.5e-400", b'"' + b"\\" * rng.randint(1, 3) + b'"']
    if depth > 12 or rng.random() < 0.3:
        return rng.choice(atoms)
    if rng.random() < 0.5:
        return b"[" + b",".join(_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))) + b"]"
    names = [b'"text"', b'"image"', b'"audio"', b'"vec"', b'"other"']
    items = [rng.choice(names) + b":" + _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    body = b"{" + b",".join(items) + b"}"
    return body if rng.random() > 0.1 else body[: rng.randrange(len(body) + 1)]
