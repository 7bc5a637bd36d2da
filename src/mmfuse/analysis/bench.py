"""``mmfuse bench``: every fusion method (and each modality alone) on the same data, encoders and
budget, over several seeds, with the results a paper table needs.

The data is preprocessed once and shared by every run. Each run records its task metrics on the
test split (validation when there is none; the task's main metric first), the main metric with
modalities hidden at test time (without each modality, each alone, and the mean over those
subsets), its parameter count, training time and peak memory. ``runs.csv`` is rewritten after
every run, so an interrupted benchmark keeps what it finished.

Every planned model is built once before any training, so a method or baseline the task cannot
use is known in seconds, not after hours of training: see ``check_plan``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import torch
import yaml

from mmfuse.analysis.bench_methods import MethodOptions, method_fusion, unused_methods
from mmfuse.analysis.bench_results import UNIMODAL_SUFFIX, BenchRun, plot_bench, write_runs, write_summary
from mmfuse.analysis.run_pool import one_thread_runs, pool_jobs, run_pool
from mmfuse.config import ExperimentConfig, FusionConfig
from mmfuse.config.balance import BalanceName
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.distributed import is_rank_zero
from mmfuse.core.errors import ConfigError
from mmfuse.core.threads import thread_policy
from mmfuse.data.dataset import MultimodalDataset
from mmfuse.engine.balance import build_balance
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel

NO_FUSION = "no fusion"
"""The label of the one run per seed of a task that builds no fusion (contrastive alignment)."""

Plan = list[tuple[str, float, ExperimentConfig]]


def resolve_methods(spec: str) -> list[str]:
    """'all' or a comma-separated list of registry names, checked against the registry."""
    if spec.strip() == "all":
        return FUSIONS.names()
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods needs 'all' or at least one fusion name")
    for method in methods:
        FUSIONS.get(method)
    return methods


def baseline_fusion(fusion: FusionConfig) -> FusionConfig:
    """The fusion of a single-modality baseline: ``concat`` over the one modality.

    Concat of one modality is a projection + MLP between the encoder and the task head: the
    "encoder alone" baseline of fusion papers, and the same network whatever the benchmarked
    method, so every method is compared with one reference. It keeps the options of the config's
    fusion that concat also takes (``proj_dim``, ``hidden``, ``dropout``: in the built-in methods
    they size the per-modality projection and the MLP before the output, and set the dropout), so
    the baseline has the fused model's width and regularisation, plus ``out_dim``. The rest (rank,
    heads, layers, gate...) shape how modalities interact, which one modality does not have, and
    is dropped; so is a ``proj_dim`` below 1 (tfn's "no sub-network"), which concat cannot use.
    """
    accepted = set(inspect.signature(FUSIONS.get("concat")).parameters) - {"dims", "out_dim"}
    kept = {key: value for key, value in fusion.options.items() if key in accepted
            and not (key == "proj_dim" and isinstance(value, int) and value < 1)}
    return FusionConfig(name="concat", out_dim=fusion.out_dim, **kept)


def resolve_balances(spec: str) -> list[str]:
    """A comma-separated list of ``trainer.balance`` names ('none', 'ogm_ge', ...), checked."""
    names = [b.strip() for b in spec.split(",") if b.strip()]
    valid = list(get_args(BalanceName))
    for name in names:
        if name not in valid:
            raise ConfigError(f"--balance '{name}' is not a balance method; choose from {', '.join(valid)}")
    if not names:
        raise ConfigError(f"--balance needs at least one of {', '.join(valid)}")
    return names


def with_balance(label: str, config: ExperimentConfig, balance: str) -> tuple[str, ExperimentConfig]:
    """The run's label and config with ``trainer.balance`` set.

    A balance other than 'none' is part of the label (``concat+ogm_ge``), so summaries and plots keep
    the settings apart; the config's ``balance_options`` go with its own balance only.
    """
    options = config.trainer.balance_options if balance == config.trainer.balance else {}
    trainer = config.trainer.model_copy(update={"balance": balance, "balance_options": options})
    config = config.model_copy(update={"trainer": trainer})
    return (label if balance == "none" else f"{label}+{balance}"), config


def planned_runs(config: ExperimentConfig, methods: list[str], dropouts: list[float],
                 unimodal: bool, balances: list[str] | None = None,
                 method_options: MethodOptions | None = None) -> Plan:
    """(method label, modality dropout, config) per run, before seeds are applied.

    A baseline (``"<modality> only"``) reads one modality through ``baseline_fusion`` and trains
    without modality dropout: hiding its only modality would just blank samples. A method keeps the
    config's fusion options when it is the config's method, else runs with its defaults; either is
    updated with the method's entry in ``method_options`` (``--methods-config``, see ``bench_methods``).
    ``model_copy(update=...)`` skips validation on purpose: the data section keeps every modality
    (the prepared data is shared) while a unimodal run's model reads only one of them. ``balances``
    (``--balance``) runs each method under each ``trainer.balance``; baselines train without one.
    """
    runs = []
    if unimodal and len(config.modalities) > 1:
        trainer = config.trainer.model_copy(update={"modality_dropout": 0.0, "balance": "none", "balance_options": {}})
        for modality in config.modalities:
            solo = config.model_copy(deep=True, update={
                "encoders": {modality: config.encoders[modality]},
                "fusion": baseline_fusion(config.fusion), "trainer": trainer,
            })
            runs.append((f"{modality}{UNIMODAL_SUFFIX}", 0.0, solo))
    for method in methods:
        fusion = method_fusion(config, method, method_options)
        for rate in dropouts:
            trainer = config.trainer.model_copy(update={"modality_dropout": rate})
            run_config = config.model_copy(deep=True, update={"fusion": fusion, "trainer": trainer})
            for balance in balances or [config.trainer.balance]:
                label, balanced = with_balance(method, run_config, balance)
                runs.append((label, rate, balanced))
    return runs


def check_plan(plan: Plan, data: PreparedData, skip_incompatible: bool = False) -> tuple[Plan, list[str]]:
    """The runs that can train, and a note for each one left out, before anything trains.

    Each distinct model is built once (and thrown away). A baseline the task cannot build (an
    autoencoder imputes a modality from the others, contrastive alignment needs a pair) is left out
    with a note. A method the task cannot use (``late`` outputs decisions, captioning needs
    features) is left out with a note when ``skip_incompatible`` (``--methods all``), else it is a
    ConfigError naming it. A task that builds no fusion gets one run per dropout rate, labelled
    ``NO_FUSION``, instead of identical models under every method's name.
    """
    notes: list[str] = []
    baselines = [run for run in plan if run[0].endswith(UNIMODAL_SUFFIX)]
    fused = [run for run in plan if not run[0].endswith(UNIMODAL_SUFFIX)]
    if not data.task.uses_fusion and fused:
        names = sorted({label for label, _, _ in fused})
        notes.append(f"task '{data.task.name}' builds no fusion: one run per seed, labelled '{NO_FUSION}', "
                     f"instead of one per method ({', '.join(names)})")
        first: dict[float, ExperimentConfig] = {}
        for _, rate, config in fused:
            first.setdefault(rate, config)
        fused = [(NO_FUSION, rate, config) for rate, config in first.items()]
    kept: Plan = []
    built: dict[str, str | None] = {}  # label -> why it cannot be built (None: it can)
    for label, rate, config in [*baselines, *fused]:
        if label not in built:
            built[label] = _build_error(config, data)
            reason = built[label]
            if reason is not None and label.endswith(UNIMODAL_SUFFIX):
                notes.append(f"no '{label}' baseline: {reason}")
            elif reason is not None and skip_incompatible:
                notes.append(f"'{label}' left out: {reason}")
            elif reason is not None:
                raise ConfigError(f"--methods {label}: {reason}")
        if built[label] is None:
            kept.append((label, rate, config))
    return kept, notes


def _build_error(config: ExperimentConfig, data: PreparedData) -> str | None:
    """Why the model of ``config`` cannot be built on ``data`` (a ConfigError's message), or None.

    The task is copied: building a model fits the task's head to it (e.g. its modalities).
    """
    try:
        model = MultimodalModel.from_config(config, data.preprocessor, copy.deepcopy(data.task))
        build_balance(config.trainer, model)  # a remedy the task cannot use (agm on regression)
    except ConfigError as error:
        return str(error)
    return None


class PeakMemory:
    """Peak memory during a run: CUDA allocator peak on a GPU, else the process's resident set.

    The process's ru_maxrss never decreases, so on the CPU a thread samples /proc/self/statm
    instead (Linux); elsewhere ru_maxrss is the best available answer.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    @contextmanager
    def track(self) -> Iterator[PeakMemory]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = self._rss_mb()
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join()
            if cuda:
                self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def missing_modality_scores(model: MultimodalModel, dataset: MultimodalDataset, metric: str) -> dict[str, float]:
    """The main metric with modalities hidden at test time: without each one, with each one alone
    (three or more modalities), and the mean over every such proper subset (``missing_mean``), the
    one number that says how well a model copes with missing modalities.

    Each proper subset is evaluated once: "without m" and "only m" are among them. A task that
    builds no fusion (contrastive alignment) gets none: hiding a modality there removes the pairs
    being retrieved rather than testing how a fused prediction copes, and its metric is undefined.
    """
    modalities = list(model.modalities)
    if len(modalities) < 2 or not model.task.uses_fusion:
        return {}
    subsets = [frozenset(c) for k in range(1, len(modalities)) for c in itertools.combinations(modalities, k)]
    kept = {keep: evaluate(model, dataset, absent=[m for m in modalities if m not in keep])[metric]
            for keep in subsets}
    scores = {f"{metric}_without_{m}": kept[frozenset(modalities) - {m}] for m in modalities}
    if len(modalities) > 2:
        scores.update({f"{metric}_only_{m}": kept[frozenset({m})] for m in modalities})
    scores[f"{metric}_missing_mean"] = sum(kept.values()) / len(kept)
    return scores


def run_one(label: str, rate: float, config: ExperimentConfig, seed: int, data: PreparedData,
            out_dir: Path) -> BenchRun | None:
    """One training run and its scores; None in the other ranks of a DDP run (rank 0 scores it)."""
    run_dir = out_dir / "runs" / f"{label.replace(' ', '_')}-d{rate:g}-s{seed}"
    trainer = config.trainer.model_copy(update={"output_dir": run_dir, "progress_bar": False})
    config = config.model_copy(update={"seed": seed, "trainer": trainer})
    with PeakMemory().track() as memory:
        result = fit(config, data, save=False)
    if not result.is_global_zero:
        return None
    split = "test" if len(data.datasets.get("test", [])) else "val"
    metrics = result.test_metrics if split == "test" and result.test_metrics else result.val_metrics
    main_metric, _ = data.task.monitor
    metrics = {main_metric: metrics[main_metric], **metrics}  # first: the column tables and plots show
    dataset = data.datasets[split]
    if config.data.cache:  # the frozen encoders' outputs for this split are cached already: all hits
        from mmfuse.engine.feature_cache import cache_datasets

        dataset = cache_datasets(result.model, {split: dataset}, config.data.cache_dir, device="cpu")[0][split]
    missing = missing_modality_scores(result.model, dataset, main_metric)
    return BenchRun(method=label, modalities="+".join(result.model.modalities), seed=seed, modality_dropout=rate,
                    metrics=metrics, missing=missing, params=result.params, train_seconds=result.train_seconds,
                    peak_memory_mb=memory.peak_mb, balance=config.trainer.balance,
                    fusion_options={"out_dim": config.fusion.out_dim, **config.fusion.options})


def _bench_task(data: PreparedData, task: tuple[str, float, ExperimentConfig, int, Path]) -> BenchRun | None:
    label, rate, run_config, seed, out_dir = task
    return run_one(label, rate, run_config, seed, data, out_dir)


def run_bench(config: ExperimentConfig, methods: list[str], seeds: int, out_dir: Path,
              dropouts: list[float] | None = None, unimodal: bool = True,
              on_run: Callable[[BenchRun, int, int], None] | None = None, skip_incompatible: bool = False,
              on_note: Callable[[str], None] | None = None, balances: list[str] | None = None,
              method_options: MethodOptions | None = None, jobs: int | None = None) -> list[BenchRun]:
    """Trains every planned run for ``seeds`` seeds and writes the result files into ``out_dir``;
    ``jobs`` runs at a time, each on one thread (default: one per usable core; ``analysis.run_pool``).

    ``skip_incompatible`` (``--methods all``) leaves out methods the task cannot use instead of
    failing; every run left out is told to ``on_note`` and listed in ``summary.md``.
    ``method_options`` (``--methods-config``) sets options per method.
    """
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    with thread_policy(1 if pool_jobs(config, 2, jobs) > 1 else None):  # workers fork with no thread pool
        data = prepare_data(config)
    plan, notes = check_plan(planned_runs(config, methods, dropouts or [config.trainer.modality_dropout], unimodal,
                                          balances=balances, method_options=method_options), data,
                             skip_incompatible)
    notes += [f"--methods-config: options for '{m}' unused, it is not benchmarked"
              for m in unused_methods(method_options or {}, methods)]
    if not plan:
        raise ConfigError("nothing to train: " + "; ".join(notes))
    for note in notes:
        if on_note:
            on_note(note)
    writer = is_rank_zero()  # under DDP every rank runs the bench; rank 0 writes its files
    if writer:
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tasks = [(label, rate, one_thread_runs(run_config), seed, out_dir)
             for seed in range(config.seed, config.seed + seeds) for label, rate, run_config in plan]
    done: dict[int, BenchRun] = {}
    names = [f"{label} seed {seed}" for label, _, _, seed, _ in tasks]
    for index, run in run_pool(data, tasks, _bench_task, pool_jobs(config, len(tasks), jobs), names):
        if run is None:
            continue
        done[index] = run
        runs = [done[i] for i in sorted(done)]  # in plan order, whichever finished first
        write_runs(runs, out_dir / "runs.csv")
        if on_run:
            on_run(run, len(runs), len(tasks))
    runs = [done[i] for i in sorted(done)]
    if writer:
        write_summary(runs, out_dir, notes)
        plot_bench(runs, out_dir, data.task.monitor[0])
    return runs
