"""The ``features`` modality kind: pre-extracted arrays -> collated (B, T, D) + mask -> every fusion.

Also the ``sentiment`` task's MOSI metrics, checked against numbers computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from config_helpers import fusion_section

from mmfuse.config import FeaturesPrep, ModalitySpec, validate_config
from mmfuse.core.errors import DataError
from mmfuse.data import arrays
from mmfuse.data.dataset import Collator, MultimodalDataset, build_sample
from mmfuse.data.manifest import read_manifest
from mmfuse.data.preprocess import Preprocessor
from mmfuse.datasets.feature_example import generate_feature_example
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS

MODS = {"seq": ModalitySpec(kind="features", column="seq"), "vec": ModalitySpec(kind="features", column="vec")}


@pytest.fixture(autouse=True)
def _fresh_mmaps() -> None:
    arrays.clear_cache()


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """3 samples: 'seq' = one (T, 4) .npy per sample (T = 2, 5, absent); 'vec' = rows of a (3, 3) file."""
    rng = np.random.default_rng(0)
    seqs = {"a": rng.normal(size=(2, 4)), "b": rng.normal(size=(5, 4))}
    (tmp_path / "seq").mkdir()
    for name, value in seqs.items():
        np.save(tmp_path / "seq" / f"{name}.npy", value)
    vec = rng.normal(size=(3, 3)).astype(np.float32)
    np.save(tmp_path / "vec_train.npy", vec)
    rows: list[dict[str, Any]] = [
        {"id": "a", "seq": "seq/a.npy", "vec": "vec_train.npy#0", "label": 1.0},
        {"id": "b", "seq": "seq/b.npy", "vec": "vec_train.npy#2", "label": -2.0},
        {"id": "c", "seq": None, "vec": "vec_train.npy#1", "label": 0.0},
    ]
    return write_rows(tmp_path / "manifest.jsonl", rows), {"a": seqs["a"], "b": seqs["b"], "vec": vec}


def make_prep(max_length: int = 512) -> Preprocessor:
    from mmfuse.config import AudioPrep, ImagePrep, TextPrep

    return Preprocessor(MODS, TextPrep(), ImagePrep(), AudioPrep(), features=FeaturesPrep(max_length=max_length))


def test_preprocess_and_collate_shapes_values_and_mask(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    manifest, data = tiny
    records = read_manifest(manifest, MODS)
    prep = make_prep()
    prep.fit(records)
    assert prep.feature_dims == {"seq": 4, "vec": 3}
    ctx = prep.context("seq")
    assert (ctx.kind, ctx.feature_dim, ctx.max_length) == ("features", 4, 512)
    dataset = MultimodalDataset(records, prep, None)
    assert dataset[0].inputs["seq"] is not None and dataset[0].inputs["seq"]["values"].shape == (2, 4)
    assert dataset[0].inputs["vec"]["values"].shape == (1, 3)  # type: ignore[index]  # (D,) -> T=1
    batch = Collator(prep, None)([dataset[i] for i in range(3)])
    seq, vec = batch.inputs["seq"], batch.inputs["vec"]
    assert seq["values"].shape == (3, 5, 4) and seq["values"].dtype == torch.float32
    assert seq["mask"].tolist() == [[True] * 2 + [False] * 3, [True] * 5, [False] * 5]
    torch.testing.assert_close(seq["values"][0, :2], torch.tensor(data["a"], dtype=torch.float32))
    torch.testing.assert_close(seq["values"][1], torch.tensor(data["b"], dtype=torch.float32))
    assert not seq["values"][0, 2:].any() and not seq["values"][2].any()
    assert batch.present["seq"].tolist() == [True, True, False]
    assert vec["values"].shape == (3, 1, 3) and vec["mask"].all()
    torch.testing.assert_close(vec["values"][:, 0], torch.tensor(data["vec"][[0, 2, 1]]))
    # max_length crops long sequences to their first steps.
    short = make_prep(max_length=3)
    short.fit(records)
    assert short.encode("seq", str(manifest.parent / "seq" / "b.npy"))["values"].shape == (3, 4)  # type: ignore[index]
    # The fitted state survives save/load.
    assert Preprocessor.from_state(json.loads(json.dumps(prep.state()))).feature_dims == {"seq": 4, "vec": 3}


def test_errors_name_the_row_and_file(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    manifest, _ = tiny
    folder = manifest.parent
    np.save(folder / "seq" / "wide.npy", np.zeros((3, 7), dtype=np.float32))
    bad = write_rows(folder / "bad.jsonl", [
        {"id": "x", "seq": "seq/wide.npy", "vec": "vec_train.npy#0", "label": 0.0},
        {"id": "y", "seq": "seq/missing.npy", "vec": "vec_train.npy#0", "label": 0.0},
        {"id": "z", "seq": "seq/a.npy", "vec": "vec_train.npy#9", "label": 0.0},
    ])
    prep = make_prep()
    prep.fit(read_manifest(manifest, MODS))
    records = read_manifest(bad, MODS)
    with pytest.raises(DataError, match=r"bad\.jsonl row 1 \(id x\): .*wide\.npy: feature width D=7 .*'seq' has D=4"):
        build_sample(records[0], prep, None)
    with pytest.raises(DataError, match=r"bad\.jsonl row 2 \(id y\): array file not found: .*missing\.npy"):
        build_sample(records[1], prep, None)
    with pytest.raises(DataError, match=r"bad\.jsonl row 3 \(id z\): .*vec_train\.npy row 9: row index out of range"):
        build_sample(records[2], prep, None)
    skipping = MultimodalDataset(records, prep, None, on_error="skip")
    assert len(skipping) == 0 and skipping.report.count == 3
    # A modality that no training sample has cannot be fitted.
    empty = write_rows(folder / "empty.jsonl", [{"id": "e", "seq": None, "vec": "vec_train.npy#0", "label": 1}])
    with pytest.raises(DataError, match=r"no training sample has the features modality 'seq'"):
        make_prep().fit(read_manifest(empty, MODS))


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_feature_example(tmp_path_factory.mktemp("features"), n_samples=120, seed=0)


def example_config(manifest: Path, out: Path, fusion: str = "concat", **trainer: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 16, "features": {"max_length": 24},
                 "modalities": {"words": {"kind": "features", "column": "words"},
                                "acoustic": {"kind": "features", "column": "acoustic"}}},
        "encoders": {"words": {"name": "sequence", "dim": 16, "layers": 1, "heads": 2},
                     "acoustic": {"name": "identity", "dim": 16}},
        "fusion": fusion_section(fusion, out_dim=16),
        "task": {"name": "sentiment"},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(out), "progress_bar": False, **trainer},
    }


def test_feature_example_is_deterministic(tmp_path: Path, example: Path) -> None:
    again = generate_feature_example(tmp_path, n_samples=120, seed=0)
    assert again.read_text() == example.read_text()
    first = json.loads(example.read_text().splitlines()[0])
    assert first["acoustic"] == "acoustic_train.npy#0" and first["words"].endswith(".npy")
    np.testing.assert_array_equal(np.load(again.parent / "acoustic_test.npy"),
                                  np.load(example.parent / "acoustic_test.npy"))


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_feature_encoders_work_with_every_fusion(example: Path, tmp_path: Path, fusion: str) -> None:
    """identity + sequence encoders feed each fusion method: finite outputs, gradients reach every encoder."""
    config = validate_config(example_config(example, tmp_path, fusion))
    data = prepare_data(config)
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    batch = Collator(data.preprocessor, data.task)([data.datasets["train"][i] for i in range(6)])
    out = model(batch)
    assert out.shape == (6, 1) and torch.isfinite(out).all()
    assert batch.target is not None
    data.task.loss(out, batch.target).backward()  # type: ignore[attr-defined]
    for modality in ("words", "acoustic"):
        grads = [p.grad for p in model.encoders[modality].parameters()]
        assert grads and all(g is not None for g in grads), f"{fusion}: {modality} gets no gradient"
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_train_one_epoch_save_reload_identical(example: Path, tmp_path: Path) -> None:
    config = validate_config(example_config(example, tmp_path / "run"))
    data = prepare_data(config)
    result = fit(config, data)
    assert result.test_metrics is not None
    assert {"mae", "pearson", "acc2", "acc2_nonzero", "f1", "f1_nonzero", "acc7"} <= set(result.test_metrics)
    assert result.model_dir is not None
    reloaded = MultimodalModel.from_pretrained(result.model_dir)
    assert reloaded.preprocessor.feature_dims == {"acoustic": 12, "words": 16}
    batch = Collator(reloaded.preprocessor, reloaded.task)([data.datasets["test"][i] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(batch), reloaded(batch))
    predictions = reloaded.predict(batch)
    assert predictions[0]["sentiment"] in ("positive", "negative") and isinstance(predictions[0]["value"], float)



@pytest.mark.usefixtures("one_thread")
def test_features_model_learns_the_sentiment(tmp_path: Path) -> None:
    """Acceptance, CI-fast form: on pre-extracted feature arrays the model beats every constant
    predictor on the held-out test split (never used for training or model selection).

    The best constant under MAE is the training labels' median (the mean is also tried); the
    model must cut the error by 30% and correlate with the truth. 300 samples, 8 epochs: ~1 s.
    """
    manifest = generate_feature_example(tmp_path / "data", n_samples=300, seed=0)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    train = np.array([r["label"] for r in rows if r["split"] == "train"])
    test = np.array([r["label"] for r in rows if r["split"] == "test"])
    constant_mae = min(float(np.abs(test - np.median(train)).mean()), float(np.abs(test - train.mean()).mean()))
    config = validate_config(example_config(manifest, tmp_path / "learn", max_epochs=8))
    data = prepare_data(config)
    assert len(data.datasets["test"]) == len(test) == 45
    result = fit(config, data, save=False)
    assert result.test_metrics is not None
    mae, pearson = result.test_metrics["mae"], result.test_metrics["pearson"]
    assert mae < 0.7 * constant_mae, f"held-out MAE {mae:.3f} vs the best constant's {constant_mae:.3f}"
    assert pearson > 0.5, f"held-out Pearson r {pearson:.3f}"


# ---- MOSI metrics ----------------------------------------------------------------------------------

PREDS = [2.4, -0.6, 0.0, 1.2, -2.6, 0.3, -3.5, 0.5]
TRUTH = [3.0, -1.0, 0.0, 0.0, -2.4, -0.2, -2.0, 1.5]
# Worked by hand (see the sentiment module docstring for the definitions):
# Has0 signs (>= 0): preds 1 0 1 1 0 1 0 1, truth 1 0 1 1 0 0 0 1 -> 7/8 right.
#   F1 positive: P 4/5, R 4/4 -> 8/9; negative: P 3/3, R 3/4 -> 6/7; support 4/4 -> mean 0.873016.
# Non0 drops the two zero targets: preds > 0: 1 0 0 1 0 1, truth > 0: 1 0 0 0 0 1 -> 5/6 right.
#   F1 positive: P 2/3, R 1 -> 0.8 (support 2); negative: P 1, R 3/4 -> 6/7 (support 4) -> 0.838095.
# Acc-7 (clip, round half to even): preds 2 -1 0 1 -3 0 -3 0, truth 3 -1 0 0 -2 0 -2 2 -> 3/8.
# MAE: (0.6 + 0.4 + 0 + 1.2 + 0.2 + 0.5 + 1.5 + 1.0) / 8 = 0.675.
EXPECTED = {"acc2": 7 / 8, "f1": (8 / 9 + 6 / 7) / 2, "acc2_nonzero": 5 / 6, "f1_nonzero": (2 * 0.8 + 4 * 6 / 7) / 6,
            "acc7": 3 / 8, "mae": 0.675, "pearson": float(np.corrcoef(PREDS, TRUTH)[0, 1])}


def test_mosi_metrics_match_hand_computed_values() -> None:
    task = TASKS.create("sentiment")
    metrics = task.metrics()
    # Two updates (as over two batches) must accumulate to the same numbers as one.
    metrics.update(torch.tensor(PREDS[:3]), torch.tensor(TRUTH[:3]))
    metrics.update(torch.tensor(PREDS[3:]), torch.tensor(TRUTH[3:]))
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert set(values) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert values[name] == pytest.approx(expected, abs=1e-5), name


def test_sentiment_metric_inputs_are_in_original_units() -> None:
    task = TASKS.create("sentiment")
    task.fit([-3.0, 3.0, 1.0])
    target = torch.tensor([[2.0], [-1.0]])
    outputs = (target - task.mean[0]) / task.std[0]  # type: ignore[attr-defined]
    preds, _ = task.metric_inputs(outputs, target)  # type: ignore[attr-defined]
    torch.testing.assert_close(preds, torch.tensor([2.0, -1.0]))
    assert [d["sentiment"] for d in task.decode(outputs)] == ["positive", "negative"]  # type: ignore[attr-defined]
