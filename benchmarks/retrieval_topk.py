"""Exact blockwise top-k (``mmfuse.retrieval.chunked_topk``) over a large random index.

Measures queries/s for N items of dimension D, against one ``torch.topk`` over the full (Q, N)
similarity matrix, and checks both give the same indices. The largest temporary is a (Q, chunk)
block instead of the (Q, N) matrix (sizes printed), which is what lets millions of items fit.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_topk.py --n 1000000 --dim 64 --queries 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmfuse.retrieval import chunked_topk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=65536)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    started = time.perf_counter()
    scores, index = chunked_topk(queries, items, args.k, args.chunk)
    chunked_s = time.perf_counter() - started
    started = time.perf_counter()
    full = (queries @ items.T).topk(args.k, dim=1)
    full_s = time.perf_counter() - started
    print(json.dumps({
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "chunk": args.chunk,
        "index_mb": round(items.numel() * 4 / 2**20, 1),
        "chunked_seconds": round(chunked_s, 3), "chunked_queries_per_s": round(args.queries / chunked_s, 1),
        "chunked_block_mb": round(args.queries * min(args.chunk, args.n) * 4 / 2**20, 1),
        "full_matrix_seconds": round(full_s, 3),
        "full_matrix_mb": round(args.queries * args.n * 4 / 2**20, 1),
        "same_indices": bool(torch.equal(index, full.indices)),
        "same_scores": bool(torch.allclose(scores, full.values, atol=1e-6)),
    }, indent=2))


if __name__ == "__main__":
    main()
