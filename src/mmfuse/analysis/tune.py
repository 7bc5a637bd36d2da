"""``mmfuse tune``: hyper-parameter and fusion-method search with Optuna, stored in a database.

The study lives in a relational database: ``DIR/study.db`` (SQLite) by default, or any SQLAlchemy
URL (``postgresql://...``, ``mysql+pymysql://...``) so several machines work on one study. The same
command run again continues the study (``load_if_exists``): finished trials are kept and only the
trials still missing to reach ``--trials`` finished ones (complete or pruned) run.

A trial that dies with its process is not lost. Every running trial writes a heartbeat to the
database; one whose heartbeat is older than the grace period (its process was killed) is marked
failed by the next trial to start, anywhere, and queued again with the same values
(``RetryHeartbeatStaleTrialCallback``). A trial stopped by SIGTERM or Ctrl-C is marked failed and queued
again at once. Failed trials do not count towards ``--trials``.

Parallel trials (``--jobs J``) are J worker *processes*, each running ``study.optimize`` on the
shared storage: torch keeps global state (RNG, thread pools, the default dtype) that threads would
share, so Optuna's thread-based ``n_jobs`` would let trials disturb each other. Each worker gets
``cores / J`` torch threads unless ``trainer.threads`` is set. Across processes or machines the
last trials can overshoot ``--trials`` by up to J-1: a worker that started a trial finishes it.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mmfuse.analysis.tune_objective import MAX_RETRY, Objective, study_direction
from mmfuse.analysis.tune_report import write_outputs
from mmfuse.analysis.tune_space import SearchSpace
from mmfuse.config import ExperimentConfig, validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.core.threads import usable_cores, whole_cores
from mmfuse.engine.data import prepare_data
from mmfuse.engine.interrupts import SignalInterrupt, raise_on_signals
from mmfuse.engine.nonfinite import NonFiniteError

Direction = Literal["minimize", "maximize"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CAUGHT = (ConfigError, NonFiniteError)
"""Errors that fail one trial and let the study go on: a combination of values the config refuses
(an option one fusion method does not take), a learning rate that diverges."""


@dataclass(frozen=True)
class TuneOptions:
    trials: int
    out_dir: Path
    storage: str | None = None
    study_name: str = "mmfuse"
    jobs: int = 1
    timeout: float | None = None
    pruner: str = "median"
    """median (MedianPruner) or none."""
    heartbeat_interval: int = 10
    grace_period: int = 30
    """Seconds without a heartbeat after which a running trial counts as killed."""

    def check(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive seconds, got {self.timeout:g}")
        if self.pruner not in ("median", "none"):
            raise ConfigError(f"--pruner must be median or none, got '{self.pruner}'")
        if not self.study_name.strip():
            raise ConfigError("--study-name must not be empty")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"


@dataclass
class TuneResult:
    study: optuna.Study
    monitor: str
    direction: Direction
    ran: int
    """Trials this call started (all workers together)."""
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def open_storage(options: TuneOptions) -> RDBStorage:
    """The study database, with heartbeats so a killed trial is found and retried."""
    url = options.storage_url
    # SQLite: wait for a lock held by another worker instead of failing at once.
    engine_kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                                     else {"pool_pre_ping": True})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=options.heartbeat_interval,
                              grace_period=options.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as exc:  # a bad URL, a missing driver, a server that does not answer
        raise ConfigError(f"cannot open the study storage {url}: {exc}") from None


def open_study(storage: RDBStorage, options: TuneOptions, direction: Direction, monitor: str,
               seed: int) -> optuna.Study:
    """Creates the study or loads it; a loaded study must optimise the same metric the same way."""
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if options.pruner == "median"
        else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=options.study_name, direction=direction,
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    stored = study.user_attrs.get("monitor")
    if stored is None:
        study.set_user_attr("monitor", monitor)
    elif stored != monitor or study.direction.name.lower() != direction:
        raise ConfigError(f"study '{options.study_name}' in {options.storage_url} {study.direction.name.lower()}s "
                          f"{stored}; this config's runs are scored by {monitor} ({direction}): use another "
                          "--study-name or --out")
    return study


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _optimize(study: optuna.Study, objective: Objective, options: TuneOptions, remaining: int,
              callbacks: list[Callable[[optuna.Study, FrozenTrial], None]]) -> None:
    stop = optuna.study.MaxTrialsCallback(options.trials, states=FINISHED)
    with raise_on_signals():
        study.optimize(objective, n_trials=remaining, timeout=options.timeout, catch=CAUGHT,
                       callbacks=[*callbacks, stop], gc_after_trial=True)


def _sampler_seed(base: ExperimentConfig, study_trials: int, worker: int) -> int:
    """Distinct per worker and per session: a resumed study must not replay its first random trials."""
    return base.seed + 7919 * study_trials + worker


def _worker(base_raw: dict[str, Any], space: SearchSpace, options: TuneOptions, direction: Direction, monitor: str,
            worker: int, remaining: int) -> None:
    """One process of a ``--jobs`` study (spawned: a fresh interpreter, nothing of the parent's torch state)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = validate_config(base_raw)
    storage = open_storage(options)
    seed = _sampler_seed(base, len(storage.get_all_trials(storage.get_study_id_from_name(options.study_name),
                                                          deepcopy=False)), worker)
    study = open_study(storage, options, direction, monitor, seed)
    with contextlib.suppress(SignalInterrupt):  # the trial is marked failed and queued again already
        _optimize(study, Objective(base, space, options.out_dir), options, remaining, [])


def _run_workers(base: ExperimentConfig, space: SearchSpace, options: TuneOptions, direction: Direction, monitor: str,
                 remaining: int) -> None:
    if base.trainer.threads is None:
        threads = max(1, whole_cores(usable_cores()) // options.jobs)
        base = base.model_copy(update={"trainer": base.trainer.model_copy(update={"threads": threads})})
    context = multiprocessing.get_context("spawn")
    raw = base.model_dump(mode="json")
    workers = [context.Process(target=_worker, args=(raw, space, options, direction, monitor, index, remaining),
                               name=f"mmfuse-tune-{index}") for index in range(options.jobs)]
    for process in workers:
        process.start()
    try:
        with raise_on_signals():
            for process in workers:
                process.join()
    except SignalInterrupt:  # the workers got the signal too: they mark their trials and stop
        for process in workers:
            process.join()
        raise
    failed = [f"{p.name} (exit code {p.exitcode})" for p in workers if p.exitcode]
    if failed:
        raise ConfigError(f"tuning workers failed: {', '.join(failed)}; see their errors above")


def run_tune(base: ExperimentConfig, space: SearchSpace, options: TuneOptions,
             on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> TuneResult:
    """Runs (or continues) the study until ``options.trials`` trials have finished, then writes
    ``best.yaml``, ``trials.csv`` and the plots into ``options.out_dir``."""
    options.check()
    if str(base.trainer.devices) != "1" or base.trainer.num_nodes != 1 or any(
            key in space.keys for key in ("trainer.devices", "trainer.num_nodes")):
        raise ConfigError("mmfuse tune trains each trial on one device (trainer.devices: 1, trainer.num_nodes: 1); "
                          "run trials in parallel with --jobs, or on several machines with a shared --storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(options)
    data = prepare_data(base)  # data errors before any trial; the task says what to optimise
    monitor, direction = study_direction(base, space, data)
    notes: list[str] = []
    study = open_study(storage, options, direction, monitor, seed=base.seed)
    before = len(study.trials)
    started = datetime.datetime.now()  # optuna stamps trials with naive local time
    study.sampler = optuna.samplers.TPESampler(seed=_sampler_seed(base, before, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        notes.append(f"{len(running)} trial(s) still running (another worker, or killed less than "
                     f"{options.grace_period} s ago: then marked failed and retried once their heartbeat is stale): "
                     + ", ".join(str(t.number) for t in running))
    finished = count_finished(study)
    remaining = options.trials - finished
    if finished:
        notes.append(f"study '{options.study_name}' continues: {finished} finished trial(s) kept")
    if remaining <= 0:
        notes.append(f"the study already holds {finished} finished trial(s) (--trials {options.trials}): "
                     "nothing to run; raise --trials to search further")
    elif options.jobs == 1:
        objective = Objective(base, space, options.out_dir)
        objective.reuse(base, data)
        _optimize(study, objective, options, remaining, [on_trial] if on_trial else [])
    else:
        _run_workers(base, space, options, direction, monitor, remaining)
    ran = sum(1 for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_start >= started)
    files, report_notes = write_outputs(study, base, options.out_dir)
    return TuneResult(study=study, monitor=monitor, direction=direction, ran=ran, files=files,
                      notes=notes + report_notes)
