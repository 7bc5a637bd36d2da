"""Embedding index files: one safetensors file of L2-normalised embeddings per data set, searched
exactly (``EmbeddingIndex.search``) or approximately through faiss HNSW indexes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mmfuse.core.atomic import atomic_file
from mmfuse.core.errors import DataError, MMFuseError
from mmfuse.retrieval.metrics import chunked_topk

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
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
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
        with atomic_file(target) as tmp:
            faiss.write_index(hnsw, str(tmp))
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
