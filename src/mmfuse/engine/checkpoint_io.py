"""Checkpoint files that are complete or absent, and that are read without running pickled code.

Lightning writes a checkpoint through an fsspec transaction: a temporary file in the system temp
folder, then ``shutil.move``, which is a copy when that folder is on another file system, so a kill
during the copy leaves a truncated ``last.ckpt`` that a resume would then try to load (and an
orphan in /tmp). Here the bytes go to a temporary file beside the checkpoint, are flushed to disk
and renamed over it (``mmfuse.core.atomic``): a kill at any moment leaves the previous checkpoint.

Every checkpoint is read with ``weights_only=True``: mmfuse's checkpoints hold tensors, numbers,
strings and containers only (the RNG states are stored as tensors for that reason), so nothing in
them needs unpickling of arbitrary objects, and a tampered file cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmfuse.core.atomic import atomic_file


def read_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, memory-mapped (cheap to look into), never unpickling objects."""
    loaded: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    return loaded


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically and reads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_file(Path(path)) as tmp, tmp.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint

    def load_checkpoint(self, path: _PATH, map_location: Callable[..., Any] | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("mmfuse reads checkpoints with weights_only=True only")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        loaded: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
        return loaded
