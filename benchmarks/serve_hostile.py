"""Hostile requests and overload against a real ``mmfuse serve`` on 127.0.0.1 (issue 30's acceptance).

Trains a small model reading text, image, audio and an 8-wide features modality ``vec``, then:

1. **Battery**: starts ``mmfuse serve`` and sends the regression corpus (``hostile_corpus.corpus()``:
   the six former 500s, every limit, every decoder's failure), ``--fuzz`` fuzzer-style requests
   (mutated real PNG/JPEG/WAV/FLAC/.npy files, random JSON) and ``--png16`` 16-bit PNGs of 6000 x 6000
   (70 KB each, 36 M pixels: the issue's 1.1 GB case), over one keep-alive connection, then the
   same 16-bit PNGs from 8 clients at once. Checks: no 5xx, every corpus case its exact status and
   message, no traceback or address in any body, no dropped connection (a new one is opened only
   after a ``Connection: close`` answer), no request over ``--timeout`` + 5 s, and the server's RSS
   after the run within 10% of its RSS before (after warm-up requests).
2. **Overload**: restarts it with ``--max-queue 32`` and lets ``--clients`` (200) clients each send
   ``--per-client`` valid requests at once (each on its own connection), not waiting after a 503.
   Checks: some 503s, each with ``Retry-After``; no other 5xx, no dropped connection; reports the
   p50/p99 latency of accepted ones. Run twice: with the server requiring an API key (every client
   sends it) and, on loopback, with no key set.

The script exits 1 when a check fails. ``python benchmarks/serve_hostile.py --out results.json``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_corpus as hc

LEAKS = re.compile(r"Traceback|File \"|0x[0-9a-fA-F]{6,}|object at ")
BODY_CAP_MB = 2.0


def train_model(folder: Path) -> Path:
    """48 synthetic samples with a ``vec`` column of (8,) .npy files; one epoch (a few seconds)."""
    import numpy as np
    from typer.testing import CliRunner

    from mmfuse.cli import app
    from mmfuse.datasets.synth import generate_synthetic

    manifest = generate_synthetic(folder / "synth", n_samples=48, seed=0, missing_rate=0.0)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (folder / "synth" / "vec").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for row in rows:
        np.save(folder / "synth" / "vec" / f"{row['id']}.npy", rng.normal(size=hc.VEC_WIDTH).astype(np.float32))
        row["vec"] = f"vec/{row['id']}.npy"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = {"text": "text", "image": "image", "audio": "audio", "vec": "features"}
    config = {
        "data": {"manifest": str(manifest), "batch_size": 16, "text": {"max_length": 12},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256},
                 "modalities": {m: {"kind": k, "column": m} for m, k in kinds.items()}},
        "encoders": {"text": {"name": "text_transformer", "dim": 32},
                     "image": {"name": "image_cnn", "dim": 32, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]},
                     "vec": {"name": "identity", "dim": hc.VEC_WIDTH}},
        "fusion": {"name": "concat"},
        "trainer": {"max_epochs": 1, "patience": None, "progress_bar": False, "threads": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(folder / "config.yaml"), "--out", str(folder / "run")])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return folder / "run" / "model"


def sample_files(model: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The real files the fuzzer mutates, and one valid JSON request body (all four modalities)."""
    synth = model.parents[1] / "synth"
    row = json.loads((synth / "manifest.jsonl").read_text().splitlines()[0])
    image, audio = (synth / row["image"]).read_bytes(), (synth / row["audio"]).read_bytes()
    good = {"text": row["text"], "image": base64.b64encode(image).decode(),
            "audio": base64.b64encode(audio).decode(), "vec": [0.5] * hc.VEC_WIDTH}
    return hc.real_files(image, audio), good


