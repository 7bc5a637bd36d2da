"""``mmfuse tune``: the search space, pruning from the validation curve, a study that resumes after a kill."""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmfuse.analysis.tune import TuneOptions, open_storage, run_tune
from mmfuse.analysis.tune_objective import PruneOnValidation
from mmfuse.analysis.tune_space import apply_params, load_space, parse_space
from mmfuse.cli import app
from mmfuse.config import load_config, validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.engine.interrupts import SignalInterrupt


def tiny_config(manifest: Path, out: Path) -> dict[str, Any]:
    """Two small encoders, one epoch: a trial takes about a second on one CPU thread."""
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "target_column": "pitch", "batch_size": 32,
                 "text": {"max_length": 12}, "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [4, 8]}},
        "fusion": {"name": "concat", "out_dim": 16, "proj_dim": 16, "hidden": 16},
        "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(out), "progress_bar": False,
                    "threads": 1},
    }


SPACE = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "fusion.name": {"type": "categorical", "choices": ["concat", "lmf"]},
    "fusion.rank": {"type": "int", "low": 2, "high": 8, "step": 2, "when": {"fusion.name": "lmf"}},
    "trainer.unimodal_loss_weight": {"type": "float", "low": 0, "high": 1},
    "data.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
}


@pytest.fixture
def base(synth_manifest: Path, tmp_path: Path) -> Any:
    return validate_config(tiny_config(synth_manifest, tmp_path / "base-run"))


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- the search space ------------------------------------------------------------------------------


def test_space_samples_each_type_and_conditional_keys_only_when_their_condition_holds(base: Any,
                                                                                        tmp_path: Path) -> None:
    space = load_space(write(tmp_path / "space.yaml", SPACE), base)
    assert space.keys == list(SPACE)
    lmf = space.suggest(optuna.trial.FixedTrial({"optim.lr": 0.001, "fusion.name": "lmf", "fusion.rank": 4,
                                                  "trainer.unimodal_loss_weight": 0.5, "data.batch_size": 48}))
    assert lmf == {"optim.lr": 0.001, "fusion.name": "lmf", "fusion.rank": 4, "trainer.unimodal_loss_weight": 0.5,
                   "data.batch_size": 48}
    concat = space.suggest(optuna.trial.FixedTrial({"optim.lr": 0.001, "fusion.name": "concat",
                                                     "trainer.unimodal_loss_weight": 0.0, "data.batch_size": 16}))
    assert "fusion.rank" not in concat
    config = apply_params(base, lmf)
    assert (config.optim.lr, config.fusion.name, config.fusion.options, config.data.batch_size) == (
        0.001, "lmf", {"rank": 4}, 48)  # concat's proj_dim/hidden dropped with the method switch
    assert config.fusion.out_dim == base.fusion.out_dim and config.trainer.unimodal_loss_weight == 0.5
    same = apply_params(base, {"fusion.name": "concat", "fusion.hidden": 8})
    assert same.fusion.options == {"proj_dim": 16, "hidden": 8}  # the config's own method keeps its options


def test_a_trial_that_picks_late_fusion_leaves_out_what_late_does_not_take(synth_manifest: Path,
                                                                           tmp_path: Path) -> None:
    """late takes no fusion.out_dim and no task.head_* (no MLP head follows it): a switch to it drops the
    base's, as bench does, instead of failing every late trial; the space's own head_* are still refused."""
    raw = tiny_config(synth_manifest, tmp_path / "run")
    raw["task"] = {"name": "classification", "head_hidden": 16, "head_dropout": 0.2}
    base = validate_config(raw)
    late = apply_params(base, {"fusion.name": "late", "fusion.hidden": 8})
    assert late.fusion.model_dump() == {"name": "late", "hidden": 8}
    assert late.model_dump(mode="json")["task"] == {"name": "classification"}
    back = apply_params(validate_config(late.model_dump(mode="json")), {"fusion.name": "concat"})
    assert (back.fusion.out_dim, back.task.head_hidden) == (128, 0)  # the defaults: late's config had neither
    with pytest.raises(ConfigError, match=r"^option 'task\.head_hidden' does not apply with fusion 'late'"):
        apply_params(base, {"fusion.name": "late", "task.head_hidden": 8})
    assert apply_params(base, {"fusion.name": "lmf"}).task.head_hidden == 16  # a method with a head keeps them


