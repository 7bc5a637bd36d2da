"""``mmfuse embed`` and ``mmfuse retrieve``: cross-modal search with a contrastive model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from mmfuse.cli.app import app, console, friendly_errors


@app.command()
@friendly_errors
def embed(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved contrastive model folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Manifest whose rows to embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors index.")],
    split: Annotated[str | None, typer.Option(help="Only rows whose 'split' column has this value.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 256,
    faiss: Annotated[bool, typer.Option(
        "--faiss", help="Also build an approximate HNSW index per modality (needs mmfuse[faiss]).")] = False,
) -> None:
    """Embed every sample's modalities with a contrastive model into one index file (for retrieve)."""
    from mmfuse.core.errors import DataError
    from mmfuse.data.manifest import read_manifest
    from mmfuse.model import MultimodalModel
    from mmfuse.tasks.contrastive import contrastive_task, embed_records

    started = time.perf_counter()
    loaded = MultimodalModel.from_pretrained(model)
    contrastive_task(loaded)
    used = {m: spec for m, spec in loaded.preprocessor.modalities.items() if m in loaded.modalities}
    records = read_manifest(data, used, target_column=None, split_column="split" if split else None)
    if split:
        records = [r for r in records if (r.split or "").lower() == split.lower()]
    if not records:
        raise DataError(f"{data}: no rows to embed" + (f" with split '{split}'" if split else ""))
    index = embed_records(loaded, records, batch_size=batch_size, model_name=str(model.resolve()))
    index.save(out)
    if faiss:
        from mmfuse.retrieval import write_faiss

        written = write_faiss(index, out)
        console.print(f"approximate indexes: {', '.join(p.name for p in written)}")
    counts = ", ".join(f"{m} {int(index.present[m].sum())}" for m in sorted(index.embeddings))
    console.print(f"embedded {len(records)} samples ({counts}) into [bold]{out}[/] "
                  f"in {time.perf_counter() - started:.1f} s")


@app.command()
@friendly_errors
def retrieve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved contrastive model folder.")],
    index: Annotated[Path, typer.Option("--index", help="Index written by mmfuse embed.")],
    target: Annotated[str, typer.Option(help="Modality of the items to return (e.g. image, audio, text).")],
    query_text: Annotated[str | None, typer.Option(help="Query text.")] = None,
    query_image: Annotated[Path | None, typer.Option(help="Query image file.")] = None,
    query_audio: Annotated[Path | None, typer.Option(help="Query audio file.")] = None,
    query: Annotated[str | None, typer.Option(help="MODALITY=VALUE query for any modality.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of items to return.")] = 5,
    approximate: Annotated[bool, typer.Option(
        help="Search the HNSW index built by embed --faiss instead of the exact blockwise top-k.")] = False,
) -> None:
    """Nearest items of --target modality to one query; prints JSON (id, score, the item's path/text)."""
    from mmfuse.core.errors import DataError
    from mmfuse.model import MultimodalModel
    from mmfuse.retrieval import EmbeddingIndex
    from mmfuse.tasks.contrastive import embed_query

    given = [(m, str(v)) for m, v in (("text", query_text), ("image", query_image), ("audio", query_audio))
             if v is not None]
    if query is not None:
        if "=" not in query:
            raise DataError(f"--query '{query}' must look like MODALITY=VALUE")
        given.append(tuple(query.split("=", 1)))  # type: ignore[arg-type]
    if len(given) != 1:
        raise DataError("give exactly one query: --query-text, --query-image, --query-audio or --query")
    if k <= 0:
        raise DataError(f"-k must be positive, got {k}")
    loaded = MultimodalModel.from_pretrained(model)
    found = EmbeddingIndex.load(index)
    modality, value = given[0]
    if modality not in loaded.modalities:
        raise DataError(f"this model has no '{modality}' modality; it embeds {', '.join(loaded.modalities)}")
    if target not in found.embeddings:
        raise DataError(f"--target '{target}' is not in the index; it holds {', '.join(sorted(found.embeddings))}")
    if loaded.preprocessor.kind(modality) not in ("text",):
        value = str(Path(value).expanduser().resolve())
    query_embedding = embed_query(loaded, modality, value)
    if approximate:
        from mmfuse.retrieval import search_faiss

        hits = search_faiss(found, index, query_embedding, target, k)
    else:
        hits = found.search(query_embedding, target, k)
    print(json.dumps({"query": {modality: value}, "target": target, "results": hits}, indent=2))
