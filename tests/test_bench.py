"""`mmfuse bench`: the run plan, the statistics, the files a user gets, and clear errors."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

# The AV-MNIST subsets (skip cleanly without ../shared/data), requested by name in the config sweep.
from test_avmnist import arith, avmnist  # noqa: F401
from typer.testing import CliRunner

from mmfuse.analysis.bench import planned_runs, resolve_methods
from mmfuse.analysis.bench_results import BenchRun, summarise
from mmfuse.cli import app
from mmfuse.config import FusionConfig, load_config
from mmfuse.config.presets import preset_path
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


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
    # A baseline has one modality: dropping it would only blank samples, so it trains without dropout.
    assert all(run.trainer.modality_dropout == 0.0 for _, _, run in plan[:3])


@pytest.mark.parametrize(("fusion", "kept"), [
    ({"name": "lmf", "out_dim": 100, "rank": 40, "proj_dim": 32, "hidden": 100, "dropout": 0.0},
     {"proj_dim": 32, "hidden": 100, "dropout": 0.0}),
    ({"name": "tfn", "out_dim": 100, "rank_dim": 4, "proj_dim": 0, "max_product": 500}, {}),
    ({"name": "mult", "dim": 32, "heads": 2, "layers": 2, "self_layers": 0, "hidden": 64}, {"hidden": 64}),
    ({"name": "gated", "gate": "sigmoid", "proj_dim": 16}, {"proj_dim": 16}),
    ({"name": "bottleneck", "fusion_layer": 0, "n_bottlenecks": 2, "dropout": 0.2}, {"dropout": 0.2}),
])
def test_unimodal_baseline_is_concat_with_the_options_concat_shares(fusion: dict[str, object],
                                                                     kept: dict[str, object]) -> None:
    config = load_config(preset_path("demo"))
    config = config.model_copy(update={"fusion": FusionConfig(**fusion), "trainer": config.trainer.model_copy(
        update={"modality_dropout": 0.3})})
    plan = planned_runs(config, [str(fusion["name"])], [0.3], unimodal=True)
    solo = plan[0][2]
    assert solo.fusion.name == "concat" and solo.fusion.options == kept
    assert solo.fusion.out_dim == config.fusion.out_dim
    built = FUSIONS.create("concat", dims={"audio": 8}, out_dim=solo.fusion.out_dim, **solo.fusion.options)
    assert built(  # the baseline's fusion really is an encoder-width projection + MLP
        {"audio": _features(batch=3, dim=8)}).shape == (3, solo.fusion.out_dim)
    assert plan[0][:2] == ("audio only", 0.0) and solo.trainer.modality_dropout == 0.0
    fused = plan[-1][2]
    assert fused.fusion == config.fusion and fused.trainer.modality_dropout == 0.3


def _features(batch: int, dim: int) -> object:
    from mmfuse.core.contracts import Features

    return Features(torch.randn(batch, 1, dim), torch.ones(batch, 1, dtype=torch.bool), torch.randn(batch, dim),
                    torch.ones(batch, dtype=torch.bool))


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


def test_missing_modality_scores_cover_every_proper_subset(synth_manifest: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
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
    calls: list[list[str]] = []

    def counted(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(sorted(kwargs["absent"]))  # type: ignore[call-overload]
        return evaluate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("mmfuse.analysis.bench.evaluate", counted)
    scores = missing_modality_scores(model, data.datasets["val"], "accuracy")
    assert len(calls) == 6, "each of the 6 proper subsets is evaluated once"
    assert set(scores) == {*(f"accuracy_without_{m}" for m in ("audio", "image", "text")),
                           *(f"accuracy_only_{m}" for m in ("audio", "image", "text")), "accuracy_missing_mean"}
    assert scores["accuracy_only_text"] == evaluate(model, data.datasets["val"], absent=["audio", "image"])["accuracy"]
    six = [v for k, v in scores.items() if k != "accuracy_missing_mean"]
    assert scores["accuracy_missing_mean"] == pytest.approx(sum(six) / 6)



def _captioning_config(manifest: Path, tmp_path: Path) -> object:
    from mmfuse.config import validate_config

    return validate_config({
        "data": {"manifest": str(manifest), "target_column": "caption", "batch_size": 64,
                 "text": {"max_length": 8}, "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 8}, "image": {"name": "image_cnn", "dim": 8, "channels": [4]},
                     "audio": {"name": "audio_cnn", "dim": 8, "channels": [4]}},
        "fusion": {"name": "concat", "out_dim": 16},
        "task": {"name": "captioning", "dim": 16, "layers": 1, "heads": 2, "max_length": 12},
        "trainer": {"max_epochs": 1, "patience": None, "progress_bar": False, "output_dir": str(tmp_path)},
    })


def test_a_method_the_task_cannot_use_is_refused_before_any_training(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.analysis.bench import run_bench

    config = _captioning_config(synth_manifest, tmp_path)
    with pytest.raises(ConfigError, match="fusion 'late' outputs decisions, not features; task 'captioning' "
                                          "needs a feature-level fusion") as error:
        run_bench(config, ["concat", "late"], 1, tmp_path / "bench")  # type: ignore[arg-type]
    assert not (tmp_path / "bench" / "runs").exists(), "nothing was trained"
    assert str(error.value).startswith("--methods late: ")


def test_all_methods_leave_out_what_the_task_cannot_use_with_a_note(synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.analysis.bench import check_plan
    from mmfuse.engine.data import prepare_data

    config = _captioning_config(synth_manifest, tmp_path)
    data = prepare_data(config)  # type: ignore[arg-type]
    plan, notes = check_plan(planned_runs(config, FUSIONS.names(), [0.0], unimodal=True),  # type: ignore[arg-type]
                             data, skip_incompatible=True)
    assert [label for label, _, _ in plan] == ["audio only", "image only", "text only",
                                               *(m for m in FUSIONS.names() if m != "late")]
    assert notes == ["'late' left out: fusion 'late' outputs decisions, not features; task 'captioning' needs a "
                     "feature-level fusion (e.g. concat)"]


def test_summary_files_are_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.analysis import bench_results as bench

    for name in ("summary.csv", "summary.md"):
        (tmp_path / name).write_text("old\n")
    runs = [BenchRun("concat", "a+b", 0, 0.0, {"accuracy": 0.5}, {}, 10, 1.0, 5.0)]

    def disk_full(value: float | None) -> str:
        raise OSError("No space left on device")

    monkeypatch.setattr(bench, "_fmt", disk_full)  # fails after the csv header is written
    with pytest.raises(OSError, match="No space left"):
        bench.write_summary(runs, tmp_path)
    assert (tmp_path / "summary.csv").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv", "summary.md"], "no temporary left"


def test_demo_results_are_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    from mmfuse.analysis.demo import DemoRow, write_results

    (tmp_path / "results.csv").write_text("old\n")
    rows = [DemoRow("audio only", "audio", 0.25, 0.1, 10, 1.0),
            DemoRow("concat", "audio+image", "n/a", 0.1, 10, 1.0)]  # type: ignore[arg-type]  # fails on row 2
    with pytest.raises(ValueError, match="Unknown format code"):
        write_results(rows, tmp_path)
    assert (tmp_path / "results.csv").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"], "no temporary left"


# ---- every shipped config through `mmfuse bench` on a tiny budget ---------------------------------

# Metrics that are fractions; every other main metric (mae, bleu, nmse...) is only checked to be >= 0.
FRACTIONS = {"accuracy", "macro_f1", "mean_recall", "mean_class_recall"}


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40-sample stand-ins for the data of the configs whose data is built by a script."""
    from mmfuse.datasets.feature_example import generate_feature_example
    from mmfuse.datasets.synth import generate_synthetic

    root = tmp_path_factory.mktemp("tiny")
    return {"synthetic": generate_synthetic(root / "synth", n_samples=40, seed=0, missing_rate=0.0),
            "features": generate_feature_example(root / "features", n_samples=40, seed=0),
            "cache": root / "cache"}


