"""What proving a pack's bytes costs: hashing at pack time, the first open (every shard hashed), later
opens (the verified-shard cache) and `mmfuse data verify`, on one pack, in one run.

On a generated synthetic manifest (a PNG + a WAV + a sentence per sample), packed with 64x64 RGB images
so that the shards are large next to the work of opening them:

    PYTHONPATH=src python benchmarks/pack_verify.py --samples 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from mmfuse.config import validate_config
from mmfuse.data import pack_integrity
from mmfuse.data.pack_format import INDEX_SUFFIX, ShardIndex
from mmfuse.datasets.synth import generate_synthetic
from mmfuse.engine.pack import pack_data
from mmfuse.engine.pack_open import open_pack
from mmfuse.engine.pack_verify import verify_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pack_verify.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pack-verify-"))
    os.environ["MMFUSE_CACHE"] = str(root / "cache")
    manifest = generate_synthetic(root / "data", n_samples=args.samples, seed=0, missing_rate=0.0)
    config = validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "text": {"max_length": 16}, "image": {"size": 64, "mode": "rgb"},
                 "audio": {"sample_rate": 16000, "n_mels": 64, "n_fft": 512, "hop_length": 128, "max_seconds": 1.0}},
        "encoders": {"text": {"name": "text_gru"}, "image": {"name": "image_cnn"}, "audio": {"name": "audio_cnn"}},
        "trainer": {"output_dir": str(root / "run")}})
    started = time.perf_counter()
    pack_data(config, root / "pack", workers=1, shard_size=500)
    pack_seconds = time.perf_counter() - started
    shards = sorted((root / "pack").glob("*.tar"))
    size = sum(p.stat().st_size for p in shards)
    started = time.perf_counter()  # the hashing part of packing, redone alone
    for shard in shards:
        index = ShardIndex.read(shard.with_name(shard.name + INDEX_SUFFIX))
        assert index.layouts is not None
        pack_integrity.shard_digests(shard, index.spans, index.layouts)
    digest_seconds = time.perf_counter() - started

    def timed_open() -> float:
        pack_integrity._VERIFIED.clear()  # as a new process
        started = time.perf_counter()
        open_pack(config, root / "pack")
        return time.perf_counter() - started

    cold = timed_open()  # no stamps yet: every shard hashed
    warm = min(timed_open() for _ in range(3))  # stamps: nothing hashed
    started = time.perf_counter()
    assert verify_pack(root / "pack").damaged == {}
    verify_seconds = time.perf_counter() - started
    result = {
        "command": f"PYTHONPATH=src python benchmarks/pack_verify.py --samples {args.samples}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "samples": args.samples, "shards": len(shards), "pack_mb": round(size / 1e6, 1),
        "pack_seconds": round(pack_seconds, 2), "digest_seconds_at_pack_time": round(digest_seconds, 3),
        "digest_share_of_packing": round(digest_seconds / pack_seconds, 4),
        "open_cold_seconds": round(cold, 3), "open_cached_seconds": round(warm, 3),
        "verify_seconds": round(verify_seconds, 3), "verify_mb_per_s": round(size / 1e6 / verify_seconds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
