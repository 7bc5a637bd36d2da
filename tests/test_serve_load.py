"""The load test's acceptance claims in a fast form: a real server under concurrent mixed traffic
answers every good request 200 and every malformed one 4xx, never 5xx (benchmarks/serve_load.py
runs the full 2,000 requests, batching on and off)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
from serve_helpers import running_server, train_small_model

from mmfuse.serve.app import create_app
from mmfuse.serve.settings import ServeSettings

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "serve_load.py"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch", [8, 1])
def test_mixed_concurrent_traffic_gets_no_server_error(synth_manifest: Path, tmp_path: Path, batch: int) -> None:
    bench = load_benchmark()
    model = train_small_model(synth_manifest, tmp_path)
    specs = bench.build_requests(synth_manifest, 140, malformed=0.1, seed=1)
    assert {s["kind"] for s in specs if s["malformed"]} == set(bench.MALFORMED_KINDS)
    settings = ServeSettings(max_batch_size=batch, max_body_bytes=int(bench.BODY_CAP_MB * 1024 * 1024),
                             max_text_chars=10_000)
    with running_server(create_app(model, settings)) as url:
        result = asyncio.run(bench.run_load(url, specs, 8, os.getpid()))
    assert result["requests"] == 140
    assert result["server_errors_5xx"] == 0, result["statuses"]
    assert result["good_not_200"] == 0 and result["malformed_not_4xx"] == 0, result["statuses"]
    assert result["statuses"]["200"] == sum(1 for s in specs if not s["malformed"])
    if batch > 1:
        assert result["batch_sizes"]["mean_batch"] > 1.0
    else:
        assert result["batch_sizes"]["mean_batch"] == 1.0
