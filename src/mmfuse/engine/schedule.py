"""Learning-rate schedules: optional linear warm-up, then constant or cosine decay, per optimizer step.

Fine-tuning a pretrained encoder with a freshly initialised head at full learning rate from step
one can wreck the pretrained weights before the head has learnt anything useful; a short linear
warm-up (a few hundred steps) is the usual cure. Without warm-up the cosine schedule is torch's
``CosineAnnealingLR``, exactly as before warm-up existed.
"""

from __future__ import annotations

import math

import torch

from mmfuse.config import OptimConfig

Scheduler = torch.optim.lr_scheduler.LRScheduler


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> Scheduler | None:
    """The per-step schedule of ``optim`` over ``total_steps`` optimizer steps, or None for a constant rate."""
    total_steps = max(1, total_steps)
    warmup = min(optim.warmup_steps, total_steps)
    if warmup == 0:
        if optim.scheduler == "none":
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    decay = optim.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay or total_steps == warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
