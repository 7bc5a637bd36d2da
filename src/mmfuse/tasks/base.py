"""The task contract: how raw manifest targets become tensors, the loss, metrics and predictions.

Two levels:

* ``Task`` is the general contract. A task builds its own head module on the model
  (``build_head``), computes its training loss from the whole model and batch (``step_loss``),
  evaluates a batch into torchmetrics (``eval_step``) and decodes predictions (``predict``). This is
  what tasks need that are more than "fused vector -> logits": contrastive alignment reads the
  per-modality features without fusion, an autoencoder takes its targets from the inputs, a
  captioner runs a decoder with teacher forcing and searches at prediction time.
* ``HeadTask`` is the common special case: an MLP head maps the fused vector to
  ``num_outputs`` values and ``loss/decode`` work on that one (B, num_outputs) tensor.
  Classification, multi-label and regression are HeadTasks.

A task has fitted state (label names, target normalisation, a caption vocabulary) that is saved
next to the weights so predictions decode the same way; its parameters live in the head module,
which belongs to the model, so ``save_pretrained`` stores them with everything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mmfuse.config import TaskConfig
from mmfuse.core.contracts import Batch, Features, FusionModule
from mmfuse.core.layers import mlp
from mmfuse.data.preprocess import Preprocessor


class FusedModel(Protocol):
    """What a task may use of the model whose head it is; ``mmfuse.model.MultimodalModel`` provides it.

    Why a protocol: the model sits above the tasks (it builds their heads and calls them), so a task
    typed against ``MultimodalModel`` had to import it, if only for annotations (a circle in the
    import graph), and it reached into the model's private encoder accessor and its spec. These
    members are the whole interface between a task and its model: the model may change anything else.
    """

    @property
    def training(self) -> bool: ...

    @property
    def modalities(self) -> Sequence[str]:
        """The model's modalities, sorted."""
        ...

    @property
    def preprocessor(self) -> Preprocessor: ...

    @property
    def task(self) -> Task: ...

    @property
    def fusion(self) -> FusionModule | None:
        """None for a task that does not use fusion (``Task.uses_fusion``)."""
        ...

    @property
    def head(self) -> nn.Module:
        """What ``build_head`` returned."""
        ...

    @property
    def encoder_dims(self) -> dict[str, int]:
        """Width of each modality's encoder features (``Features.tokens`` and ``pooled``)."""
        ...

    @property
    def encoder_names(self) -> dict[str, str]:
        """The registry name of each modality's encoder."""
        ...

    @property
    def task_config(self) -> TaskConfig:
        """The task's config (``head_hidden``, ``head_dropout`` besides the task's own options)."""
        ...

    @property
    def target_column(self) -> str: ...

    def encode(self, batch: Batch) -> dict[str, Features]: ...

    def __call__(self, batch: Batch) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def eval(self) -> nn.Module: ...


class Task(ABC):
    name: str = ""
    uses_fusion: ClassVar[bool] = True
    """False for tasks that read the per-modality features only; the model then builds no fusion."""

    @property
    def raw_input_modalities(self) -> list[str]:
        """Modalities whose preprocessed inputs the task reads itself (not only through encoders).

        The feature cache replaces inputs with encoder outputs, so training refuses it for these.
        """
        return []

    @property
    @abstractmethod
    def monitor(self) -> tuple[str, str]:
        """(metric name, 'max' | 'min') used to select the best checkpoint."""

    @abstractmethod
    def fit(self, targets: list[Any]) -> None:
        """Learns label names / normalisation / vocabularies from the training targets."""

    @abstractmethod
    def encode_target(self, raw: Any) -> Tensor:
        """One raw manifest value -> a target tensor; raises ValueError with a clear reason."""

    @abstractmethod
    def metrics(self) -> MetricCollection: ...

    @abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def build_head(self, model: FusedModel) -> nn.Module:
        """The task's own parameters, built after the encoders and fusion; stored as ``model.head``."""

    @abstractmethod
    def forward(self, model: FusedModel, batch: Batch) -> Tensor:
        """``model(batch)``: the task's main output tensor (documented by each task)."""

    @abstractmethod
    def step_loss(self, model: FusedModel, batch: Batch) -> Tensor:
        """The scalar training loss of one batch."""

    @abstractmethod
    def eval_step(self, model: FusedModel, batch: Batch, metrics: MetricCollection) -> Tensor:
        """Validation / evaluation of one batch: updates ``metrics`` and returns the batch's loss."""

    @abstractmethod
    def predict(self, model: FusedModel, batch: Batch) -> list[dict[str, Any]]:
        """One JSON-ready prediction per sample (called under ``torch.no_grad`` in eval mode)."""

    def collate_targets(self, targets: list[Tensor]) -> Tensor:
        return torch.stack(targets)

    def metric_inputs(self, outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """What the torchmetrics collection is updated with (float32 for bf16 runs)."""
        return outputs.float(), target


class HeadTask(Task):
    """fused vector -> MLP head -> (B, num_outputs); the loss and decoding read only that tensor."""

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Width of the logits / predictions the model must produce."""

    @abstractmethod
    def loss(self, outputs: Tensor, target: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, outputs: Tensor) -> list[dict[str, Any]]:
        """Model outputs -> one JSON-ready prediction per sample."""

    def build_head(self, model: FusedModel) -> nn.Module:
        # A decision-level fusion (late) already outputs num_outputs values per sample.
        assert model.fusion is not None
        if model.fusion.decision_level:
            return nn.Identity()
        cfg = model.task_config
        width = model.fusion.out_dim
        return nn.Sequential(nn.GELU(), nn.Dropout(cfg.head_dropout),
                             mlp(width, cfg.head_hidden, self.num_outputs, cfg.head_dropout))

    def forward(self, model: FusedModel, batch: Batch) -> Tensor:
        """(B, num_outputs) outputs (logits or standardised values), calibrated when the task is."""
        assert model.fusion is not None
        return self.calibrate(model.head(model.fusion(model.encode(batch))), batch.present)

    def calibrate(self, outputs: Tensor, present: dict[str, Tensor]) -> Tensor:
        """The head's outputs as the task reports them, given which modalities each sample has;
        identity unless the task fitted a calibration after training (classification)."""
        return outputs

    def step_loss(self, model: FusedModel, batch: Batch) -> Tensor:
        assert batch.target is not None, f"task '{self.name}' needs targets to train"
        return self.loss(model(batch), batch.target)

    def eval_step(self, model: FusedModel, batch: Batch, metrics: MetricCollection) -> Tensor:
        assert batch.target is not None, f"task '{self.name}' needs targets to evaluate"
        outputs = model(batch)
        metrics.update(*self.metric_inputs(outputs, batch.target))
        return self.loss(outputs, batch.target)

    def predict(self, model: FusedModel, batch: Batch) -> list[dict[str, Any]]:
        return self.decode(model(batch))