@contextmanager
def serving(model: Path, *options: str, timeout_s: float = 120, key: str | None = None) -> Iterator[tuple[str, int]]:
    """``mmfuse serve MODEL`` on 127.0.0.1 and a free port until the block ends; yields (url, pid).
    ``key``: the server requires it (``MMFUSE_API_KEYS``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    command = [sys.executable, "-m", "mmfuse.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-body-mb", str(BODY_CAP_MB), *options]
    env = {k: v for k, v in os.environ.items() if k != "MMFUSE_API_KEYS"} | ({"MMFUSE_API_KEYS": key} if key else {})
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                if httpx.get(url + "/ready", timeout=2, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()  # before reading its stderr, which stays open while it runs
                raise SystemExit(f"the server did not start: {server.communicate()[1].decode()[-2000:]}")
            time.sleep(0.1)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _send(client: httpx.Client, case: hc.Case) -> httpx.Response:
    request = dict(case.request)
    if "chunks" in request:
        request["content"] = iter(request.pop("chunks"))
    return client.post("/predict", params=case.params, **request)


def _port(response: httpx.Response) -> Any:
    stream = response.extensions.get("network_stream")
    return stream.get_extra_info("client_addr") if stream is not None else None


def run_battery(url: str, pid: int, cases: list[hc.Case], png16s: int, good: dict[str, Any],
                timeout_s: float) -> dict[str, Any]:
    """Every case over one keep-alive client; then ``png16s`` 16-bit PNGs from 8 clients at once."""
    process = psutil.Process(pid)
    with httpx.Client(base_url=url, timeout=timeout_s + 30) as client:
        for _ in range(5):  # warm-up: first calls pay one-off costs (allocator arenas, lazy imports)
            client.post("/predict", json=good).raise_for_status()
        rss_start = process.memory_info().rss
        heavy = [hc.Case(f"png16 {i}", hc.upload("image", f"deep{i}.png", hc.png16(6000, 6000))) for i in range(png16s)]
        outcomes, failures = [], []
        sampler = _PeakRss(process)
        previous_port, closes, new_connections = None, 0, 0
        started = time.perf_counter()
        for case in [*cases, *heavy]:
            began = time.perf_counter()
            try:
                response = _send(client, case)
            except httpx.TransportError as exc:
                failures.append(f"{case.name}: the connection failed ({type(exc).__name__})")
                continue
            seconds = time.perf_counter() - began
            port = _port(response)
            if previous_port is not None and port != previous_port:
                new_connections += 1
            previous_port = port
            if response.headers.get("connection", "").lower() == "close":
                closes += 1
                previous_port = None  # the server said it closes: a new connection is expected
            outcomes.append((case, response.status_code))
            failures += _judge(case, response, seconds, timeout_s)
        heavy_parallel = asyncio.run(_concurrent(url, heavy, 8, timeout_s))
        for status in heavy_parallel:
            if not (status == 200 or 400 <= status < 500):
                failures.append(f"16-bit PNG sent concurrently got {status}")
        wall = time.perf_counter() - started
        peak = sampler.stop()
        time.sleep(1.0)
        rss_end = process.memory_info().rss
        client.post("/predict", json=good).raise_for_status()  # the server still answers
    statuses: dict[str, int] = {}
    for _, status in outcomes:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    if new_connections:
        failures.append(f"{new_connections} connections were dropped without 'Connection: close'")
    growth = rss_end / rss_start - 1
    if abs(growth) > 0.10:
        failures.append(f"server RSS went from {rss_start / 2**20:.0f} MB to {rss_end / 2**20:.0f} MB")
    return {"requests": len(outcomes) + len(heavy_parallel), "corpus_cases": sum(c.status is not None for c in cases),
            "statuses": dict(sorted(statuses.items())), "concurrent_png16_statuses": sorted(set(heavy_parallel)),
            "server_errors_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "closed_by_server": closes, "dropped_connections": new_connections, "seconds": round(wall, 1),
            "rss_mb_start": round(rss_start / 2**20, 1), "rss_mb_peak": round(peak / 2**20, 1),
            "rss_mb_end": round(rss_end / 2**20, 1), "rss_change": round(growth, 4), "failures": failures}


class _PeakRss:
    """Samples a process's RSS every 20 ms in a thread until ``stop`` (which returns the peak)."""

    def __init__(self, process: psutil.Process) -> None:
        import threading

        self.peak = process.memory_info().rss
        self._done = threading.Event()

        def sample() -> None:
            while not self._done.wait(0.02):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def _judge(case: hc.Case, response: httpx.Response, seconds: float, timeout_s: float) -> list[str]:
    problems = []
    status, text = response.status_code, response.text
    if status >= 500:
        problems.append(f"{case.name}: {status} {text[:200]}")
    elif case.status is not None and status != case.status:
        problems.append(f"{case.name}: {status} instead of {case.status}: {text[:200]}")
    elif case.status is None and not (status == 200 or 400 <= status < 500):
        problems.append(f"{case.name}: {status}")
    if case.message and case.message not in text:
        problems.append(f"{case.name}: '{case.message}' not in {text[:200]}")
    if LEAKS.search(text):
        problems.append(f"{case.name}: the body leaks internals: {text[:200]}")
    if seconds > timeout_s + 5:
        problems.append(f"{case.name}: took {seconds:.1f} s")
    return problems


