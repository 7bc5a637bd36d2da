"""The pack's own reader of a sample's tar span and of its ``.npy`` members: the same members and
arrays as ``tarfile`` / ``np.load`` on real shards and on edge cases, and clear refusals."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Sample
from mmfuse.data.pack_format import ShardIndex, _load, decode_sample, shard_layouts, span_members, write_shard


def _samples() -> list[Sample]:
    return [Sample(f"id-{i}", {"audio": {"mel": torch.randn(4, 3 + i)}, "text": None,
                               "image": {"pixels": torch.rand(3, 2, 2), "flag": torch.tensor(i % 2 == 0)}},
                   torch.tensor(i)) for i in range(3)]


def test_spans_read_like_tarfile_and_samples_round_trip(tmp_path) -> None:
    samples = _samples()
    path = tmp_path / "shard-000000.tar"
    spans = write_shard(path, samples, first_key=7)
    raw = path.read_bytes()
    with tarfile.open(path) as tar:
        expected = [(info.name, tar.extractfile(info).read()) for info in tar]  # type: ignore[union-attr]
    got = [member for start, end in spans for member in span_members(raw[start:end])]
    assert got == expected and got[0][0] == "0000000007.audio.mel.npy"
    for sample, (start, end) in zip(samples, spans, strict=True):
        decoded = decode_sample(raw[start:end], "here")
        assert decoded.id == sample.id and decoded.inputs["text"] is None
        assert torch.equal(decoded.inputs["audio"]["mel"], sample.inputs["audio"]["mel"])
        assert torch.equal(decoded.inputs["image"]["flag"], sample.inputs["image"]["flag"])
        assert torch.equal(decoded.target, sample.target)


def test_index_layouts_slice_the_same_members_without_parsing_headers(tmp_path) -> None:
    samples = _samples()
    path = tmp_path / "shard.tar"
    spans = write_shard(path, samples, first_key=0)
    layouts = shard_layouts(path, spans)
    assert [name for name, _, _ in layouts[0]] == ["audio.mel.npy", "image.flag.npy", "image.pixels.npy", "json",
                                                   "target.npy"]
    raw = path.read_bytes()
    for (start, end), layout in zip(spans, layouts, strict=True):
        parsed = decode_sample(raw[start:end], "parsed")
        buffer = bytearray(raw[start:end])
        sliced = decode_sample(buffer, "sliced", layout)
        assert sliced.id == parsed.id and torch.equal(sliced.target, parsed.target)
        mel = sliced.inputs["audio"]["mel"]
        assert torch.equal(mel, parsed.inputs["audio"]["mel"])
        mel += 1  # a view of the read buffer, not a copy: writable and shared
        again = decode_sample(buffer, "again", layout).inputs["audio"]["mel"]
        assert torch.equal(again, parsed.inputs["audio"]["mel"] + 1)
    start, end = spans[0]
    with pytest.raises(DataError, match="layout runs past the end"):
        decode_sample(raw[start:end - 1024], "cut", layouts[0])
    index = ShardIndex("shard.tar", path.stat().st_size, spans, [], layouts)
    assert ShardIndex.read(_written(tmp_path / "shard.tar.index.json", index.to_json())) == index


def _written(path, text: str):  # type: ignore[no-untyped-def]
    path.write_text(text)
    return path


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(
    np.arange(12, dtype=np.int64).reshape(3, 4)), np.array(3.5), np.zeros((0, 5), np.float16),
    np.array([True, False])], ids=["c-order", "fortran", "0-d", "empty", "bool"])
def test_npy_members_load_as_np_load_does(array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    for _ in range(2):  # the second read comes from the header cache
        loaded = _load(buffer.getvalue())
        assert loaded.shape == array.shape and loaded.numpy().dtype == array.dtype
        assert np.array_equal(loaded.numpy(), array)
    assert loaded.numpy().flags.writeable  # no read-only buffer underneath (torch would warn)


def test_object_arrays_and_non_npy_bytes_are_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array(["a", None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        _load(buffer.getvalue())
    with pytest.raises(ValueError, match=r"not a \.npy"):
        _load(b"PK\x03\x04 not numpy")


def test_a_damaged_span_names_where(tmp_path) -> None:
    path = tmp_path / "shard.tar"
    (start, end), *_ = write_shard(path, _samples(), first_key=0)
    raw = bytearray(path.read_bytes()[start:end])
    raw[101] ^= 0x01  # inside the first header's mode field: its checksum no longer matches
    with pytest.raises(DataError, match=r"shard\.tar sample 0: corrupt sample in the pack.*checksum"):
        decode_sample(bytes(raw), "shard.tar sample 0")
    # each member: a ustar header block + its data block (1024 bytes here)
    with pytest.raises(DataError, match="runs past the end"):
        decode_sample(path.read_bytes()[start:end - 512 + 50], "cut")  # the last array's bytes cut
    with pytest.raises(DataError, match="cut short"):
        decode_sample(path.read_bytes()[start:end - 1024 + 100], "cut")  # inside the last header


def test_fingerprint_hashes_lists_piecewise_to_the_same_digest() -> None:
    """Streaming the records into the hash must not change a pack's fingerprint (old packs stay valid)."""
    from mmfuse.engine.pack_fingerprint import _sha, _sha_of_list

    items = [["a", {"image": "/p/a.png", "text": None}, 3], ["b", {"text": "ünïcode", "x": 1.5}, [1, 2]], []]
    assert _sha_of_list(iter(items)) == _sha(items)
    assert _sha_of_list(iter([])) == _sha([])
    assert _sha_of_list(iter(items[:2])) != _sha(items)