@pytest.mark.parametrize(("space", "message"), [
    ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}, "'optim.lrr'.*unknown key 'lrr'.*did you mean 'lr'"),
    ({"trainer.foo.bar": {"type": "int", "low": 1, "high": 2}}, "'trainer.foo.bar'"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}, "'optim.lr': type must be one of"),
    ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, "'optim.lr': low 1 is above high 0.1"),
    ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "'optim.lr': a log scale needs low > 0"),
    ({"optim.lr": {"type": "float", "low": 0.1}}, "'optim.lr' needs 'high'"),
    ({"optim.lr": {"type": "float", "lo": 0.1, "high": 1}}, "'optim.lr': unknown field 'lo'.*did you mean 'low'"),
    ({"optim.lr": {"type": "float", "low": -1, "high": 1}}, "'optim.lr' = -1.0 does not make a valid config"),
    ({"data.batch_size": {"type": "int", "low": 1.5, "high": 4}}, "'data.batch_size': an int range needs whole"),
    ({"fusion.name": {"type": "categorical", "choices": ["concat", "nope"]}}, "'fusion.name' = 'nope'"),
    ({"fusion.name": {"type": "categorical", "choices": []}}, "non-empty list 'choices'"),
    ({"fusion.rank": {"type": "int", "low": 2, "high": 4, "when": {"fusion.name": "lmf"}}},
     "'fusion.rank': 'when' names 'fusion.name', which must be a parameter listed above"),
    ({"fusion.name": {"type": "categorical", "choices": ["concat", "lmf"]},
      "fusion.rank": {"type": "int", "low": 2, "high": 4}}, "'fusion.rank' = 2 with fusion.name = 'concat'"),
    ({"fusion.name": {"type": "categorical", "choices": ["concat", "lmf"]},
      "fusion.rank": {"type": "int", "low": 2, "high": 4, "when": {"fusion.name": "tfn"}}},
     "'when' value 'tfn' is not a choice of 'fusion.name'"),
    ({"optim.lr": 0.01}, "'optim.lr' must map to a distribution"),
    ([1, 2], "must map config keys to distributions"),
])
def test_bad_spaces_are_errors_naming_the_key(base: Any, tmp_path: Path, space: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_space(write(tmp_path / "space.yaml", space), base)
    assert str(tmp_path / "space.yaml") in str(error.value)


def test_searching_the_monitor_is_refused(base: Any, tmp_path: Path) -> None:
    space = parse_space({"trainer.monitor": {"type": "categorical", "choices": ["val_loss", "val_accuracy"]}})
    with pytest.raises(ConfigError, match=r"'trainer\.monitor' cannot be searched"):
        run_tune(base, space, TuneOptions(trials=1, out_dir=tmp_path / "t"))


def test_multi_device_trials_are_refused(base: Any, tmp_path: Path) -> None:
    config = base.model_copy(update={"trainer": base.trainer.model_copy(update={"devices": 2})})
    with pytest.raises(ConfigError, match="one device"):
        run_tune(config, parse_space({"optim.lr": SPACE["optim.lr"]}), TuneOptions(trials=1, out_dir=tmp_path / "t"))
    assert not (tmp_path / "t").exists()


# ---- pruning ----------------------------------------------------------------------------------------


def _epoch_end(callback: PruneOnValidation, value: float, epoch: int) -> None:
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=epoch,
                              callback_metrics={"val_accuracy": torch.tensor(value)})
    callback.on_validation_end(trainer, None)  # type: ignore[arg-type]


