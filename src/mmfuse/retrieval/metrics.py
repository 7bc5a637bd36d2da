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
import math

import torch
from torch import Tensor
from torch.nn import functional as F

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
