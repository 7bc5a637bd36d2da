"""Epoch time with and without the feature cache (``data.cache``), same model, frozen encoders.

The model: the built-in text/image/audio encoders at a size where they dominate the step on a
CPU (text Transformer 4x256, image and audio CNNs with 64/128/256 channels on 64x64 images and
64-band log-mels), all frozen (``freeze: true``), concat fusion + MLP head, on the embedded
synthetic tri-modal data. Three runs on the same preprocessed data and seed:

1. cache fill: ``cache_datasets`` computes every sample's features once and writes the packs;
2. cached training: ``fit`` with ``data.cache: true`` finds every entry and runs no encoder;
3. no cache: every step runs the three encoders (forward only: they are frozen);
4. cached training again.

Two epoch times per setting:

- Lightning epoch: ``trainer.fit`` time / epochs (train + validation + checkpointing, as a user
  sees an epoch); mean of a cached run before and one after the uncached run, so load from other
  jobs drifting during the run weighs on both sides of the ratio alike;
- training-loop epoch: one pass over the training split with the same model, DataLoader and
  collate, forward, backward and AdamW step, without Lightning's per-step bookkeeping (mean of
  ``--cached-epochs`` cached passes; one uncached pass), in wall and in CPU seconds. It isolates
  the work the cache removes.

The cache fill is paid once per encoder and data set; later runs, other fusion methods and
``mmfuse bench`` seeds with the same encoder weights reuse it.

    python benchmarks/feature_cache.py --n 600 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import validate_config
from mmfuse.data.dataset import Collator, MultimodalDataset
from mmfuse.datasets.synth import generate_synthetic
from mmfuse.engine.data import prepare_data
from mmfuse.engine.feature_cache import cache_datasets
from mmfuse.engine.fit import fit
from mmfuse.model import MultimodalModel


def experiment(manifest: Path, out: Path, cache_dir: Path, epochs: int, cache: bool, batch_size: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "target_column": "label", "batch_size": batch_size,
                 "cache": cache, "cache_dir": str(cache_dir),
                 "text": {"max_length": 32}, "image": {"size": 64},
                 "audio": {"n_mels": 64, "max_seconds": 1.0}},
        "encoders": {
            "text": {"name": "text_transformer", "dim": 256, "layers": 4, "heads": 4, "freeze": True},
            "image": {"name": "image_cnn", "dim": 256, "channels": [64, 128, 256], "freeze": True},
            "audio": {"name": "audio_cnn", "dim": 256, "channels": [64, 128, 256], "freeze": True},
        },
        "fusion": {"name": "concat", "out_dim": 256},
        "task": {"name": "classification", "head_hidden": 128},
        "trainer": {"max_epochs": epochs, "patience": None, "output_dir": str(out), "progress_bar": False,
                    "accelerator": "cpu"},
    }


def loop_epoch(model: MultimodalModel, dataset: MultimodalDataset, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one training pass: DataLoader + collate, forward, backward, AdamW step.

    CPU time (this process, all threads) is reported beside wall time because on a shared machine
    other jobs stretch wall time of short passes far more than they change the work done.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         collate_fn=Collator(model.preprocessor, model.task))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    started, cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        optimizer.zero_grad()
        model.task.step_loss(model, batch).backward()
        optimizer.step()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples in the synthetic data set")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the uncached run")
    parser.add_argument("--cached-epochs", type=int, default=20,
                        help="epochs of each cached run (longer windows average out other jobs' load)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmfuse-cache-bench-") as tmp:
        root = Path(tmp)
        manifest = generate_synthetic(root / "data", n_samples=args.n, seed=0, missing_rate=0.0)
        plain = validate_config(experiment(manifest, root / "plain", root / "cache", args.epochs, False,
                                           args.batch_size))
        started = time.perf_counter()
        data = prepare_data(plain)
        prep_seconds = time.perf_counter() - started
        sizes = {name: len(ds) for name, ds in data.datasets.items()}

        cached_config = validate_config(experiment(manifest, root / "cached", root / "cache", args.cached_epochs,
                                                   True, args.batch_size))
        torch.manual_seed(cached_config.seed)
        model = MultimodalModel.from_config(cached_config, data.preprocessor, data.task)
        params = sum(p.numel() for p in model.encoders.parameters())
        cached_data, fill = cache_datasets(model, data.datasets, root / "cache", device="cpu")
        passes = [loop_epoch(model, cached_data["train"], args.batch_size) for _ in range(args.cached_epochs)]
        loop_cached = (sum(w for w, _ in passes) / len(passes), sum(c for _, c in passes) / len(passes))
        loop_plain = loop_epoch(model, data.datasets["train"], args.batch_size)
        # Cached runs before and after the uncached one, so load from other jobs on the machine
        # drifting during the run weighs on both sides of the ratio alike.
        cached_runs = [fit(cached_config, data, save=False)]  # seeds itself: the same encoder weights, all hits
        uncached = fit(plain, data, save=False)
        started = time.perf_counter()
        cached_runs.append(fit(cached_config, data, save=False))
        cached_wall = time.perf_counter() - started
        _, load = cache_datasets(model, data.datasets, root / "cache", device="cpu")
        cache_bytes = sum(p.stat().st_size for p in (root / "cache").rglob("*.safetensors"))

    epoch_plain = uncached.train_seconds / max(1, uncached.epochs)
    cached_epochs = [run.train_seconds / max(1, run.epochs) for run in cached_runs]
    epoch_cached = sum(cached_epochs) / len(cached_epochs)
    cached = cached_runs[-1]
    result = {
        "samples": sizes, "epochs": args.epochs, "cached_epochs": args.cached_epochs, "batch_size": args.batch_size,
        "encoder_params": params, "threads": torch.get_num_threads(),
        "preprocess_s": round(prep_seconds, 2),
        "epoch_s_no_cache": round(epoch_plain, 3), "epoch_s_cached": round(epoch_cached, 4),
        "epoch_s_cached_before_after": [round(t, 4) for t in cached_epochs],
        "speedup": round(epoch_plain / epoch_cached, 1),
        "loop_epoch_s_no_cache": round(loop_plain[0], 3), "loop_epoch_s_cached": round(loop_cached[0], 4),
        "loop_speedup": round(loop_plain[0] / loop_cached[0], 1),
        "loop_epoch_cpu_s_no_cache": round(loop_plain[1], 3), "loop_epoch_cpu_s_cached": round(loop_cached[1], 4),
        "loop_cpu_speedup": round(loop_plain[1] / loop_cached[1], 1),
        "cache_fill_s": round(fill.seconds, 2), "cache_load_s": round(load.seconds, 3),
        "cached_fit_wall_s": round(cached_wall, 2), "cache_mb": round(cache_bytes / 2**20, 1),
        "val_accuracy_no_cache": round(uncached.val_metrics["accuracy"], 4),
        "val_accuracy_cached": round(cached.val_metrics["accuracy"], 4),
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print("| | seconds |\n|---|---|")
    print(f"| epoch, no cache (encoders run every step) | {epoch_plain:.3f} |")
    print(f"| epoch, cached (mean of a run before and after) | {epoch_cached:.4f} |")
    print(f"| **speed-up per Lightning epoch** | **{epoch_plain / epoch_cached:.1f}x** |")
    print(f"| training-loop epoch, no cache (wall / CPU) | {loop_plain[0]:.3f} / {loop_plain[1]:.3f} |")
    print(f"| training-loop epoch, cached (mean of {args.cached_epochs}; wall / CPU) | "
          f"{loop_cached[0]:.4f} / {loop_cached[1]:.4f} |")
    print(f"| **speed-up per training-loop epoch (wall / CPU)** | "
          f"**{loop_plain[0] / loop_cached[0]:.1f}x / {loop_plain[1] / loop_cached[1]:.1f}x** |")
    print(f"| cache fill, once ({sum(fill.computed.values())} entries) | {fill.seconds:.2f} |")
    print(f"| cache load, every later run (all hits) | {load.seconds:.3f} |")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
