"""Training on PyTorch Lightning: research code in the LightningModule, engineering in the Trainer.

``train(config)`` is the whole job: data -> fitted preprocessing -> model -> Trainer.fit with
best-checkpoint selection and early stopping -> test metrics -> ``save_pretrained``.

The run folder (``trainer.output_dir``) ends up holding ``checkpoints/`` (``best.ckpt``, and
``last.ckpt`` to resume from), ``logs/``, ``model/``, ``config.yaml`` and, written last,
``metrics.json``. A folder holding a finished run (``model/`` or ``metrics.json``) is never trained
into unless ``trainer.overwrite`` (``--overwrite``) is set, and the files of an earlier run are
deleted before training starts (results first), so a run killed half-way never leaves old metrics
beside new checkpoints. Other files in the folder are left alone.

``resume=True`` (``--resume``) continues the run in the folder from ``checkpoints/last.ckpt``
instead: its checkpoints and logs stay, its results (if it had finished) are deleted and written
anew at the end. A resumed run ends with the weights and metrics the uninterrupted run would have
had (see ``loader``, ``rng``, ``last_checkpoint``). SIGTERM and Ctrl-C end a run with
``SignalInterrupt`` (see ``interrupts``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from mmfuse.config import ExperimentConfig
from mmfuse.core.atomic import write_text_atomic
from mmfuse.core.distributed import is_rank_zero
from mmfuse.core.errors import ConfigError
from mmfuse.core.folder_lock import folder_lock
from mmfuse.core.threads import thread_policy
from mmfuse.data.dataset import Collator
from mmfuse.data.memory import ArrayDataset
from mmfuse.engine.balance import build_balance
from mmfuse.engine.calibration import calibrate
from mmfuse.engine.checkpoint_io import AtomicCheckpointIO
from mmfuse.engine.contribution import contribution_note, contributions
from mmfuse.engine.data import PreparedData, prepare_data, warn_lazy_crops, write_skipped
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.interrupts import raise_on_signals
from mmfuse.engine.last_checkpoint import LastCheckpoint
from mmfuse.engine.loader import LoaderPosition, ResumableLoader, ShardOrder
from mmfuse.engine.module import FusionModule, lightning_output
from mmfuse.engine.nonfinite import NonFiniteGuard
from mmfuse.engine.resume import BestCheckpoint, config_json, keep_earlier_logs, last_checkpoint, resume_point
from mmfuse.engine.rng import RandomState
from mmfuse.engine.stall import StallDetector, near_chance_note, remedies_for
from mmfuse.engine.thread_watch import ThreadWatchCallback
from mmfuse.engine.tracking import build_logger
from mmfuse.engine.warm_start import warm_start_encoders
from mmfuse.model import MultimodalModel
from mmfuse.tasks import Task


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class TrainResult:
    model: MultimodalModel
    output_dir: Path
    model_dir: Path | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    train_seconds: float
    params: int
    epochs: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_file: Path | None = None
    """``skipped.jsonl`` in the run folder when samples were skipped (``data.on_error: skip``)."""
    nonfinite_skipped: int = 0
    """Optimizer steps left out for a non-finite loss or gradient (``trainer.on_nonfinite: skip``)."""
    nonfinite_summary: str | None = None
    resumed_from: Path | None = None
    is_global_zero: bool = True
    """False in the other ranks of a DDP run: they train, but evaluate, save and print nothing."""
    stall_warning: str | None = None
    """The stall warning (engine/stall.py) if validation looked stalled for several epochs."""
    chance_note: str | None = None
    threads: dict[str, object] = field(default_factory=dict)
    """Torch's intra-op threads: at the start, and each change the thread policy made while training
    (seconds, from, to, cores busy elsewhere; ``mmfuse.core.threads``)."""
    contribution_note: str | None = None
    """Said when a modality adds next to nothing to validation accuracy (``mmfuse.engine.contribution``)."""
    """Set when the final accuracy ends within a few points of the majority-class rate."""


RUN_FILES = ("metrics.json", "model", "config.yaml", "checkpoints", "logs")
"""What a run writes into its folder; deleted in this order, the finished run's results first."""
FINISHED_MARKERS = ("model", "metrics.json")


