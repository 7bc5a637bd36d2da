"""Cross-modal retrieval: the ranking metrics and the embedding index files that search them.

It sits below the tasks (the contrastive task trains with ``info_nce`` and scores with
``retrieval_report``) and depends only on ``mmfuse.core``.
"""

from mmfuse.retrieval.index import EmbeddingIndex, faiss_path, search_faiss, write_faiss
from mmfuse.retrieval.metrics import (
    RECALL_AT,
    chunked_topk,
    first_relevant_ranks,
    info_nce,
    rank_metrics,
    retrieval_report,
)

__all__ = ["RECALL_AT", "EmbeddingIndex", "chunked_topk", "faiss_path", "first_relevant_ranks", "info_nce",
           "rank_metrics", "retrieval_report", "search_faiss", "write_faiss"]
