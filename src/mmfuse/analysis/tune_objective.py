"""One ``mmfuse tune`` trial: sample a config, train it in its own run folder, return its score.

The score is the monitored validation metric (the task's main metric, or ``trainer.monitor``) of
the best epoch, the one ``mmfuse train`` keeps. After every validation epoch the metric is reported
to the trial, and a pruner that judges the curve hopeless (below the median of earlier trials at
the same epoch, by default) stops the run there with ``optuna.TrialPruned``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import optuna

from mmfuse.analysis.tune_space import SearchSpace, apply_params
from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import ConfigError
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.fit import fit, monitored_metric
from mmfuse.engine.interrupts import SignalInterrupt

RUN_DIR_ATTR = "run_dir"
"""The trial's user attribute holding its run folder."""
MAX_RETRY = 3
"""How often a trial killed while running is queued again with its values before it is given up."""


class ReportingTrial(Protocol):
    """What the pruning callback needs of a trial (an ``optuna.Trial``; tests pass a fake)."""

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


class PruneOnValidation(L.Callback):
    """Reports ``monitor`` to the trial after each validation epoch; raises ``TrialPruned`` when the
    pruner says so. The exception ends ``Trainer.fit`` (Lightning tears down and re-raises it), so
    a pruned trial costs no more epochs and saves no model."""

    def __init__(self, trial: ReportingTrial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor} = {float(value):.4f} at epoch {epoch}")


def fail_and_retry(trial: optuna.Trial) -> None:
    """A trial stopped by SIGTERM / Ctrl-C: marked failed at once and queued again with the same values,
    so the next run of the study trains it first. (Optuna lets such an exception through untold.)"""
    import warnings

    from optuna.storages import RetryHeartbeatStaleTrialCallback

    study = trial.study
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    retry(study, study._storage.get_trial(trial._trial_id))


def data_key(config: ExperimentConfig) -> str:
    """What the prepared data depends on: the data and task settings and the seed, not the batch size."""
    return json.dumps({"seed": config.seed, "task": config.task.model_dump(mode="json"),
                       "data": config.data.model_dump(mode="json", exclude={"batch_size", "num_workers"})},
                      sort_keys=True)


def run_folder(out_dir: Path, number: int) -> Path:
    return out_dir / "trials" / f"{number:04d}"


@dataclass
class Objective:
    """Trains one config per trial. Prepared data is reused while the trial's data and task
    settings match the previous trial's (a batch size alone does not re-read the data)."""

    base: ExperimentConfig
    space: SearchSpace
    out_dir: Path
    _data_key: str | None = field(default=None, init=False)
    _data: PreparedData | None = field(default=None, init=False)

    def trial_config(self, params: dict[str, Any], number: int) -> ExperimentConfig:
        config = apply_params(self.base, params)
        trainer = config.trainer.model_copy(update={"output_dir": run_folder(self.out_dir, number),
                                                    "overwrite": True, "progress_bar": False, "verbose": False})
        return config.model_copy(update={"trainer": trainer})

    def data_for(self, config: ExperimentConfig) -> PreparedData:
        key = data_key(config)
        if key != self._data_key or self._data is None:
            self._data, self._data_key = prepare_data(config), key
        return self._data

    def reuse(self, config: ExperimentConfig, data: PreparedData) -> None:
        """Starts the cache with data already prepared for ``config`` (the study's base config)."""
        self._data, self._data_key = data, data_key(config)

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.space.suggest(trial)
        config = self.trial_config(params, trial.number)
        trial.set_user_attr(RUN_DIR_ATTR, str(config.trainer.output_dir))
        try:
            data = self.data_for(config)
            monitor, _ = monitored_metric(config, data.task)
            result = fit(config, data, save=False, callbacks=[PruneOnValidation(trial, monitor)])
        except SignalInterrupt:
            fail_and_retry(trial)
            raise
        metric = monitor.removeprefix("val_")
        trial.set_user_attr("epochs", result.epochs)
        return float(result.val_metrics[metric])


def study_direction(base: ExperimentConfig, space: SearchSpace,
                    data: PreparedData) -> tuple[str, Literal["minimize", "maximize"]]:
    """The monitored metric and 'minimize' / 'maximize', from the task the base config builds.

    ``trainer.monitor`` may not be searched: trials scored by different metrics cannot be ranked.
    """
    if "trainer.monitor" in space.keys:
        raise ConfigError(f"{space.source}: 'trainer.monitor' cannot be searched: trials scored by different "
                          "metrics cannot be compared")
    monitor, mode = monitored_metric(base, data.task)
    return monitor, "minimize" if mode == "min" else "maximize"
