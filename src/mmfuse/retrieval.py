"""Retrieval maths shared by the contrastive task, ``mmfuse embed`` and ``mmfuse retrieve``.

Everything works on L2-normalised embeddings, so a dot product is a cosine similarity. Searches
run over blocks of the gallery (``chunked_topk``) so that the full (queries x items) similarity
matrix is never held in memory: millions of items fit as long as the embeddings themselves do.

Relevance is explicit. *Instance level*: the only relevant item for a query is the same sample's
other modality (the pair the manifest row holds). *Class level*: every item whose label equals the
query's label is relevant; used where several items are equally right answers (AV-MNIST: any image
of the spoken digit; the synthetic data: any caption naming the image's shape).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F

from mmfuse.errors import DataError, MMFuseError

RECALL_AT = (1, 5, 10)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP) loss of N aligned pairs: row i of ``a`` belongs with row i of ``b``.

    a, b: (N, D) L2-normalised; logit_scale: scalar, the inverse temperature (not its log).
    loss = (CE(s * a b^T, arange) + CE(s * b a^T, arange)) / 2.

    With ``labels`` (N,), every item with the query's label is a positive (supervised contrastive):
    the target distribution is uniform over them. Use it where pairs are only matched by class
    (AV-MNIST pairs a random image of the spoken digit), so same-class items are not pushed apart
    as false negatives. A label < 0 (unlabelled) has only its own pair as positive.
    """
    logits = logit_scale * a.float() @ b.float().T
    eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
    if labels is None:
        targets = eye.float()
    else:
        same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) | eye
        targets = same.float() / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def chunked_topk(queries: Tensor, items: Tensor, k: int, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Exact top-k by dot product over ``items`` in blocks of ``chunk`` rows.

    queries (Q, D), items (N, D) -> scores (Q, k'), indices (Q, k') with k' = min(k, N), best first.
    Memory is O(Q * (chunk + k)) whatever N is. Ties keep the lower index first, as one
    ``torch.topk`` over the whole matrix would (both are stable on the sorted merge below).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n = len(items)
    k = min(k, n)
    best_scores = torch.empty(len(queries), 0, device=queries.device, dtype=torch.float32)
    best_index = torch.empty(len(queries), 0, device=queries.device, dtype=torch.long)
    for start in range(0, n, chunk):
        block = items[start:start + chunk].to(queries.device, torch.float32)
        scores = queries.float() @ block.T
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_index = torch.cat([best_index, top.indices + start], dim=1)
        # Sort by score, then by index, so equal scores resolve deterministically.
        order = torch.argsort(merged_index, dim=1)
        merged_scores, merged_index = merged_scores.gather(1, order), merged_index.gather(1, order)
        keep = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_index = merged_scores.gather(1, keep), merged_index.gather(1, keep)
    return best_scores, best_index


def first_relevant_ranks(queries: Tensor, items: Tensor, relevant_label: Tensor | None,
                         query_label: Tensor | None, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Where the first relevant item of every query lands: (items scoring higher, tied items).

    Instance level (labels None): query i's relevant item is item i (so Q == N). Class level:
    item j is relevant to query i when ``relevant_label[j] == query_label[i]``. ``higher`` counts
    items scoring strictly above the best relevant one; ``ties`` counts the other (irrelevant, or at
    instance level any other) items with exactly its score. Ties are real here: identical inputs
    (the same caption text twice) give identical embeddings, and counting them in the query's
    favour would overstate instance-level recall. A query with no relevant item gets higher = N.
    Computed ``chunk`` queries at a time, so memory is O(chunk * N).
    """
    highers, ties = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].float()
        scores = q @ items.float().T  # (c, N)
        if query_label is None or relevant_label is None:
            rows = torch.arange(len(q), device=q.device)
            best = scores[rows, rows + start]
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[rows, rows + start] = True
        else:
            relevant = query_label[start:start + chunk, None] == relevant_label[None, :]
            best = scores.masked_fill(~relevant, -math.inf).amax(dim=1)
        higher = (scores > best[:, None]).sum(dim=1)
        tie = ((scores == best[:, None]) & ~relevant).sum(dim=1)
        found = torch.isfinite(best)
        highers.append(torch.where(found, higher, torch.full_like(higher, len(items))))
        ties.append(torch.where(found, tie, torch.zeros_like(tie)))
    if not highers:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(highers), torch.cat(ties)


def rank_metrics(higher: Tensor, ties: Tensor, prefix: str) -> dict[str, float]:
    """recall@1/5/10 and median rank, with ties broken at random (in expectation).

    The first relevant item's rank is uniform over 1 + higher ... 1 + higher + ties, so
    P(rank <= K) = clamp((K - higher) / (ties + 1), 0, 1) and the expected rank is 1 + higher + ties / 2.
    """
    higher, ties = higher.double(), ties.double()
    out = {f"{prefix}_r{k}": float(((k - higher) / (ties + 1)).clamp(0, 1).mean()) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float((1 + higher + ties / 2).median())
    return out


def retrieval_report(embeddings: dict[str, Tensor], present: dict[str, Tensor],
                     labels: Tensor | None = None) -> dict[str, float]:
    """Recall@1/5/10 and median rank, both directions, for every pair of modalities.

    Only samples that have both modalities of a pair take part in it (as queries and as the
    gallery). Keys: ``{query}_to_{target}_r1`` ... ``_medr`` at instance level, and the same with
    ``_class`` inserted (``image_to_text_class_r1``) at class level when ``labels`` are given
    (label < 0 means unlabelled: such samples leave the class-level evaluation). ``mean_recall``
    averages instance-level R@1/5/10 over every direction, ``mean_class_recall`` the class-level ones:
    the numbers training monitors (instance or class level, as the task's ``positives``).
    """
    report: dict[str, float] = {}
    means: list[float] = []
    class_means: list[float] = []
    for a, b in itertools.combinations(sorted(embeddings), 2):
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue
        for q, t in ((a, b), (b, a)):
            qe, te = embeddings[q][both], embeddings[t][both]
            metrics = rank_metrics(*first_relevant_ranks(qe, te, None, None), f"{q}_to_{t}")
            report.update(metrics)
            means.extend(metrics[f"{q}_to_{t}_r{k}"] for k in RECALL_AT)
            if labels is not None:
                lab = labels[both]
                known = lab >= 0
                if int(known.sum()) >= 2:
                    ranks = first_relevant_ranks(qe[known], te[known], lab[known], lab[known])
                    metrics = rank_metrics(*ranks, f"{q}_to_{t}_class")
                    report.update(metrics)
                    class_means.extend(metrics[f"{q}_to_{t}_class_r{k}"] for k in RECALL_AT)
    report["mean_recall"] = sum(means) / len(means) if means else 0.0
    if class_means:
        report["mean_class_recall"] = sum(class_means) / len(class_means)
    return report


# ---- embedding index files ------------------------------------------------------------------------

INDEX_FORMAT = "mmfuse-embeddings-v1"


def _pack_strings(values: list[str]) -> tuple[Tensor, Tensor]:
    """Strings as one uint8 tensor of UTF-8 bytes + (N + 1,) offsets: scales to millions of ids
    without a huge JSON header (safetensors caps its header at 100 MB)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    if encoded:
        offsets[1:] = torch.cumsum(torch.tensor([len(e) for e in encoded], dtype=torch.long), dim=0)
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if offsets[-1] > 0 \
        else torch.zeros(0, dtype=torch.uint8)
    return data, offsets


def _unpack_strings(data: Tensor, offsets: Tensor) -> list[str]:
    raw = bytes(data.numpy().tobytes())
    bounds = offsets.tolist()
    return [raw[bounds[i]:bounds[i + 1]].decode("utf-8") for i in range(len(bounds) - 1)]


@dataclass
class EmbeddingIndex:
    """Embeddings per sample per modality, with the sample ids and the item each row came from.

    embeddings[m]: (N, D) float32, zero rows where the sample lacks m; present[m]: (N,) bool;
    sources[m]: the text, or the file path, of each sample's m ('' where absent).
    """

    ids: list[str]
    embeddings: dict[str, Tensor]
    present: dict[str, Tensor]
    sources: dict[str, list[str]]
    model: str = ""

    def save(self, path: str | Path) -> Path:
        """Writes one safetensors file atomically (temp file in the same folder + os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        tensors["ids.bytes"], tensors["ids.offsets"] = _pack_strings(self.ids)
        for m in sorted(self.embeddings):
            tensors[f"{m}.embeddings"] = self.embeddings[m].float().contiguous()
            tensors[f"{m}.present"] = self.present[m].to(torch.uint8).contiguous()
            tensors[f"{m}.sources.bytes"], tensors[f"{m}.sources.offsets"] = _pack_strings(self.sources[m])
        metadata = {"format": INDEX_FORMAT, "modalities": json.dumps(sorted(self.embeddings)), "model": self.model}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingIndex:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"embedding index not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != INDEX_FORMAT:
                    raise DataError(f"{path} is not an mmfuse embedding index (run mmfuse embed)")
                modalities = json.loads(metadata["modalities"])
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except DataError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise DataError(f"cannot read embedding index {path}: {exc}") from None
        return cls(
            ids=_unpack_strings(tensors["ids.bytes"], tensors["ids.offsets"]),
            embeddings={m: tensors[f"{m}.embeddings"] for m in modalities},
            present={m: tensors[f"{m}.present"].bool() for m in modalities},
            sources={m: _unpack_strings(tensors[f"{m}.sources.bytes"], tensors[f"{m}.sources.offsets"])
                     for m in modalities},
            model=metadata.get("model", ""),
        )

    def search(self, query: Tensor, target: str, k: int, chunk: int = 65536) -> list[dict[str, Any]]:
        """The k nearest items of modality ``target`` to one (D,) query: id, score and source."""
        if target not in self.embeddings:
            raise DataError(f"the index has no modality '{target}'; it holds {', '.join(sorted(self.embeddings))}")
        rows = torch.nonzero(self.present[target]).flatten()
        if len(rows) == 0:
            raise DataError(f"the index holds no '{target}' items (every sample lacks it)")
        scores, index = chunked_topk(query[None].float(), self.embeddings[target][rows], k, chunk)
        return [
            {"id": self.ids[int(rows[j])], "score": round(float(s), 6), target: self.sources[target][int(rows[j])]}
            for s, j in zip(scores[0].tolist(), index[0].tolist(), strict=True)
        ]


# ---- optional approximate search (faiss) ---------------------------------------------------------

def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MMFuseError("approximate search needs faiss: pip install 'mmfuse[faiss]'") from None
    return faiss


def faiss_path(index_path: str | Path, modality: str) -> Path:
    """Where ``mmfuse embed --faiss`` puts the HNSW index of one modality, beside the index file."""
    path = Path(index_path)
    return path.with_name(f"{path.name}.{modality}.faiss")


def write_faiss(index: EmbeddingIndex, index_path: str | Path, neighbours: int = 32) -> list[Path]:
    """One HNSW (inner product) index per modality over its present rows, written atomically.

    Rows are added in index order, so faiss row r is the r-th present item of that modality.
    """
    faiss = _faiss()
    written = []
    for m in sorted(index.embeddings):
        rows = index.embeddings[m][index.present[m]].float().contiguous().numpy()
        if len(rows) == 0:
            continue
        hnsw = faiss.IndexHNSWFlat(rows.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = max(64, neighbours * 2)
        hnsw.add(rows)
        target = faiss_path(index_path, m)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            faiss.write_index(hnsw, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(target)
    return written


def search_faiss(index: EmbeddingIndex, index_path: str | Path, query: Tensor, target: str,
                 k: int) -> list[dict[str, Any]]:
    """``EmbeddingIndex.search`` through the modality's HNSW index (approximate, sub-linear)."""
    faiss = _faiss()
    if target not in index.embeddings:
        raise DataError(f"the index has no modality '{target}'; it holds {', '.join(sorted(index.embeddings))}")
    path = faiss_path(index_path, target)
    if not path.is_file():
        raise DataError(f"{path} not found: run mmfuse embed with --faiss to build the approximate index")
    hnsw = faiss.read_index(str(path))
    rows = torch.nonzero(index.present[target]).flatten()
    if hnsw.ntotal != len(rows):
        raise DataError(f"{path} holds {hnsw.ntotal} items but the index has {len(rows)} '{target}' items: "
                        "rebuild both with mmfuse embed --faiss")
    scores, found = hnsw.search(query[None].float().numpy(), min(k, len(rows)))
    return [
        {"id": index.ids[int(rows[j])], "score": round(float(s), 6), target: index.sources[target][int(rows[j])]}
        for s, j in zip(scores[0].tolist(), found[0].tolist(), strict=True) if j >= 0
    ]
