"""Zero uni-modal signal: what plain fusion, the unimodal auxiliary loss and the imbalance remedies reach.

Data: ``mmfuse.datasets.xor_features`` (label = XOR of one balanced binary factor per modality;
each modality alone is exactly at chance, 0.5), 2,000 samples, 16 values per modality, in two
encodings of each modality's factor:

  linear: the factor along one direction (a linear read-out of one modality recovers it);
  parity: the factor is the XOR of two latent bits, each along its own direction (no linear
          function of one modality says anything about its own factor: the label is a 4-bit parity
          across modalities, the analogue of digits hidden in pixels).

Runs (identity encoders to 16 dims, fusion out_dim 32, AdamW lr 0.002, batch 64, a fixed budget of
``--epochs`` epochs with no early stopping so every setting gets the same number of steps):
concat; concat + trainer.unimodal_loss_weight 1.0; concat + trainer.balance ogm_ge / grad_blend /
agm (default options); tfn. The parity encoding over ``--seeds`` seeds and ``--epochs`` epochs,
the linear one (easy for every setting) over one seed and ``--linear-epochs``; the test accuracy at
the best validation epoch, the epoch at which validation accuracy first exceeded 0.6 (from the run's CSV log), and
whether the stall warning (engine/stall.py) fired.

    nice -n 10 python benchmarks/zero_signal.py --out benchmarks/results/zero-signal-cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import validate_config
from mmfuse.datasets.xor_features import generate_xor_features
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit

SETTINGS: dict[str, dict[str, Any]] = {
    "concat": {},
    "concat + unimodal_loss_weight 1": {"unimodal_loss_weight": 1.0},
    "concat + ogm_ge": {"balance": "ogm_ge"},
    "concat + grad_blend": {"balance": "grad_blend"},
    "concat + agm": {"balance": "agm"},
    "tfn": {"fusion": "tfn"},
}


def config_for(manifest: Path, out: Path, setting: dict[str, Any], epochs: int, seed: int) -> Any:
    trainer = {"max_epochs": epochs, "patience": None, "output_dir": str(out), "overwrite": True,
               "progress_bar": False, **{k: v for k, v in setting.items() if k != "fusion"}}
    return validate_config({
        "seed": seed,
        "data": {"manifest": str(manifest), "batch_size": 64,
                 "modalities": {m: {"kind": "features", "column": m} for m in ("a", "b")}},
        "encoders": {m: {"name": "identity", "dim": 16} for m in ("a", "b")},
        "fusion": {"name": setting.get("fusion", "concat"), "out_dim": 32},
        "optim": {"name": "adamw", "lr": 0.002}, "trainer": trainer})


def first_epoch_above(log_dir: Path, threshold: float = 0.6) -> int | None:
    """The first epoch whose validation accuracy exceeded ``threshold`` (Lightning's CSV log)."""
    for metrics in sorted(log_dir.rglob("metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("val_accuracy") and float(row["val_accuracy"]) > threshold:
                    return int(row["epoch"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zero-signal-cpu.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmfuse-zero-signal"))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--linear-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for encoding in ("linear", "parity"):
        manifest = generate_xor_features(args.work / encoding, n_samples=2000, dim=16, encoding=encoding)
        data = None
        seeds, epochs = (1, args.linear_epochs) if encoding == "linear" else (args.seeds, args.epochs)
        for name, setting in SETTINGS.items():
            for seed in range(seeds):
                out = args.work / "runs" / f"{encoding}-{name.replace(' ', '_')}-s{seed}"
                config = config_for(manifest, out, setting, epochs, seed)
                data = data or prepare_data(config)  # the same preprocessed data for every run
                result = fit(config, data, save=False)
                assert result.test_metrics is not None
                row = {"encoding": encoding, "setting": name, "seed": seed,
                       "test_accuracy": round(result.test_metrics["accuracy"], 4),
                       "val_accuracy": round(result.val_metrics["accuracy"], 4),
                       "first_epoch_val_acc_above_0.6": first_epoch_above(out / "logs"),
                       "epochs": epochs, "stall_warning": result.stall_warning is not None,
                       "train_seconds": round(result.train_seconds, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for row in results:
        key = f"{row['encoding']} / {row['setting']}"
        entry = summary.setdefault(key, {"test_accuracy": [], "first_epoch_val_acc_above_0.6": [], "stalls": 0})
        entry["test_accuracy"].append(row["test_accuracy"])
        entry["first_epoch_val_acc_above_0.6"].append(row["first_epoch_val_acc_above_0.6"])
        entry["stalls"] += int(row["stall_warning"])
    for entry in summary.values():
        accs = entry["test_accuracy"]
        entry["mean_test_accuracy"] = round(sum(accs) / len(accs), 4)
    report = {"command": "nice -n 10 python benchmarks/zero_signal.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), 2 shared cores (loaded)",
              "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
              "runs": results, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
