"""The per-sample array reader (mmfuse.data.arrays): file and row references, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mmfuse.core.errors import DataError
from mmfuse.data import arrays
from mmfuse.data.arrays import load_array, parse_reference


@pytest.fixture(autouse=True)
def _fresh_mmaps() -> None:
    arrays.clear_cache()


def test_parse_reference() -> None:
    assert parse_reference("a/b.npy") == (Path("a/b.npy"), None)
    assert parse_reference("a/b.npy#12") == (Path("a/b.npy"), 12)
    assert parse_reference("a/x#1/b.npy") == (Path("a/x#1/b.npy"), None)
    with pytest.raises(DataError, match="empty row index"):
        parse_reference("a/b.npy#")


def test_whole_npy_and_safetensors(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "a.npy", data)
    save_file({"features": data.astype(np.float16)}, str(tmp_path / "a.safetensors"))
    for name in ("a.npy", "a.safetensors"):
        out = load_array(tmp_path / name)
        assert out.dtype == np.float32 and out.shape == (3, 4)
        np.testing.assert_array_equal(out, data.astype(np.float32))
    np.save(tmp_path / "ints.npy", np.array([1, 2, 3], dtype=np.int16))
    np.testing.assert_array_equal(load_array(tmp_path / "ints.npy"), [1.0, 2.0, 3.0])


def test_row_reference_is_memory_mapped_once(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(5, 3, 2)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    first = load_array(f"{tmp_path / 'train.npy'}#4")
    np.testing.assert_array_equal(first, data[4])
    assert isinstance(arrays._MMAP_CACHE[(tmp_path / "train.npy").resolve()], np.memmap)
    cached = arrays._MMAP_CACHE[(tmp_path / "train.npy").resolve()]
    load_array(f"{tmp_path / 'train.npy'}#0")
    assert arrays._MMAP_CACHE[(tmp_path / "train.npy").resolve()] is cached
    first[:] = 0  # a returned array is a copy: the mapped file is never written through it
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'train.npy'}#4"), data[4])


def test_errors_name_the_file_and_row(tmp_path: Path) -> None:
    np.save(tmp_path / "split.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"array file not found: .*missing\.npy"):
        load_array(tmp_path / "missing.npy")
    with pytest.raises(DataError, match=r"split\.npy row 7: row index out of range \(the file has 3 rows"):
        load_array(f"{tmp_path / 'split.npy'}#7")
    with pytest.raises(DataError, match=r"split\.npy row -1: row index out of range"):
        load_array(f"{tmp_path / 'split.npy'}#-1")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(DataError, match=r"cube\.npy: expected a 1-D or 2-D array, got shape \(2, 2, 2\)"):
        load_array(tmp_path / "cube.npy")
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"words\.npy: dtype <U1 is not numeric"):
        load_array(tmp_path / "words.npy")
    bad = np.ones((4, 2), dtype=np.float32)
    bad[2, 1] = np.nan
    bad[3, 0] = np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan\.npy row 2: 1 NaN/inf value"):
        load_array(f"{tmp_path / 'nan.npy'}#2")
    with pytest.raises(DataError, match=r"nan\.npy: 2 NaN/inf value"):
        load_array(tmp_path / "nan.npy")
    save_file({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(DataError, match=r"two\.safetensors: .*exactly one tensor, found 2 \(a, b\)"):
        load_array(tmp_path / "two.safetensors")
    (tmp_path / "feat.txt").write_text("1 2 3")
    with pytest.raises(DataError, match=r"feat\.txt: unsupported array file type"):
        load_array(tmp_path / "feat.txt")
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"cannot read array file .*corrupt\.npy"):
        load_array(tmp_path / "corrupt.npy")
    with pytest.raises(DataError, match=r"row reference .* needs a \.npy file"):
        load_array(f"{tmp_path / 'feat.txt'}#0")
