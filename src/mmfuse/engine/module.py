"""The LightningModule: research code (loss, metrics, optimiser) around a ``MultimodalModel``."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mmfuse.config import OptimConfig
from mmfuse.core.contracts import Batch
from mmfuse.core.logs import logger_levels
from mmfuse.core.masking import drop_modalities
from mmfuse.engine.auxiliary import UnimodalHeads
from mmfuse.engine.balance import BalanceMethod
from mmfuse.engine.schedule import build_scheduler
from mmfuse.model import MultimodalModel


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
                 unimodal_loss_weight: float = 0.0, balance: BalanceMethod | None = None) -> None:
        """``balance``: a modality-imbalance remedy (``trainer.balance``, see engine/balance)."""
        super().__init__()
        self.model = model
        self.optim = optim
        self.modality_dropout = modality_dropout
        self.unimodal_loss_weight = unimodal_loss_weight
        self.unimodal_heads = UnimodalHeads(model) if unimodal_loss_weight > 0 else None
        self.balance = balance
        self.val_metrics = model.task.metrics().clone(prefix="val_")

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        batch = Batch(batch.inputs, drop_modalities(batch.present, self.modality_dropout), batch.target, batch.ids)
        if self.balance is not None:
            loss = self._balanced_loss(batch)
        elif self.unimodal_heads is None:
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

    def _balanced_loss(self, batch: Batch) -> Tensor:
        """The remedy's loss on the encoded batch (plus the unimodal auxiliary loss when that is on too)."""
        assert self.balance is not None and batch.target is not None
        features = self.model.encode(batch)
        step = self.balance.training_loss(self.model, features, batch.target, self.current_epoch)
        loss = step.loss
        if self.unimodal_heads is not None:
            unimodal = self.unimodal_heads.loss(features, batch.target)
            self.log("train_unimodal_loss", unimodal, batch_size=batch.size)
            loss = loss + self.unimodal_loss_weight * unimodal
        for name, value in step.logs.items():
            self.log(f"train_{name}", value, batch_size=batch.size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.balance is not None:
            logs = self.balance.before_optimizer_step(self.model, self.current_epoch, self.global_step)
            for name, value in logs.items():
                self.log(f"train_{name}", value)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss = self.model.task.eval_step(self.model, batch, self.val_metrics)
        if self.balance is not None and self.balance.uses_validation and batch.target is not None:
            self.balance.validation_step(self.model, self.model.encode(batch), batch.target)
        # Synced so every rank monitors the same value: early stopping must stop all ranks together.
        self.log("val_loss", loss, prog_bar=True, batch_size=batch.size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if self.balance is not None and not self.trainer.sanity_checking:
            for name, value in self.balance.on_validation_epoch_end(self.current_epoch).items():
                self.log(f"val_{name}", value)

    def configure_optimizers(self) -> Any:
        params = parameter_groups(self.model, self.optim)
        if self.unimodal_heads is not None:
            params.append({"params": list(self.unimodal_heads.parameters()), "lr": self.optim.lr,
                           "name": "unimodal_heads"})
        if self.balance is not None and any(True for _ in self.balance.parameters()):
            params.append({"params": list(self.balance.parameters()), "lr": self.optim.lr, "name": "balance"})
        cfg = self.optim
        optimizer: torch.optim.Optimizer
        if cfg.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.name == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
        if cfg.scheduler == "none" and cfg.warmup_steps == 0:
            return optimizer
        scheduler = build_scheduler(optimizer, cfg, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@contextlib.contextmanager
def lightning_output(verbose: bool) -> Iterator[None]:
    """Hides Lightning's info lines and library warnings unless ``trainer.verbose`` asks for them."""
    if verbose:
        yield
        return
    with warnings.catch_warnings(), logger_levels(("lightning.pytorch", "lightning.fabric"), logging.WARNING):
        warnings.simplefilter("ignore")
        yield