def _tiny_data(name: str, request: pytest.FixtureRequest, tiny: dict[str, Path]) -> list[str]:
    if name.startswith("synthetic"):  # the config's own generator, at its minimum useful size
        return ["data.synthetic.n_samples=40"]
    if name == "avmnist-arith.yaml":
        manifest = request.getfixturevalue("arith") / "manifest.jsonl"
    elif name.startswith("avmnist-"):
        manifest = request.getfixturevalue("avmnist") / "manifest.jsonl"
    elif name.startswith("features"):
        manifest = tiny["features"]
    elif name.startswith("xor"):
        from mmfuse.datasets.xor_features import generate_xor_features

        manifest = generate_xor_features(tiny["cache"].parent / "xor", n_samples=60, dim=4)
    elif name.startswith("video"):
        from mmfuse.datasets.synth_video import generate_synthetic_video

        manifest = generate_synthetic_video(tiny["cache"].parent / "video", n_samples=40, seed=0)
    else:  # the manifest template and the pretrained configs read text + image + audio files
        manifest = tiny["synthetic"]
    return [f"data.manifest={manifest}"]


def _expected_methods(name: str) -> list[str]:
    config = load_config(REPO / "configs" / name, ["data.synthetic=null", "data.manifest=x.jsonl"]
                         if name.startswith("synthetic") else None)
    if config.task.name == "contrastive":  # no fusion, and no single-modality alignment
        return ["no fusion"]
    if config.task.name == "autoencoder":  # imputes one modality from the others: needs two
        return [config.fusion.name]
    return [f"{m} only" for m in config.modalities] + [config.fusion.name]


