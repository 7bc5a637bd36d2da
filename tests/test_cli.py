"""Every CLI command from a user's point of view: output, files written, exit codes, clear errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mmfuse import __version__
from mmfuse.cli import app

runner = CliRunner()


def write_config(tmp_path: Path, manifest: Path, **trainer: object) -> Path:
    config = {
        "data": {"manifest": str(manifest), "batch_size": 32, "text": {"max_length": 12},
                 "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 32},
                     "image": {"name": "image_cnn", "dim": 32, "channels": [8, 16]},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}},
        "fusion": {"name": "late", "hidden": 32},
        "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 2, "patience": None, "progress_bar": False, **trainer},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained_model(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli-train")
    config = write_config(tmp, synth_manifest)
    result = runner.invoke(app, ["train", "-c", str(config), "--out", str(tmp / "run"),
                                 "--set", "trainer.max_epochs=2"])
    assert result.exit_code == 0, result.output
    assert "model saved to" in result.output and "accuracy" in result.output
    return tmp / "run" / "model"


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mmfuse {__version__}"


def test_list_shows_registries() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert re.search(r"fusion:.*concat.*late", result.output)
    assert "text_transformer" in result.output and "demo" in result.output


def test_evaluate_prints_metrics_and_writes_json(trained_model: Path, synth_manifest: Path, tmp_path: Path) -> None:
    """--split evaluates exactly the rows of that split: the count printed is the test split's size,
    not the manifest's, and the metrics are those of a direct evaluation of only the test rows."""
    from mmfuse.data.dataset import MultimodalDataset
    from mmfuse.data.manifest import read_manifest
    from mmfuse.engine.evaluate import evaluate
    from mmfuse.model import MultimodalModel

    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", "-m", str(trained_model), "--data", str(synth_manifest),
                                 "--split", "test", "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "precision", "recall", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert f"{metrics['accuracy']:.4f}" in result.output

    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    n_test = sum(r["split"] == "test" for r in rows)
    assert 0 < n_test < len(rows)
    shown = " ".join(result.output.split())  # the table title may wrap
    assert f"{synth_manifest.name}: {n_test} samples" in shown
    assert f": {len(rows)} samples" not in shown

    model = MultimodalModel.from_pretrained(trained_model)
    everything = read_manifest(synth_manifest, model.preprocessor.modalities,
                               target_column=model.spec.target_column, split_column="split")
    records = [r for r in everything if r.split == "test"]
    assert len(records) == n_test
    direct = evaluate(model, MultimodalDataset(records, model.preprocessor, model.task))
    assert metrics == pytest.approx(direct, abs=1e-5)


def test_predict_with_two_of_three_modalities(trained_model: Path, synth_manifest: Path) -> None:
    row = json.loads(synth_manifest.read_text().splitlines()[0])
    image = synth_manifest.parent / row["image"]
    result = runner.invoke(app, ["predict", "-m", str(trained_model), "--text", row["text"], "--image", str(image)])
    assert result.exit_code == 0, result.output
    prediction = json.loads(result.output)
    assert prediction["modalities"] == ["image", "text"]
    assert len(prediction["probabilities"]) == 8
    assert prediction["label"] in prediction["probabilities"]
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)


