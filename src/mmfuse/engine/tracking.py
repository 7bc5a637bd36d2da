"""Experiment tracking through Lightning's loggers: ``trainer.logger: csv | tensorboard | mlflow | wandb``.

Every logger writes inside the run folder unless its own environment says otherwise, and none
needs a network: MLflow logs to ``RUN/mlruns`` (a file store) unless ``MLFLOW_TRACKING_URI`` is
set; Weights & Biases runs offline (``wandb sync`` uploads later) unless ``WANDB_MODE=online``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger

from mmfuse.core.errors import ConfigError

_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def build_logger(kind: str, out: Path, run_name: str) -> Logger:
    """The logger ``kind`` writing under ``out``; a missing package is a ConfigError naming the extra."""
    packages = _PACKAGES.get(kind, ())
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"trainer.logger '{kind}' needs the {packages[0]} package: "
                          f"pip install 'mmfuse[tracking]' (or pip install {packages[0]})")
    if kind == "csv":
        return CSVLogger(out, name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out, name="logs", version="", default_hp_metric=False)
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        return MLFlowLogger(experiment_name="mmfuse", run_name=run_name, tracking_uri=uri)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE", "offline") == "online"
        return WandbLogger(name=run_name, save_dir=str(out), project="mmfuse", offline=not online)
    raise ConfigError(f"trainer.logger '{kind}' is not one of csv, tensorboard, mlflow, wandb")
