"""Robust runs: resume after kill -9, SIGTERM and Ctrl-C, determinism, non-finite losses.

The key claim: a run killed in the middle of an epoch and resumed with ``--resume`` ends with the
same weights and metrics as the run that was never interrupted, bit for bit on the CPU. The config
below makes that hard to get right by accident: modality dropout and head dropout draw from the
global generators every step, the cosine schedule has state, and step checkpoints fall in the
middle of epochs. Runs in this file are in-process (about a second each) except where a real
process must be killed or signalled from outside.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import mmfuse
from mmfuse.cli import app
from mmfuse.engine.module import FusionModule

runner = CliRunner()
STEPS_PER_EPOCH = 6  # 48 training samples, batches of 8
SLOW_TRAINER = """
import sys, time
from mmfuse.engine.module import FusionModule

step = FusionModule.training_step

def slow(self, batch, batch_idx):  # epochs 3 and 4 slowed down, so a signal can land inside epoch 3
    if self.trainer.global_step >= 12:
        time.sleep(0.3)
    return step(self, batch, batch_idx)

FusionModule.training_step = slow
from mmfuse.cli import app
app(sys.argv[1:], prog_name="mmfuse")
"""


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(mmfuse.__file__).parents[1])}


@pytest.fixture(scope="module")
def small_manifest(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train, 12 val and 12 test rows of the synthetic set, with absolute file paths."""
    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    chosen = []
    for split, count in (("train", 48), ("val", 12), ("test", 12)):
        for row in [r for r in rows if r["split"] == split][:count]:
            row["image"], row["audio"] = (str(synth_manifest.parent / row[m]) for m in ("image", "audio"))
            chosen.append(row)
    path = tmp_path_factory.mktemp("small") / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


@pytest.fixture(scope="module")
def config(small_manifest: Path) -> Path:
    raw = {
        "seed": 3,
        "data": {"manifest": str(small_manifest), "batch_size": 8, "text": {"max_length": 12},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8, 16]}},
        "fusion": {"name": "concat", "hidden": 16},
        "optim": {"lr": 0.005, "scheduler": "cosine"},
        "trainer": {"max_epochs": 4, "patience": None, "progress_bar": False, "threads": 1, "accelerator": "cpu",
                    "modality_dropout": 0.3, "checkpoint_every_n_steps": 4},
    }
    path = small_manifest.parent / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Run:
    folder: Path
    batches: dict[int, tuple[str, ...]]
    """Global step -> the ids of the batch trained at that step."""


def record_batches(monkeypatch: pytest.MonkeyPatch, signals: dict[int, int] | None = None) -> dict[int, Any]:
    """Records each training step's batch ids; ``signals`` (global step -> count) sends Ctrl-C that
    many times when that step starts, until the dict is emptied."""
    seen: dict[int, Any] = {}
    step = FusionModule.training_step

    def recording(self: FusionModule, batch: Any, batch_idx: int) -> Any:
        seen[self.trainer.global_step] = tuple(batch.ids)
        for _ in range((signals or {}).get(self.trainer.global_step, 0)):
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled by whatever handler is installed
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FusionModule, "training_step", recording)
    return seen


