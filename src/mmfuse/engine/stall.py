"""Stall detection: a run whose validation predictions say nothing about the inputs, said once.

Why: on tasks where each modality alone is at chance (the label lives in an interaction of
modalities, as in AV-MNIST arithmetic), plain fusion can sit at chance for a whole budget while
the loss looks "converged" (issue 16): the network predicts the label prior. Nothing fails, so
without a word the user learns it from the final table, after the budget is spent. This callback
watches each validation epoch of a classification run and, after ``patience`` stalled epochs in a
row, logs one warning that names the options that help.

An epoch is stalled when

* every validation prediction is the same class, or
* the validation cross-entropy is not below the entropy of the validation label distribution by
  more than ``tolerance`` (relative; ln 2 for balanced binary labels: the loss of always predicting
  the prior) **and** the accuracy is within ``margin`` of the majority-class rate. A loss *above* the
  prior counts too: a model that fits noise in the training set (late fusion on an interaction
  label does) is no better off than one predicting the prior.

The model's outputs are read from a forward hook on its head during the validation the Trainer
runs anyway (no extra forward pass); the label distribution from the validation targets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from mmfuse.model import MultimodalModel
from mmfuse.tasks.classification import ClassificationTask

log = logging.getLogger(__name__)

REMEDIES = ("trainer.unimodal_loss_weight: 1.0 (a head per modality keeps every encoder learning), "
            "trainer.balance: ogm_ge | grad_blend | agm (modality-imbalance remedies), "
            "trainer.modality_dropout: 0.3, a lower optim.lr or optim.warmup_steps, a longer budget (more "
            "trainer.max_epochs, a larger or null trainer.patience: a plateau at chance can last many epochs), "
            "encoders.<modality>.init_from: a saved model folder (warm-start an encoder, e.g. after "
            "contrastive pre-alignment)")
"""The options that help a model stuck at chance, named by the stall warning and the end-of-run summary."""


def remedies_for(model: MultimodalModel) -> str:
    """:data:`REMEDIES`, led by the one that matters first when ``model``'s fusion is decision-level.

    Why: late fusion averages one vote per modality, so its score is a sum of per-modality terms and
    cannot represent a label that lives in an interaction of modalities (for a XOR b no sum
    u(a) + v(b) has the right sign in all four cases). No training option fixes that, so it is named first.
    """
    if model.fusion is None or not model.fusion.decision_level:
        return REMEDIES
    return (f"first, a feature-level fusion (fusion.name: concat, lmf or tfn): '{model.spec.fusion.name}' averages "
            f"one vote per modality, so it cannot represent a label that depends on how the modalities combine; "
            f"then {REMEDIES}")


@dataclass
class EpochStats:
    """One validation epoch, as the stall check sees it."""

    samples: int
    loss: float
    accuracy: float
    predicted_classes: int
    prior_entropy: float
    majority_rate: float


def epoch_stats(logits: Tensor, target: Tensor, num_classes: int) -> EpochStats:
    """Cross-entropy, accuracy and distinct predictions of (N, C) logits; entropy and majority rate
    of the (N,) targets' distribution."""
    counts = torch.bincount(target, minlength=num_classes).double()
    prior = counts / counts.sum()
    nonzero = prior[prior > 0]
    predictions = logits.argmax(-1)
    return EpochStats(
        samples=len(target), loss=float(F.cross_entropy(logits.double(), target)),
        accuracy=float((predictions == target).double().mean()),
        predicted_classes=int(predictions.unique().numel()),
        prior_entropy=float(-(nonzero * nonzero.log()).sum()), majority_rate=float(prior.max()))


def is_stalled(stats: EpochStats, tolerance: float = 0.05, margin: float = 0.02) -> bool:
    """One class for every sample, or a loss at (or above) the prior's entropy with accuracy at the
    majority rate."""
    if stats.samples == 0:
        return False
    if stats.predicted_classes == 1:
        return True
    not_below_prior = stats.loss >= stats.prior_entropy - tolerance * max(stats.prior_entropy, 1e-8)
    return not_below_prior and stats.accuracy <= stats.majority_rate + margin


