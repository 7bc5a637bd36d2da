"""`mmfuse data pack`: packing throughput with 1 vs 2 workers, and the peak memory of training from a pack.

On a generated synthetic manifest (a PNG + a WAV + a sentence per sample, the demo's preprocessing):

1. packs it with ``--workers 1`` and then (``rebuild``) ``--workers 2`` in the same run: seconds and
   samples per second of each (after a warm-up pack, interleaved, best of two);
2. at two data-set sizes, trains one epoch in a fresh process from the pack (``data.pack``) and, for
   comparison, from the manifest (the per-sample path, which holds every preprocessed sample in
   memory), and reports each process's peak RSS (``VmHWM``).

    PYTHONPATH=src python benchmarks/pack_throughput.py --sizes 800 3200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmfuse.config import ExperimentConfig, validate_config


def bench_config(manifest: Path, out: Path, pack: Path | None = None, in_memory: bool = False,
                 workers: int = 0) -> ExperimentConfig:
    return validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "text": {"max_length": 16}, "image": {"size": 32, "mode": "rgb"},
                 "audio": {"sample_rate": 16000, "n_mels": 32, "n_fft": 512, "hop_length": 256, "max_seconds": 1.0},
                 "batch_size": 64, "pack": None if pack is None else str(pack), "in_memory": in_memory,
                 "num_workers": workers,
                 "in_memory_cache": str(out / "arrays") if in_memory else None},
        "encoders": {"text": {"name": "text_gru", "dim": 32},
                     "image": {"name": "image_cnn", "dim": 32, "channels": [8]},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}},
        "fusion": {"name": "concat", "out_dim": 32},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(out), "progress_bar": False, "threads": 1},
    })


def peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM``, not ``ru_maxrss``, which an exec'd child inherits from its parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_child(manifest: Path, out: Path, pack: str, workers: int = 0) -> None:
    """One epoch in this process; prints seconds (all, and the training loop's own), the RSS before
    training and the peak RSS (MiB) as JSON. ``pack`` 'in_memory' selects the in-memory fast path."""
    from mmfuse.engine.fit import train

    before = peak_rss_mib()  # the libraries alone
    started = time.perf_counter()
    in_memory = pack == "in_memory"
    result = train(bench_config(manifest, out, Path(pack) if pack and not in_memory else None, in_memory, workers))
    peak = peak_rss_mib()
    print(json.dumps({"seconds": time.perf_counter() - started, "train_seconds": result.train_seconds,
                      "peak_rss_mib": peak, "growth_mib": peak - before}))


def run_child(manifest: Path, out: Path, pack: Path | str | None, workers: int = 0) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(manifest), str(out), str(pack or ""), str(workers)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs=2, default=[800, 3200])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_child(Path(args.child[0]), Path(args.child[1]), args.child[2], int((args.child[3:] or [0])[0]))
        return
    from mmfuse.datasets.synth import generate_synthetic
    from mmfuse.engine.pack import pack_data

    print(f"# {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for n in args.sizes:
            manifest = generate_synthetic(root / f"data{n}", n_samples=n, seed=0)
            config = bench_config(manifest, root / "run")
            pack_data(config, root / f"pack{n}", workers=2, shard_size=200)  # warm-up: imports, file pages
            timings: dict[int, float] = {}
            for workers in (1, 2, 1, 2):  # interleaved, best of two: the machine is shared
                started = time.perf_counter()
                pack_data(config, root / f"pack{n}", workers=workers, rebuild=True, shard_size=200)
                seconds = time.perf_counter() - started
                timings[workers] = min(seconds, timings.get(workers, seconds))
            size = sum(p.stat().st_size for p in (root / f"pack{n}").iterdir()) / 2**20
            streamed = run_child(manifest, root / f"run-pack{n}", root / f"pack{n}")
            in_memory = run_child(manifest, root / f"run-plain{n}", None)
            rows.append((n, timings, size, streamed, in_memory))
            print(f"n={n}: pack 1 worker {timings[1]:.1f} s ({n / timings[1]:.0f}/s), 2 workers {timings[2]:.1f} s "
                  f"({n / timings[2]:.0f}/s), pack {size:.1f} MiB; 1 epoch from the pack: "
                  f"{streamed['seconds']:.1f} s, peak RSS {streamed['peak_rss_mib']:.0f} MiB "
                  f"(+{streamed['growth_mib']:.0f}); "
                  f"per-sample path: {in_memory['seconds']:.1f} s, peak RSS {in_memory['peak_rss_mib']:.0f} MiB "
                  f"(+{in_memory['growth_mib']:.0f})", flush=True)
    print("\n| samples | pack, 1 worker | pack, 2 workers | pack size | 1 epoch from the pack: peak RSS (growth) | "
          "per-sample path: peak RSS (growth) |\n|---|---|---|---|---|---|")
    for n, timings, size, streamed, in_memory in rows:
        print(f"| {n} | {timings[1]:.1f} s ({n / timings[1]:.0f}/s) | {timings[2]:.1f} s ({n / timings[2]:.0f}/s) "
              f"| {size:.1f} MiB | {streamed['peak_rss_mib']:.0f} MiB (+{streamed['growth_mib']:.0f}), "
              f"{streamed['seconds']:.1f} s | {in_memory['peak_rss_mib']:.0f} MiB (+{in_memory['growth_mib']:.0f}), "
              f"{in_memory['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
