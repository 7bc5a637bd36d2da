"""``data.mode``: how fast the training loader delivers samples, eager vs lazy, with 0 and 2 workers.

On a generated synthetic manifest (a PNG + a WAV + a sentence per sample, the demo's preprocessing),
for each mode and worker count: the seconds ``prepare_data`` takes (eager: fitting + preprocessing
every split; lazy: fitting only) and the samples per second of two epochs of the training loader
(``ResumableLoader``, shuffled, batch 64, collated batches, no model), the first epoch including the
workers' start. Lazy is also measured with every augmentation on. One intra-op thread in the main
process (as ``trainer.threads: 1``); DataLoader workers use one each.

    PYTHONPATH=src python benchmarks/lazy_throughput.py --samples 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import ExperimentConfig, validate_config

AUGMENT = {"image": {"flip": 0.5, "crop_scale": [0.8, 1.0]},
           "audio": {"time_masks": 2, "time_width": 8, "freq_masks": 2, "freq_width": 4},
           "text": {"word_dropout": 0.1}}


def bench_config(manifest: Path, out: Path, mode: str, workers: int, augment: bool) -> ExperimentConfig:
    return validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "text": {"max_length": 16}, "image": {"size": 32, "mode": "rgb"},
                 "audio": {"sample_rate": 16000, "n_mels": 32, "n_fft": 512, "hop_length": 256, "max_seconds": 1.0},
                 "batch_size": 64, "mode": mode, "num_workers": workers, "augment": AUGMENT if augment else {}},
        "encoders": {"text": {"name": "text_gru", "dim": 32}, "image": {"name": "image_cnn", "dim": 32},
                     "audio": {"name": "audio_cnn", "dim": 32}},
        "trainer": {"output_dir": str(out), "threads": 1},
    })


def measure(config: ExperimentConfig, epochs: int = 2) -> dict[str, Any]:
    from mmfuse.data.dataset import Collator
    from mmfuse.engine.data import prepare_data
    from mmfuse.engine.loader import ResumableLoader

    started = time.perf_counter()
    data = prepare_data(config)
    prepare = time.perf_counter() - started
    train = data.datasets["train"]
    loader = ResumableLoader(train, Collator(data.preprocessor, data.task), config.data.batch_size, True,
                             config.data.num_workers, config.seed)
    rates = []
    try:
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            n = sum(batch.size for batch in loader)
            rates.append(n / (time.perf_counter() - started))
    finally:
        loader.close()
    return {"mode": config.data.mode, "workers": config.data.num_workers, "augment": config.data.augment.active,
            "train_samples": len(train), "prepare_s": round(prepare, 2),
            "epoch_samples_per_s": [round(r) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    from mmfuse.datasets.synth import generate_synthetic

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_synthetic(Path(tmp) / "data", n_samples=args.samples, seed=0, missing_rate=0.0)
        runs = [("eager", 0, False), ("eager", 2, False), ("lazy", 0, False), ("lazy", 2, False),
                ("lazy", 2, True)]
        results = [measure(bench_config(manifest, Path(tmp) / "run", mode, workers, augment))
                   for mode, workers, augment in runs]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print("| mode | workers | augment | prepare_data | epoch 1 (samples/s) | epoch 2 (samples/s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        one, two = r["epoch_samples_per_s"]
        augment = "on" if r["augment"] else "off"
        print(f"| {r['mode']} | {r['workers']} | {augment} | {r['prepare_s']} s | {one} | {two} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
