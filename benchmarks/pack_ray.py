"""`mmfuse data pack --engine ray` against the local pool: wall time of packing the same data, in one run.

Rows: the local pool with 1 and 2 workers; Ray Data tasks on a local cluster of 1 node and of 2 nodes
(each node 1 CPU, all on 127.0.0.1, started by ``ray.cluster_utils.Cluster`` before timing; the time
includes connecting the driver and Ray Data's start). Every row packs into a fresh folder and its
files are checked to hash equal to the first row's. On a 2-core VM two nodes share the same two cores
as the 2-worker pool does: the comparison is of overheads, not of more hardware.

    PYTHONPATH=src python benchmarks/pack_ray.py --samples 3000 --shard-size 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pack_throughput import bench_config


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pack_ray.json")
    args = parser.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a one-machine cluster: 127.0.0.1 stays 127.0.0.1
    from ray.cluster_utils import Cluster

    from mmfuse.datasets.synth import generate_synthetic
    from mmfuse.engine.pack import pack_data
    from mmfuse.engine.pack_ray import ray_runner

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
        root = Path(tmp)
        manifest = generate_synthetic(root / "data", n_samples=args.samples, seed=0)
        config = bench_config(manifest, root / "run")
        reference: dict[str, str] = {}

        def timed(name: str, pack: Callable[[Path], object]) -> None:
            out = root / name.replace(" ", "-")
            started = time.perf_counter()
            pack(out)
            seconds = time.perf_counter() - started
            files = digests(out)
            if not reference:
                reference.update(files)
            rows.append({"engine": name, "seconds": round(seconds, 2),
                         "samples_per_s": round(args.samples / seconds), "identical": files == reference})
            print(rows[-1], flush=True)

        for workers in (1, 2):
            timed(f"local pool, {workers} worker(s)",
                  lambda out, w=workers: pack_data(config, out, workers=w, shard_size=args.shard_size))
        for nodes in (1, 2):
            head = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False,
                    "temp_dir": f"/tmp/mmfuse-bench-ray-{os.getpid()}", "ray_client_server_port": None}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            try:
                for _ in range(nodes - 1):
                    cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
                runner = ray_runner(str(cluster.address))
                timed(f"ray, {nodes} node(s) x 1 CPU",
                      lambda out, r=runner: pack_data(config, out, shard_size=args.shard_size, runner=r))
            finally:
                cluster.shutdown()
    result = {"samples": args.samples, "shard_size": args.shard_size, "machine": platform.machine(),
              "cpus": os.cpu_count(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
