"""Project-level promises: the public API resolves, CI runs the README's commands, bf16 trains."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import mmfuse
from mmfuse.config import validate_config
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves() -> None:
    for name in mmfuse.__all__:
        assert getattr(mmfuse, name) is not None, name
    assert mmfuse.list_fusions() == mmfuse.FUSIONS.names()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert len(commands) == 2, "the README's first screen gives two commands"
    demo_command, test_command = commands
    assert demo_command.endswith("mmfuse demo")
    assert "pytest" in test_command and "ruff check" in test_command and "mypy" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_bf16_mixed_precision_trains(synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.precision: bf16 must reach the computation: training forwards run under bf16 autocast
    (the logits come out bfloat16) while the weights stay float32, and the run still gives finite metrics."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    import mmfuse.engine.fit as fit_module
    from mmfuse.model import MultimodalModel

    seen: list[torch.dtype] = []
    forward = MultimodalModel.forward

    def recording_forward(self: MultimodalModel, batch: Any) -> torch.Tensor:
        out = forward(self, batch)
        if self.training:
            seen.append(out.dtype)
        return out

    trainers: list[Any] = []
    run_trainer = fit_module._run_trainer

    def recording_run(*args: Any, **kwargs: Any) -> Any:
        trainer, seconds = run_trainer(*args, **kwargs)
        trainers.append(trainer)
        return trainer, seconds

    monkeypatch.setattr(MultimodalModel, "forward", recording_forward)
    monkeypatch.setattr(fit_module, "_run_trainer", recording_run)
    config = validate_config({
        "data": {"manifest": str(synth_manifest), "target_column": "shape", "batch_size": 32},
        "encoders": {"image": {"name": "image_cnn", "dim": 16, "channels": [8]},
                     "text": {"name": "text_transformer", "dim": 16, "heads": 2, "layers": 1}},
        "trainer": {"max_epochs": 1, "patience": None, "precision": "bf16", "output_dir": str(tmp_path),
                    "progress_bar": False},
    })
    result = fit(config, prepare_data(config), save=False)
    assert seen and set(seen) == {torch.bfloat16}, f"training forwards produced {set(seen)}"
    (trainer,) = trainers
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.precision == "bf16-mixed"
    assert all(torch.isfinite(torch.tensor(v)) for v in result.val_metrics.values())
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # mixed: weights stay fp32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_training_and_reload_on_gpu(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.data.dataset import Collator
    from mmfuse.model import MultimodalModel

    config = validate_config({
        "data": {"manifest": str(synth_manifest), "target_column": "shape", "batch_size": 32},
        "encoders": {"image": {"name": "image_cnn", "dim": 16, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8]}},
        "trainer": {"max_epochs": 8, "patience": None, "precision": "bf16", "accelerator": "gpu", "devices": 1,
                    "output_dir": str(tmp_path), "progress_bar": False},
    })
    data = prepare_data(config)
    result = fit(config, data)
    assert result.val_metrics["accuracy"] >= 0.8  # shape is in the image; chance 0.5
    on_gpu = MultimodalModel.from_pretrained(tmp_path / "model", map_location="cuda")
    assert next(on_gpu.parameters()).device.type == "cuda"
    batch = Collator(on_gpu.preprocessor, on_gpu.task)([data.datasets["test"][i] for i in range(16)])
    with torch.no_grad():
        cpu_out = result.model.eval()(batch)
        gpu_out = on_gpu(batch.to("cuda")).cpu()
    torch.testing.assert_close(gpu_out, cpu_out, atol=1e-3, rtol=1e-3)
