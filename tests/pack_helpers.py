"""Helpers shared by the tests of packs written in parts, on Ray and to URLs: the real CLI in a child
process (optionally slowed after each shard, so that it is surely seen running or killed half-way) and
the SHA-256 of every file of a pack."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from mmfuse.config import ExperimentConfig

SLOW_CLI = ("import sys, time\nfrom mmfuse.engine import pack\nreal, delay = pack.write_shard, float(sys.argv[1])\n"
            "def slow(*a, **k):\n    out = real(*a, **k)\n    time.sleep(delay)\n    return out\n"
            "pack.write_shard = slow\nfrom mmfuse.cli import main\nsys.argv = sys.argv[2:]\nmain()\n")


SHARD_SIZE = 20
"""Shards of these tests: the synthetic set's splits in several shards each."""


def whole_pack(manifest: Path, root: Path) -> Path:
    """The reference the other ways of packing must equal: ``manifest`` packed in one local run."""
    from test_pack import pack_config

    from mmfuse.engine.pack import pack_data

    pack_data(pack_config(manifest, root / "run"), root / "pack", workers=1, shard_size=SHARD_SIZE)
    return root / "pack"


def config_file(config: ExperimentConfig, path: Path) -> Path:
    """``config`` written where the CLI can read it."""
    path.write_text(json.dumps(config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})))
    return path


def cli(*args: str, delay: float = 0.0, **popen: object) -> subprocess.Popen[str]:
    """``mmfuse ARGS`` in a child process, each shard followed by ``delay`` seconds of sleep."""
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), "mmfuse", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"},
                            **popen)  # type: ignore[call-overload]


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path, lock files left out (they hold no data)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".mmfuse.")}