def test_a_trial_whose_validation_curve_is_below_the_median_is_pruned() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for good in (0.8, 0.9):  # two earlier trials set the median curve
        trial = study.ask()
        callback = PruneOnValidation(trial, "val_accuracy")
        for epoch in range(3):
            _epoch_end(callback, good + 0.01 * epoch, epoch)
        study.tell(trial, good)
    trial = study.ask()
    callback = PruneOnValidation(trial, "val_accuracy")
    _epoch_end(callback, 0.85, 0)  # above the median (0.85 vs 0.85) at epoch 0: goes on
    with pytest.raises(optuna.TrialPruned, match=r"val_accuracy = 0\.2000 at epoch 1"):
        _epoch_end(callback, 0.2, 1)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[2].intermediate_values == {0: pytest.approx(0.85), 1: pytest.approx(0.2)}
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED


def test_pruning_callback_ignores_the_sanity_check_and_missing_metrics() -> None:
    reports: list[tuple[float, int]] = []
    fake = SimpleNamespace(report=lambda value, step: reports.append((value, step)), should_prune=lambda: True)
    callback = PruneOnValidation(fake, "val_accuracy")
    callback.on_validation_end(SimpleNamespace(sanity_checking=True, current_epoch=0,  # type: ignore[arg-type]
                                               callback_metrics={"val_accuracy": torch.tensor(0.1)}), None)
    callback.on_validation_end(SimpleNamespace(sanity_checking=False, current_epoch=0,  # type: ignore[arg-type]
                                               callback_metrics={}), None)
    assert reports == []
    with pytest.raises(optuna.TrialPruned):
        _epoch_end(callback, 0.1, 2)
    assert reports == [(pytest.approx(0.1), 2)]


def test_pruning_stops_training_after_the_reported_epoch(base: Any, one_thread: None) -> None:
    from mmfuse.engine.data import prepare_data
    from mmfuse.engine.fit import fit

    config = base.model_copy(update={"trainer": base.trainer.model_copy(update={"max_epochs": 4})})
    reports: list[tuple[float, int]] = []
    verdicts = iter([False, True])  # keep the first epoch, prune at the second
    fake = SimpleNamespace(report=lambda value, step: reports.append((value, step)),
                           should_prune=lambda: next(verdicts))
    with pytest.raises(optuna.TrialPruned, match="at epoch 1"):
        fit(config, prepare_data(config), save=False, callbacks=[PruneOnValidation(fake, "val_accuracy")])
    assert [step for _, step in reports] == [0, 1] and all(0.0 <= value <= 1.0 for value, _ in reports)
    assert not (config.trainer.output_dir / "metrics.json").exists()  # a pruned run writes no results


# ---- studies end to end -----------------------------------------------------------------------------


