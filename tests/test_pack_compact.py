"""Compact pack members (issue 32, item 4): uint8 pixels, narrow integers and zstd, read back bit for bit
as ``build_sample`` makes them; old (v1, plain ``.npy``) shards still read; hostile zstd members give
one ``DataError`` naming the sample, never a crash or a large allocation."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_files import FUZZ
from test_pack import pack_config

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import Sample, build_sample
from mmfuse.data.pack_compact import MAX_MEMBER_BYTES, Compactor, compactor_for, rebuild_pixels
from mmfuse.data.pack_dataset import PackDataset
from mmfuse.data.pack_format import INDEX_SUFFIX, ShardIndex, sample_from_members, sample_members, write_shard
from mmfuse.data.pack_integrity import shard_digests
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.records import fit_preprocessing, load_records


def same(a: Sample, b: Sample) -> bool:
    def equal(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                             and x.shape == y.shape and torch.equal(x, y))
    return a.id == b.id and equal(a.target, b.target) and a.inputs.keys() == b.inputs.keys() and all(
        (a.inputs[m] is None) == (b.inputs[m] is None)
        and all(equal(t, (b.inputs[m] or {}).get(n)) for n, t in (a.inputs[m] or {}).items()) for m in a.inputs)


def test_a_compact_pack_reads_back_exactly_what_preprocessing_makes(synth_missing_manifest: Path,
                                                                  tmp_path: Path) -> None:
    config = pack_config(synth_missing_manifest, tmp_path / "run")
    pack_data(config, tmp_path / "pack", workers=1, shard_size=50)
    data = open_pack(config, tmp_path / "pack")
    splits = load_records(config)
    preprocessor, task = fit_preprocessing(config, splits)
    for split, records in splits.items():
        dataset = data.datasets[split]
        assert len(dataset) == len(records)
        for i, record in enumerate(records):
            assert same(dataset[i], build_sample(record, preprocessor, task)), (split, i)
    whole = next(dataset[i] for i in range(len(dataset)) if all(v is not None for v in dataset[i].inputs.values()))
    header = json.loads(sample_members("0", whole, compactor_for(preprocessor))["json"])
    assert header["stored"]["image.pixels"]["as"] == "float32" and "pixels" in header["stored"]["image.pixels"]
    assert "text.input_ids" not in header["stored"], "a member that would save no 512-byte tar block stays plain"


def test_compact_shards_are_smaller_and_an_old_plain_shard_still_reads(synth_manifest: Path, tmp_path: Path) -> None:
    config = pack_config(synth_manifest, tmp_path / "run", image={"size": 32})
    splits = load_records(config)
    preprocessor, task = fit_preprocessing(config, splits)
    samples = [build_sample(r, preprocessor, task) for r in splits["train"][:40]]
    sizes = {}
    for name, compactor in (("plain", None), ("compact", compactor_for(preprocessor))):
        path = tmp_path / f"{name}-00000.tar"
        spans = write_shard(path, samples, 0, compactor)
        from mmfuse.data.pack_format import shard_layouts

        layouts = shard_layouts(path, spans)
        sha, members = shard_digests(path, spans, layouts)
        path.with_name(path.name + INDEX_SUFFIX).write_text(
            ShardIndex(path.name, path.stat().st_size, spans, [], layouts, sha, members).to_json())
        read = PackDataset([path])
        assert all(same(read[i], samples[i]) for i in range(len(samples))), name
        sizes[name] = path.stat().st_size
    # pixels as uint8 (a quarter), zstd on the rest; the float32 log-mels stay about as large (measured 0.57)
    assert sizes["compact"] < 0.62 * sizes["plain"], sizes


def test_a_tensor_that_is_not_normalised_pixels_is_kept_as_it_is() -> None:
    compactor = Compactor((0.5,), (0.5,))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 4)).astype(np.uint8)
    exact = ((pixels.astype(np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)
    stored, spec = compactor.narrow(exact)
    assert stored.dtype == np.uint8 and np.array_equal(stored, pixels) and spec is not None
    nudged = exact.copy()
    nudged[0, 0, 0] = np.nextafter(nudged[0, 0, 0], np.float32(10))  # one ulp off: not a pixel any more
    kept, spec = compactor.narrow(nudged)
    assert kept is nudged and spec is None
    ids = np.array([0, 3, 70000], dtype=np.int64)
    narrowed, spec = compactor.narrow(ids)
    assert narrowed.dtype == np.int32 and spec == {"as": "int64"}


@pytest.mark.parametrize(("mean", "std"), [((0.5,), (0.5,)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                           ((0.1,), (0.3, 0.2, 0.7))])
def test_looked_up_pixels_are_the_formula_bit_for_bit(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 16, 16)).astype(np.uint8)
    pixels[0, :, 0, :] = np.arange(256, dtype=np.uint8).reshape(16, 16)[:3]  # every level appears
    means, stds = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in (mean, std))
    formula = (pixels.astype(np.float32) / 255.0 - means) / stds
    looked_up = rebuild_pixels(pixels, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    assert looked_up.dtype == np.float32 and np.array_equal(looked_up.view(np.uint32), formula.view(np.uint32))


def members_with(mel: bytes, stored: object = None) -> dict[str, object]:
    header = {"id": "x", "target": False, "inputs": {"audio": ["mel"]}, **({"stored": stored} if stored else {})}
    return {"json": json.dumps(header).encode(), "audio.mel.npy.zst": mel}


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(("frame", "message"), [
    (zstandard.ZstdCompressor(write_content_size=False).compress(npy_bytes(np.zeros(10, np.float32))),
     "does not state its decompressed size"),
    (zstandard.ZstdCompressor().compress(bytes(MAX_MEMBER_BYTES + 1)), "more than a member can be"),
    (zstandard.ZstdCompressor().compress(npy_bytes(np.zeros(1000, np.float32)))[:-9], "corrupt zstd frame"),
    (b"\x28\xb5\x2f\xfd" + bytes(14), "zstd"),
    (b"not zstd at all", "not a zstd frame"),
])
def test_hostile_zstd_members_are_one_line_errors(frame: bytes, message: str) -> None:
    with pytest.raises(DataError, match=rf"shard 7: corrupt sample in the pack .*{message}"):
        sample_from_members(members_with(frame), "shard 7")


@pytest.mark.parametrize("stored", [{"audio.mel": {"as": "object"}}, {"audio.mel": {"as": "float32", "pixels": 3}},
                                    {"audio.mel": "int64"}, {"audio.mel": {"as": "no such dtype"}}])
def test_a_hostile_stored_entry_is_refused(stored: object) -> None:
    frame = zstandard.ZstdCompressor().compress(npy_bytes(np.zeros((2, 3), np.int16)))
    with pytest.raises(DataError, match=r"corrupt sample in the pack"):
        sample_from_members(members_with(frame, stored), "shard 7")


@FUZZ
@given(body=st.binary(max_size=300), stored=st.none() | st.dictionaries(
    st.just("audio.mel"), st.dictionaries(st.sampled_from(["as", "pixels"]),
                                          st.sampled_from(["int64", "uint8", "float32", [[0.5], [0.5]], [1], None]))))
def test_fuzzed_compact_members_read_or_fail_cleanly(body: bytes, stored: object) -> None:
    frame = zstandard.ZstdCompressor().compress(body) if body[:1] == b"\x00" else body
    with contextlib.suppress(DataError):
        sample_from_members(members_with(frame, stored), "fuzz")


def test_a_shard_written_as_v1_packs_were_still_reads(synth_manifest: Path, tmp_path: Path) -> None:
    """v1: plain .npy members, and a PAX header on every member (the float mtime TarWriter was given)."""
    import webdataset as wds

    from mmfuse.data.pack_format import _spans, shard_layouts

    config = pack_config(synth_manifest, tmp_path / "run")
    splits = load_records(config)
    preprocessor, task = fit_preprocessing(config, splits)
    samples = [build_sample(r, preprocessor, task) for r in splits["train"][:5]]
    path = tmp_path / "train-00000.tar"
    with open(path, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0.0, user="mmfuse",
                                                   group="mmfuse", mode=0o444) as writer:
        for number, sample in enumerate(samples):
            writer.write(sample_members(f"{number:010d}", sample))
    spans = _spans(path)
    layouts = shard_layouts(path, spans)
    assert path.read_bytes().count(b"mtime=0.0") == 5 * 5, "PAX headers, as v1 wrote them"
    sha, members = shard_digests(path, spans, layouts)
    path.with_name(path.name + INDEX_SUFFIX).write_text(
        ShardIndex(path.name, path.stat().st_size, spans, [], layouts, sha, members).to_json())
    read = PackDataset([path])
    assert all(same(read[i], samples[i]) for i in range(5))
