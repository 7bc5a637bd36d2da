"""Bytes per sample and read throughput of a pack before and after compact shards, in one run.

The same synthetic manifest (a PNG + a WAV + a sentence per sample; 64x64 RGB images, 64-band log-mels
of 1 s) packed three ways: as packs were written before (v1: float32/int64 ``.npy`` members, each with
a PAX header), plain members without the PAX header, and compact (v2 default: uint8 pixels, narrow
integers, zstd). Read throughput is shuffled epochs of train batches (the median of 7) through ``ResumableLoader``
(batch 64, no loader workers, one torch thread), the training read path; the shards are hashed once
before it (remembered), so it is the reading and decoding alone. Train throughput: 2 epochs of
``mmfuse train`` from each pack (built-in encoders, one thread), samples per second of the training loop.

    PYTHONPATH=src python benchmarks/pack_compact.py --samples 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import webdataset

from mmfuse.config import validate_config
from mmfuse.data.dataset import Collator
from mmfuse.datasets.synth import generate_synthetic
from mmfuse.engine import pack as pack_module
from mmfuse.engine.fit import train
from mmfuse.engine.loader import ResumableLoader
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack


class _V1Writer(webdataset.TarWriter):
    """TarWriter as packs used it before: a float mtime, hence a PAX header on every member."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["mtime"] = 0.0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def read_epochs(config: object, folder: Path, epochs: int) -> tuple[float, int]:
    """The median seconds of ``epochs`` epochs (one is a fraction of a second: single ones are noise)."""
    data = open_pack(config, folder)  # type: ignore[arg-type]
    loader = ResumableLoader(data.datasets["train"], Collator(data.preprocessor, data.task), 64, True, 0, 0)
    seconds, samples = [], 0
    for _ in range(epochs):
        started = time.perf_counter()
        samples = sum(len(batch.ids) for batch in loader)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), samples


def train_rate(settings: dict[str, Any], folder: Path, out: Path, epochs: int, samples: int) -> float:
    """Training samples per second of ``epochs`` epochs from the pack at ``folder`` (the loop's own time,
    ``TrainResult.train_seconds``: reading, decoding, forward and backward and each epoch's validation;
not the start or the final evaluation); ``samples``: the pack's training samples."""
    config = validate_config({**settings, "data": {**settings["data"], "pack": str(folder)},
                              "trainer": {"max_epochs": epochs, "patience": None, "output_dir": str(out),
                                          "progress_bar": False, "threads": 1}})
    result = train(config)
    return epochs * samples / result.train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack_compact.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="pack-compact-"))
    os.environ["MMFUSE_CACHE"] = str(root / "cache")
    manifest = generate_synthetic(root / "data", n_samples=args.samples, seed=0, missing_rate=0.0)
    settings: dict[str, Any] = {
        "seed": 0,
        "data": {"manifest": str(manifest), "text": {"max_length": 16}, "image": {"size": 64, "mode": "rgb"},
                 "audio": {"sample_rate": 16000, "n_mels": 64, "n_fft": 512, "hop_length": 128, "max_seconds": 1.0}},
        "encoders": {"text": {"name": "text_gru"}, "image": {"name": "image_cnn"}, "audio": {"name": "audio_cnn"}},
        "trainer": {"output_dir": str(root / "run")}}
    config = validate_config(settings)
    compactor_for, tar_writer = pack_module.compactor_for, webdataset.TarWriter
    rows = {}
    for name in ("v1 (before)", "plain, no PAX headers", "compact (v2 default)"):
        folder = root / name.split()[0].strip(",")
        pack_module.compactor_for = compactor_for if name.startswith("compact") else (lambda p: None)  # type: ignore
        webdataset.TarWriter = _V1Writer if name.startswith("v1") else tar_writer  # type: ignore[misc]
        try:
            started = time.perf_counter()
            result = pack_data(config, folder, workers=1, shard_size=500)
            pack_seconds = time.perf_counter() - started
        finally:
            pack_module.compactor_for, webdataset.TarWriter = compactor_for, tar_writer  # type: ignore[misc]
        size = sum(p.stat().st_size for p in folder.glob("*.tar"))
        count = sum(result.counts.values())
        open_pack(config, folder)  # every shard hashed once, remembered
        seconds, samples = read_epochs(config, folder, args.epochs)
        rows[name] = {"pack_bytes": size, "bytes_per_sample": round(size / count), "pack_s": round(pack_seconds, 1),
                      "read_samples_per_s": round(samples / seconds),
                      "train_samples_per_s": round(train_rate(settings, folder, root / f"run-{folder.name}",
                                                              args.train_epochs, result.counts["train"]))}
    result = {"command": f"PYTHONPATH=src python benchmarks/pack_compact.py --samples {args.samples}",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
