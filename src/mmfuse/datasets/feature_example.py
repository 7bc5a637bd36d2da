"""A small MOSI-shaped data set of pre-extracted features, to try the ``features`` modality.

It has the two layouts a user's features come in:

- ``words``: one ``.npy`` of shape (T, 16) per sample, T varying from 3 to 20 (like per-word
  BERT/GloVe vectors), under ``words/``;
- ``acoustic``: one (N, 12) array per split (``acoustic_train.npy`` ...), referenced row by row
  as ``acoustic_train.npy#12`` (like utterance-level COVAREP averages).

The label is a sentiment score in [-3, 3] with one decimal (so some are exactly 0, as in MOSI)
that depends on both modalities: a hidden direction in the mean word vector and another in the
acoustic vector. Deterministic from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmfuse.core.atomic import atomic_file, write_text_atomic

WORD_DIM, ACOUSTIC_DIM = 16, 12
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic: a crash never leaves a truncated array that a later run would read."""
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


def generate_feature_example(out: str | Path, n_samples: int = 300, seed: int = 0) -> Path:
    """Writes the data set under ``out`` and returns the path of its ``manifest.jsonl``."""
    out = Path(out)
    (out / "words").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w_words = rng.normal(size=WORD_DIM) / np.sqrt(WORD_DIM)
    w_acoustic = rng.normal(size=ACOUSTIC_DIM) / np.sqrt(ACOUSTIC_DIM)
    rows, start = [], 0
    for split, fraction in SPLITS:
        count = n_samples - start if split == "test" else round(n_samples * fraction)
        acoustic = rng.normal(size=(count, ACOUSTIC_DIM)).astype(np.float32)
        # Acoustic dimensions on very different scales, as raw COVAREP features are.
        scales = np.logspace(-1, 2, ACOUSTIC_DIM).astype(np.float32)
        _save_npy(out / f"acoustic_{split}.npy", acoustic * scales)
        for row in range(count):
            index = start + row
            steps = int(rng.integers(3, 21))
            words = rng.normal(size=(steps, WORD_DIM)).astype(np.float32)
            sample_id = f"s{index:05d}"
            _save_npy(out / "words" / f"{sample_id}.npy", words)
            evidence = 1.2 * (words.mean(axis=0) @ w_words) * np.sqrt(steps) + 0.8 * acoustic[row] @ w_acoustic
            score = 3.0 * np.tanh(evidence)
            rows.append({"id": sample_id, "split": split, "words": f"words/{sample_id}.npy",
                         "acoustic": f"acoustic_{split}.npy#{row}", "label": round(float(score), 1)})
        start += count
    manifest = out / "manifest.jsonl"
    write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest
