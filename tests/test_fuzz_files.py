"""Property-based fuzzing (hypothesis) of the parsers that read files from strangers: the restricted
unpickler (MMSA-style pickles) and a pack's members (tar spans, ``.npy`` arrays, JSON headers, shard
indexes). Plain data round-trips exactly; any mutation of a valid file either loads plain data or gives
the library's one ``DataError``, never another exception, a crash or a hang. Bounded: derandomized
examples (the same every run, so CI is reproducible; see ``FUZZ`` for a long random campaign), no
example database written."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Sample
from mmfuse.data.pack_format import ShardIndex, decode_sample, sample_from_members, shard_layouts, write_shard
from mmfuse.datasets.importers.safe_pickle import safe_load

FUZZ = settings(max_examples=int(os.environ.get("MMFUSE_FUZZ_EXAMPLES", "400")), deadline=None,
                derandomize="MMFUSE_FUZZ_EXAMPLES" not in os.environ, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""400 derandomized examples per property in the test run (about a second each); a long random campaign:
MMFUSE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_files.py."""

_ARRAYS = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_, np.float16]),
                     hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20) | _ARRAYS)
PLAIN = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape \
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _safe_load_bytes(data: bytes) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.pkl"
        path.write_bytes(data)
        return safe_load(path)


@FUZZ
@given(value=PLAIN, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_plain_data_round_trips_through_the_restricted_unpickler(value: Any, protocol: int) -> None:
    assert _same(value, _safe_load_bytes(pickle.dumps(value, protocol=protocol)))


_MMSA_LIKE = pickle.dumps({"train": {"text": np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32),
                                     "audio": np.zeros((3, 2, 7)), "id": ["a$_$0", "b$_$1", "c$_$2"],
                                     "regression_labels": np.array([0.5, -1.2, 3.0]),
                                     "raw_text": np.array(["x", "yy", "zzz"], dtype=object)}}, protocol=4)
_MMSA_LIKE_V2 = pickle.dumps({"valid": (np.arange(6, dtype=np.int64).reshape(2, 3), [1.5, "s"])}, protocol=2)


def _mutate(data: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
    """Byte flips/overwrites/insertions at positions (taken modulo the length), then an optional cut."""
    out = bytearray(data)
    for kind, position, value in edits:
        at = position % max(1, len(out))
        if kind == 0 and out:
            out[at] ^= 1 << (value % 8)
        elif kind == 1 and out:
            out[at] = value % 256
        else:
            out[at:at] = bytes([value % 256])
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(source=st.sampled_from([_MMSA_LIKE, _MMSA_LIKE_V2]), edits=EDITS, cut=st.none() | st.integers(0, 2000))
def test_a_mutated_pickle_loads_plain_data_or_gives_one_data_error(source: bytes, edits: list[tuple[int, int, int]],
                                                                  cut: int | None) -> None:
    try:
        _safe_load_bytes(_mutate(source, edits, cut))
    except DataError as exc:
        assert "\n" not in str(exc) and "fuzz.pkl" in str(exc)


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ShardIndex]:
    """A real two-sample shard (text ids, an image, a missing audio, a target) and its index."""
    path = tmp_path_factory.mktemp("fuzz_shard") / "train-00000.tar"
    samples = [Sample("a", {"text": {"input_ids": torch.arange(6)}, "image": {"pixels": torch.rand(3, 4, 4)},
                            "audio": None}, torch.tensor(1)),
               Sample("b", {"text": {"input_ids": torch.arange(3)}, "image": None,
                            "audio": {"mel": torch.rand(1, 8, 5)}}, torch.tensor(0))]
    spans = write_shard(path, samples, 0)
    layouts = shard_layouts(path, spans)
    return path.read_bytes(), ShardIndex(path.name, path.stat().st_size, spans, [], layouts)


@FUZZ
@given(number=st.integers(0, 1), edits=EDITS, cut=st.none() | st.integers(0, 30000), use_layout=st.booleans())
def test_a_mutated_sample_span_decodes_or_gives_one_data_error(shard: tuple[bytes, ShardIndex], number: int,
                                                               edits: list[tuple[int, int, int]], cut: int | None,
                                                               use_layout: bool) -> None:
    data, index = shard
    start, end = index.spans[number]
    assert index.layouts is not None
    span = bytearray(_mutate(data[start:end], edits, cut))
    try:
        sample = decode_sample(span, "shard (sample)", index.layouts[number] if use_layout else None)
    except DataError as exc:
        assert str(exc).startswith("shard (sample): corrupt sample in the pack") and "\n" not in str(exc)
    else:
        assert isinstance(sample.id, str)


@FUZZ
@given(header=st.binary(max_size=200) | st.builds(lambda d: b"\x93NUMPY\x01\x00" + d, st.binary(max_size=120)),
       text=st.binary(max_size=60))
def test_hostile_npy_and_json_members_give_one_data_error(header: bytes, text: bytes) -> None:
    members = {"json": json.dumps({"id": "x", "target": True, "inputs": {"text": ["input_ids"]}}).encode(),
               "text.input_ids.npy": header, "target.npy": header}
    with pytest.raises(DataError, match=r"^where: corrupt sample in the pack"):
        sample_from_members(members, "where")
    with pytest.raises(DataError):
        sample_from_members({"json": text}, "where")


@FUZZ
@given(edits=EDITS)
def test_a_mutated_shard_index_parses_consistently_or_gives_one_data_error(shard: tuple[bytes, ShardIndex],
                                                                          edits: list[tuple[int, int, int]]) -> None:
    _, index = shard
    try:
        parsed = ShardIndex.parse(_mutate(index.to_json().encode(), edits, None), "fuzz.index.json")
    except DataError as exc:
        assert str(exc).startswith("fuzz.index.json: unreadable shard index") and "\n" not in str(exc)
    else:
        assert all(0 <= a < b <= parsed.bytes for a, b in parsed.spans)  # what the reader trusts holds
