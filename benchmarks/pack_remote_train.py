"""Training from a pack on S3 against the same pack on local disk: one epoch of the training read path
(open + every train batch through ``ResumableLoader``, as ``mmfuse train`` reads it) from the local
folder (first open: every shard hashed; then again, hashes remembered), from S3 with a cold shard cache
and again with the cache warm, and the bytes fetched, in one run.

The S3 server is moto in server mode on 127.0.0.1 (no network): the cold number is a lower bound on the
download cost a real bucket adds, and the warm number is what every later epoch and run pays.

    PYTHONPATH=src python benchmarks/pack_remote_train.py --samples 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import boto3
import torch
from moto.server import ThreadedMotoServer

from mmfuse.config import validate_config
from mmfuse.data import pack_integrity
from mmfuse.data.dataset import Collator
from mmfuse.datasets.synth import generate_synthetic
from mmfuse.engine.loader import ResumableLoader
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack


def epoch(config: object, location: str) -> tuple[float, int]:
    """Seconds to open the pack and read one shuffled epoch of train batches; samples read."""
    pack_integrity._VERIFIED.clear()  # as a new process
    started = time.perf_counter()
    data = open_pack(config, location)  # type: ignore[arg-type]
    loader = ResumableLoader(data.datasets["train"], Collator(data.preprocessor, data.task), 64, True, 0, 0)
    samples = sum(len(batch.ids) for batch in loader)
    return time.perf_counter() - started, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack_remote_train.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="pack-remote-"))
    os.environ["MMFUSE_CACHE"] = str(root / "cache")
    manifest = generate_synthetic(root / "data", n_samples=args.samples, seed=0, missing_rate=0.0)
    config = validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "text": {"max_length": 16}, "image": {"size": 32},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru"}, "image": {"name": "image_cnn"}, "audio": {"name": "audio_cnn"}},
        "trainer": {"output_dir": str(root / "run")}})
    pack_data(config, root / "pack", workers=1, shard_size=500)
    size = sum(p.stat().st_size for p in (root / "pack").glob("train-*.tar"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for path in (root / "pack").rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), "bench", f"p/{path.relative_to(root / 'pack').as_posix()}")
    url = "s3://bench/p"
    try:
        local_seconds, samples = epoch(config, str(root / "pack"))
        cold_seconds, _ = epoch(config, url)
        cached = sum(p.stat().st_size for p in (root / "cache" / "packs").rglob("train-*.tar"))
        warm_seconds, _ = epoch(config, url)
        local_again, _ = epoch(config, str(root / "pack"))  # its shards' hashes remembered too, as the warm run's
    finally:
        server.stop()
    result = {
        "command": f"PYTHONPATH=src python benchmarks/pack_remote_train.py --samples {args.samples}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1",
        "train_samples": samples, "train_shard_bytes": size, "downloaded_train_bytes": cached,
        "local_first_epoch_s": round(local_seconds, 2), "local_epoch_s": round(local_again, 2), "s3_cold_epoch_s": round(cold_seconds, 2),
        "s3_warm_epoch_s": round(warm_seconds, 2),
        "local_samples_per_s": round(samples / local_again), "s3_cold_samples_per_s": round(samples / cold_seconds),
        "s3_warm_samples_per_s": round(samples / warm_seconds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