def check_output_dir(config: ExperimentConfig, resume: bool = False) -> Path:
    """The run folder; refuses one that holds a finished run unless ``trainer.overwrite`` is set.

    Called before any work, so a forgotten ``--overwrite`` costs nothing and destroys nothing. A
    resume continues the run in the folder, finished or not, and needs its ``last.ckpt``.
    """
    out = Path(config.trainer.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"trainer.output_dir {out} is a file, not a folder")
    if resume:
        if config.trainer.overwrite:
            raise ConfigError("--resume continues the run in the output folder and --overwrite "
                              "(trainer.overwrite) starts it over: give one of them")
        resume_point(config)
        return out
    finished = [f"{name}/" if (out / name).is_dir() else name for name in FINISHED_MARKERS if (out / name).exists()]
    if finished and not config.trainer.overwrite:
        raise ConfigError(f"{out} already holds a finished run ({', '.join(finished)}); pass --overwrite to "
                          "replace it (config: trainer.overwrite: true) or choose another output folder")
    return out


def _clear_run_files(out: Path, keep_training_state: bool = False) -> None:
    """Deletes an earlier run's files (results first), so what the folder holds is this run's only.

    A ``config.yaml`` with no other run file beside it is the user's own config, not a run's: kept.
    A resumed run keeps its checkpoints and logs (and config.yaml) and loses only the results that
    its end writes anew.
    """
    if not any((out / name).exists() for name in RUN_FILES if name != "config.yaml"):
        return
    for name in FINISHED_MARKERS[::-1] if keep_training_state else RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def fit(config: ExperimentConfig, data: PreparedData, save: bool = True, resume: bool = False,
        callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Trains one model on already-prepared data (the demo and benchmarks reuse one PreparedData);
    ``resume`` continues the run in ``trainer.output_dir`` from its ``last.ckpt``. ``callbacks`` are
    added to the Trainer's own (``mmfuse tune`` reports each validation epoch to its trial)."""
    with run_folder_lock(config), thread_policy(config.trainer.threads, config.data.num_workers) as watch, \
            raise_on_signals():
        if watch is not None:
            callbacks = [*callbacks, ThreadWatchCallback(watch)]
        return _fit(config, data, save, resume, callbacks)


def run_folder_lock(config: ExperimentConfig) -> contextlib.AbstractContextManager[None]:
    """The run folder's lock (``mmfuse.core.folder_lock``): a second process training into the same folder
    (a command started twice, ``--resume`` while the first still runs) is refused in one line. Only
    rank zero holds it: under DDP every rank trains into the folder that rank zero owns."""
    if not is_rank_zero():
        return contextlib.nullcontext()
    return folder_lock(Path(config.trainer.output_dir), "training")


def _fit(config: ExperimentConfig, data: PreparedData, save: bool, resume: bool,
         extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    out = check_output_dir(config, resume)
    threads_at_start = torch.get_num_threads()
    resume_from = last_checkpoint(out) if resume else None
    L.seed_everything(config.seed, workers=True, verbose=False)
    # Its own copy of the task: calibration fits per-model state into it, and the demo and bench
    # train several models on one PreparedData.
    model = MultimodalModel.from_config(config, data.preprocessor, copy.deepcopy(data.task))
    if resume_from is None:  # encoders.<m>.init_from; before the feature cache sees the weights
        warm_start_encoders(model, config)
    if config.data.cache:  # frozen encoders' outputs from disk: the encoders never run while training
        from mmfuse.engine.feature_cache import cache_datasets

        if model.task.raw_input_modalities:
            raise ConfigError(
                f"data.cache replaces the inputs with encoder outputs, but task '{model.task.name}' reconstructs "
                f"the inputs of {', '.join(model.task.raw_input_modalities)}; set task.input_targets: false "
                "or data.cache: false")

        cached, _ = cache_datasets(model, data.datasets, config.data.cache_dir,
                                   device=None if config.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
        data = dataclasses.replace(data, datasets=cached)
    module = FusionModule(model, config.optim, config.trainer.modality_dropout,
                          config.trainer.unimodal_loss_weight, build_balance(config.trainer, model))
    if is_rank_zero():  # under DDP every rank runs this; one of them owns the folder
        _clear_run_files(out, keep_training_state=resume)
        if resume_from is not None:
            keep_earlier_logs(out, resume_from)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint_callback(config, data.task, out)
    with lightning_output(config.trainer.verbose):
        trainer, train_seconds = _run_trainer(config, data, module, checkpoint, out, resume_from, extra_callbacks)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Training is over: what follows (evaluation, saving) is rank 0's alone, and a metric that
        # tried to sync with ranks that have moved on (or exited) would wait for ever.
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return TrainResult(model=module.model, output_dir=out, model_dir=None, val_metrics={}, test_metrics=None,
                           train_seconds=train_seconds, params=count_parameters(module.model),
                           epochs=trainer.current_epoch, resumed_from=resume_from, is_global_zero=False)
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    model = module.model.cpu().eval()
    calibrate(model, data.datasets["val"], config.trainer.calibration)
    val_metrics = evaluate(model, data.datasets["val"])
    test_metrics = evaluate(model, data.datasets["test"]) if len(data.datasets.get("test", [])) else None
    warn_lazy_crops(config, data)  # lazy splits: known only now that every split has been read
    remedies = remedies_for(model)  # what the end-of-run notes suggest, for this fusion
    note = (contribution_note(contributions(model, data.datasets["val"]), remedies)
            if config.trainer.contribution_check else None)
    model_dir = model.save_pretrained(out / "model") if save else None
    result = TrainResult(
        model=model, output_dir=out, model_dir=model_dir, val_metrics=val_metrics, test_metrics=test_metrics,
        train_seconds=train_seconds, params=count_parameters(model), epochs=trainer.current_epoch,
        skipped={name: report.count for name, report in data.skipped.items()}, resumed_from=resume_from,
        contribution_note=note, threads={"start": threads_at_start, "changes": []},
    )
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ThreadWatchCallback):
            result.threads["changes"] = [list(change) for change in callback.watch.changes]
        if isinstance(callback, NonFiniteGuard):
            result.nonfinite_skipped, result.nonfinite_summary = callback.skipped, callback.summary()
        if isinstance(callback, StallDetector):
            result.stall_warning = callback.message
            split = "test" if test_metrics else "val"
            result.chance_note = near_chance_note(test_metrics or val_metrics, callback.last, len(data.datasets[split]),
                                                  remedies=remedies)
    if save:
        write_run_files(config, result)
        result.skipped_file = write_skipped(data, out)
    return result


def monitored_metric(config: ExperimentConfig, task: Task) -> tuple[str, str]:
    """The logged validation metric that picks the best epoch (``val_<name>``) and its mode (min/max):
    the task's main metric, or ``trainer.monitor``."""
    metric, mode = task.monitor
    monitor = config.trainer.monitor or f"val_{metric}"
    valid = [f"val_{name}" for name in task.metrics().keys()] + ["val_loss"]  # noqa: SIM118
    if monitor not in valid:
        raise ConfigError(f"trainer.monitor '{monitor}' is not a validation metric; choose from {', '.join(valid)}")
    return monitor, "min" if monitor == "val_loss" else mode


def _checkpoint_callback(config: ExperimentConfig, task: Task, out: Path) -> BestCheckpoint:
    """Keeps the best epoch by the task's main validation metric (or ``trainer.monitor``)."""
    monitor, mode = monitored_metric(config, task)
    return BestCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                          save_top_k=1, enable_version_counter=False)


def shard_order(config: ExperimentConfig, dataset: object) -> ShardOrder | None:
    """``data.pack_order: shards``: the order over the train split's shards (through an augmenting wrapper)."""
    if config.data.pack_order != "shards":
        return None
    sizes = getattr(getattr(dataset, "base", dataset), "shard_sizes", None)
    if sizes is None:
        raise ConfigError("data.pack_order shards orders a pack's shards: it needs data.pack")
    return ShardOrder(sizes, config.data.pack_window)


def _run_trainer(config: ExperimentConfig, data: PreparedData, module: FusionModule, checkpoint: ModelCheckpoint,
                 out: Path, resume_from: Path | None = None,
                 extra_callbacks: Sequence[L.Callback] = ()) -> tuple[L.Trainer, float]:
    collator = Collator(data.preprocessor, data.task)
    batch_size, workers = config.data.batch_size, config.data.num_workers
    train_loader = ResumableLoader(data.datasets["train"], collator, batch_size, True, workers, config.seed,
                                   shard_order(config, data.datasets["train"]))
    # LastCheckpoint after the best-model checkpoint: it saves the state that one has just updated.
    callbacks: list[L.Callback] = [
        checkpoint, LastCheckpoint(last_checkpoint(out), config.trainer.checkpoint_every_n_steps, config_json(config)),
        RandomState(), LoaderPosition(train_loader), NonFiniteGuard(config.trainer.on_nonfinite), StallDetector(),
        *extra_callbacks]
    if config.trainer.patience:
        callbacks.append(EarlyStopping(monitor=checkpoint.monitor or "val_loss", mode=checkpoint.mode,
                                       patience=config.trainer.patience, stopping_threshold=config.trainer.stop_at))
    elif config.trainer.stop_at is not None:
        callbacks.append(EarlyStopping(monitor=checkpoint.monitor or "val_loss", mode=checkpoint.mode,
                                       patience=config.trainer.max_epochs, stopping_threshold=config.trainer.stop_at))
    trainer_cfg = config.trainer
    trainer = L.Trainer(
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        precision="bf16-mixed" if trainer_cfg.precision == "bf16" else "32-true",
        callbacks=callbacks,
        logger=build_logger(trainer_cfg.logger, out, out.name),
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        gradient_clip_val=config.optim.gradient_clip,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # ResumableLoader shards by rank itself (see loader.py)
    )
    device = trainer.strategy.root_device
    if device.type == "cuda":  # the fast path's tensors go to the GPU once, not batch by batch
        for name in ("train", "val"):
            dataset = data.datasets[name]
            if isinstance(dataset, ArrayDataset):
                dataset.to(device)
    val_loader = ResumableLoader(data.datasets["val"], collator, batch_size, False, workers, config.seed)
    started = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resume_from,
                    weights_only=True)
    finally:
        train_loader.close()
        val_loader.close()
    return trainer, time.perf_counter() - started


def write_run_files(config: ExperimentConfig, result: TrainResult) -> None:
    """The resolved config and the metrics, so a run folder documents itself; metrics.json comes last.

    ``trainer.overwrite`` is left out: re-running a saved config must not replace a run silently.
    """
    resolved = config.model_dump(mode="json", exclude={"trainer": {"overwrite"}})
    write_text_atomic(result.output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    summary = {
        "val": result.val_metrics, "test": result.test_metrics, "train_seconds": round(result.train_seconds, 2),
        "params": result.params, "epochs": result.epochs, "skipped": result.skipped,
        "nonfinite_skipped": result.nonfinite_skipped, "threads": result.threads,
    }
    write_text_atomic(result.output_dir / "metrics.json", json.dumps(summary, indent=2))


def train(config: ExperimentConfig, resume: bool = False) -> TrainResult:
    """The whole training job for one config (a finished run in the way, or nothing to resume, stops it
    before the data work)."""
    check_output_dir(config, resume)
    with run_folder_lock(config), thread_policy(config.trainer.threads, config.data.num_workers), \
            raise_on_signals():
        check_output_dir(config, resume)  # again under the lock: a run that finished meanwhile is not overwritten
        return fit(config, prepare_data(config), resume=resume)
