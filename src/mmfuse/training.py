"""Training on PyTorch Lightning: research code in the LightningModule, engineering in the Trainer.

``train(config)`` is the whole job: data -> fitted preprocessing -> model -> Trainer.fit with
best-checkpoint selection and early stopping -> test metrics -> ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmfuse.auxiliary import UnimodalHeads
from mmfuse.config import ExperimentConfig, OptimConfig
from mmfuse.data.dataset import Collator, MultimodalDataset, SkipReport
from mmfuse.data.manifest import Record, read_manifest
from mmfuse.data.memory import ArrayDataset, ArrayLoader, cached_arrays
from mmfuse.data.preprocess import Preprocessor
from mmfuse.errors import ConfigError, DataError
from mmfuse.evaluation import evaluate
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS, Task
from mmfuse.types import Batch

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


# ---- data ---------------------------------------------------------------------------------------

def load_records(config: ExperimentConfig) -> dict[str, list[Record]]:
    """Records per split ('train', 'val', 'test'), from a split column or separate manifests."""
    data = config.data
    read = dict(modalities=data.modalities, id_column=data.id_column, target_column=data.target_column)
    if data.train is not None:
        splits = {"train": read_manifest(data.train, **read)}  # type: ignore[arg-type]
        for name, path in (("val", data.val), ("test", data.test)):
            if path is not None:
                splits[name] = read_manifest(path, **read)  # type: ignore[arg-type]
    else:
        if data.synthetic is not None:
            from mmfuse.data.synth import synthetic_dataset

            manifest = synthetic_dataset(data.synthetic)
        else:
            assert data.manifest is not None
            manifest = data.manifest
        splits = {}
        for record in read_manifest(manifest, split_column=data.split_column, **read):  # type: ignore[arg-type]
            split = SPLIT_NAMES.get((record.split or "").lower())
            if split is None:
                raise DataError(f"{record.where}: split '{record.split}' is not one of train/val/test")
            splits.setdefault(split, []).append(record)
    if not splits.get("train"):
        raise DataError("the data has no training samples")
    if "val" not in splits:
        if data.val_fraction <= 0:
            raise ConfigError("no validation data: give data.val, a 'val' split, or data.val_fraction > 0")
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_val = max(1, round(len(order) * data.val_fraction))
        train = splits["train"]
        splits["val"] = [train[i] for i in sorted(order[:n_val])]
        splits["train"] = [train[i] for i in sorted(order[n_val:])]
    return splits


@dataclass
class PreparedData:
    """Preprocessed datasets plus the fitted preprocessing they were built with."""

    preprocessor: Preprocessor
    task: Task
    datasets: dict[str, MultimodalDataset]

    @property
    def skipped(self) -> dict[str, SkipReport]:
        return {name: ds.report for name, ds in self.datasets.items() if ds.report.count}


def prepare_data(config: ExperimentConfig) -> PreparedData:
    """Reads the manifests, fits vocabulary and labels on train, preprocesses every split once."""
    splits = load_records(config)
    preprocessor = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio,
                                features=config.data.features)
    preprocessor.fit(splits["train"])
    task = TASKS.create(config.task.name, **config.task.options)
    fit_targets = [r.target for r in splits["train"]]
    try:
        task.fit([t for t in fit_targets if t is not None] if config.data.on_error == "skip" else fit_targets)
    except ValueError as exc:
        raise DataError(f"training targets (column '{config.data.target_column}'): {exc}") from None
    datasets = {name: split_dataset(config, records, preprocessor, task) for name, records in splits.items()}
    if len(datasets["train"]) == 0:
        raise DataError("every training sample was skipped; see the errors above")
    return PreparedData(preprocessor, task, datasets)


def split_dataset(config: ExperimentConfig, records: list[Record], preprocessor: Preprocessor,
                  task: Task) -> MultimodalDataset:
    """One split, preprocessed: per-sample (``MultimodalDataset``) or stacked tensors (``data.in_memory``)."""
    if config.data.in_memory:
        return cached_arrays(records, preprocessor, task, config.data.on_error, config.data.in_memory_cache)
    return MultimodalDataset(records, preprocessor, task, on_error=config.data.on_error)


def make_loader(dataset: MultimodalDataset, collator: Collator, batch_size: int, shuffle: bool,
                num_workers: int) -> DataLoader[Any] | ArrayLoader:
    """Batches of a split: slices of its tensors on the fast path, else a DataLoader over samples."""
    if isinstance(dataset, ArrayDataset):
        return ArrayLoader(dataset, batch_size, shuffle)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


# ---- model --------------------------------------------------------------------------------------

def drop_modalities(present: dict[str, Tensor], rate: float) -> dict[str, Tensor]:
    """Hides each present modality of each sample with probability ``rate`` (modality dropout).

    A sample never loses all of its modalities: if every one would be dropped, one of those it had,
    chosen at random, stays. Teaches the model to predict from any subset it may meet at test time.
    """
    if rate <= 0:
        return present
    names = sorted(present)
    original = torch.stack([present[m] for m in names], dim=1)
    kept = original & (torch.rand(original.shape, device=original.device) >= rate)
    rescue_scores = torch.rand(original.shape, device=original.device).masked_fill(~original, -1.0)
    rescued = nn.functional.one_hot(rescue_scores.argmax(dim=1), len(names)).bool() & original
    kept = torch.where(kept.any(dim=1, keepdim=True), kept, rescued)
    return {m: kept[:, i] for i, m in enumerate(names)}


def parameter_groups(model: MultimodalModel, optim: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: fusion + head at ``optim.lr``, encoders at ``optim.encoder_lr``.

    Pretrained encoders usually want a learning rate 10-100x smaller than the freshly initialised
    fusion and head; frozen parameters (requires_grad False) are left out of the optimizer entirely.
    """
    encoder_ids = {id(p) for p in model.encoders.parameters()}
    encoders = [p for p in model.encoders.parameters() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": optim.lr, "name": "fusion_head"}]
    if encoders:
        groups.append({"params": encoders, "lr": optim.encoder_lr or optim.lr, "name": "encoders"})
    return [g for g in groups if g["params"]]


class FusionModule(L.LightningModule):
    """Trains a ``MultimodalModel``; logs loss and the task's metrics per split."""

    def __init__(self, model: MultimodalModel, optim: OptimConfig, modality_dropout: float = 0.0,
                 unimodal_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.modality_dropout = modality_dropout
        self.unimodal_loss_weight = unimodal_loss_weight
        self.unimodal_heads = UnimodalHeads(model) if unimodal_loss_weight > 0 else None
        self.val_metrics = model.task.metrics().clone(prefix="val_")

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        batch = Batch(batch.inputs, drop_modalities(batch.present, self.modality_dropout), batch.target, batch.ids)
        if self.unimodal_heads is None:
            loss = self.model.task.step_loss(self.model, batch)
        else:
            loss = self._loss_with_unimodal_heads(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.size)
        return loss

    def _loss_with_unimodal_heads(self, batch: Batch) -> Tensor:
        """The fused loss plus ``unimodal_loss_weight`` x the mean per-modality head loss (see auxiliary.py)."""
        assert self.unimodal_heads is not None and batch.target is not None and self.model.fusion is not None
        features = self.model.encode(batch)
        fused = self.unimodal_heads.task.loss(self.model.head(self.model.fusion(features)), batch.target)
        unimodal = self.unimodal_heads.loss(features, batch.target)
        self.log("train_unimodal_loss", unimodal, batch_size=batch.size)
        return fused + self.unimodal_loss_weight * unimodal

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss = self.model.task.eval_step(self.model, batch, self.val_metrics)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch.size)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def configure_optimizers(self) -> Any:
        params = parameter_groups(self.model, self.optim)
        if self.unimodal_heads is not None:
            params.append({"params": list(self.unimodal_heads.parameters()), "lr": self.optim.lr,
                           "name": "unimodal_heads"})
        cfg = self.optim
        optimizer: torch.optim.Optimizer
        if cfg.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.name == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
        if cfg.scheduler == "none":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@contextlib.contextmanager
def lightning_output(verbose: bool) -> Iterator[None]:
    """Hides Lightning's info lines and library warnings unless ``trainer.verbose`` asks for them."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


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


def fit(config: ExperimentConfig, data: PreparedData, save: bool = True) -> TrainResult:
    """Trains one model on already-prepared data (the demo and benchmarks reuse one PreparedData)."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    if config.data.cache:  # frozen encoders' outputs from disk: the encoders never run while training
        from mmfuse.data.feature_cache import cache_datasets

        if model.task.raw_input_modalities:
            raise ConfigError(
                f"data.cache replaces the inputs with encoder outputs, but task '{model.task.name}' reconstructs "
                f"the inputs of {', '.join(model.task.raw_input_modalities)}; set task.input_targets: false "
                "or data.cache: false")

        cached, _ = cache_datasets(model, data.datasets, config.data.cache_dir,
                                   device=None if config.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
        data = dataclasses.replace(data, datasets=cached)
    module = FusionModule(model, config.optim, config.trainer.modality_dropout,
                          config.trainer.unimodal_loss_weight)
    out = Path(config.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint_callback(config, data.task, out)
    with lightning_output(config.trainer.verbose):
        trainer, train_seconds = _run_trainer(config, data, module, checkpoint, out)
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    model = module.model.cpu().eval()
    val_metrics = evaluate(model, data.datasets["val"])
    test_metrics = evaluate(model, data.datasets["test"]) if len(data.datasets.get("test", [])) else None
    model_dir = model.save_pretrained(out / "model") if save else None
    result = TrainResult(
        model=model, output_dir=out, model_dir=model_dir, val_metrics=val_metrics, test_metrics=test_metrics,
        train_seconds=train_seconds, params=count_parameters(model), epochs=trainer.current_epoch,
        skipped={name: report.count for name, report in data.skipped.items()},
    )
    if save:
        write_run_files(config, result)
    return result


def _checkpoint_callback(config: ExperimentConfig, task: Task, out: Path) -> ModelCheckpoint:
    """Keeps the best epoch by the task's main validation metric (or ``trainer.monitor``)."""
    metric, mode = task.monitor
    monitor = config.trainer.monitor or f"val_{metric}"
    valid = [f"val_{name}" for name in task.metrics().keys()] + ["val_loss"]  # noqa: SIM118
    if monitor not in valid:
        raise ConfigError(f"trainer.monitor '{monitor}' is not a validation metric; choose from {', '.join(valid)}")
    if monitor == "val_loss":
        mode = "min"
    return ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, enable_version_counter=False)


def _run_trainer(config: ExperimentConfig, data: PreparedData, module: FusionModule,
                 checkpoint: ModelCheckpoint, out: Path) -> tuple[L.Trainer, float]:
    callbacks: list[L.Callback] = [checkpoint]
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
        precision="bf16-mixed" if trainer_cfg.precision == "bf16" else "32-true",
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs", version=""),
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        gradient_clip_val=config.optim.gradient_clip,
        num_sanity_val_steps=0,
    )
    collator = Collator(data.preprocessor, data.task)
    batch_size, workers = config.data.batch_size, config.data.num_workers
    device = trainer.strategy.root_device
    if device.type == "cuda":  # the fast path's tensors go to the GPU once, not batch by batch
        for name in ("train", "val"):
            dataset = data.datasets[name]
            if isinstance(dataset, ArrayDataset):
                dataset.to(device)
    started = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=make_loader(data.datasets["train"], collator, batch_size, True, workers),
        val_dataloaders=make_loader(data.datasets["val"], collator, batch_size, False, workers),
    )
    return trainer, time.perf_counter() - started


def write_run_files(config: ExperimentConfig, result: TrainResult) -> None:
    """The resolved config and the metrics, so a run folder documents itself."""
    (result.output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    summary = {
        "val": result.val_metrics, "test": result.test_metrics, "train_seconds": round(result.train_seconds, 2),
        "params": result.params, "epochs": result.epochs, "skipped": result.skipped,
    }
    (result.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))


def train(config: ExperimentConfig) -> TrainResult:
    """The whole training job for one config."""
    return fit(config, prepare_data(config))
