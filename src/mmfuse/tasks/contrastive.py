"""Contrastive alignment: every modality projected into one shared, L2-normalised space.

No fusion: each modality's pooled encoder features go through their own projection, and a
symmetric InfoNCE loss (CLIP) with one learnable temperature pulls the two modalities of the same
sample together and pushes the other samples of the batch away. ``pairs`` says which modality
pairs are trained: ``all`` (every pair), ``anchor:<modality>`` (ImageBind: bind every other
modality to the anchor only; pairs not involving the anchor align through it, emergently), or an
explicit list ``[[a, b], ...]``. A pair uses only the samples that have both modalities, so
missing modalities cost nothing but those samples' contribution to that pair. ``positives:
label`` makes every same-label item a positive (for data paired by class only, like AV-MNIST).

The target column is optional and only used for evaluation: when it holds class labels, recall
is also reported at class level (see ``mmfuse.retrieval``). ``model(batch)`` returns (B, M, D)
embeddings in sorted modality order with absent rows zero.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric, MetricCollection

from mmfuse.core.contracts import Batch
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.core.layers import mlp
from mmfuse.core.masking import present_pooled
from mmfuse.core.registry import TASKS
from mmfuse.data.manifest import Record
from mmfuse.retrieval import EmbeddingIndex, info_nce, retrieval_report
from mmfuse.tasks.base import FusedModel, Task
from mmfuse.tasks.classification import _label_text

PairsOption = str | list[list[str]] | list[tuple[str, str]]


class ContrastiveHead(nn.Module):
    """Per-modality projection to ``dim`` + the learnable log inverse temperature.

    The scale is clamped to at most 100 (CLIP's choice): beyond it the softmax saturates and the
    loss becomes unstable. pooled (B, D_m) per modality -> (B, dim) unit vectors.
    """

    def __init__(self, dims: dict[str, int], dim: int, hidden: int, temperature: float, learn: bool) -> None:
        super().__init__()
        self.projections = nn.ModuleDict({m: mlp(dims[m], hidden, dim, 0.0) for m in sorted(dims)})
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn)

    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def embed(self, modality: str, pooled: Tensor) -> Tensor:
        return F.normalize(self.projections[modality](pooled).float(), dim=-1)


class RetrievalMetric(Metric):
    """Collects embeddings, presence and labels over an epoch; computes ``retrieval_report``."""

    full_state_update = False
    embeddings: list[Tensor]
    present: list[Tensor]
    labels: list[Tensor]

    def __init__(self, modalities: list[str]) -> None:
        super().__init__()
        self.modalities = modalities
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("present", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, present: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        self.embeddings.append(embeddings.float())
        self.present.append(present)
        self.labels.append(labels)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        emb = torch.cat(self.embeddings)
        present = torch.cat(self.present)
        labels = torch.cat(self.labels)
        report = retrieval_report(
            {m: emb[:, i] for i, m in enumerate(self.modalities)},
            {m: present[:, i] for i, m in enumerate(self.modalities)},
            labels if bool((labels >= 0).any()) else None,
        )
        return {k: torch.tensor(v) for k, v in report.items()}


def parse_pairs(pairs: PairsOption, modalities: list[str]) -> list[tuple[str, str]]:
    """``all`` | ``anchor:<m>`` | [[a, b], ...] -> sorted, de-duplicated (a, b) pairs with a < b."""
    if len(modalities) < 2:
        raise ConfigError(f"task contrastive needs at least two modalities, the model has {modalities}")
    if isinstance(pairs, str):
        if pairs == "all":
            return list(itertools.combinations(modalities, 2))
        if pairs.startswith("anchor:"):
            anchor = pairs.removeprefix("anchor:").strip()
            if anchor not in modalities:
                raise ConfigError(f"task.pairs: anchor '{anchor}' is not a modality; choose from {modalities}")
            return sorted(tuple(sorted((anchor, m))) for m in modalities if m != anchor)  # type: ignore[misc]
        raise ConfigError(f"task.pairs '{pairs}' must be 'all', 'anchor:<modality>' or a list of pairs")
    result = set()
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigError(f"task.pairs: {list(pair)} must name two different modalities")
        for m in pair:
            if m not in modalities:
                raise ConfigError(f"task.pairs: '{m}' is not a modality; choose from {modalities}")
        result.add((min(pair), max(pair)))
    if not result:
        raise ConfigError("task.pairs is empty")
    return sorted(result)


class ContrastiveTask(Task):
    name = "contrastive"
    uses_fusion = False

    def __init__(self, dim: int = 64, pairs: PairsOption = "all", temperature: float = 0.07,
                 learn_temperature: bool = True, hidden: int = 0, positives: str = "instance",
                 labels: list[str] | None = None) -> None:
        if positives not in ("instance", "label"):
            raise ConfigError(f"task.positives must be 'instance' or 'label', got '{positives}'")
        if dim <= 0:
            raise ConfigError(f"task.dim must be positive, got {dim}")
        if not 0 < temperature <= 10:
            raise ConfigError(f"task.temperature must be in (0, 10], got {temperature}")
        self.dim, self.pairs_option, self.temperature = dim, pairs, temperature
        self.learn_temperature, self.hidden, self.positives = learn_temperature, hidden, positives
        self.labels: list[str] = list(labels or [])
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.pairs: list[tuple[str, str]] = []
        self.modalities: list[str] = []

    @property
    def monitor(self) -> tuple[str, str]:
        """Instance-level mean recall; class-level when positives are labels (pairs matched by class)."""
        return ("mean_class_recall" if self.positives == "label" else "mean_recall"), "max"

    def fit(self, targets: list[Any]) -> None:
        """Label names for class-level recall; no labels at all is fine (instance level only)."""
        if not self.labels:
            self.labels = sorted({_label_text(t) for t in targets if t is not None and str(t).strip()})
        self._index = {label: i for i, label in enumerate(self.labels)}

    def encode_target(self, raw: Any) -> Tensor:
        """Class index, or -1 for an unlabelled sample.

        Labels only decide which items count as relevant to each other, so a label unseen in
        training (or a whole other column, ``mmfuse evaluate --label-column``) gets a new index
        after the fitted ones instead of an error.
        """
        if raw is None or not str(raw).strip() or (isinstance(raw, float) and math.isnan(raw)):
            return torch.tensor(-1)
        label = _label_text(raw)
        if label not in self._index:
            self._index[label] = len(self._index)
        return torch.tensor(self._index[label])

    def metrics(self) -> MetricCollection:
        return MetricCollection({self.monitor[0]: RetrievalMetric(self.modalities)})

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def load_state(self, state: dict[str, Any]) -> None:
        self.labels = list(state["labels"])
        self._index = {label: i for i, label in enumerate(self.labels)}

    def build_head(self, model: FusedModel) -> nn.Module:
        self.modalities = list(model.modalities)
        self.pairs = parse_pairs(self.pairs_option, self.modalities)
        dims = {m: model.encoder_dims[m] for m in self.modalities}
        return ContrastiveHead(dims, self.dim, self.hidden, self.temperature, self.learn_temperature)

    @staticmethod
    def _head(model: FusedModel) -> ContrastiveHead:
        assert isinstance(model.head, ContrastiveHead)
        return model.head

    def embed(self, model: FusedModel, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Unit embeddings (B, dim) and presence (B,) per modality; absent rows are zero."""
        features = model.encode(batch)
        head = self._head(model)
        embeddings = {
            m: head.embed(m, present_pooled(f)) * f.present[:, None].float() for m, f in features.items()
        }
        return embeddings, {m: f.present for m, f in features.items()}

    def forward(self, model: FusedModel, batch: Batch) -> Tensor:
        """(B, M, dim) unit embeddings in sorted modality order; absent rows are zero."""
        embeddings, _ = self.embed(model, batch)
        return torch.stack([embeddings[m] for m in self.modalities], dim=1)

    def pair_loss(self, model: FusedModel, embeddings: dict[str, Tensor], present: dict[str, Tensor],
                  labels: Tensor | None) -> Tensor:
        """Mean InfoNCE over the configured pairs that have at least two samples with both modalities."""
        scale = self._head(model).scale()
        use_labels = self.positives == "label" and labels is not None
        losses = []
        for a, b in self.pairs:
            both = present[a] & present[b]
            if int(both.sum()) >= 2:
                losses.append(info_nce(embeddings[a][both], embeddings[b][both], scale,
                                       labels[both] if use_labels and labels is not None else None))
        if not losses:  # keeps the graph connected: a zero loss with gradients of zero
            return scale * 0.0 + sum(e.sum() for e in embeddings.values()) * 0.0
        return torch.stack(losses).mean()

    def step_loss(self, model: FusedModel, batch: Batch) -> Tensor:
        return self.pair_loss(model, *self.embed(model, batch), batch.target)

    def eval_step(self, model: FusedModel, batch: Batch, metrics: MetricCollection) -> Tensor:
        embeddings, present = self.embed(model, batch)
        stacked = torch.stack([embeddings[m] for m in self.modalities], dim=1)
        labels = batch.target if batch.target is not None else torch.full((batch.size,), -1)
        metrics.update(stacked, torch.stack([present[m] for m in self.modalities], dim=1), labels.to(stacked.device))
        return self.pair_loss(model, embeddings, present, batch.target)

    def predict(self, model: FusedModel, batch: Batch) -> list[dict[str, Any]]:
        embeddings, present = self.embed(model, batch)
        return [
            {"embeddings": {m: [round(float(v), 6) for v in embeddings[m][i].cpu()]
                            for m in self.modalities if bool(present[m][i])}}
            for i in range(batch.size)
        ]


@TASKS.register("contrastive", common=(), why="its projection heads take dim and hidden; there is no MLP head",
                uses_fusion=False)
def contrastive(dim: int = 64, pairs: PairsOption = "all", temperature: float = 0.07,
                learn_temperature: bool = True, hidden: int = 0, positives: str = "instance") -> Task:
    """``positives: label`` treats every same-label item as a positive (supervised contrastive)."""
    return ContrastiveTask(dim=dim, pairs=pairs, temperature=temperature, learn_temperature=learn_temperature,
                           hidden=hidden, positives=positives)


# ---- embedding a manifest / a query (``mmfuse embed`` and ``mmfuse retrieve``) --------------------

def contrastive_task(model: FusedModel) -> ContrastiveTask:
    """The model's task if it is contrastive, else a clear error (embed/retrieve need one)."""
    if not isinstance(model.task, ContrastiveTask):
        raise MMFuseError(f"this model was trained for task '{model.task.name}'; embed and retrieve need a "
                          "model trained with task 'contrastive'")
    return model.task


def embed_records(model: FusedModel, records: list[Record], batch_size: int = 256,
                  model_name: str = "") -> EmbeddingIndex:
    """Embeds every modality of every record (in order) into an ``EmbeddingIndex``."""
    from mmfuse.data.dataset import Collator, build_sample

    task = contrastive_task(model)
    device = next(model.parameters()).device
    collate = Collator(model.preprocessor, None)
    parts: dict[str, list[Tensor]] = {m: [] for m in task.modalities}
    present: dict[str, list[Tensor]] = {m: [] for m in task.modalities}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = collate([build_sample(r, model.preprocessor, None) for r in chunk]).to(device)
            embeddings, mask = task.embed(model, batch)
            for m in task.modalities:
                parts[m].append(embeddings[m].cpu())
                present[m].append(mask[m].cpu())
    return EmbeddingIndex(
        ids=[r.id for r in records],
        embeddings={m: torch.cat(parts[m]) for m in task.modalities},
        present={m: torch.cat(present[m]) for m in task.modalities},
        sources={m: [r.fields.get(m) or "" for r in records] for m in task.modalities},
        model=model_name,
    )


def embed_query(model: FusedModel, modality: str, value: str) -> Tensor:
    """(dim,) unit embedding of one query (text, or an image/audio file path)."""
    from mmfuse.data.dataset import Collator, build_sample

    task = contrastive_task(model)
    if modality not in task.modalities:
        raise MMFuseError(f"this model has no '{modality}' modality; it embeds {', '.join(task.modalities)}")
    fields: dict[str, str | None] = {m: None for m in model.preprocessor.modalities}
    fields[modality] = value
    record = Record(source=Path("query"), row=0, id="query", fields=fields)
    batch = Collator(model.preprocessor, None)([build_sample(record, model.preprocessor, None)])
    model.eval()
    with torch.no_grad():
        embeddings, _ = task.embed(model, batch.to(next(model.parameters()).device))
    return embeddings[modality][0].cpu()
