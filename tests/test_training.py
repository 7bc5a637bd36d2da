"""Training end to end on small synthetic data: the model must really learn, and save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfuse.config import validate_config
from mmfuse.core.masking import drop_modalities
from mmfuse.data.dataset import Collator
from mmfuse.engine.data import load_records, prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit
from mmfuse.model import MultimodalModel


def small_config(manifest: Path, out: Path, **overrides: object) -> dict:
    raw: dict = {
        "seed": 0,
        "data": {"manifest": str(manifest), "target_column": "pitch", "batch_size": 16,
                 "text": {"max_length": 12}, "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 32},
                     "audio": {"name": "audio_cnn", "dim": 32, "channels": [8, 16]}},
        "fusion": {"name": "concat", "out_dim": 32, "proj_dim": 32, "hidden": 32},
        "optim": {"lr": 0.005},
        "trainer": {"max_epochs": 15, "patience": None, "output_dir": str(out), "progress_bar": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def test_concat_learns_the_audio_factor_and_reloads_identically(synth_manifest: Path, tmp_path: Path) -> None:
    config = validate_config(small_config(synth_manifest, tmp_path / "run"))
    result = fit(config, prepare_data(config))
    # 'pitch' is carried by the audio only; chance is 0.5.
    assert result.val_metrics["accuracy"] >= 0.85
    assert result.test_metrics is not None and result.test_metrics["accuracy"] >= 0.85
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()

    reloaded = MultimodalModel.from_pretrained(tmp_path / "run" / "model")
    data = prepare_data(config)
    batch = Collator(reloaded.preprocessor, reloaded.task)([data.datasets["test"][i] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(batch), reloaded(batch))
    assert evaluate(reloaded, data.datasets["test"])["accuracy"] == pytest.approx(result.test_metrics["accuracy"])


def test_late_fusion_regression_beats_the_mean_predictor(synth_manifest: Path, tmp_path: Path) -> None:
    raw = small_config(synth_manifest, tmp_path / "reg", data__target_column="frequency_hz")
    raw["task"] = {"name": "regression"}
    raw["fusion"] = {"name": "late", "hidden": 32}
    config = validate_config(raw)
    data = prepare_data(config)
    result = fit(config, data, save=False)
    targets = torch.tensor([float(r.target) for r in load_records(config)["val"]])
    mean_baseline_mae = float((targets - targets.mean()).abs().mean())
    assert result.val_metrics["mae"] < 0.6 * mean_baseline_mae
    assert result.val_metrics["pearson"] > 0.8


def test_modality_dropout_never_removes_every_modality() -> None:
    torch.manual_seed(0)
    present = {"a": torch.tensor([True, True, False, True] * 50), "b": torch.tensor([True, False, True, True] * 50)}
    dropped = drop_modalities(present, rate=0.9)
    stacked = torch.stack([dropped["a"], dropped["b"]], dim=1)
    assert stacked.any(dim=1).all()
    # Nothing absent becomes present, and at rate 0.9 most present entries are dropped.
    assert not (dropped["a"] & ~present["a"]).any() and not (dropped["b"] & ~present["b"]).any()
    assert stacked.sum() < 0.7 * (present["a"].sum() + present["b"].sum())
    assert drop_modalities(present, 0.0) is present


def test_val_split_is_carved_from_train_when_absent(synth_manifest: Path, tmp_path: Path) -> None:
    import json

    rows = [json.loads(line) for line in synth_manifest.read_text().splitlines()]
    train_only = tmp_path / "train.jsonl"
    train_only.write_text("\n".join(json.dumps({**r, "image": str(synth_manifest.parent / r["image"]),
                                                 "audio": str(synth_manifest.parent / r["audio"])})
                                     for r in rows if r["split"] == "train"))
    raw = small_config(synth_manifest, tmp_path / "x")
    raw["data"].pop("manifest")
    raw["data"]["train"] = str(train_only)
    raw["data"]["val_fraction"] = 0.25
    splits = load_records(validate_config(raw))
    n_train = sum(r["split"] == "train" for r in rows)
    assert len(splits["val"]) == round(n_train * 0.25)
    assert len(splits["train"]) + len(splits["val"]) == n_train
    assert not {r.id for r in splits["val"]} & {r.id for r in splits["train"]}