def _trials_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_study_writes_best_config_and_trials_then_resumes_with_only_the_missing_trials(
        synth_manifest: Path, tmp_path: Path, one_thread: None) -> None:
    config = write(tmp_path / "cfg.yaml", tiny_config(synth_manifest, tmp_path / "base-run"))
    space = write(tmp_path / "space.yaml", {k: SPACE[k] for k in ("optim.lr", "data.batch_size")})
    out = tmp_path / "tune"
    command = ["tune", "-c", str(config), "--space", str(space), "--out", str(out), "--pruner", "none"]
    first = CliRunner().invoke(app, [*command, "--trials", "2"])
    assert first.exit_code == 0, first.output
    assert "2 trial(s) run" in first.output and "mmfuse train -c" in first.output

    rows = _trials_csv(out / "trials.csv")
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE")]
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    assert all(1e-4 <= float(r["optim.lr"]) <= 1e-2 and int(r["data.batch_size"]) in (16, 32, 48, 64) for r in rows)
    assert all(Path(r["run_dir"]) == out / "trials" / f"{int(r['number']):04d}" for r in rows)
    assert all((Path(r["run_dir"]) / "checkpoints" / "best.ckpt").is_file() for r in rows)
    best_row = max(rows, key=lambda r: float(r["value"]))

    best = load_config(out / "best.yaml")  # valid, ready for mmfuse train
    assert best.optim.lr == pytest.approx(float(best_row["optim.lr"]))
    assert best.data.batch_size == int(best_row["data.batch_size"])
    assert best.trainer.output_dir == out / "best-run" and not best.trainer.output_dir.exists()
    assert best.encoders == validate_config(tiny_config(synth_manifest, out)).encoders
    assert (out / "history.png").stat().st_size > 1000
    if rows[0]["value"] != rows[1]["value"]:  # importance needs values that differ (tested on its own below)
        assert (out / "importance.png").stat().st_size > 1000
    else:
        assert "every completed trial scored the same" in first.output

    again = CliRunner().invoke(app, [*command, "--trials", "3"])
    assert again.exit_code == 0, again.output
    assert "continues: 2 finished trial(s) kept" in again.output and "1 trial(s) run" in again.output
    study = optuna.load_study(study_name="mmfuse", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [r["number"] for r in _trials_csv(out / "trials.csv")] == ["0", "1", "2"]
    assert len(list((out / "trials").iterdir())) == 3

    done = CliRunner().invoke(app, [*command, "--trials", "3"])  # nothing left to run
    assert done.exit_code == 0 and "0 trial(s) run" in done.output


def test_trial_killed_while_running_is_failed_and_retried_with_its_values(
        base: Any, tmp_path: Path, one_thread: None) -> None:
    space = parse_space({"optim.lr": SPACE["optim.lr"]})
    options = TuneOptions(trials=1, out_dir=tmp_path / "tune", heartbeat_interval=1, grace_period=1)
    options.out_dir.mkdir()
    storage = open_storage(options)
    study = optuna.create_study(storage=storage, study_name="mmfuse", direction="maximize")
    killed = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    storage.record_heartbeat(killed._trial_id)  # the process then died: RUNNING, heartbeat going stale
    time.sleep(2.5)

    result = run_tune(base, space, options)
    states = [(t.number, t.state.name) for t in result.study.trials]
    assert states == [(0, "FAIL"), (1, "COMPLETE")]
    retried = result.study.trials[1]
    assert retried.params == killed.params and retried.system_attrs["failed_trial"] == 0
    assert result.ran == 1
    rows = _trials_csv(options.out_dir / "trials.csv")
    assert [(r["state"], r["retry_of"]) for r in rows] == [("FAIL", ""), ("COMPLETE", "0")]


def test_trial_stopped_by_sigterm_is_queued_again_and_runs_first_next_time(
        base: Any, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmfuse.analysis.tune_objective as objective

    space = parse_space({"optim.lr": SPACE["optim.lr"]})
    options = TuneOptions(trials=2, out_dir=tmp_path / "tune")

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise SignalInterrupt(signal.SIGTERM)

    monkeypatch.setattr(objective, "fit", stopped)
    with pytest.raises(SignalInterrupt):
        run_tune(base, space, options)
    monkeypatch.undo()
    study = optuna.load_study(study_name="mmfuse", storage=options.storage_url)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].params == study.trials[0].params

    result = run_tune(base, space, options)
    assert [t.state.name for t in result.study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert result.study.trials[1].params == study.trials[0].params
    assert result.ran == 2


def test_cli_stopped_by_sigterm_exits_143_and_says_how_to_continue(
        synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmfuse.analysis.tune_objective as objective

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise SignalInterrupt(signal.SIGTERM)

    monkeypatch.setattr(objective, "fit", stopped)
    config = write(tmp_path / "cfg.yaml", tiny_config(synth_manifest, tmp_path / "run"))
    space = write(tmp_path / "space.yaml", {"optim.lr": SPACE["optim.lr"]})
    result = CliRunner().invoke(app, ["tune", "-c", str(config), "--space", str(space), "--out", str(tmp_path / "t")])
    assert result.exit_code == 143
    assert "marked failed and queued again" in " ".join(result.output.split())
    assert "Run the same command to continue the study" in " ".join(result.output.split())


def test_a_study_scored_by_another_metric_is_not_continued(base: Any, tmp_path: Path) -> None:
    options = TuneOptions(trials=1, out_dir=tmp_path / "tune")
    options.out_dir.mkdir()
    study = optuna.create_study(storage=open_storage(options), study_name="mmfuse", direction="minimize")
    study.set_user_attr("monitor", "val_loss")
    with pytest.raises(ConfigError, match="minimizes val_loss; this config's runs are scored by val_accuracy"):
        run_tune(base, parse_space({"optim.lr": SPACE["optim.lr"]}), options)


def test_tune_cli_bad_options_are_clear(synth_manifest: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "cfg.yaml", tiny_config(synth_manifest, tmp_path / "run"))
    space = write(tmp_path / "space.yaml", {"optim.lr": SPACE["optim.lr"]})
    for extra, message in ((["--trials", "0"], "--trials must be at least 1"), (["--jobs", "0"], "--jobs must be"),
                           (["--pruner", "hyperband"], "--pruner must be median or none"),
                           (["--storage", "nosuchdb://x"], "cannot open the study storage nosuchdb://x")):
        result = CliRunner().invoke(app, ["tune", "-c", str(config), "--space", str(space), "--out",
                                          str(tmp_path / "t"), *extra])
        assert result.exit_code == 1 and message in result.output, result.output


def test_shipped_space_and_methods_examples_are_valid() -> None:
    from mmfuse.analysis.bench_methods import load_method_options

    repo = Path(__file__).resolve().parents[1]
    base = load_config(repo / "configs" / "synthetic.yaml")
    space = load_space(repo / "configs" / "tune" / "space-synthetic.yaml", base)
    assert "fusion.rank" in space.keys and space.params[space.keys.index("fusion.rank")].when == {
        "fusion.name": ("lmf",)}
    arith = load_space(repo / "configs" / "tune" / "space-avmnist-arith.yaml",
                       load_config(repo / "configs" / "avmnist-arith.yaml"))
    assert arith.keys == ["optim.lr", "fusion.name", "fusion.rank", "fusion.out_dim", "trainer.unimodal_loss_weight",
                          "data.batch_size"]
    assert load_method_options(repo / "configs" / "tune" / "bench-methods.yaml") == {
        "lmf": {"rank": 8}, "mult": {"heads": 2, "layers": 1}}


def _study_with(values: list[float | None]) -> Any:
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr": 1e-3 * (i + 1)}, distributions={"optim.lr": lr}, value=value,
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL))
    return study


@pytest.mark.parametrize(("values", "note"), [
    ([0.5, None], "needs at least 2 completed trials, the study has 1"),
    ([0.5, 0.5, 0.5], "every completed trial scored the same"),
    ([0.2, 0.5, 0.4], None),
])
def test_importance_plot_only_when_there_is_something_to_attribute(tmp_path: Path, values: list[float | None],
                                                                   note: str | None) -> None:
    from mmfuse.analysis.tune_report import write_plots

    files, notes = write_plots(_study_with(values), tmp_path)
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG" and files["history"] == tmp_path / "history.png"
    if note is None:
        assert notes == [] and (tmp_path / "importance.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert len(notes) == 1 and note in notes[0] and not (tmp_path / "importance.png").exists()


@pytest.mark.slow
def test_two_worker_processes_share_one_study(synth_manifest: Path, tmp_path: Path) -> None:
    """--jobs 2: two spawned processes on one SQLite study; slow (each imports torch and prepares the data)."""
    config = write(tmp_path / "cfg.yaml", tiny_config(synth_manifest, tmp_path / "base-run"))
    space = write(tmp_path / "space.yaml", {"optim.lr": SPACE["optim.lr"]})
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", "-c", str(config), "--space", str(space), "--out", str(out),
                                      "--trials", "3", "--jobs", "2", "--pruner", "none"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="mmfuse", storage=f"sqlite:///{out / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 3 <= len(complete) == len(study.trials) <= 4  # a worker that started a trial finishes it
    assert len({t.params["optim.lr"] for t in complete}) == len(complete)  # the workers sample apart
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{t.number:04d}" for t in study.trials]
