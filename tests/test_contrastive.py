"""Contrastive alignment and retrieval: InfoNCE, recall@K, chunked top-k, the index file, embed/retrieve CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.model import MultimodalModel
from mmfuse.retrieval import (
    EmbeddingIndex,
    chunked_topk,
    first_relevant_ranks,
    info_nce,
    rank_metrics,
    retrieval_report,
)
from mmfuse.tasks import TASKS
from mmfuse.tasks.contrastive import ContrastiveHead, parse_pairs

runner = CliRunner()
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic-contrastive.yaml"


def test_info_nce_equals_hand_computed_value() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # logits = 2 * a b^T = [[1.2, 0], [1.6, 2]]; rows: CE with targets 0, 1; columns: the transpose.
    row0 = -math.log(math.exp(1.2) / (math.exp(1.2) + 1.0))
    row1 = -math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))
    col0 = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    col1 = -math.log(math.exp(2.0) / (1.0 + math.exp(2.0)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert float(info_nce(a, b, scale)) == pytest.approx(expected, rel=1e-6)
    # Symmetric in its two arguments.
    assert float(info_nce(b, a, scale)) == pytest.approx(expected, rel=1e-6)


def test_recall_perfect_shuffled_and_class_level() -> None:
    n = 20
    emb = torch.eye(n)
    present = torch.ones(n, dtype=torch.bool)
    perfect = retrieval_report({"a": emb, "b": emb}, {"a": present, "b": present})
    assert perfect["a_to_b_r1"] == perfect["b_to_a_r1"] == 1.0 and perfect["a_to_b_medr"] == 1.0
    assert perfect["mean_recall"] == 1.0
    # b's rows rolled by one: query i's own item scores 0, one item scores 1 and 18 others tie at 0,
    # so its rank is uniform over 2..20: R@5 = 4/19, R@10 = 9/19, expected rank 11.
    rolled = retrieval_report({"a": emb, "b": emb.roll(1, dims=0)}, {"a": present, "b": present})
    assert rolled["a_to_b_r1"] == 0.0 and rolled["a_to_b_medr"] == pytest.approx(11.0)
    assert rolled["a_to_b_r5"] == pytest.approx(4 / 19) and rolled["a_to_b_r10"] == pytest.approx(9 / 19)
    # Class level: labels of period 2, and the roll by two keeps every label, so every query's
    # top item is relevant although its own pair is not on top.
    labels = torch.arange(n) % 2
    by_class = retrieval_report({"a": emb, "b": emb.roll(2, dims=0)}, {"a": present, "b": present}, labels)
    assert by_class["a_to_b_r1"] == 0.0 and by_class["a_to_b_class_r1"] == 1.0
    assert by_class["mean_class_recall"] == 1.0 and "mean_class_recall" not in perfect
    # Only samples with both modalities count: hiding half of b leaves 10 queries, still perfect.
    half = torch.arange(n) < 10
    partial = retrieval_report({"a": emb, "b": emb}, {"a": present, "b": half})
    assert partial["a_to_b_r1"] == 1.0


def test_ranks_by_hand() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    items = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # Scores: q0 [0, 1, .6] own 0 -> 2 higher; q1 [1, 0, .8] own 0 -> 2 higher; q2 [.8, .6, 1] own 1 -> 0.
    higher, ties = first_relevant_ranks(queries, items, None, None, chunk=2)
    assert higher.tolist() == [2, 2, 0] and ties.tolist() == [0, 0, 0]
    labels = torch.tensor([0, 1, 1])
    # Class level: q0 (label 0) relevant item 0 scores 0 -> 2 higher; q1 relevant items 1, 2 best .8 -> 1.
    assert first_relevant_ranks(queries, items, labels, labels)[0].tolist() == [2, 1, 0]


def test_ties_are_broken_at_random_in_expectation() -> None:
    """Duplicate items (the same caption twice) give equal scores: recall counts them in expectation."""
    queries = torch.eye(3)
    items = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # item 1 duplicates item 0
    higher, ties = first_relevant_ranks(queries, items, None, None)
    # q0: own item 0 ties with item 1; q1: own item (a copy of [1,0,0]) scores 0, items 0 and 1... see below.
    assert higher.tolist() == [0, 0, 0] and ties.tolist() == [1, 2, 0]
    metrics = rank_metrics(higher, ties, "x")
    # P(rank <= 1): q0 1/2, q1 1/3 (three items score 0), q2 1.
    assert metrics["x_r1"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert metrics["x_r5"] == 1.0
    assert metrics["x_medr"] == pytest.approx(1.5)


def test_chunked_topk_matches_full_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(1000, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=1)
    scores, index = chunked_topk(queries, items, k=10, chunk=64)
    full = (queries @ items.T).topk(10, dim=1)
    assert torch.equal(index, full.indices)
    assert torch.allclose(scores, full.values)
    assert chunked_topk(queries, items[:3], k=10)[1].shape == (7, 3)
    with pytest.raises(ValueError, match="positive"):
        chunked_topk(queries, items, k=0)


def test_parse_pairs() -> None:
    mods = ["audio", "image", "text"]
    assert parse_pairs("all", mods) == [("audio", "image"), ("audio", "text"), ("image", "text")]
    assert parse_pairs("anchor:text", mods) == [("audio", "text"), ("image", "text")]
    assert parse_pairs([["text", "image"], ["image", "text"]], mods) == [("image", "text")]
    with pytest.raises(ConfigError, match="anchor 'video'"):
        parse_pairs("anchor:video", mods)
    with pytest.raises(ConfigError, match="'video' is not a modality"):
        parse_pairs([["video", "text"]], mods)
    with pytest.raises(ConfigError, match="two modalities"):
        parse_pairs("all", ["text"])


def test_temperature_is_learnable_and_clamped() -> None:
    head = ContrastiveHead({"a": 4, "b": 4}, 8, 0, temperature=0.07, learn=True)
    assert float(head.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.log_scale.fill_(10.0)
    assert float(head.scale().detach()) == pytest.approx(100.0, rel=1e-5)
    emb = head.embed("a", torch.randn(3, 4))
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_index_round_trip_and_errors(tmp_path: Path) -> None:
    emb = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    index = EmbeddingIndex(ids=["a", "b", "ç", "d"], embeddings={"image": emb, "text": torch.zeros(4, 3)},
                           present={"image": torch.tensor([True, True, False, True]),
                                    "text": torch.zeros(4, dtype=torch.bool)},
                           sources={"image": ["x.png", "y.png", "", "z.png"], "text": [""] * 4})
    path = index.save(tmp_path / "idx.safetensors")
    loaded = EmbeddingIndex.load(path)
    assert loaded.ids == index.ids and loaded.sources == index.sources
    assert torch.equal(loaded.embeddings["image"], emb) and torch.equal(loaded.present["image"], index.present["image"])
    hits = loaded.search(emb[3], "image", k=2)
    assert hits[0]["id"] == "d" and hits[0]["image"] == "z.png"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 2
    assert all(h["id"] != "ç" for h in loaded.search(emb[2], "image", k=3))  # absent rows are never returned
    with pytest.raises(DataError, match="no modality 'audio'"):
        loaded.search(emb[0], "audio", k=1)
    with pytest.raises(DataError, match="holds no 'text' items"):
        loaded.search(emb[0], "text", k=1)
    with pytest.raises(DataError, match="not found"):
        EmbeddingIndex.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        EmbeddingIndex.load(tmp_path / "bad.safetensors")


def tiny_config(tmp_path: Path, manifest: Path, epochs: int = 4) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["data"] = {"manifest": str(manifest), "modalities": {"text": {"kind": "text", "column": "caption"}},
                      "target_column": "shape", "batch_size": 32, "text": {"max_length": 16},
                      "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}}
    config["encoders"] = {"text": {"name": "text_gru", "dim": 32},
                          "image": {"name": "image_cnn", "dim": 32, "channels": [8, 16]},
                          "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}}
    config["task"]["dim"] = 32
    config["optim"] = {"lr": 0.005}
    config["trainer"] = {"max_epochs": epochs, "patience": None, "progress_bar": False}
    path = tmp_path / "contrastive.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("contrastive")
    result = runner.invoke(app, ["train", "-c", str(tiny_config(tmp, synth_manifest)), "--out", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    assert "mean_recall" in result.output
    return tmp / "run" / "model"


def test_save_reload_gives_identical_embeddings(trained: Path, synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.data.manifest import read_manifest
    from mmfuse.tasks.contrastive import embed_records

    model = MultimodalModel.from_pretrained(trained)
    assert model.fusion is None  # contrastive reads the per-modality features only
    records = read_manifest(synth_manifest, model.preprocessor.modalities, target_column=None)[:20]
    first = embed_records(model, records)
    again = embed_records(MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "copy")), records)
    for m in first.embeddings:
        assert torch.equal(first.embeddings[m], again.embeddings[m])


def test_trained_model_beats_chance_at_class_level(trained: Path, synth_manifest: Path, tmp_path: Path) -> None:
    """Caption -> image by shape (the factor both carry), scored on the test split that training never
    saw (train fits, val picks the epoch). At random, a query's top-1 image shares its shape with
    probability (rows of that shape) / (rows), about 0.5; the model must beat that by 0.2."""
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", "-m", str(trained), "--data", str(synth_manifest), "--split", "test",
                                 "--label-column", "shape", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    shapes = [row["shape"] for row in rows if row["split"] == "test"]
    assert f"{len(shapes)} samples" in " ".join(result.output.split())
    chance = sum(shapes.count(shape) for shape in shapes) / len(shapes) ** 2
    metrics = json.loads(out.read_text())
    for key in ("image_to_text_r1", "text_to_image_r10", "audio_to_image_medr", "image_to_audio_class_r5"):
        assert key in metrics and key in result.output
    assert metrics["text_to_image_class_r1"] > chance + 0.2, (metrics["text_to_image_class_r1"], chance)


def test_embed_and_retrieve_round_trip(trained: Path, synth_manifest: Path, tmp_path: Path) -> None:
    index_path = tmp_path / "index.safetensors"
    result = runner.invoke(app, ["embed", "-m", str(trained), "--data", str(synth_manifest), "--out", str(index_path)])
    assert result.exit_code == 0, result.output
    index = EmbeddingIndex.load(index_path)
    assert len(index.ids) == 160 and set(index.embeddings) == {"audio", "image", "text"}
    row = json.loads(synth_manifest.read_text().splitlines()[3])
    result = runner.invoke(app, ["retrieve", "-m", str(trained), "--index", str(index_path),
                                 "--query-text", row["caption"], "--target", "image", "-k", "5"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # The scores are the cosine similarities of the query with the indexed image embeddings.
    from mmfuse.tasks.contrastive import embed_query

    query = embed_query(MultimodalModel.from_pretrained(trained), "text", row["caption"])
    best = int(torch.argmax(index.embeddings["image"] @ query))
    assert hits[0]["id"] == index.ids[best] and hits[0]["image"].endswith(".png")
    assert hits[0]["score"] == pytest.approx(float(index.embeddings["image"][best] @ query), abs=1e-5)
    image = synth_manifest.parent / row["image"]
    result = runner.invoke(app, ["retrieve", "-m", str(trained), "--index", str(index_path),
                                 "--query-image", str(image), "--target", "text", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["results"]) == 3


def test_retrieve_errors(trained: Path, synth_manifest: Path, tmp_path: Path) -> None:
    index_path = tmp_path / "index.safetensors"
    assert runner.invoke(app, ["embed", "-m", str(trained), "--data", str(synth_manifest), "--out",
                               str(index_path), "--split", "test"]).exit_code == 0
    base = ["retrieve", "-m", str(trained), "--index", str(index_path)]
    result = runner.invoke(app, [*base, "--query-text", "a red circle", "--target", "video"])
    assert result.exit_code == 1 and "--target 'video' is not in the index" in result.output
    result = runner.invoke(app, [*base, "--query", "video=x.mp4", "--target", "image"])
    assert result.exit_code == 1 and "no 'video' modality" in result.output
    result = runner.invoke(app, [*base, "--target", "image"])
    assert result.exit_code == 1 and "exactly one query" in result.output
    empty = EmbeddingIndex(ids=["a"], embeddings={"image": torch.zeros(1, 32)},
                           present={"image": torch.zeros(1, dtype=torch.bool)}, sources={"image": [""]})
    empty_path = empty.save(tmp_path / "empty.safetensors")
    result = runner.invoke(app, ["retrieve", "-m", str(trained), "--index", str(empty_path),
                                 "--query-text", "a red circle", "--target", "image"])
    assert result.exit_code == 1 and "holds no 'image' items" in result.output
    result = runner.invoke(app, ["embed", "-m", str(trained), "--data", str(synth_manifest), "--out",
                                 str(tmp_path / "x.safetensors"), "--split", "nope"])
    assert result.exit_code == 1 and "no rows to embed" in result.output
    result = runner.invoke(app, ["evaluate", "-m", str(trained), "--data", str(synth_manifest), "--robustness"])
    assert result.exit_code == 1 and "trained for task 'contrastive'" in result.output


def test_registered_and_needs_two_modalities() -> None:
    assert "contrastive" in TASKS.names()
    task = TASKS.create("contrastive", pairs="anchor:text")
    task.fit(["a", "b", None])
    assert task.encode_target("b").item() == 1 and task.encode_target(None).item() == -1
    # An unseen label (another column at evaluation) gets its own index after the fitted ones.
    assert task.encode_target("zebra").item() == 2 and task.encode_target("zebra").item() == 2
    assert task.monitor == ("mean_recall", "max") and list(task.metrics()) == ["mean_recall"]
    by_label = TASKS.create("contrastive", positives="label")
    assert by_label.monitor == ("mean_class_recall", "max") and list(by_label.metrics()) == ["mean_class_recall"]


def test_info_nce_with_labels() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(4, 3, generator=gen), dim=1)
    b = torch.nn.functional.normalize(torch.randn(4, 3, generator=gen), dim=1)
    scale = torch.tensor(5.0)
    # Distinct labels (or all unlabelled): the same as instance-level InfoNCE.
    assert torch.allclose(info_nce(a, b, scale, torch.tensor([0, 1, 2, 3])), info_nce(a, b, scale))
    assert torch.allclose(info_nce(a, b, scale, torch.tensor([-1, -1, -1, -1])), info_nce(a, b, scale))
    # Labels [0, 0, 1, -1]: rows 0 and 1 have two positives each, by hand.
    logits = scale * a @ b.T
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    by_hand = sum(-(targets[i] * logits[i].log_softmax(0)).sum() - (targets[i] * logits.T[i].log_softmax(0)).sum()
                  for i in range(4)) / 8
    assert float(info_nce(a, b, scale, torch.tensor([0, 0, 1, -1]))) == pytest.approx(float(by_hand), rel=1e-5)
    with pytest.raises(ConfigError, match="positives"):
        TASKS.create("contrastive", positives="class")


def test_faiss_approximate_search_matches_exact(tmp_path: Path) -> None:
    from mmfuse.retrieval import search_faiss, write_faiss

    gen = torch.Generator().manual_seed(4)
    emb = torch.nn.functional.normalize(torch.randn(300, 8, generator=gen), dim=1)
    present = torch.ones(300, dtype=torch.bool)
    present[::7] = False
    index = EmbeddingIndex(ids=[f"i{n}" for n in range(300)], embeddings={"image": emb}, present={"image": present},
                           sources={"image": [f"{n}.png" for n in range(300)]})
    path = index.save(tmp_path / "idx.safetensors")
    assert [p.name for p in write_faiss(index, path)] == ["idx.safetensors.image.faiss"]
    for q in (emb[1], emb[50], torch.nn.functional.normalize(torch.ones(8), dim=0)):
        exact = index.search(q, "image", k=5)
        approx = search_faiss(index, path, q, "image", k=5)
        assert [h["id"] for h in approx] == [h["id"] for h in exact]  # 300 items: HNSW finds the true top 5
        assert [h["score"] for h in approx] == pytest.approx([h["score"] for h in exact], abs=1e-5)
    with pytest.raises(DataError, match="--faiss"):
        search_faiss(index, tmp_path / "other.safetensors", emb[0], "image", k=1)


def test_cli_embed_faiss_and_approximate_retrieve(trained: Path, synth_manifest: Path, tmp_path: Path) -> None:
    index_path = tmp_path / "index.safetensors"
    result = runner.invoke(app, ["embed", "-m", str(trained), "--data", str(synth_manifest), "--out",
                                 str(index_path), "--faiss"])
    assert result.exit_code == 0, result.output
    base = ["retrieve", "-m", str(trained), "--index", str(index_path), "--query-text", "a red circle",
            "--target", "audio", "-k", "3"]
    exact = json.loads(runner.invoke(app, base).output)["results"]
    approx = json.loads(runner.invoke(app, [*base, "--approximate"]).output)["results"]
    assert [h["id"] for h in approx] == [h["id"] for h in exact]
