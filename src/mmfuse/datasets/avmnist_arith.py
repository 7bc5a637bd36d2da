"""avmnist-arith: image digit a, spoken digit b, an operation phrase; label = (a op b) mod 10.

It reuses AV-MNIST's image and audio pipeline (``mmfuse.datasets.avmnist``) and adds a text
modality, so that no single modality carries the label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from mmfuse.core.atomic import staged_folder
from mmfuse.core.errors import DataError
from mmfuse.datasets.avmnist import (
    FORMAT_VERSION,
    AudioAugment,
    AVMnistRecipe,
    _checked_output,
    _counts,
    _PCAEnergyRemoval,
    _read_sources,
    _save,
    _write_audio,
    _write_manifest,
    n_val,
    write_sums,
)
from mmfuse.datasets.mnist_fsdd import fsdd_split

__all__ = ["ARITH_OPERATIONS", "ArithRecipe", "arith_label", "build_avmnist_arith"]

ARITH_OPERATIONS: dict[str, tuple[str, ...]] = {
    "plus": ("plus", "add", "added to", "and", "sum with", "increased by"),
    "minus": ("minus", "take away", "subtract", "less", "decreased by", "without"),
    "times": ("times", "multiplied by", "multiply by", "product with", "lots of", "groups of"),
}
_TEMPLATES = ("{op}", "the picture {op} the voice", "image {op} audio", "what is the digit {op} the word",
              "written number {op} spoken number")


def arith_label(a: int | NDArray[np.int64], op: str, b: int | NDArray[np.int64]) -> int | NDArray[np.int64]:
    """(a op b) mod 10, with Python's non-negative modulo for minus."""
    if op == "plus":
        return (a + b) % 10
    if op == "minus":
        return (a - b) % 10
    if op == "times":
        return (a * b) % 10
    raise DataError(f"unknown operation '{op}' (choose from {', '.join(ARITH_OPERATIONS)})")


@dataclass(frozen=True)
class ArithRecipe:
    """avmnist-arith settings: milder signals than AV-MNIST so the interaction, not noise, is the test."""

    seed: int = 0
    pca_removed: float = 0.0
    augment: AudioAugment = field(default_factory=lambda: AudioAugment(noise="white", snr_db=(10.0, 30.0)))
    limit: int | None = None

    def check(self) -> None:
        AVMnistRecipe(self.seed, self.pca_removed, self.augment, self.limit).check()


def build_avmnist_arith(mnist: Path | str, fsdd: Path | str, out: Path | str, recipe: ArithRecipe | None = None,
                        overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Image digit a, spoken digit b (drawn uniformly), an operation phrase; label = (a op b) mod 10.

    No single modality carries the label: for plus and minus each label is equally likely given any
    one modality, so only a model that combines all three can beat chance by much.
    """
    recipe = recipe or ArithRecipe()
    recipe.check()
    say = log or (lambda _msg: None)
    splits, clips = _read_sources(mnist, fsdd, recipe.limit)
    ops = list(ARITH_OPERATIONS)
    final = _checked_output(Path(out), overwrite)
    with staged_folder(final) as staging:
        seeds = np.random.SeedSequence(recipe.seed).spawn(2)
        pca = _PCAEnergyRemoval.fit(splits["train"][0], recipe.pca_removed)
        rows: list[dict[str, object]] = []
        for (split, (images, a)), seed in zip(splits.items(), seeds, strict=True):
            rng = np.random.default_rng(seed)
            b = rng.integers(0, 10, size=len(images)).astype(np.int64)
            op_index = rng.integers(0, len(ops), size=len(images))
            phrase_pick = rng.integers(0, 1 << 30, size=(len(images), 2))
            labels = np.array([arith_label(int(x), ops[o], int(y)) for x, o, y in zip(a, op_index, b, strict=True)],
                              dtype=np.int64)
            say(f"{split}: {len(images)} samples")
            _save(staging / "image" / f"{split}_data.npy", pca.apply(images))
            _save(staging / f"{split}_labels.npy", labels)
            _save(staging / f"{split}_operands.npy", np.stack([a, op_index, b], axis=1).astype(np.int64))
            names = _write_audio(staging / "audio" / f"{split}_data.npy", b, fsdd_split(clips, split),
                                 recipe.augment, rng)
            val_from = len(images) - n_val(len(images)) if split == "train" else len(images)
            for i in range(len(images)):
                op = ops[int(op_index[i])]
                words = ARITH_OPERATIONS[op][int(phrase_pick[i, 0]) % len(ARITH_OPERATIONS[op])]
                text = _TEMPLATES[int(phrase_pick[i, 1]) % len(_TEMPLATES)].format(op=words)
                rows.append({
                    "id": f"{split}-{i:05d}", "split": "val" if i >= val_from else split, "label": int(labels[i]),
                    "image": f"image/{split}_data.npy#{i}", "audio": f"audio/{split}_data.npy#{i}", "text": text,
                    "a": int(a[i]), "b": int(b[i]), "op": op, "fsdd_clip": names[i],
                })
        _write_manifest(staging / "manifest.jsonl", rows)
        info = {"format": f"{FORMAT_VERSION}-arith", "recipe": asdict(recipe), "counts": _counts(rows),
                "pca_components_kept": pca.kept, "operations": ARITH_OPERATIONS}
        (staging / "recipe.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        write_sums(staging)
    return final / "manifest.jsonl"