@pytest.mark.parametrize("name", CONFIGS)
def test_bench_runs_every_shipped_config(name: str, request: pytest.FixtureRequest, tiny_sets: dict[str, Path],
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config's own method and its single-modality baselines, 1 epoch, 1 seed, on a tiny set."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tiny_sets["cache"]))
    overrides = [*_tiny_data(name, request, tiny_sets), "trainer.max_epochs=1", "trainer.progress_bar=false"]
    config = load_config(REPO / "configs" / name, overrides)
    metric = _main_metric(config)
    out = tmp_path / "bench"
    # A contrastive task builds no fusion: `--methods all` must collapse to one run, not 12 identical ones.
    methods = "all" if config.task.name == "contrastive" else config.fusion.name
    args = ["bench", "-c", str(REPO / "configs" / name), "--methods", methods, "--seeds", "1", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *(x for o in overrides for x in ("--set", o))])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output

    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = _expected_methods(name)
    assert [r["method"] for r in rows] == expected
    assert list(rows[0])[:5] == ["method", "modalities", "modality_dropout", "seed", metric]
    for row in rows:
        value = float(row[metric])
        assert math.isfinite(value) and value >= 0.0 and (metric not in FRACTIONS or value <= 1.0), row
        assert int(row["params"]) > 0 and float(row["train_seconds"]) > 0 and float(row["peak_memory_mb"]) > 0
        modalities = row["modalities"].split("+")
        hidden = [f"{metric}_without_{m}" for m in modalities]  # fused predictions only: not contrastive
        if len(modalities) > 1 and config.task.name != "contrastive":
            assert all(0.0 <= float(row[h]) < math.inf for h in hidden), row
        else:
            assert all(row.get(h, "") == "" for h in hidden), row
        assert modalities == (sorted(config.modalities) if " only" not in row["method"]
                              else [row["method"].removesuffix(" only")])
    with (out / "summary.csv").open() as handle:
        summary = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(summary) == expected
    for row in rows:  # one seed: the mean is the run's value and the spread is 0
        assert float(summary[row["method"]][f"{metric}_mean"]) == pytest.approx(float(row[metric]), rel=1e-5)
        assert float(summary[row["method"]][f"{metric}_std"]) == 0.0
    assert all(f"| {label} |" in (out / "summary.md").read_text() for label in expected)
    if config.task.name in ("contrastive", "autoencoder"):  # the baselines left out are told, and written down
        assert "no 'audio only' baseline: task " in result.output
        assert "- no 'audio only' baseline: task " in (out / "summary.md").read_text()
    assert (out / f"bench_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_epochs"] == 1


def _main_metric(config: object) -> str:
    from mmfuse.tasks import TASKS

    task = config.task  # type: ignore[attr-defined]
    return TASKS.create(task.name, **task.options).monitor[0]  # type: ignore[no-any-return]
