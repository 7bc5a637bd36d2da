"""A two-modality feature set whose label is the XOR of one binary factor per modality.

Why: it has *exactly zero* uni-modal signal. Each modality ``a`` and ``b`` carries one balanced
binary factor (f_a, f_b), the label is f_a XOR f_b, and within every split each of the four
(f_a, f_b) combinations occurs equally often, so the label is independent of each modality alone,
empirically as well as in distribution: any model that uses one modality is at chance (0.5), and
only an interaction of both modalities predicts the label. It is the minimal test of a fusion
that has to learn a cross-modal interaction (the failure mode of issue 16, where concat and TFN
stalled at chance on tasks whose modalities are useless alone).

Each modality is a ``features`` vector of ``dim`` values plus unit Gaussian noise in every
dimension. ``encoding: linear`` (the default) adds the factor's sign times a fixed random direction
of norm ``separation``, so a linear read-out recovers the factor with accuracy Phi(separation)
(0.977 at the default 2.0). ``encoding: parity`` hides the factor one level deeper, as a pixel
image hides a digit: two latent bits (c1, c2) with c1 XOR c2 = the factor, each drawn at random,
each adding its sign times its own direction; no linear function of one modality then says
anything about its own factor, and the label is a 4-bit parity across the two modalities. Arrays are
written one per split and modality (``a_train.npy``) and referenced row by row (``a_train.npy#12``),
as the feature example does. ``missing_rate`` drops each modality of a sample with that
probability (never both). Deterministic from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmfuse.core.atomic import atomic_file, write_text_atomic
from mmfuse.core.errors import MMFuseError

MODALITIES = ("a", "b")
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def balanced_factors(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 2) int factors: the four combinations as equally often as ``count`` allows, shuffled."""
    combos = np.array([(0, 0), (0, 1), (1, 0), (1, 1)])
    return combos[rng.permutation(np.resize(np.arange(4), count))]


def generate_xor_features(out: str | Path, n_samples: int = 2000, dim: int = 16, separation: float = 2.0,
                          missing_rate: float = 0.0, seed: int = 0, encoding: str = "linear") -> Path:
    """Writes the data set under ``out`` and returns the path of its ``manifest.jsonl``."""
    if encoding not in ("linear", "parity"):
        raise MMFuseError(f"--encoding '{encoding}' must be 'linear' or 'parity'")
    if n_samples < 40:
        raise MMFuseError(f"--n {n_samples}: need at least 40 samples (every split must hold all four combinations)")
    if not 0.0 <= missing_rate < 1.0:
        raise MMFuseError(f"--missing-rate {missing_rate} must be in [0, 1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(MODALITIES), 2, dim))  # the second one: parity encoding only
    directions *= separation / np.linalg.norm(directions, axis=2, keepdims=True)
    rows, start = [], 0
    for split, fraction in SPLITS:
        count = n_samples - start if split == "test" else round(n_samples * fraction)
        factors = balanced_factors(count, rng)
        for i, m in enumerate(MODALITIES):
            if encoding == "linear":
                signal = (2 * factors[:, i] - 1)[:, None] * directions[i, 0]
            else:  # c1 at random, c2 = c1 XOR factor: each bit alone independent of the factor
                c1 = rng.integers(0, 2, size=count)
                c2 = c1 ^ factors[:, i]
                signal = (2 * c1 - 1)[:, None] * directions[i, 0] + (2 * c2 - 1)[:, None] * directions[i, 1]
            values = signal + rng.normal(size=(count, dim))
            _save_npy(out / f"{m}_{split}.npy", values.astype(np.float32))
        dropped = rng.random((count, len(MODALITIES))) < missing_rate
        dropped[dropped.all(axis=1), rng.integers(0, len(MODALITIES))] = False  # never both
        for row in range(count):
            row_data: dict[str, object] = {"id": f"x{start + row:05d}", "split": split,
                                           "label": str(int(factors[row, 0] ^ factors[row, 1]))}
            for i, m in enumerate(MODALITIES):
                row_data[m] = None if dropped[row, i] else f"{m}_{split}.npy#{row}"
            rows.append(row_data)
        start += count
    manifest = out / "manifest.jsonl"
    write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest
