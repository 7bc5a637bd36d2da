"""`mmfuse demo` and `mmfuse train` (the demo preset's concat model, 6 epochs) on an idle machine
and beside 1 and 3 CPU-bound competitors, before and after the thread policy (mmfuse.core.threads,
mmfuse.analysis.run_pool), in one run.

A competitor is `nice -n 19 python3 -c "while True: pass"` started in a session of its own (as
another user's or terminal's job is: Linux's autogroup then shares the CPU between sessions, and
nice only orders processes inside one). "before" is what mmfuse did until this change, forced
through today's options: torch's default threads (one per core: `trainer.threads` = cores) and the
demo's runs one after the other (`--jobs 1`). `data pack` (the demo's 3,000 samples, 12 shards) is
compared with 1 and 2 workers. "after" is the default. Every command is a fresh
process, data cached (the demo's synthetic set is generated first, outside the timings).

    python benchmarks/busy_cpu.py --out benchmarks/results/busy_cpu.json [--timeout 420]

A command still running at --timeout seconds is stopped and reported as "> timeout".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPINNER = "while True: pass"


def start_competitors(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", SPINNER], start_new_session=True)
            for _ in range(count)]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def timed(command: list[str], timeout: float) -> float | None:
    """Wall seconds of ``command`` (None: stopped at ``timeout``)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - started


def commands(work: Path, cores: int) -> dict[str, dict[str, list[str]]]:
    from mmfuse.config.presets import preset_path

    mmfuse = [sys.executable, "-m", "mmfuse.cli"]
    train = [*mmfuse, "train", "-c", str(preset_path("demo")), "--overwrite", "--set", "trainer.max_epochs=6",
             "--set", "trainer.patience=null", "--set", "trainer.stop_at=null", "--set", "trainer.progress_bar=false"]
    pack = [*mmfuse, "data", "pack", "-c", str(preset_path("demo")), "--shard-size", "250", "--rebuild"]
    return {
        "pack": {
            "workers 1": [*pack, "--out", str(work / "pack-1"), "--workers", "1"],
            "workers 2": [*pack, "--out", str(work / "pack-2"), "--workers", "2"],
        },
        "train": {
            "before": [*train, "--out", str(work / "train-before"), "--set", f"trainer.threads={cores}"],
            "after": [*train, "--out", str(work / "train-after")],
        },
        "demo": {
            "before": [*mmfuse, "demo", "--out", str(work / "demo-before"), "--jobs", "1",
                       "--set", f"trainer.threads={cores}"],
            "after": [*mmfuse, "demo", "--out", str(work / "demo-after")],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/busy_cpu.json"))
    parser.add_argument("--timeout", type=float, default=420.0)
    parser.add_argument("--competitors", default="0,1,3")
    parser.add_argument("--commands", default="train,demo", help="comma-separated: pack, train, demo")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "mmfuse.cli", "demo", "--out", str(work / "warm"),
                        "--set", "trainer.max_epochs=1"], check=True, stdout=subprocess.DEVNULL)
        results: list[dict[str, object]] = []
        for count in (int(c) for c in args.competitors.split(",")):
            chosen = args.commands.split(",")
            for name, variants in ((n, v) for n, v in commands(work, cores).items() if n in chosen):
                for variant, command in variants.items():
                    competitors = start_competitors(count)
                    try:
                        time.sleep(1.0)
                        seconds = timed(command, args.timeout)
                    finally:
                        stop(competitors)
                    row = {"command": name, "variant": variant, "competitors": count,
                           "seconds": None if seconds is None else round(seconds, 1)}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {cores} cores, {platform.platform()}",
                                    "timeout_s": args.timeout, "results": results}, indent=2))


if __name__ == "__main__":
    main()
