"""`mmfuse bench`: the run plan, the statistics, the files a user gets, and clear errors."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmfuse.analysis.bench import BenchRun, planned_runs, resolve_methods, summarise
from mmfuse.cli import app
from mmfuse.config import load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS


def test_resolve_methods() -> None:
    assert resolve_methods("all") == FUSIONS.names()
    assert resolve_methods("late, concat") == ["late", "concat"]
    with pytest.raises(ConfigError, match="unknown fusion 'lmff'"):
        resolve_methods("concat,lmff")
    with pytest.raises(ConfigError, match="at least one"):
        resolve_methods(" , ")


def test_plan_has_each_modality_alone_then_methods_times_dropouts() -> None:
    config = load_config(preset_path("demo"))
    plan = planned_runs(config, ["concat", "late"], [0.0, 0.3], unimodal=True)
    labels = [(label, rate) for label, rate, _ in plan]
    assert labels == [("audio only", 0.0), ("image only", 0.0), ("text only", 0.0), ("concat", 0.0),
                      ("concat", 0.3), ("late", 0.0), ("late", 0.3)]
    solo = plan[0][2]
    assert list(solo.encoders) == ["audio"] and set(solo.data.modalities) == {"audio", "image", "text"}
    late = plan[5][2]
    assert late.fusion.name == "late" and late.fusion.options == {}  # concat's options are not passed on
    assert plan[4][2].trainer.modality_dropout == 0.3


def test_summary_mean_and_std_over_seeds() -> None:
    runs = [BenchRun("concat", "a+b", seed, 0.0, {"accuracy": acc}, {"accuracy_without_a": acc / 2}, 10, 1.0, 5.0)
            for seed, acc in enumerate([0.5, 0.7, 0.9])]
    runs.append(BenchRun("a only", "a", 0, 0.0, {"accuracy": 0.3}, {}, 4, 0.5, 2.0))
    summary = {row.method: row for row in summarise(runs)}
    assert summary["concat"].seeds == 3
    assert summary["concat"].mean["accuracy"] == pytest.approx(0.7)
    assert summary["concat"].std["accuracy"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert summary["concat"].mean["accuracy_without_a"] == pytest.approx(0.35)
    assert summary["a only"].std["accuracy"] == 0.0


def test_bench_cli_writes_every_result_file(synth_manifest: Path, tmp_path: Path) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"manifest": str(synth_manifest), "batch_size": 64, "text": {"max_length": 8}},
        "encoders": {"text": {"name": "text_gru", "dim": 8}, "image": {"name": "image_cnn", "dim": 8, "channels": [4]}},
        "trainer": {"max_epochs": 1, "patience": None},
    }))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "-c", str(config), "--methods", "concat,late", "--seeds", "2",
                                      "--out", str(out), "--modality-dropout", "0,0.5"])
    assert result.exit_code == 0, result.output
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # (2 single modalities + 2 methods x 2 dropout rates) x 2 seeds
    assert len(rows) == (2 + 2 * 2) * 2
    assert {"method", "seed", "accuracy", "macro_f1", "params", "train_seconds", "peak_memory_mb",
            "accuracy_without_image", "accuracy_without_text"} <= set(rows[0])
    fused = [r for r in rows if r["method"] == "late"]
    assert {r["modality_dropout"] for r in fused} == {"0.0", "0.5"} and {r["seed"] for r in fused} == {"0", "1"}
    assert all(float(r["peak_memory_mb"]) > 0 and int(r["params"]) > 0 for r in rows)
    assert all(r["accuracy_without_text"] != "" for r in fused)
    with (out / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 + 2 * 2 and {"accuracy_mean", "accuracy_std"} <= set(summary[0])
    assert "± " in (out / "summary.md").read_text()
    for png in ("bench_accuracy.png", "bench_missing_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_epochs"] == 1


def test_bench_bad_arguments_are_clear(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--methods", "concatt", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "did you mean 'concat'" in result.output
    result = runner.invoke(app, ["bench", "--modality-dropout", "0,lots", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "must be comma-separated numbers" in result.output


def test_missing_modality_scores_cover_every_proper_subset(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.analysis.bench import missing_modality_scores
    from mmfuse.config import validate_config
    from mmfuse.engine.data import prepare_data
    from mmfuse.engine.evaluate import evaluate
    from mmfuse.model import MultimodalModel

    config = validate_config({
        "data": {"manifest": str(synth_manifest), "text": {"max_length": 8}},
        "encoders": {"text": {"name": "text_gru", "dim": 8}, "image": {"name": "image_cnn", "dim": 8, "channels": [4]},
                     "audio": {"name": "audio_cnn", "dim": 8, "channels": [4]}},
        "trainer": {"output_dir": str(tmp_path)},
    })
    data = prepare_data(config)
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task).eval()
    scores = missing_modality_scores(model, data.datasets["val"], "accuracy")
    assert set(scores) == {*(f"accuracy_without_{m}" for m in ("audio", "image", "text")),
                           *(f"accuracy_only_{m}" for m in ("audio", "image", "text")), "accuracy_missing_mean"}
    assert scores["accuracy_only_text"] == evaluate(model, data.datasets["val"], absent=["audio", "image"])["accuracy"]
    six = [v for k, v in scores.items() if k != "accuracy_missing_mean"]
    assert scores["accuracy_missing_mean"] == pytest.approx(sum(six) / 6)
