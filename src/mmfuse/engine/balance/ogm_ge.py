"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang & Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022. When one modality learns faster it dominates the fused loss and the others stop
receiving useful gradient; OGM-GE slows the dominant encoder down in proportion to how far ahead
it is, and adds gradient noise to keep the generalisation that plain slowing down costs.

Equations (paper section 3.2-3.3, for the batch B_t of step t; we follow the notation):

* uni-modal score of modality m:   s_m = sum_{i in B_t} softmax(f_m(x_i))[y_i]
* discrepancy ratio:               rho_m = s_m / s_other      (two modalities: rho_a = s_a / s_v)
* coefficient:                     k_m = 1 - tanh(alpha * relu(rho_m - 1))
  (so k = 1 for every modality that is not ahead; only the dominant one is slowed)
* modulated update of encoder m:   g_m <- k_m * g_m
* Generalization Enhancement:      g_m <- k_m * g_m + N(0, std(g_m)^2)   (every modulated encoder)

Choices our generic fusion forces, stated:

* ``f_m``, the uni-modal output. The paper reads it from the slice of a linear fused classifier
  that multiplies modality m's features (W_m phi_m + b/2). Our fusions mix modalities non-linearly
  (concat has an MLP after the concatenation), so no such slice exists. Instead each modality gets
  a linear *probe* head on its pooled features, trained with its own cross-entropy on
  **detached** features: the probes measure how much each encoder's current features say about
  the label, and they send no gradient to the encoders, so the only effect of the remedy on the
  encoders is the modulation itself.
* More than two modalities: ``s_other`` is the mean score of the other modalities (for two it is
  exactly the paper's ratio). With missing modalities each s_m is a mean over the samples that
  have m (a sum would favour the more often present modality), which for complete batches gives
  the same ratio as the paper's sums.
* The coefficient is computed over every micro-batch of one optimizer step (gradient
  accumulation) and applied once, to the accumulated gradient, before clipping.
* Noise is added to every parameter tensor of the encoders (the released code adds it to the
  4-D conv weights of its ResNets only); ``noise: false`` gives plain OGM.
* ``start_epoch``/``end_epoch`` are the paper's modulation window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfuse.config.balance import OGMGEOptions
from mmfuse.core.contracts import Features
from mmfuse.engine.balance.base import (
    BalanceMethod,
    BalanceStep,
    fused_outputs,
    head_task,
    modality_heads,
    others_mean,
    scale_encoder_gradients,
    step_means,
)
from mmfuse.model import MultimodalModel


def ogm_coefficients(scores: dict[str, float], alpha: float) -> dict[str, float]:
    """k_m = 1 - tanh(alpha * relu(rho_m - 1)), rho_m = s_m / mean of the other modalities' s.

    Fewer than two modalities with a score (a step where only one was present): all 1.
    """
    if len(scores) < 2:
        return dict.fromkeys(scores, 1.0)
    coefficients = {}
    for m, s in sorted(scores.items()):
        other = others_mean(scores, m)
        rho = s / other if other > 0 else math.inf
        coefficients[m] = 1.0 - math.tanh(alpha * max(rho - 1.0, 0.0))
    return coefficients


class OGMGE(BalanceMethod):
    name = "ogm_ge"

    def __init__(self, model: MultimodalModel, options: OGMGEOptions) -> None:
        super().__init__()
        self.task = head_task(model, self.name, classification_only=True)
        self.options = options
        self.probes = modality_heads(model, self.task.num_outputs)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.last_coefficients: dict[str, float] = {}
        self._noise_seed = torch.initial_seed() % 2**62

    def training_loss(self, model: MultimodalModel, features: dict[str, Features], target: Tensor,
                      epoch: int) -> BalanceStep:
        loss = self.task.loss(fused_outputs(model, features), target)
        probe_losses = []
        for m in sorted(self.probes):
            present = features[m].present
            if not bool(present.any()):
                continue
            logits = self.probes[m](features[m].pooled[present].detach())
            probe_losses.append(F.cross_entropy(logits.float(), target[present]))
            with torch.no_grad():
                true_class = logits.float().softmax(-1).gather(1, target[present].unsqueeze(1))
            self._sums[m] = self._sums.get(m, 0.0) + float(true_class.sum())
            self._counts[m] = self._counts.get(m, 0) + int(present.sum())
        probe_loss = sum(probe_losses[1:], probe_losses[0]) if probe_losses else loss.new_zeros(())
        return BalanceStep(loss + probe_loss, {"balance_probe_loss": float(probe_loss.detach())})

    def step_scores(self) -> dict[str, float]:
        """Mean softmax score of the true class per modality over this optimizer step's micro-batches
        (and over every process of a distributed run)."""
        device = next(self.probes.parameters()).device
        return step_means(self._sums, self._counts, sorted(self.probes), device)

    def before_optimizer_step(self, model: MultimodalModel, epoch: int, step: int = 0) -> dict[str, float]:
        scores = self.step_scores()
        self._sums, self._counts = {}, {}
        opts = self.options
        if epoch < opts.start_epoch or (opts.end_epoch is not None and epoch > opts.end_epoch):
            return {}
        coefficients = ogm_coefficients(scores, opts.alpha)
        self.last_coefficients = coefficients
        # The noise comes from (run seed, step): every process of a distributed run draws the same.
        generator = torch.Generator().manual_seed(self._noise_seed + step) if opts.noise else None
        scale_encoder_gradients(model, coefficients, noise=opts.noise, generator=generator)
        return {f"balance_k_{m}": k for m, k in coefficients.items()}
