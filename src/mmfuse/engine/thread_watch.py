"""The Lightning side of ``mmfuse.core.threads.ThreadWatch``: the thread count moves only between
steps, in the thread that runs them (OpenMP's setting belongs to the calling thread)."""

from __future__ import annotations

from typing import Any

import lightning as L

from mmfuse.core.threads import ThreadWatch


class ThreadWatchCallback(L.Callback):
    def __init__(self, watch: ThreadWatch) -> None:
        self.watch = watch

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.watch.apply()

    def on_validation_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self.watch.apply()
