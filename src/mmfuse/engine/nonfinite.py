"""A NaN or inf loss or gradient stops the run naming the step and the samples, or that step is skipped.

Without a check, one overflowing sample (a target in the wrong unit, a corrupt feature row) turns
every weight into NaN and the run carries on for hours, ending in a model that predicts NaN.

The decision is taken just before the optimizer step, after backward (and, with several
processes, after the gradients were averaged, so every process sees the same gradients): the step
is bad when its loss or any gradient is not finite, on any process. ``raise`` stops with a
``NonFiniteError`` naming the global step and the ids of the samples in the batch; ``skip`` drops
the gradients so the optimizer leaves every parameter and its own state alone, and counts the step.
The learning-rate schedule still advances, as it would after a step skipped by a gradient scaler.
The count and the first skipped step travel in checkpoints, so a resumed run reports the whole run's.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from mmfuse.core.errors import MMFuseError

SHOWN_IDS = 10


class NonFiniteError(MMFuseError):
    """The loss or a gradient became NaN or inf (``trainer.on_nonfinite: raise``)."""


def _ids_text(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > SHOWN_IDS else shown


class NonFiniteGuard(L.Callback):
    """Checks every optimizer step (``trainer.on_nonfinite``: 'raise' or 'skip')."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.skipped = 0
        self.first: dict[str, Any] | None = None
        """The first skipped step: {"step", "epoch", "ids"}."""
        self._ids: list[str] = []
        self._losses: list[torch.Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "first": self.first}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.first = int(state_dict.get("skipped", 0)), state_dict.get("first")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._ids.extend(getattr(batch, "ids", []))  # with accumulation, one step spans several batches

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        ids, losses = self._ids, self._losses
        self._ids, self._losses = [], []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        values = [loss.float().reshape(()) for loss in losses]
        if grads:  # the largest |gradient| is inf or NaN exactly when some gradient is
            values.append(torch.nn.utils.get_total_norm(grads, norm_type=math.inf).float())
        device = values[0].device if values else None
        local_bad = bool(values) and not bool(torch.isfinite(torch.stack([v.to(device) for v in values])).all())
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            return
        loss = sum(float(v) for v in values[:len(losses)]) if losses else math.nan
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient (the loss was {loss:.4g})"
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        batch = f"the batch holds samples {_ids_text(ids)}" if local_bad else "in another process's batch"
        if self.mode == "raise":
            raise NonFiniteError(
                f"non-finite {what} at {where}; {batch}. Check those samples' inputs and targets, lower "
                "optim.lr or set optim.gradient_clip; trainer.on_nonfinite: skip leaves such steps out instead")
        optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer skips every parameter
        self.skipped += 1
        if self.first is None:
            self.first = {"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": ids[:SHOWN_IDS],
                          "what": what}

    def summary(self) -> str | None:
        """One line about the skipped steps, or None when there were none."""
        if not self.skipped:
            return None
        first = self.first or {}
        return (f"skipped {self.skipped} optimizer step(s) with a non-finite loss or gradient "
                f"(trainer.on_nonfinite=skip); the first at global step {first.get('step')}, "
                f"non-finite {first.get('what')}, batch with samples {_ids_text(list(first.get('ids', [])))}")
