"""The common interface of the modality-imbalance remedies, and the pieces they share.

A remedy is an ``nn.Module`` owned by the training module (``FusionModule``), beside the model: its
parameters (per-modality heads) and state (running scores, loss weights) train and checkpoint with
the run, but a saved model (``save_pretrained``) holds none of it, so predictions are unchanged.

The training module calls, in Lightning's order:

* ``training_loss(model, features, target, epoch)`` in each training step, on the encoded batch:
  the loss to back-propagate (a remedy may add terms or re-weight them) and values to log;
* ``before_optimizer_step(model, epoch)`` once per optimizer step, after every accumulated
  backward and before gradient clipping: where gradient modulation scales encoder gradients;
* ``validation_step`` / ``on_validation_epoch_end`` for remedies that learn from validation loss.

Modalities are iterated in sorted order; a sample without a modality (``present`` False) never
counts towards that modality's statistics. In a distributed run the statistics are summed over the
processes before use (and random noise is drawn from the run seed and the step), so every process
changes its gradients identically and the replicas stay equal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.encoders.base import Encoder
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import HeadTask
from mmfuse.tasks.classification import ClassificationTask


@dataclass
class BalanceStep:
    """What one training step of a remedy returns: the loss and scalars to log (``train_<name>``)."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class BalanceMethod(nn.Module, ABC):
    """Base of the remedies: each computes its own training loss; the other hooks default to nothing."""

    name: ClassVar[str] = ""
    uses_validation: ClassVar[bool] = False
    """True when ``validation_step`` needs the encoded validation batches (they cost an extra encode)."""

    @abstractmethod
    def training_loss(self, model: MultimodalModel, features: dict[str, Features], target: Tensor,
                      epoch: int) -> BalanceStep:
        """The step's loss (fused, and whatever per-modality terms the remedy adds) and values to log."""

    def before_optimizer_step(self, model: MultimodalModel, epoch: int, step: int = 0) -> dict[str, float]:
        """Changes the accumulated gradients of optimizer step ``step``; returns values to log."""
        return {}

    def validation_step(self, model: MultimodalModel, features: dict[str, Features], target: Tensor) -> None:
        return None

    def on_validation_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}


def head_task(model: MultimodalModel, method: str, classification_only: bool = False) -> HeadTask:
    """The model's task, if remedy ``method`` can work with it; else a ``ConfigError`` saying why."""
    task = model.task
    if model.fusion is None or not isinstance(task, HeadTask):
        raise ConfigError(f"trainer.balance '{method}' needs a task with a prediction head (classification, "
                          f"multilabel, regression); '{task.name}' has none")
    if classification_only and not isinstance(task, ClassificationTask):
        raise ConfigError(f"trainer.balance '{method}' reads the softmax score of the true class and needs "
                          f"task classification, not '{task.name}'")
    return task


def modality_heads(model: MultimodalModel, num_outputs: int) -> nn.ModuleDict:
    """One linear head per modality on its pooled features: (B, D_m) -> (B, num_outputs)."""
    heads = {}
    for m in model.modalities:
        encoder = model.encoders[m]
        assert isinstance(encoder, Encoder)
        heads[m] = nn.Linear(encoder.out_dim, num_outputs)
    return nn.ModuleDict(heads)


def fused_outputs(model: MultimodalModel, features: dict[str, Features]) -> Tensor:
    """(B, num_outputs): the model's own fusion + head on already-encoded features."""
    assert model.fusion is not None
    return model.head(model.fusion(features))


def encoder_parameters(model: MultimodalModel, modality: str) -> Iterable[nn.Parameter]:
    """The encoder's parameters that received a gradient in this step."""
    return (p for p in model.encoders[modality].parameters() if p.grad is not None)


def scale_encoder_gradients(model: MultimodalModel, coefficients: dict[str, float], noise: bool = False,
                            generator: torch.Generator | None = None) -> None:
    """grad <- k_m * grad (+ N(0, std(grad)) when ``noise``) for every parameter of encoder m.

    The noise std is the std of the unmodulated gradient of that tensor, as in OGM-GE's released
    code; a one-element tensor has no std and gets no noise.
    """
    for m, k in sorted(coefficients.items()):
        for p in encoder_parameters(model, m):
            grad = p.grad
            assert grad is not None
            std = float(grad.std()) if noise and grad.numel() > 1 else 0.0
            grad.mul_(k)
            if std > 0:
                grad.add_(torch.randn(grad.shape, generator=generator, device="cpu", dtype=grad.dtype)
                          .to(grad.device) * std)


def reduce_across_ranks(values: Tensor) -> Tensor:
    """The sum of ``values`` over every process of a distributed run (itself otherwise).

    Gradient modulation must use the same coefficients in every process: DDP has already averaged
    the gradients, and ranks that scaled them differently would hold different weights after the
    step. So per-rank score sums and counts are added up before the coefficients are computed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def step_means(sums: dict[str, float], counts: dict[str, int], modalities: list[str],
               device: torch.device) -> dict[str, float]:
    """Per-modality mean of this optimizer step's scores over every rank; modalities with no sample left out."""
    totals = reduce_across_ranks(torch.tensor([[sums.get(m, 0.0) for m in modalities],
                                               [float(counts.get(m, 0)) for m in modalities]],
                                              dtype=torch.float64 if device.type == "cpu" else torch.float32,
                                              device=device))
    return {m: float(totals[0, i] / totals[1, i]) for i, m in enumerate(modalities) if float(totals[1, i]) > 0}


def others_mean(values: dict[str, float], modality: str) -> float:
    """Mean of the other modalities' values (the one other value when there are two)."""
    rest = [v for m, v in values.items() if m != modality]
    return sum(rest) / len(rest)
