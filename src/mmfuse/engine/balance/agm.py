"""AGM: Adaptive Gradient Modulation driven by Shapley mono-modal responses.

Li, Li, Hu, Lei, Li & Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. OGM-GE needs a fusion whose output splits into per-modality terms; AGM
works with any fusion: it measures each modality's contribution to the *fused* output by its
Shapley value, and modulates each encoder's gradient so that no modality's lead over the others
grows beyond its running average.

Equations (paper section 3; M the set of modalities, f(S) the fused logits when only the
modalities in S are given):

* mono-modal response (Shapley value):
      phi_m = sum_{S subset of M without m} |S|! (|M| - |S| - 1)! / |M|! * (f(S + {m}) - f(S))
  (two modalities: phi_a = ((f(a, v) - f(v)) + (f(a) - f({}))) / 2)
* mono-modal score, the cross-entropy of the response:  s_m = mean_i -log softmax(phi_m(x_i))[y_i]
* discrepancy ratio:      r_m = exp(s_other - s_m)          (> 1 when m is ahead: its loss is lower)
* target ratio from the running mean s*_m of s_m over the steps so far:
                          r*_m = exp(s*_other - s*_m)
* coefficient:            c_m = exp(alpha * min(r*_m - r_m, clip))    (clip = 7 in the authors' code)
* modulated update:       g_m <- c_m * g_m  for encoder m's gradients

so a modality that pulls ahead of its usual lead is slowed (c < 1) and one that falls behind is
sped up (c > 1). Choices, stated:

* "Only the modalities in S" is our ``present`` mask: a modality outside S is marked absent for
  every sample, which every fusion must honour (learned missing embeddings, masked attention);
  the authors zero the modality's features instead, which our fusions would treat as data. The
  2^|M| masked passes run fusion + head only (the encoders run once), without gradient and in
  eval mode (no dropout noise in the differences); ``max_modalities`` bounds their number.
* s_m is a mean over the samples that have m (the authors' code sums over the batch, which makes
  alpha depend on the batch size); "other" is the mean over the other modalities (for two it is
  the one other, as in the paper).
* The running mean s* is over the previous optimizer steps (s*_t = s*_{t-1} (t-1)/t + s_t / t, as
  in the authors' code); at the first step there is none and c = 1. Scores are gathered over
  every micro-batch of one optimizer step and the coefficient applied once before clipping.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfuse.config.balance import AGMOptions
from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.engine.balance.base import (
    BalanceMethod,
    BalanceStep,
    fused_outputs,
    head_task,
    others_mean,
    scale_encoder_gradients,
    step_means,
)
from mmfuse.model import MultimodalModel


def shapley_responses(outputs: dict[frozenset[str], Tensor], modalities: list[str]) -> dict[str, Tensor]:
    """phi_m for each modality from the outputs f(S) of every subset S of ``modalities``."""
    n = len(modalities)
    responses = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = torch.zeros_like(outputs[frozenset(modalities)])
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                total = total + weight * (outputs[s | {m}] - outputs[s])
        responses[m] = total
    return responses


def agm_coefficients(scores: dict[str, float], mean_scores: dict[str, float], alpha: float,
                     clip: float) -> dict[str, float]:
    """c_m = exp(alpha * min(r*_m - r_m, clip)), r_m = exp(s_other - s_m), r*_m = exp(s*_other - s*_m).

    Modalities without a running mean yet (or fewer than two scored): 1.
    """
    if len(scores) < 2 or any(m not in mean_scores for m in scores):
        return dict.fromkeys(scores, 1.0)
    coefficients = {}
    for m in sorted(scores):
        ratio = math.exp(others_mean(scores, m) - scores[m])
        target = math.exp(others_mean({k: mean_scores[k] for k in scores}, m) - mean_scores[m])
        coefficients[m] = math.exp(alpha * min(target - ratio, clip))
    return coefficients


def masked(features: dict[str, Features], keep: frozenset[str]) -> dict[str, Features]:
    """The features with every modality outside ``keep`` marked absent for every sample."""
    return {m: f if m in keep else Features(f.tokens, f.mask, f.pooled, torch.zeros_like(f.present))
            for m, f in features.items()}


class AGM(BalanceMethod):
    name = "agm"
    mean_scores: Tensor
    steps: Tensor

    def __init__(self, model: MultimodalModel, options: AGMOptions) -> None:
        super().__init__()
        self.task = head_task(model, self.name, classification_only=True)
        if len(model.modalities) > options.max_modalities:
            raise ConfigError(f"trainer.balance 'agm' computes 2^M masked passes; {len(model.modalities)} modalities "
                              f"exceed balance_options.max_modalities {options.max_modalities}")
        self.options = options
        self.modalities = list(model.modalities)
        # Running mean score per modality and its step count: buffers, so a resumed run continues them.
        self.register_buffer("mean_scores", torch.zeros(len(self.modalities)))
        self.register_buffer("steps", torch.zeros(len(self.modalities)))
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.last_coefficients: dict[str, float] = {}

    @torch.no_grad()
    def responses(self, model: MultimodalModel, features: dict[str, Features]) -> dict[str, Tensor]:
        """phi_m (B, C) per modality, from 2^M passes of fusion + head in eval mode."""
        assert model.fusion is not None
        modes = (model.fusion.training, model.head.training)
        model.fusion.eval()
        model.head.eval()
        try:
            detached = {m: Features(f.tokens.detach(), f.mask, f.pooled.detach(), f.present)
                        for m, f in features.items()}
            outputs = {frozenset(s): fused_outputs(model, masked(detached, frozenset(s))).float()
                       for size in range(len(self.modalities) + 1)
                       for s in itertools.combinations(self.modalities, size)}
        finally:
            model.fusion.train(modes[0])
            model.head.train(modes[1])
        return shapley_responses(outputs, self.modalities)

    def training_loss(self, model: MultimodalModel, features: dict[str, Features], target: Tensor,
                      epoch: int) -> BalanceStep:
        loss = self.task.loss(fused_outputs(model, features), target)
        for m, phi in self.responses(model, features).items():
            present = features[m].present
            if bool(present.any()):
                nll = F.cross_entropy(phi[present], target[present], reduction="sum")
                self._sums[m] = self._sums.get(m, 0.0) + float(nll)
                self._counts[m] = self._counts.get(m, 0) + int(present.sum())
        return BalanceStep(loss)

    def before_optimizer_step(self, model: MultimodalModel, epoch: int, step: int = 0) -> dict[str, float]:
        scores = step_means(self._sums, self._counts, self.modalities, self.mean_scores.device)
        self._sums, self._counts = {}, {}
        index = {m: i for i, m in enumerate(self.modalities)}
        means = {m: float(self.mean_scores[index[m]]) for m in scores if float(self.steps[index[m]]) > 0}
        coefficients = agm_coefficients(scores, means, self.options.alpha, self.options.clip)
        for m, s in scores.items():  # s*_t = s*_{t-1} (t-1)/t + s_t/t
            i = index[m]
            self.steps[i] += 1
            self.mean_scores[i] += (s - self.mean_scores[i]) / self.steps[i]
        self.last_coefficients = coefficients
        scale_encoder_gradients(model, coefficients)
        logs = {f"balance_c_{m}": c for m, c in coefficients.items()}
        logs.update({f"balance_score_{m}": s for m, s in scores.items()})
        return logs