class StallDetector(L.Callback):
    """Warns once when ``patience`` validation epochs in a row are stalled (classification only)."""

    def __init__(self, patience: int = 3, tolerance: float = 0.05, margin: float = 0.02) -> None:
        self.patience, self.tolerance, self.margin = patience, tolerance, margin
        self.streak = 0
        self.message: str | None = None
        self.last: EpochStats | None = None
        self._hook: Any = None
        self._batch_logits: Tensor | None = None
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "message": self.message}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streak, self.message = int(state_dict.get("streak", 0)), state_dict.get("message")

    @staticmethod
    def _task(pl_module: L.LightningModule) -> ClassificationTask | None:
        task = getattr(getattr(pl_module, "model", None), "task", None)
        return task if isinstance(task, ClassificationTask) else None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._logits, self._targets, self._batch_logits = [], [], None
        if self._task(pl_module) is None or trainer.sanity_checking:
            return

        def keep_first(module: torch.nn.Module, args: Any, output: Tensor) -> None:
            if self._batch_logits is None:  # a remedy may run the head again on the same batch
                self._batch_logits = output.detach().float().cpu()

        self._hook = pl_module.model.head.register_forward_hook(keep_first)  # type: ignore[union-attr]

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, self._batch_logits = self._batch_logits, None
        target = getattr(batch, "target", None)
        if logits is not None and target is not None and len(logits) == len(target):
            self._logits.append(logits)
            self._targets.append(target.detach().cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        task = self._task(pl_module)
        if task is None or not self._logits or trainer.sanity_checking:
            return
        self.last = epoch_stats(torch.cat(self._logits), torch.cat(self._targets), task.num_outputs)
        self._logits, self._targets = [], []
        self.streak = self.streak + 1 if is_stalled(self.last, self.tolerance, self.margin) else 0
        if self.streak >= self.patience and self.message is None and trainer.is_global_zero:
            model = getattr(pl_module, "model", None)
            remedies = remedies_for(model) if isinstance(model, MultimodalModel) else REMEDIES
            self.message = stall_message(self.last, self.streak, remedies)
            log.warning("%s", self.message)


def stall_message(stats: EpochStats, epochs: int, remedies: str = REMEDIES) -> str:
    """The one-line warning: what was seen, and what to try."""
    if stats.predicted_classes == 1:
        seen = "every validation prediction was the same class"
    else:
        seen = (f"the validation loss stayed at or above the label prior's entropy ({stats.loss:.3f} vs "
                f"{stats.prior_entropy:.3f}) with accuracy {stats.accuracy:.3f} at the majority rate "
                f"{stats.majority_rate:.3f}")
    return (f"training looks stalled: for {epochs} epochs {seen}, so far the model is not using its inputs "
            f"(when each modality alone says little, fusion can stay at chance). Options that help: {remedies}")


def near_chance_note(metrics: dict[str, float], stats: EpochStats | None, samples: int,
                     points: float = 0.03, remedies: str = REMEDIES) -> str | None:
    """A note when the final accuracy on ``samples`` samples is within ``points`` of the majority-class
    rate (chance for this label distribution), or within two standard errors of it (a small test set
    cannot tell more); None when it is clearly above, or when that rate is unknown."""
    accuracy = metrics.get("accuracy")
    if stats is None or accuracy is None or not math.isfinite(accuracy) or samples <= 0:
        return None
    chance = stats.majority_rate
    margin = max(points, 2 * math.sqrt(chance * (1 - chance) / samples))
    if accuracy > chance + margin:
        return None
    return (f"accuracy {accuracy:.3f} is within {margin * 100:.0f} points of chance (the majority-class rate "
            f"{chance:.3f}; {samples} samples): the model predicts little more than the label prior. "
            f"Options that help: {remedies}")