async def _concurrent(url: str, cases: list[hc.Case], clients: int, timeout_s: float) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 30) as client:
        gate = asyncio.Semaphore(clients)

        async def one(case: hc.Case) -> int:
            async with gate:
                try:
                    return (await client.post("/predict", **case.request)).status_code
                except httpx.TransportError:
                    return -1

        return list(await asyncio.gather(*(one(c) for c in cases)))


async def run_overload(url: str, good: dict[str, Any], clients: int, per_client: int,
                       key: str | None = None) -> dict[str, Any]:
    """``clients`` clients at once, each on its own keep-alive connection sending ``per_client`` requests
    back to back (no back-off after a 503). The client is a minimal HTTP/1.1 writer/reader on asyncio
    streams: with httpx, 200 concurrent connections cost the client 3x the server's CPU on this machine
    and its own scheduling dominated the latencies measured."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(good).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    accepted: list[float] = []
    statuses: dict[str, int] = {}
    retry_after: set[str | None] = set()
    errors: dict[str, int] = {}

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in range(per_client):
                began = time.perf_counter()
                try:
                    writer.write(request)
                    await writer.drain()
                    status, headers = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    accepted.append(time.perf_counter() - began)
                elif status == 503:
                    retry_after.add(headers.get("retry-after"))
                if headers.get("connection", "").lower() == "close":
                    errors["closed by the server"] = errors.get("closed by the server", 0) + 1
                    return
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - started
    accepted.sort()
    failures = []
    if not statuses.get("503"):
        failures.append("no request got 503: the queue never filled")
    if retry_after - {"1"}:
        failures.append(f"503s without Retry-After: 1 ({retry_after})")
    other = {s: n for s, n in statuses.items() if s not in ("200", "503")}
    if other or errors:
        failures.append(f"other answers {other}, connection errors {errors}")
    if not accepted:
        failures.append("no request was accepted")

    def quantile(q: float) -> float | None:
        return round(1000 * accepted[min(len(accepted) - 1, int(len(accepted) * q))], 1) if accepted else None

    return {"clients": clients, "requests": clients * per_client, "statuses": dict(sorted(statuses.items())),
            "retry_after": sorted(r or "-" for r in retry_after), "connection_errors": errors,
            "accepted_per_s": round(len(accepted) / wall, 1), "accepted_p50_ms": quantile(0.5),
            "accepted_p99_ms": quantile(0.99), "accepted_max_ms": quantile(1.0), "seconds": round(wall, 1),
            "failures": failures}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 response: its status and headers; the body (Content-Length) is read and dropped."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the server closed the connection without answering")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


OVERLOAD_KEY = "bench-key-0123456789abcdef"
"""The overload runs once with the server requiring this key (every client sends it) and once, on
loopback, with no key set."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=120, help="fuzzer-style requests besides the corpus")
    parser.add_argument("--png16", type=int, default=8, help="70 KB 16-bit PNGs of 6000 x 6000")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--queue", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = train_model(Path(tmp))
        files, good = sample_files(model)
        cases = hc.corpus() + hc.fuzz_cases(files, args.fuzz, seed=0)
        common = ("--threads", str(args.threads), "--timeout", str(args.timeout))
        with serving(model, *common) as (url, pid):
            battery = run_battery(url, pid, cases, args.png16, good, args.timeout)
        with serving(model, *common, "--max-queue", str(args.queue), key=OVERLOAD_KEY) as (url, _):
            keyed = asyncio.run(run_overload(url, good, args.clients, args.per_client, key=OVERLOAD_KEY))
        with serving(model, *common, "--max-queue", str(args.queue)) as (url, _):
            overload = asyncio.run(run_overload(url, good, args.clients, args.per_client))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "command": " ".join(["python", *sys.argv]), "battery": battery, "overload_with_key": keyed,
              "overload": overload}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    failures = battery["failures"] + keyed["failures"] + overload["failures"]
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
