"""Training from a pack at 20k vs 200k samples: peak RSS stays flat; and the per-sample (eager) path for
comparison; and training samples/s from a pack vs the in-memory fast path.

Each training run is one epoch in a fresh process (``pack_throughput.train_child``); the pack is
written once per size with ``--workers 2``. Data: the embedded synthetic generator (PNG + WAV +
sentence per sample), the demo's preprocessing.

    PYTHONPATH=src python benchmarks/pack_scale.py --sizes 20000 200000 --eager 20000 50000 --root /tmp/pack-scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from pack_throughput import bench_config, run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--eager", type=int, nargs="*", default=[20000, 50000])
    parser.add_argument("--in-memory", type=int, nargs="*", default=[20000])
    parser.add_argument("--pack-workers", type=int, nargs="+", default=[0],
                        help="DataLoader workers of the runs from the pack (one run per count)")
    parser.add_argument("--root", type=Path, required=True, help="scratch folder (GBs at 200k); removed at the end")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pack-scale-cpu.json"))
    args = parser.parse_args()
    from mmfuse.datasets.synth import generate_synthetic
    from mmfuse.engine.pack import pack_data

    results: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} cores", "runs": []}
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    try:
        for n in sorted(set(args.sizes) | set(args.eager) | set(args.in_memory)):
            started = time.perf_counter()
            manifest = generate_synthetic(root / f"data{n}", n_samples=n, seed=0)
            row: dict = {"samples": n, "generate_seconds": round(time.perf_counter() - started, 1)}
            if n in args.sizes:
                config = bench_config(manifest, root / "run")
                started = time.perf_counter()
                pack_data(config, root / f"pack{n}", workers=2, shard_size=500)
                row["pack_seconds"] = round(time.perf_counter() - started, 1)
                row["pack_mib"] = round(sum(p.stat().st_size for p in (root / f"pack{n}").rglob("*")
                                            if p.is_file()) / 2**20, 1)
                for workers in args.pack_workers:
                    key = "from_pack" if workers == 0 else f"from_pack_{workers}_workers"
                    row[key] = run_child(manifest, root / f"run-pack{n}-{workers}", root / f"pack{n}", workers)
            if n in args.in_memory:
                row["in_memory"] = run_child(manifest, root / f"run-mem{n}", "in_memory")
            if n in args.eager:
                row["eager"] = run_child(manifest, root / f"run-eager{n}", None)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(root / f"data{n}", ignore_errors=True)
            shutil.rmtree(root / f"pack{n}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
