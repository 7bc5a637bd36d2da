"""The XOR feature set: exactly zero uni-modal signal, balanced splits, missing modalities, determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmfuse.core.errors import MMFuseError
from mmfuse.datasets.xor_features import balanced_factors, generate_xor_features


def test_factors_make_the_label_independent_of_each_modality() -> None:
    factors = balanced_factors(40, np.random.default_rng(0))
    label = factors[:, 0] ^ factors[:, 1]
    for i in (0, 1):  # P(label = 1 | factor_i = v) = 1/2 exactly, for v = 0 and 1
        for v in (0, 1):
            assert label[factors[:, i] == v].mean() == 0.5
    assert Counter(map(tuple, factors.tolist())) == {(0, 0): 10, (0, 1): 10, (1, 0): 10, (1, 1): 10}


@pytest.mark.parametrize("encoding", ["linear", "parity"])
def test_the_written_set(tmp_path: Path, encoding: str) -> None:
    manifest = generate_xor_features(tmp_path / "x", n_samples=200, dim=6, missing_rate=0.4, encoding=encoding)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert Counter(r["split"] for r in rows) == {"train": 140, "val": 30, "test": 30}
    assert Counter(r["label"] for r in rows if r["split"] == "train") == {"0": 70, "1": 70}
    assert all(r["a"] is not None or r["b"] is not None for r in rows)  # never both missing
    assert 0 < sum(r["a"] is None for r in rows) < 200
    train_a = np.load(tmp_path / "x" / "a_train.npy")
    assert train_a.shape == (140, 6) and train_a.dtype == np.float32
    again = generate_xor_features(tmp_path / "y", n_samples=200, dim=6, missing_rate=0.4, encoding=encoding)
    assert again.read_text() == manifest.read_text()
    assert np.array_equal(np.load(tmp_path / "y" / "a_train.npy"), train_a)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MMFuseError, match="at least 40 samples"):
        generate_xor_features(tmp_path, n_samples=10)
    with pytest.raises(MMFuseError, match="'linear' or 'parity'"):
        generate_xor_features(tmp_path, encoding="cubic")
