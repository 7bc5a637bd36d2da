"""Time to compute the cache keys of the embedded synthetic set, before and after content keys.

The demo's data (``mmfuse.datasets.synth.synthetic_dataset``, 3000 samples: a PNG and a WAV per
sample, 6000 files) and the demo's three encoders, in one process, so both schemes read the same
files under the same load:

- in-memory arrays (``data.in_memory``): ``mmfuse.data.memory.cache_key`` of every split.
  Before: one ``stat`` per file (size, mtime); after: SHA-256 of every file's bytes, plus the
  decoding libraries' versions and the preprocessing code's identity.
- feature cache (``data.cache``): ``encoder_key`` of each of the three encoders. Before:
  settings, weights hash, torch version; after: also the mmfuse/transformers/timm versions and
  the identity of the encoder's code.

"Before" is the previous code, kept verbatim below (``_old_cache_key``; for the encoder key the
two new parts replaced by constants). Each pass is timed ``--repeats`` times; with ``--cold``
the files' pages are first dropped from the OS page cache (``posix_fadvise(DONTNEED)``, no root
needed), so the hash pass reads from disk as a first run after a reboot would.

    python benchmarks/cache_keys.py --n 3000 --repeats 5 --cold
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.contracts import TargetCodec
from mmfuse.data import memory
from mmfuse.data.arrays import parse_reference
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor
from mmfuse.engine import feature_cache
from mmfuse.engine.data import load_records
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS


def _old_file_stamps(records: list[Record], preprocessor: Preprocessor) -> list[list[object]]:
    """The previous ``_file_stamps``, verbatim: (path, size, mtime_ns)."""
    paths: set[str] = set()
    for record in records:
        for modality in preprocessor.modalities:
            value = record.fields.get(modality)
            if value is not None and preprocessor.kind(modality) != "text":
                paths.add(str(parse_reference(str(value))[0]))
    stamps: list[list[object]] = []
    for path in sorted(paths):
        try:
            stat = os.stat(path)
            stamps.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append([path, None, None])
    return stamps


def _old_cache_key(records: list[Record], preprocessor: Preprocessor, task: TargetCodec | None, on_error: str) -> str:
    """The previous ``cache_key``, verbatim."""
    digest = hashlib.sha256()
    digest.update(json.dumps(["arrays-v1", on_error, type(task).__name__ if task else None,
                              preprocessor.state()], sort_keys=True, default=str).encode())
    for record in records:
        digest.update(json.dumps([record.id, record.fields, record.target], sort_keys=True, default=str).encode())
    digest.update(json.dumps(_old_file_stamps(records, preprocessor)).encode())
    if task is not None:
        labels = sorted({str(r.target) for r in records})[:10000]
        encoded: list[object] = []
        for label in labels:
            try:
                encoded.append(task.encode_target(label).tolist())
            except (ValueError, TypeError):
                encoded.append(None)
        digest.update(json.dumps([labels, encoded], default=str).encode())
    return digest.hexdigest()[:32]


def _evict(paths: list[str]) -> None:
    """Drops the files' pages from the page cache (best effort; a no-op where unsupported)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)


def _time(run: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    return {"first_s": round(times[0], 4), "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="synthetic samples (the demo uses 3000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each pass")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the synthetic set is generated/cached")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(preset_path("demo"), [
            f"data.synthetic.n_samples={args.n}",
            f"data.synthetic.cache_dir={args.data_dir or Path(tmp) / 'synth'}",
        ])
        started = time.perf_counter()
        splits = load_records(config)
        generate_s = time.perf_counter() - started
        preprocessor = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio,
                                    features=config.data.features)
        preprocessor.fit(splits["train"])
        task = TASKS.create(config.task.name, **config.task.options)
        task.fit([r.target for r in splits["train"]])
        files = sorted({str(p) for records in splits.values() for p, _ in memory._file_digests(records, preprocessor)})
        size_mb = sum(os.path.getsize(p) for p in files) / 2**20
        evict = (lambda: _evict(files)) if args.cold else None

        def arrays(key: Callable[..., str]) -> Callable[[], list[str]]:
            return lambda: [key(records, preprocessor, task, "raise") for records in splits.values()]

        old_arrays = _time(arrays(_old_cache_key), args.repeats, evict)
        new_arrays = _time(arrays(memory.cache_key), args.repeats, evict)

        torch.manual_seed(0)
        model = MultimodalModel.from_config(config, preprocessor, task)

        def encoder_keys() -> list[str]:
            return [feature_cache.encoder_key(m, model.encoders[m], model.spec.encoders[m], preprocessor)  # type: ignore[arg-type]
                    for m in model.modalities]

        new_encoder = _time(encoder_keys, args.repeats)
        kept = feature_cache.library_versions, feature_cache.encoder_code
        feature_cache.library_versions = lambda names: {}  # type: ignore[assignment]
        feature_cache.encoder_code = lambda encoder: ""  # type: ignore[assignment]
        try:
            old_encoder = _time(encoder_keys, args.repeats)
        finally:
            feature_cache.library_versions, feature_cache.encoder_code = kept

    result: dict[str, Any] = {
        "samples": args.n, "files": len(files), "files_mb": round(size_mb, 1), "cold": args.cold,
        "repeats": args.repeats, "synthetic_set_s": round(generate_s, 2),
        "in_memory_cache_key_all_splits": {"before_stat": _summary(old_arrays), "after_sha256": _summary(new_arrays)},
        "feature_cache_encoder_key_3_encoders": {"before": _summary(old_encoder), "after": _summary(new_encoder)},
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