def test_predict_a_whole_manifest(trained_model: Path, synth_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", "-m", str(trained_model), "--data", str(synth_manifest), "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(synth_manifest.read_text().splitlines())
    assert lines[0]["id"] == "s00000" and lines[0]["modalities"] == ["audio", "image", "text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audio", "/nonexistent/clip.wav"], "audio file not found: /nonexistent/clip.wav"),
        (["--input", "speech=hello"], "not trained with 'speech'"),
        ([], "give at least one input"),
    ],
)
def test_predict_bad_input_is_one_clear_line(trained_model: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["predict", "-m", str(trained_model), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_predict_on_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", "-m", str(tmp_path), "--text", "hi"])
    assert result.exit_code == 1 and "is not an mmfuse model folder" in result.output


def test_train_config_errors_name_the_key(synth_manifest: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, synth_manifest)
    result = runner.invoke(app, ["train", "-c", str(config), "--set", "trainer.max_epoch=3"])
    assert result.exit_code == 1
    assert "max_epoch" in result.output and "did you mean 'max_epochs'" in result.output
    result = runner.invoke(app, ["train", "-c", str(config), "--set", "fusion.name=tensorfusion"])
    assert result.exit_code == 1 and "valid choices: attention, bottleneck, coattention, concat" in result.output
    result = runner.invoke(app, ["train", "-c", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "config file not found" in result.output


def test_train_with_bad_samples_raise_or_skip(synth_manifest: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_manifest.parent, data)
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    (data / rows[3]["image"]).write_bytes(b"not a png")
    (data / rows[5]["audio"]).unlink()
    config = write_config(tmp_path, data / "manifest.jsonl", max_epochs=1)
    result = runner.invoke(app, ["train", "-c", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"manifest.jsonl row 4 (id {rows[3]['id']})" in result.output and "cannot decode image" in result.output
    result = runner.invoke(app, ["train", "-c", str(config), "--out", str(tmp_path / "run"),
                                 "--set", "data.on_error=skip"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 bad sample(s) in train" in result.output


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --debug a user error is one red line and exit 1; with --debug the exception escapes
    with its traceback (Python/Typer print it) instead of being turned into that line."""
    import importlib
    import traceback

    from rich.console import Console

    from mmfuse.core.errors import ConfigError

    # A console that emits colour codes even into CliRunner's pipe, so "red" can be checked.
    cli_app = importlib.import_module("mmfuse.cli.app")
    monkeypatch.setattr(cli_app, "err_console", Console(stderr=True, force_terminal=True, color_system="standard",
                                                        width=400))
    missing = tmp_path / "missing.yaml"
    message = f"config file not found: {missing}"

    result = runner.invoke(app, ["train", "-c", str(missing)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("\x1b[1;31merror:\x1b[0m") and lines[0].endswith(message), repr(lines[0])
    assert "Traceback" not in result.output and "ConfigError" not in result.output

    result = runner.invoke(app, ["--debug", "train", "-c", str(missing)])
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError) and str(result.exception) == message
    assert "error:" not in result.output  # not swallowed into the one-line form
    shown = "".join(traceback.format_exception(*result.exc_info))
    assert shown.startswith("Traceback") and f"ConfigError: {message}" in shown
    assert "load_config" in shown  # the frames down to where it was raised


def test_data_synth_writes_files(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--n", "24", "--missing-rate", "0.2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert all((tmp_path / "s" / r["image"]).is_file() for r in rows if r["image"])


def test_demo_small_budget_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--set", "data.synthetic.n_samples=80",
                                 "--set", "trainer.max_epochs=1"])
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["audio only", "image only", "text only", "concat", "late"]
    assert list(rows[0]) == ["method", "modalities", "accuracy", "macro_f1", "params", "train_seconds"]
    assert rows[3]["modalities"] == "audio+image+text"
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["params"]) > 0 for r in rows)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "concat" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_demo_meets_its_promise(tmp_path: Path) -> None:
    """The README's claim: fused >= 0.90, every single modality clearly lower (chance 0.125)."""
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "demo" / "results.csv").open() as handle:
        accuracy = {r["method"]: float(r["accuracy"]) for r in csv.DictReader(handle)}
    assert max(accuracy["concat"], accuracy["late"]) >= 0.90
    assert all(accuracy[f"{m} only"] <= 0.35 for m in ("audio", "image", "text"))


@pytest.mark.parametrize("command", ["avmnist", "avmnist-arith"])
def test_avmnist_builders_reject_an_unknown_noise_before_reading_data(command: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", command, "--mnist", str(tmp_path / "none"), "--fsdd",
                                      str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--noise", "pink"])
    assert result.exit_code == 1
    assert "--noise must be babble, white or none, got 'pink'" in result.output
    assert not (tmp_path / "out").exists()
