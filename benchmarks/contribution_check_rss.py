"""Peak RSS of one epoch from a 20k-sample pack with the end-of-run contribution check on and off
(``trainer.contribution_check``), alternating, each run in a fresh process.

    PYTHONPATH=src python benchmarks/contribution_check_rss.py --root /tmp/rss20k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pack_throughput import bench_config, peak_rss_mib


def child(root: Path, mode: str) -> None:
    from mmfuse.engine.fit import train

    before = peak_rss_mib()
    config = bench_config(root / "data" / "manifest.jsonl", root / f"run-{mode}", pack=root / "pack")
    config.trainer.contribution_check = mode == "on"
    config.trainer.overwrite = True
    result = train(config)
    print(json.dumps({"check": mode, "train_seconds": result.train_seconds, "peak_rss_mib": peak_rss_mib(),
                      "growth_mib": peak_rss_mib() - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.root, args.child)
        return
    from mmfuse.datasets.synth import generate_synthetic
    from mmfuse.engine.pack import pack_data

    manifest = args.root / "data" / "manifest.jsonl"
    if not manifest.exists():
        manifest = generate_synthetic(args.root / "data", n_samples=args.samples, seed=0)
    pack_data(bench_config(manifest, args.root / "run"), args.root / "pack", workers=2, shard_size=500)
    for mode in ("on", "off", "on", "off"):
        out = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--child", mode],
                             capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
