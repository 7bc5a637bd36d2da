"""Training options users fine-tuning encoders expect: warm-up, gradient accumulation, loggers,
and device settings validated before any work."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mmfuse.config import OptimConfig, validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.engine.fit import train
from mmfuse.engine.schedule import build_scheduler


def rates(optim: OptimConfig, total: int) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=optim.lr)
    scheduler = build_scheduler(optimizer, optim, total)
    assert scheduler is not None
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_warmup_then_cosine_decay() -> None:
    lr = rates(OptimConfig(lr=0.1, warmup_steps=4, scheduler="cosine"), 12)
    assert lr[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr[4] == pytest.approx(0.1)
    assert lr[8] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in itertools.pairwise(lr[4:]))


def test_warmup_then_constant_and_cosine_alone_is_unchanged() -> None:
    assert rates(OptimConfig(lr=0.2, warmup_steps=2), 5) == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2])
    cosine = rates(OptimConfig(lr=0.1, scheduler="cosine"), 10)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert cosine == pytest.approx(expected)


def small_manifest(synth_manifest: Path, folder: Path, n_train: int, n_val: int) -> Path:
    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"][:n_train]
    val_rows = [r for r in rows if r["split"] == "val"][:n_val]
    assert len(train_rows) == n_train and len(val_rows) == n_val
    for row in train_rows + val_rows:
        row["image"], row["audio"] = (str(synth_manifest.parent / row[m]) for m in ("image", "audio"))
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train_rows + val_rows))
    return path


def config(manifest: Path, out: Path, **trainer: Any) -> Any:
    batch_size = trainer.pop("batch_size", 32)
    optimizer = trainer.pop("optimizer", "adamw")
    return validate_config({
        "seed": 3,
        "data": {"manifest": str(manifest), "batch_size": batch_size, "text": {"max_length": 12},
                 "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}, "in_memory": True,
                 "in_memory_cache": str(out.parent / "arrays")},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [4, 8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [4, 8]}},
        "fusion": {"name": "concat", "dropout": 0.0},  # no dropout: the runs compared must be deterministic
        "task": {"name": "classification", "head_dropout": 0.0},
        "optim": {"name": optimizer, "lr": 0.003, "scheduler": "cosine", "warmup_steps": 2},
        "trainer": {"max_epochs": 2, "patience": None, "progress_bar": False, "threads": 1,
                    "output_dir": str(out), **trainer},
    })


def test_accumulating_two_batches_equals_one_batch_twice_as_large(synth_manifest: Path, tmp_path: Path,
                                                                  one_thread: None) -> None:
    """Lightning scales each batch's loss by 1/2 and steps every second batch: with 64 training samples
    (no partial group) that is the gradient of the mean over the 32 samples of one big batch.

    SGD, not Adam: the gradients agree to ~1e-8 (float sums in another order), and Adam divides
    each gradient by its own running scale, so a parameter whose gradient is that small moves by a
    whole learning rate either way; SGD keeps a 1e-8 difference a 1e-8 difference.
    """
    manifest = small_manifest(synth_manifest, tmp_path, 64, 16)
    big = train(config(manifest, tmp_path / "big", batch_size=32, optimizer="sgd"))
    accumulated = train(config(manifest, tmp_path / "acc", batch_size=16, accumulate_grad_batches=2, optimizer="sgd"))
    a = load_file(str(big.model_dir / "model.safetensors"))  # type: ignore[operator]
    b = load_file(str(accumulated.model_dir / "model.safetensors"))  # type: ignore[operator]
    unaccumulated = load_file(str(train(config(manifest, tmp_path / "one", batch_size=16, optimizer="sgd")).model_dir
                          / "model.safetensors"))  # type: ignore[operator]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((b[k] - unaccumulated[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert moved > 1e-4, "accumulation must change the run, or the comparison means nothing"


def test_tensorboard_logger_writes_event_files(synth_manifest: Path, tmp_path: Path, one_thread: None) -> None:
    manifest = small_manifest(synth_manifest, tmp_path, 32, 8)
    result = train(config(manifest, tmp_path / "tb", logger="tensorboard", max_epochs=1))
    events = list((result.output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_a_logger_whose_package_is_missing_says_which_extra(synth_manifest: Path, tmp_path: Path, kind: str) -> None:
    if importlib.util.find_spec(kind) is not None:
        pytest.skip(f"{kind} is installed here")
    manifest = small_manifest(synth_manifest, tmp_path, 32, 8)
    with pytest.raises(ConfigError, match=rf"trainer.logger '{kind}' needs the {kind} package: .*mmfuse\[tracking\]"):
        train(config(manifest, tmp_path / kind, logger=kind, max_epochs=1))


@pytest.mark.parametrize(("trainer", "message"), [
    ({"devices": 0}, "must be >= 1 or 'auto'"),
    ({"devices": "many"}, "device indices like '0,1'"),
    ({"strategy": "horovod"}, "strategy"),
    ({"num_nodes": 0}, "num_nodes"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ({"logger": "neptune"}, "logger"),
    ({"strategy": "fsdp", "accelerator": "cpu"}, "strategy 'fsdp' shards parameters across GPUs"),
])
def test_device_and_tracking_settings_are_validated(tmp_path: Path, trainer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path / "m.jsonl", tmp_path / "out", **trainer)


def test_devices_default_to_one_and_accept_indices(tmp_path: Path) -> None:
    assert config(tmp_path / "m.jsonl", tmp_path / "out").trainer.devices == 1
    assert config(tmp_path / "m.jsonl", tmp_path / "out", devices="0,1").trainer.devices == "0,1"
    assert config(tmp_path / "m.jsonl", tmp_path / "out", devices="auto").trainer.devices == "auto"
