"""``checkpoints/last.ckpt``: the state ``mmfuse train --resume`` continues from.

Written at the end of every epoch and, with ``trainer.checkpoint_every_n_steps: N``, after every N
optimizer steps; and once more when a SIGTERM or Ctrl-C asks the run to stop (see ``interrupts``),
after which the run ends with ``SignalInterrupt``.

Where it is written matters as much as what it holds:

* It is a ``Checkpoint`` callback, so Lightning runs it after every other callback of a hook: at an
  epoch end the best-model checkpoint and early stopping have already taken this epoch's validation
  into their state, which the file then holds, so a resumed run selects the same best model.
* Step checkpoints are written at optimizer-step boundaries only (never between accumulated
  batches, whose gradients no checkpoint holds) and never after an epoch's last batch: validation
  has not run yet there, and Lightning resuming from that point would skip it.
* Early stopping's decision (``trainer.should_stop``) is not part of Lightning's checkpoint; a run
  killed after it fired would train an extra epoch on resume, so it is saved here.

The resolved config travels in the file too, so ``--resume`` with a different config is refused.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from mmfuse.engine.interrupts import SignalInterrupt, StopRequest


class LastCheckpoint(Checkpoint):
    """Writes ``path`` at epoch ends, every ``every_n_steps`` optimizer steps and when asked to stop."""

    def __init__(self, path: Path, every_n_steps: int | None, config: str) -> None:
        self.path, self.every_n_steps, self.config = path, every_n_steps, config
        self.stop = StopRequest()
        self._step_at_batch_start = -1
        self._should_stop = False
        self._resumed_should_stop = False

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, "should_stop": self._should_stop}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_should_stop = bool(state_dict.get("should_stop", False))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop.install()  # over Lightning's SIGTERM handler, which stops inside validation too
        if trainer.received_sigterm:  # it came while Lightning's handler was still the one installed
            self.stop.signum = signal.SIGTERM
        if self._resumed_should_stop:
            trainer.should_stop = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:  # gradients accumulate: no step boundary
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # the epoch end comes after validation
            return
        stop = self._stop_requested(trainer)
        if stop or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self._save(trainer)
        if stop:
            self._raise(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
        if self._stop_requested(trainer):
            self._raise(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.stop.restore()

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        # Every process must stop at the same step (they all take part in saving).
        return bool(trainer.strategy.reduce_boolean_decision(self.stop.signum is not None, all=False))

    def _save(self, trainer: L.Trainer) -> None:
        self._should_stop = trainer.should_stop
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, not only the weights

    def _raise(self, trainer: L.Trainer) -> None:
        self.stop.restore()
        raise SignalInterrupt(self.stop.signum or signal.SIGTERM, checkpoint=self.path,
                              epoch=trainer.current_epoch, step=trainer.global_step)