def squeezed(text: str) -> str:
    """Output without any whitespace: rich wraps long paths anywhere."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def baseline(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run every other run is compared with."""
    folder = tmp_path_factory.mktemp("baseline") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = record_batches(monkeypatch)
        result = runner.invoke(app, ["train", str(config), "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return Run(folder, dict(seen))


def assert_same_result(run: Path, expected: Path) -> None:
    """Bitwise-equal weights, equal validation and test metrics."""
    weights, wanted = (load_file(p / "model" / "model.safetensors") for p in (run, expected))
    assert weights.keys() == wanted.keys()
    differences = {k: (weights[k].double() - wanted[k].double()).abs().max().item() for k in weights}
    assert all(torch.equal(weights[k], wanted[k]) for k in weights), \
        f"largest weight difference {max(differences.values())}"
    metrics, wanted_metrics = (json.loads((p / "metrics.json").read_text()) for p in (run, expected))
    assert metrics["val"] == wanted_metrics["val"] and metrics["test"] == wanted_metrics["test"]
    assert metrics["epochs"] == wanted_metrics["epochs"]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def wait_for_checkpoint(path: Path, step: int, process: subprocess.Popen[str], timeout: float = 120) -> int:
    """Polls the run folder until ``last.ckpt`` holds global step ``step`` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before step {step}: "
                        f"{process.stderr.read() if process.stderr else ''}")
        if path.is_file() and (reached := checkpoint_step(path)) >= step:  # renamed into place: complete
            return reached
        time.sleep(0.02)
    pytest.fail(f"no checkpoint of step {step} within {timeout} s")


def start_slow_run(config: Path, run: Path, *options: str) -> subprocess.Popen[str]:
    """``mmfuse train`` in its own process group, as a job under a shell or a scheduler runs."""
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAINER, "train", str(config), "--out", str(run), *options],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


# ---- the key claim: killed, resumed, identical --------------------------------------------------


def test_kill_9_in_epoch_3_then_resume_gives_the_uninterrupted_result(config: Path, baseline: Run,
                                                                     tmp_path: Path) -> None:
    """``kill -9`` while epoch 3 trains (after the step-16 checkpoint, 6 steps per epoch), then
    ``--resume``: the final weights are bitwise equal to the uninterrupted run's, and so are the
    validation and test metrics (CPU, one thread; no tolerance needed)."""
    run = tmp_path / "run"
    process = start_slow_run(config, run)
    try:
        reached = wait_for_checkpoint(run / "checkpoints" / "last.ckpt", 16, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert reached == 16 == checkpoint_step(run / "checkpoints" / "last.ckpt"), "killed inside epoch 3"
    assert not (run / "model").exists() and not (run / "metrics.json").exists()

    result = runner.invoke(app, ["train", str(config), "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert squeezed(f"resumed from {run / 'checkpoints' / 'last.ckpt'}") in squeezed(result.output)
    assert_same_result(run, baseline.folder)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "logs" / "metrics-before-step-16.csv").is_file(), "the first part's logs are kept"


def test_a_kill_while_the_checkpoint_is_written_leaves_the_previous_one(tmp_path: Path) -> None:
    """A real SIGKILL half-way through writing ``last.ckpt``: the file still holds the previous,
    complete checkpoint; the half-written temporary is removed by the next write."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    script = f"""
import os, signal, torch
from mmfuse.engine.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"global_step": 1, "weights": torch.ones(1000)}}, {str(path)!r})
def dying(obj, file, *args, **kwargs):
    file.write(b"PK" + bytes(5000))
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying
io.save_checkpoint({{"global_step": 2, "weights": torch.zeros(1000)}}, {str(path)!r})
"""
    killed = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-")
    assert leftovers[0].stat().st_size > 5000, "the kill came mid-write"

    from mmfuse.engine.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["weights"], torch.ones(1000))
    io.save_checkpoint({"global_step": 3}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# ---- signals ------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_exits_143_and_the_printed_command_resumes(config: Path, baseline: Run,
                                                                               tmp_path: Path) -> None:
    """SIGTERM to the whole process group, as a scheduler preempting the job sends it, data loader
    worker included: the run saves at the next step boundary, exits 143 with one line, and the command
    in that line resumes it to the uninterrupted result."""
    run = tmp_path / "run"
    process = start_slow_run(config, run, "--set", "data.num_workers=1")
    try:
        wait_for_checkpoint(run / "checkpoints" / "last.ckpt", 12, process)  # epoch 2 done
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    saved = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert 12 < saved < 18, "saved at the step boundary inside epoch 3, not at an epoch end"
    assert lines[0].startswith(f"interrupted: SIGTERM: stopped at global step {saved} (epoch 3); a resumable "
                               f"checkpoint was saved to {run / 'checkpoints' / 'last.ckpt'}; resume with: ")
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command == ["mmfuse", "train", str(config), "--set", "data.num_workers=1", "--resume", str(run)]
    assert not (run / "metrics.json").exists()

    result = runner.invoke(app, command[1:])
    assert result.exit_code == 0, result.output
    assert_same_result(run, baseline.folder)


def test_ctrl_c_stops_at_the_step_boundary_exits_130_and_resumes_identically(
        config: Path, baseline: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during global step 9 (epoch 2): the step finishes, is saved and the run exits 130; the
    resumed run (from the folder moved elsewhere) trains exactly the batches the uninterrupted run
    trained from step 10 on."""
    run = tmp_path / "run"
    signals = {9: 1}
    seen = record_batches(monkeypatch, signals)
    result = runner.invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 130, result.output
    assert ("interrupted: Ctrl-C (SIGINT): stopped at global step 10 (epoch 2); a resumable checkpoint was saved to "
            f"{run / 'checkpoints' / 'last.ckpt'}; resume with: mmfuse train {config} --resume {run}"
            in result.output)
    assert max(seen) == 9 and checkpoint_step(run / "checkpoints" / "last.ckpt") == 10
    first = dict(seen)
    seen.clear()
    signals.clear()
    moved = tmp_path / "moved"  # a run folder may move (scratch to home, another machine)
    run.rename(moved)
    result = runner.invoke(app, ["train", str(config), "--resume", str(moved)])
    assert result.exit_code == 0, result.output
    assert min(seen) == 10
    assert {**first, **seen} == baseline.batches
    orders = {tuple(sorted(baseline.batches[s] for s in range(e * STEPS_PER_EPOCH, (e + 1) * STEPS_PER_EPOCH)))
              for e in range(4)}
    assert len(orders) == 4, "every epoch is shuffled anew"
    assert_same_result(moved, baseline.folder)


