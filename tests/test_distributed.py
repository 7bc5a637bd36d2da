"""DDP that is correct: a real 2-process run on this CPU (gloo over 127.0.0.1) equals one process
on the combined batch, writes one model folder, and every rank sees its own share of the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from serve_helpers import free_port

import mmfuse
from mmfuse.core import distributed
from mmfuse.engine import loader as loader_module
from mmfuse.engine.loader import EpochBatches


def write_config(synth_manifest: Path, folder: Path) -> Path:
    """No dropout anywhere and SGD: two runs that see the same gradients end with the same weights
    (Adam would turn a 1e-8 difference in a near-zero gradient into a whole learning-rate step)."""
    config = {
        "seed": 0,
        "data": {"manifest": str(synth_manifest), "batch_size": 16, "text": {"max_length": 12}, "in_memory": True,
                 "in_memory_cache": str(folder / "arrays"),
                 "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [4, 8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [4, 8]}},
        "fusion": {"name": "concat", "dropout": 0.0},
        "task": {"name": "classification", "head_dropout": 0.0},
        "optim": {"name": "sgd", "lr": 0.05},
        "trainer": {"max_epochs": 3, "patience": None, "progress_bar": False, "threads": 1,
                    "accelerator": "cpu"},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_train(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``mmfuse train`` in a subprocess: Lightning's DDP launcher re-runs the command line for each
    rank, which inside pytest would re-run pytest. Bounded in time so a hung collective fails."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    command = [sys.executable, "-m", "mmfuse.cli", "train", str(config), "--out", str(out), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_two_process_ddp_equals_one_process_on_the_combined_batch(synth_manifest: Path, tmp_path: Path) -> None:
    """128 training samples: batch 16 on each of 2 ranks is, step for step, batch 32 in one process
    (the same samples, gradients averaged), so the weights agree to float rounding and so do the
    metrics. Only rank 0 evaluates and writes."""
    config = write_config(synth_manifest, tmp_path)
    ddp = run_train(config, tmp_path / "ddp", "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_train(config, tmp_path / "single", "--set", "data.batch_size=32")
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for split in ("val", "test"):
        for name, value in single_metrics[split].items():
            assert ddp_metrics[split][name] == pytest.approx(value, abs=1e-5), (split, name)
    # One model folder, one report: rank 1 printed no results table.
    assert sorted(p.relative_to(tmp_path / "ddp").as_posix() for p in (tmp_path / "ddp").rglob("model")) == ["model"]
    titles = [line.strip() for line in ddp.stdout.splitlines()]  # rank 0 alone reports: one table, one line
    assert ddp.stdout.count("model saved to") == 1 and titles.count("validation") == 1
    assert ddp_metrics["epochs"] == single_metrics["epochs"] == 3
    # torchrun starts both ranks itself (as on a cluster); Lightning joins them instead of launching.
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    launched = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
         str(free_port()), "-m", "mmfuse.cli", "train", str(config), "--out", str(tmp_path / "torchrun"),
         "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"],
        capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("model saved to") == 1
    c = load_file(str(tmp_path / "torchrun" / "model" / "model.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) <= 1e-6


def test_each_rank_gets_its_share_with_equal_batch_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 samples over 4 ranks: 3 each (2 wrapped around from the start), the same permutation on
    every rank, and batch k of all ranks together is batch k of one process with 4x the batch."""
    single = EpochBatches(10, 8, shuffle=True, seed=5)
    single.set_epoch(2)
    expected = list(single)
    shards = []
    for rank in range(4):
        monkeypatch.setattr(loader_module, "_rank_and_world", lambda rank=rank: (rank, 4))
        sampler = EpochBatches(10, 2, shuffle=True, seed=5)
        sampler.set_epoch(2)
        assert len(sampler) == 2
        shards.append(list(sampler))
    assert [len(b) for s in shards for b in s] == [2, 1] * 4
    first = sorted(i for s in shards for i in s[0])
    assert first == sorted(expected[0])
    everything = [i for s in shards for b in s for i in b]
    assert len(everything) == 12 and set(everything) == set(range(10))


@pytest.mark.parametrize(("env", "rank"), [
    ({}, 0),
    ({"RANK": "3"}, 3),
    ({"RANK": "0", "LOCAL_RANK": "0"}, 0),
    ({"LOCAL_RANK": "1"}, 1),
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, 5),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 0),
])
def test_launch_rank_reads_every_launcher(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.launch_rank() == rank
    assert distributed.is_rank_zero() == (rank == 0)


def test_bench_under_ddp_writes_its_tables_once(synth_manifest: Path, tmp_path: Path) -> None:
    """Every rank runs the whole bench (Lightning re-runs the command per rank); rank 0 alone scores
    the runs, prints the table and writes runs.csv, summary and plots."""
    config = write_config(synth_manifest, tmp_path)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    command = [sys.executable, "-m", "mmfuse.cli", "bench", "-c", str(config), "--methods", "concat,late",
               "--no-unimodal", "--seeds", "1", "--out", str(tmp_path / "bench"), "--set", "trainer.max_epochs=1",
               "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "bench" / "runs.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["concat", "late"]
    assert result.stdout.count("Results:") == 1 and result.stdout.count("[2/2]") == 1
    assert (tmp_path / "bench" / "summary.md").is_file()


def test_ddp_stopped_by_sigterm_resumes_to_the_uninterrupted_result(synth_manifest: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 0 stops both ranks at the same step (the decision is reduced across ranks): exit
    143, one line; ``--resume`` under DDP then ends with the weights of one uninterrupted process."""
    import signal
    import time

    config = write_config(synth_manifest, tmp_path)
    epochs = ["--set", "trainer.max_epochs=8"]
    ddp = ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "mmfuse.cli", "train", str(config), "--out", str(out), *epochs, *ddp]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.ckpt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.count("interrupted: SIGTERM") == 1 and "a resumable checkpoint was saved" in stderr
    assert not (out / "model").exists()
    resumed = run_train(config, out, *epochs, *ddp, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    single = run_train(config, tmp_path / "single", *epochs, "--set", "data.batch_size=32")
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
