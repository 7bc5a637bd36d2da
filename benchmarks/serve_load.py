"""A bounded load test of ``mmfuse serve``: N requests at concurrency C, batching on and off.

Starts the real command (``mmfuse serve MODEL --port P``) as a subprocess on 127.0.0.1 once per
mode, sends the same request mix to each, and stops by itself. The mix: every non-empty subset of
{text, image, audio} of the synthetic set's samples, as multipart forms and base64 JSON, plus
``--malformed`` (a fraction) bad requests of seven kinds (garbage image, unknown field, wrong
content type, bad base64, a modality the model lacks, text over the limit, a body over the cap).

Checks (the script exits 1 when one fails): no response is a 5xx, every good request gets 200,
every malformed one a 4xx, and the server's RSS after the run is within ``--rss-slack-mb`` of its
RSS after the first 20% (no growth). Reports p50/p99 latency, requests/s, the batch sizes the
server saw (from /metrics) and peak RSS, per mode, as JSON.

    python benchmarks/serve_load.py --requests 2000 --concurrency 16 --malformed 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(("audio", "image", "text"), k)]
MALFORMED_KINDS = ("garbage_image", "unknown_field", "content_type", "bad_base64", "lacking_modality", "long_text",
                   "huge_body")
BODY_CAP_MB = 2.0


def train_model(folder: Path) -> Path:
    """The synthetic set and a concat model trained for a few epochs (the page test's model)."""
    from typer.testing import CliRunner

    from mmfuse.cli import app
    from mmfuse.datasets.synth import generate_synthetic

    manifest = generate_synthetic(folder / "synth", n_samples=400, seed=0, missing_rate=0.0)
    config = {
        "data": {"manifest": str(manifest), "batch_size": 32, "text": {"max_length": 12},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 32},
                     "image": {"name": "image_cnn", "dim": 32, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}},
        "fusion": {"name": "concat"}, "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 5, "patience": None, "progress_bar": False},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(folder / "config.yaml"), "--out", str(folder / "run")])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return folder / "run" / "model"


def build_requests(manifest: Path, n: int, malformed: float, seed: int) -> list[dict[str, Any]]:
    """n request specs: (kwargs for httpx, whether it is malformed, its kind)."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    files = {(r["id"], m): (manifest.parent / r[m]).read_bytes() for r in rows[:64] for m in ("image", "audio")}
    specs: list[dict[str, Any]] = []
    for _ in range(n):
        if rng.random() < malformed:
            kind = MALFORMED_KINDS[sum(s["malformed"] for s in specs) % len(MALFORMED_KINDS)]
            specs.append({"kind": kind, "malformed": True, "request": _malformed(kind)})
            continue
        row = rows[rng.randrange(64)]
        subset = rng.choice(SUBSETS)
        if rng.random() < 0.5:
            data = {"text": row["text"]} if "text" in subset else {}
            upload = {m: (f"{row['id']}.{'png' if m == 'image' else 'wav'}", files[(row["id"], m)])
                      for m in ("image", "audio") if m in subset}
            request: dict[str, Any] = {"data": data, "files": upload or {"image": ("", b"")}}
        else:
            body = {m: row["text"] if m == "text" else base64.b64encode(files[(row["id"], m)]).decode() for m in subset}
            request = {"json": body}
        specs.append({"kind": "+".join(subset), "malformed": False, "request": request})
    return specs


def _malformed(kind: str) -> dict[str, Any]:
    if kind == "garbage_image":
        return {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\nnot really")}}
    if kind == "unknown_field":
        return {"json": {"video": "AAAA"}}
    if kind == "content_type":
        return {"content": b"text=hello", "headers": {"content-type": "text/plain"}}
    if kind == "bad_base64":
        return {"json": {"audio": "@@@"}}
    if kind == "lacking_modality":
        return {"json": {"features": [0.1, 0.2]}}
    if kind == "long_text":
        return {"json": {"text": "word " * 5000}}
    return {"content": b"0" * int((BODY_CAP_MB + 1) * 1024 * 1024), "headers": {"content-type": "application/json"}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_load(url: str, specs: list[dict[str, Any]], concurrency: int, pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    outcomes: list[tuple[dict[str, Any], int]] = []
    rss_marks: list[float] = []
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                spec = queue.get_nowait()
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", **spec["request"])
                    status = response.status_code
                except httpx.TransportError:
                    status = -1  # a dropped connection counts as a failure
                latencies.append(time.perf_counter() - started)
                outcomes.append((spec, status))
                if len(outcomes) % max(1, len(specs) // 10) == 0:
                    rss_marks.append(rss_mb(pid))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    latencies.sort()
    statuses: dict[str, int] = {}
    for _, status in outcomes:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    bad_good = sum(1 for spec, status in outcomes if not spec["malformed"] and status != 200)
    bad_malformed = sum(1 for spec, status in outcomes if spec["malformed"] and not 400 <= status < 500)
    return {
        "requests": len(outcomes), "seconds": round(wall, 2), "requests_per_s": round(len(outcomes) / wall, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5") or s == "-1"),
        "good_not_200": bad_good, "malformed_not_4xx": bad_malformed,
        "malformed_sent": sum(1 for spec in specs if spec["malformed"]),
        "rss_mb_marks": [round(r, 1) for r in rss_marks],
        "batch_sizes": _mean_batch(metrics),
    }


def _mean_batch(metrics: str) -> dict[str, float]:
    values = {}
    for line in metrics.splitlines():
        for name in ("mmfuse_batch_size_sum", "mmfuse_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    count = values.get("mmfuse_batch_size_count", 0)
    return {"model_calls": count, "mean_batch": round(values.get("mmfuse_batch_size_sum", 0) / max(count, 1), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_load(model: Path, specs: list[dict[str, Any]], args: argparse.Namespace, batch: int) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "mmfuse.cli", "serve", str(model), "--port", str(port),
               "--max-batch-size", str(batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-body-mb", str(BODY_CAP_MB), "--max-text-chars", "10000"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.1)
        warm = specs[: min(50, len(specs))]
        asyncio.run(run_load(url, warm, args.concurrency, server.pid))  # first calls pay one-off costs
        result = asyncio.run(run_load(url, specs, args.concurrency, server.pid))
        result["rss_mb_peak"] = round(max(result["rss_mb_marks"]), 1)
        return result
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.05)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rss-slack-mb", type=float, default=25.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = train_model(Path(tmp))
        specs = build_requests(Path(tmp) / "synth" / "manifest.jsonl", args.requests, args.malformed, seed=0)
        results = {"batching_on": serve_and_load(model, specs, args, args.max_batch_size),
                   "batching_off": serve_and_load(model, specs, args, 1)}
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "command": " ".join(["python", *sys.argv]), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    failures = []
    for mode, r in results.items():
        marks = r["rss_mb_marks"]
        if r["server_errors_5xx"] or r["good_not_200"] or r["malformed_not_4xx"]:
            failures.append(f"{mode}: {r['server_errors_5xx']} 5xx/dropped, {r['good_not_200']} good requests "
                            f"not 200, {r['malformed_not_4xx']} malformed not 4xx")
        if len(marks) >= 3 and marks[-1] - marks[1] > args.rss_slack_mb:
            failures.append(f"{mode}: RSS grew from {marks[1]} to {marks[-1]} MB")
    on, off = results["batching_on"]["requests_per_s"], results["batching_off"]["requests_per_s"]
    if on < off * 0.95:
        failures.append(f"batching on is slower: {on} vs {off} requests/s")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