def test_a_signal_during_an_epochs_last_step_stops_after_its_validation(
        config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the last step of epoch 2: the run stops after that epoch's validation, and the
    checkpoint holds the best-model state updated by it (LastCheckpoint runs after ModelCheckpoint),
    so the resumed run selects the same best model. Monitored on val_loss, which differs every epoch."""
    import csv

    monitor = ["--set", "trainer.monitor=val_loss"]
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "uninterrupted"), *monitor])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    signals = {2 * STEPS_PER_EPOCH - 1: 1}
    record_batches(monkeypatch, signals)
    result = runner.invoke(app, ["train", str(config), "--out", str(run), *monitor])
    assert result.exit_code == 130, result.output
    assert f"stopped at global step {2 * STEPS_PER_EPOCH} (epoch 2); a resumable checkpoint" in result.output
    logged = [row for row in csv.DictReader((run / "logs" / "metrics.csv").open()) if row["val_loss"]]
    assert [int(row["epoch"]) for row in logged] == [0, 1], "epoch 2 was validated before stopping"
    assert logged[0]["val_loss"] != logged[1]["val_loss"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    best = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("BestCheckpoint"))
    assert best["current_score"].item() == pytest.approx(float(logged[1]["val_loss"]), rel=1e-6)
    signals.clear()
    result = runner.invoke(app, ["train", str(config), "--resume", str(run), *monitor])
    assert result.exit_code == 0, result.output
    assert_same_result(run, tmp_path / "uninterrupted")


def test_a_second_ctrl_c_stops_at_once_and_says_which_checkpoint_is_left(
        config: Path, baseline: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    signals = {9: 2}  # the step-8 checkpoint is the latest
    record_batches(monkeypatch, signals)
    result = runner.invoke(app, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 130, result.output
    assert ("interrupted: Ctrl-C (SIGINT): stopped without a new checkpoint; the last resumable checkpoint is "
            f"{run / 'checkpoints' / 'last.ckpt'} (global step 8, epoch 2); resume with: " in result.output)
    signals.clear()
    result = runner.invoke(app, ["train", str(config), "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert_same_result(run, baseline.folder)

    early = tmp_path / "early"
    signals[1] = 2
    result = runner.invoke(app, ["train", str(config), "--out", str(early)])
    assert result.exit_code == 130
    assert "Ctrl-C (SIGINT): stopped before any checkpoint was written; nothing to resume" in result.output
    result = runner.invoke(app, ["train", str(config), "--resume", str(early)])
    assert result.exit_code == 1
    assert (f"nothing to resume: {early / 'checkpoints' / 'last.ckpt'} does not exist"
            in " ".join(result.output.split()))


# ---- determinism, resume rules, checkpoint contents ---------------------------------------------


def test_the_same_config_and_seed_give_identical_weights_and_metrics(config: Path, baseline: Run,
                                                                       tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert_same_result(tmp_path / "again", baseline.folder)
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "seed4"), "--set", "seed=4"])
    assert result.exit_code == 0, result.output
    with pytest.raises(AssertionError, match="largest weight difference"):
        assert_same_result(tmp_path / "seed4", baseline.folder)


def test_resume_rules(config: Path, baseline: Run, tmp_path: Path) -> None:
    """Resuming a finished run is allowed (and recomputes the same result, checkpoints kept); a
    different config, --overwrite with --resume, or a run folder without --resume are refused."""
    run = tmp_path / "finished"
    shutil.copytree(baseline.folder, run)
    result = runner.invoke(app, ["train", str(config), "--resume", str(run), "--set", "trainer.max_epochs=3"])
    assert result.exit_code == 1
    assert (f"cannot resume from {run / 'checkpoints' / 'last.ckpt'}: the config differs from the run's in "
            "trainer.max_epochs: 4 -> 3" in " ".join(result.output.split()))
    result = runner.invoke(app, ["train", str(config), "--resume", str(run), "--set", "optim.lr=0.01",
                                 "--set", "trainer.threads=2"])
    assert result.exit_code == 1 and "optim.lr: 0.005 -> 0.01; resume with the config" in result.output
    result = runner.invoke(app, ["train", str(config), "--resume", str(run), "--overwrite"])
    assert result.exit_code == 1 and "give one of them" in result.output
    result = runner.invoke(app, ["train", str(config), str(run)])
    assert result.exit_code == 1 and "a run folder goes after --resume" in result.output

    result = runner.invoke(app, ["train", "-c", str(config), "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert_same_result(run, baseline.folder)
    best = "checkpoints/best.ckpt"
    assert (run / best).read_bytes() == (baseline.folder / best).read_bytes(), "training did not run again"


def test_last_checkpoint_holds_everything_a_resume_needs_and_loads_without_pickle(baseline: Run) -> None:
    from mmfuse.engine.checkpoint_io import AtomicCheckpointIO

    checkpoint = AtomicCheckpointIO().load_checkpoint(baseline.folder / "checkpoints" / "last.ckpt")
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"} <= checkpoint.keys()
    callbacks = checkpoint["callbacks"]
    assert {"RandomState", "LoaderPosition", "LastCheckpoint", "NonFiniteGuard"} <= callbacks.keys()
    assert set(callbacks["RandomState"]) == {"torch", "numpy", "python"}
    best = next(v for k, v in callbacks.items() if k.startswith("BestCheckpoint"))
    assert best["best_model_path"].endswith("best.ckpt") and best["best_model_score"] is not None
    assert callbacks["LoaderPosition"] == {"epoch": 3, "batches": STEPS_PER_EPOCH}
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(baseline.folder / "checkpoints" / "last.ckpt", weights_only=False)


def test_the_best_model_state_follows_a_moved_run_folder(tmp_path: Path) -> None:
    """Lightning keeps the best score only when the folder's absolute path is unchanged."""
    from mmfuse.engine.resume import BestCheckpoint

    saved = BestCheckpoint(dirpath=tmp_path / "old" / "checkpoints", filename="best", monitor="val_loss")
    old, new = Path(str(saved.dirpath)), tmp_path / "new" / "checkpoints"
    saved.best_model_path, saved.best_model_score = str(old / "best.ckpt"), torch.tensor(0.25)
    saved.best_k_models = {str(old / "best.ckpt"): torch.tensor(0.25)}
    restored = BestCheckpoint(dirpath=new, filename="best", monitor="val_loss")
    restored.load_state_dict(saved.state_dict())
    assert restored.best_model_path == str(Path(str(restored.dirpath)) / "best.ckpt")
    assert restored.best_model_score == 0.25 and list(restored.best_k_models) == [restored.best_model_path]


def test_loader_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch(config: Path) -> None:
    from mmfuse.config import load_config
    from mmfuse.data.dataset import Collator
    from mmfuse.data.memory import from_dataset
    from mmfuse.engine.data import prepare_data
    from mmfuse.engine.loader import ResumableLoader

    data = prepare_data(load_config(config))
    dataset, collator = data.datasets["val"], Collator(data.preprocessor, data.task)

    def ids(loader: ResumableLoader, epoch: int) -> list[list[str]]:
        loader.sampler.set_epoch(epoch)
        return [batch.ids for batch in loader]

    per_sample = ResumableLoader(dataset, collator, 3, True, 0, seed=5)
    arrays = ResumableLoader(from_dataset(dataset, collator), collator, 3, True, 0, seed=5)
    assert ids(per_sample, 0) == ids(arrays, 0) and ids(per_sample, 1) == ids(arrays, 1), "both paths agree"
    assert ids(per_sample, 0) != ids(per_sample, 1) and ids(per_sample, 1) == ids(per_sample, 1)
    assert ids(ResumableLoader(dataset, collator, 3, True, 0, seed=6), 1) != ids(per_sample, 1)
    in_order = ids(ResumableLoader(dataset, collator, 3, False, 0, seed=5), 2)
    assert [i for batch in in_order for i in batch] == [s.id for s in dataset.samples]

    full = ids(per_sample, 1)
    per_sample.sampler.set_epoch(1)
    iterator = iter(per_sample)
    [next(iterator) for _ in range(2)]
    state = per_sample.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = ResumableLoader(dataset, collator, 3, True, 0, seed=5)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch again; the skip survives it
    assert [b.ids for b in resumed] == full[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(full)}
    resumed.load_state_dict(resumed.state_dict())  # a finished epoch: the next one starts from its first batch
    assert resumed.sampler.epoch == 2 and [b.ids for b in resumed] == ids(per_sample, 2)


# ---- non-finite losses and gradients -------------------------------------------------------------


def poisoned_config(tmp_path: Path, on_nonfinite: str) -> Path:
    """Text-only regression; sample t5's target, 1e30, is a number, but its squared error overflows."""
    targets = [1.0, 2.0, 3.0, 1.5, 2.5, 1e30, 2.0, 1.0, 3.0, 2.0, 1.0, 2.5]
    rows = [{"id": f"t{i}", "text": f"word{i % 3} other", "y": y, "split": "train"} for i, y in enumerate(targets)]
    rows += [{"id": f"v{i}", "text": f"word{i % 3}", "y": 1.0 + i, "split": "val"} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "data": {"manifest": str(tmp_path / "data.jsonl"), "target_column": "y", "batch_size": 4,
                 "modalities": {"text": {"kind": "text", "column": "text"}}, "text": {"max_length": 4}},
        "encoders": {"text": {"name": "text_gru", "dim": 4}},
        "fusion": {"name": "concat", "out_dim": 4},
        "task": {"name": "regression", "standardize": False},
        "trainer": {"max_epochs": 2, "patience": None, "progress_bar": False, "accelerator": "cpu", "threads": 1,
                    "on_nonfinite": on_nonfinite},
    }
    path = tmp_path / f"{on_nonfinite}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.filterwarnings("ignore:The variance of predictions:UserWarning")
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_samples(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(poisoned_config(tmp_path, "raise")), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "error: non-finite loss (inf) at global step " in line and " (epoch 0); the batch holds samples " in line
    batch = line.split("the batch holds samples ", 1)[1].split(".", 1)[0].split(", ")
    assert "t5" in batch and len(batch) == 4
    assert "trainer.on_nonfinite: skip leaves such steps out instead" in line
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.filterwarnings("ignore:The variance of predictions:UserWarning")
def test_on_nonfinite_skip_leaves_the_step_out_and_reports_the_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(poisoned_config(tmp_path, "skip")), "--out", str(run)])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "skipped 2 optimizer step(s) with a non-finite loss or gradient (trainer.on_nonfinite=skip); " in line
    assert "non-finite loss (inf)" in line and "t5" in line
    assert json.loads((run / "metrics.json").read_text())["nonfinite_skipped"] == 2  # once per epoch
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def guard_trainer(step: int = 7) -> Any:
    """What NonFiniteGuard reads from the Trainer, for one process."""
    return SimpleNamespace(global_step=step, current_epoch=1,
                           strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision))


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_skip_leaves_parameters_and_optimiser_state_untouched(bad: str) -> None:
    from mmfuse.engine.nonfinite import NonFiniteError, NonFiniteGuard

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # some optimiser state to keep
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    loss = layer(torch.ones(1, 3)).sum() * (math.inf if bad == "loss" else 1.0)
    loss.backward()
    if bad == "gradient":
        layer.bias.grad[0] = math.nan  # type: ignore[index]
    batch = SimpleNamespace(ids=["a", "b"])

    guard = NonFiniteGuard("raise")
    guard.on_train_batch_start(guard_trainer(), None, batch, 0)  # type: ignore[arg-type]
    guard.on_before_backward(guard_trainer(), None, loss)  # type: ignore[arg-type]
    expected = r"loss \(-?inf\)" if bad == "loss" else r"gradient \(the loss was -?\d"
    with pytest.raises(NonFiniteError, match=rf"non-finite {expected}.* at global step 7 \(epoch 1\); "
                                             "the batch holds samples a, b"):
        guard.on_before_optimizer_step(guard_trainer(), None, optimizer)  # type: ignore[arg-type]

    guard = NonFiniteGuard("skip")
    guard.on_train_batch_start(guard_trainer(), None, batch, 0)  # type: ignore[arg-type]
    guard.on_before_backward(guard_trainer(), None, loss)  # type: ignore[arg-type]
    guard.on_before_optimizer_step(guard_trainer(), None, optimizer)  # type: ignore[arg-type]
    optimizer.step()
    assert guard.skipped == 1 and guard.first is not None and guard.first["ids"] == ["a", "b"]
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert all(torch.equal(v, moments[k]) for k, v in optimizer.state[layer.weight].items())


def test_new_trainer_keys_are_validated(tmp_path: Path, small_manifest: Path, config: Path) -> None:
    result = runner.invoke(app, ["train", str(config), "--set", "trainer.checkpoint_every_n_steps=0"])
    assert result.exit_code == 1 and "trainer.checkpoint_every_n_steps: Input should be greater than 0" in result.output
    result = runner.invoke(app, ["train", str(config), "--set", "trainer.on_nonfinite=ignore"])
    assert result.exit_code == 1 and "trainer.on_nonfinite" in result.output and "'raise' or 'skip'" in result.output
