"""Unimodal auxiliary losses: one small head per modality, trained beside the fused head.

Why: a fused model can reach a low loss from the modalities that learn fastest and then stop
sending gradient to a slower encoder ("modality competition"; Wang, Tran & Feiszli 2020, "What
Makes Training Multi-modal Classification Networks Hard?", whose Gradient-Blending weights
per-modality losses for the same reason). On the embedded data the image CNN learns slowest and
attention/tensor fusions sometimes leave it unused for a whole budget (measured in
benchmarks/RESULTS.md). A linear head per modality on its pooled features, with its own loss on
the samples that have that modality, keeps every encoder learning its own signal, and also
teaches each encoder to be useful alone, which is what a model meets when modalities go missing.

The heads live in the training module, not in ``MultimodalModel``: they are a training aid, so a
saved model and its predictions are unchanged by them.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmfuse.core.contracts import Features
from mmfuse.core.errors import ConfigError
from mmfuse.encoders.base import Encoder
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import HeadTask


class UnimodalHeads(nn.Module):
    """One linear head per modality: pooled (B, D_m) -> (B, task.num_outputs)."""

    def __init__(self, model: MultimodalModel) -> None:
        super().__init__()
        task = model.task
        if not isinstance(task, HeadTask):
            raise ConfigError(f"trainer.unimodal_loss_weight needs a task with a prediction head "
                              f"(classification, multilabel, regression); '{task.name}' has none")
        self.task = task
        dims = {m: encoder.out_dim for m, encoder in model.encoders.items() if isinstance(encoder, Encoder)}
        self.heads = nn.ModuleDict({m: nn.Linear(dims[m], task.num_outputs) for m in model.modalities})

    def loss(self, features: dict[str, Features], target: Tensor) -> Tensor:
        """Mean over modalities of the task loss on the samples where that modality is present.

        A modality absent from every sample of the batch adds nothing (not a zero loss that would
        dilute the mean).
        """
        losses = []
        for m in sorted(self.heads):
            present = features[m].present
            if not bool(present.any()):
                continue
            outputs = self.heads[m](features[m].pooled[present])
            losses.append(self.task.loss(outputs, target[present]))
        if not losses:
            return target.new_zeros((), dtype=next(self.parameters()).dtype)
        return sum(losses[1:], losses[0]) / len(losses)
