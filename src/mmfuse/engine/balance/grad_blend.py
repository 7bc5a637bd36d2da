"""Gradient-Blending: per-modality and fused losses weighted by how well each one generalises.

Wang, Tran & Feiszli, "What Makes Training Multi-modal Classification Networks Hard?", CVPR 2020.
A multi-modal network overfits faster than its best uni-modal part, and the modalities overfit and
generalise at different rates. Gradient-Blending trains one head per modality plus the fused head
and mixes their losses with weights that favour heads which generalise without overfitting.

Equations (paper section 3.2-3.3; k runs over the M modality heads and the fused head):

* loss:              L = sum_k w_k L_k
* overfitting:       O_N = L^V_N - L^T_N           (validation minus training loss at epoch N)
* over a window of n epochs from the anchor epoch N:
  generalisation     dG_k = L^V_{k,N} - L^V_{k,N+n}
  overfitting        dO_k = O_{k,N+n} - O_{k,N}
* weights:           w_k = (dG_k / dO_k^2) / Z,   Z = sum_j dG_j / dO_j^2

The paper's online variant re-estimates the weights every super-epoch of ``n`` epochs from that
window; ``every_n_epochs`` is n. Choices, stated:

* L^T is the mean training loss of the window's last epoch, measured on the training batches as
  they were trained (train mode), and L^V the mean loss on our validation split (the paper holds
  out part of the training set for V; our validation split is exactly such a held-out set).
* The first anchor is the end of the first epoch (we have no losses before training starts); until
  the first window closes the weights are uniform, 1 / (M + 1).
* dG_k <= 0 (the head did not generalise better over the window) gives w_k = 0 rather than the
  negative weight the formula would; dO_k^2 is floored at ``eps``. When no head generalised in a
  window the weights stay as they were.
* A per-modality loss is computed on the samples that have that modality; a head with no such
  sample in a split gets no estimate for the window (weight 0 for it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfuse.config.balance import GradBlendOptions
from mmfuse.core.contracts import Features
from mmfuse.engine.balance.base import (
    BalanceMethod,
    BalanceStep,
    fused_outputs,
    head_task,
    modality_heads,
    reduce_across_ranks,
)
from mmfuse.model import MultimodalModel

FUSED = "fused"


def blend_weights(anchor_train: list[float], anchor_val: list[float], train: list[float], val: list[float],
                  eps: float = 1e-8) -> list[float] | None:
    """w_k = max(dG_k, 0) / max(dO_k^2, eps), normalised; None when no head generalised.

    Each list holds one mean loss per head (the same order in all four); ``anchor_*`` at the start
    of the window, the others at its end. A NaN (no data for that head) gives that head weight 0.
    """
    raw = []
    for t0, v0, t1, v1 in zip(anchor_train, anchor_val, train, val, strict=True):
        d_g = v0 - v1
        d_o = (v1 - t1) - (v0 - t0)
        if not (d_g == d_g and d_o == d_o) or d_g <= 0:  # NaN check without math.isnan on four values
            raw.append(0.0)
            continue
        raw.append(d_g / max(d_o * d_o, eps))
    total = sum(raw)
    if total <= 0:
        return None
    return [r / total for r in raw]


class GradBlend(BalanceMethod):
    name = "grad_blend"
    uses_validation = True
    weights: Tensor
    anchor: Tensor
    anchor_epoch: Tensor
    _train_sums: Tensor
    _val_sums: Tensor

    def __init__(self, model: MultimodalModel, options: GradBlendOptions) -> None:
        super().__init__()
        self.task = head_task(model, self.name)
        self.options = options
        self.heads = modality_heads(model, self.task.num_outputs)
        self.keys = [*sorted(self.heads), FUSED]
        k = len(self.keys)
        # Buffers: the weights and the window's anchor travel with the checkpoint (resume).
        self.register_buffer("weights", torch.full((k,), 1.0 / k))
        self.register_buffer("anchor", torch.full((2, k), float("nan")))  # rows: train, val
        self.register_buffer("anchor_epoch", torch.tensor(-1))
        self.register_buffer("_train_sums", torch.zeros(2, k))  # rows: sum, count
        self.register_buffer("_val_sums", torch.zeros(2, k))

    def _losses(self, model: MultimodalModel, features: dict[str, Features], target: Tensor) -> list[Tensor | None]:
        """One loss per key (None where no sample of the batch has that modality)."""
        losses: list[Tensor | None] = []
        for m in sorted(self.heads):
            present = features[m].present
            losses.append(self.task.loss(self.heads[m](features[m].pooled[present]), target[present])
                          if bool(present.any()) else None)
        losses.append(self.task.loss(fused_outputs(model, features), target))
        return losses

    @staticmethod
    def _accumulate(sums: Tensor, losses: list[Tensor | None], counts: list[int]) -> None:
        for i, (loss, n) in enumerate(zip(losses, counts, strict=True)):
            if loss is not None and n:
                sums[0, i] += float(loss.detach()) * n
                sums[1, i] += n

    def _counts(self, features: dict[str, Features], target: Tensor) -> list[int]:
        return [int(features[m].present.sum()) for m in sorted(self.heads)] + [len(target)]

    def training_loss(self, model: MultimodalModel, features: dict[str, Features], target: Tensor,
                      epoch: int) -> BalanceStep:
        losses = self._losses(model, features, target)
        self._accumulate(self._train_sums, losses, self._counts(features, target))
        weights = self.weights.tolist()
        total = sum((w * loss for w, loss in zip(weights, losses, strict=True) if loss is not None),
                    torch.zeros((), device=target.device))
        logs = {f"balance_w_{key}": w for key, w in zip(self.keys, weights, strict=True)}
        return BalanceStep(total, logs)

    def validation_step(self, model: MultimodalModel, features: dict[str, Features], target: Tensor) -> None:
        self._accumulate(self._val_sums, self._losses(model, features, target), self._counts(features, target))

    @staticmethod
    def _means(sums: Tensor) -> list[float]:
        return [float(s / n) if n > 0 else float("nan") for s, n in zip(sums[0], sums[1], strict=True)]

    def on_validation_epoch_end(self, epoch: int) -> dict[str, float]:
        """Closes a window every ``every_n_epochs`` epochs and re-estimates the weights from it."""
        train = self._means(reduce_across_ranks(self._train_sums))  # every process: the same weights
        val = self._means(reduce_across_ranks(self._val_sums))
        self._train_sums.zero_()
        self._val_sums.zero_()
        if int(self.anchor_epoch) < 0:
            self._set_anchor(train, val, epoch)
            return {}
        if epoch - int(self.anchor_epoch) < self.options.every_n_epochs:
            return {}
        weights = blend_weights(self.anchor[0].tolist(), self.anchor[1].tolist(), train, val, self.options.eps)
        if weights is not None:
            self.weights.copy_(torch.tensor(weights, dtype=self.weights.dtype))
        self._set_anchor(train, val, epoch)
        return {f"balance_w_{key}": w for key, w in zip(self.keys, self.weights.tolist(), strict=True)}

    def _set_anchor(self, train: list[float], val: list[float], epoch: int) -> None:
        self.anchor.copy_(torch.tensor([train, val], dtype=self.anchor.dtype))
        self.anchor_epoch.fill_(epoch)
