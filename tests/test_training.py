"""Training end to end on small synthetic data: the model must really learn, and save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfuse.config import validate_config
from mmfuse.core.errors import DataError
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


# ---- bad rows: errors that name them, skips that are written down --------------------------------


def tiny_config(tmp_path: Path, splits: dict[str, list[dict]], task: str = "regression", **data: object) -> dict:
    """A text-only run over one JSONL manifest per split (``train.jsonl``, ...), quick to train."""
    raw: dict = {
        "seed": 0,
        "data": {"target_column": "y", "batch_size": 4, "modalities": {"text": {"kind": "text", "column": "text"}},
                 "text": {"max_length": 4}, **data},
        "encoders": {"text": {"name": "text_gru", "dim": 4}},
        "fusion": {"name": "concat", "out_dim": 4},
        "task": {"name": task},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(tmp_path / "run"), "progress_bar": False,
                    "accelerator": "cpu"},
    }
    for split, rows in splits.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes float('nan') as NaN
        raw["data"][split] = str(path)
    return raw


def numbered(prefix: str, values: list[object]) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"word{i % 3} other", "y": v} for i, v in enumerate(values)]


def test_bad_regression_targets_name_file_row_id_and_the_value_as_written(tmp_path: Path) -> None:
    """'abc' in training once failed while fitting, naming no row; NaN read as a missing value said 'None'."""
    val = numbered("v", [1.0, 2.0])
    raw = tiny_config(tmp_path, {"train": numbered("t", [1.0, 2.0, "abc", 3.0]), "val": val})
    with pytest.raises(DataError, match=r"^train.jsonl row 3 \(id t2\): target 'abc' is not a number$"):
        prepare_data(validate_config(raw))
    raw = tiny_config(tmp_path, {"train": numbered("t", [1.0, 2.0, 3.0, float("nan")]), "val": val})
    with pytest.raises(DataError, match=r"^train.jsonl row 4 \(id t3\): target NaN is not a finite number$"):
        prepare_data(validate_config(raw))
    raw = tiny_config(tmp_path, {"train": numbered("t", [1.0, 2.0, 3.0]), "val": numbered("v", [1.0, [2.0, 1.0]])})
    with pytest.raises(DataError, match=r"^val.jsonl row 2 \(id v1\): expected 1 target value\(s\), got 2$"):
        prepare_data(validate_config(raw))


@pytest.mark.filterwarnings("ignore:The variance of predictions:UserWarning")  # one epoch, tiny data
def test_skip_mode_skips_bad_regression_targets_and_writes_them_to_the_run_folder(tmp_path: Path) -> None:
    train = numbered("t", [1.0, "abc", 2.0, float("nan"), 3.0, None, 4.0])
    raw = tiny_config(tmp_path, {"train": train, "val": numbered("v", [1.0, "x", 2.0])}, on_error="skip")
    data = prepare_data(validate_config(raw))
    assert [s.id for s in data.datasets["train"].samples] == ["t0", "t2", "t4", "t6"]
    assert data.task.mean == pytest.approx([2.5])  # fitted on the four good targets only
    assert {name: report.count for name, report in data.skipped.items()} == {"train": 3, "val": 1}
    result = fit(validate_config(raw), data)
    assert result.skipped == {"train": 3, "val": 1}
    assert result.skipped_file == tmp_path / "run" / "skipped.jsonl"
    lines = [json.loads(line) for line in result.skipped_file.read_text().splitlines()]
    assert lines == [
        {"split": "train", "file": "train.jsonl", "row": 2, "id": "t1", "reason": "target 'abc' is not a number"},
        {"split": "train", "file": "train.jsonl", "row": 4, "id": "t3", "reason": "target NaN is not a finite number"},
        {"split": "train", "file": "train.jsonl", "row": 6, "id": "t5", "reason": "the target is empty"},
        {"split": "val", "file": "val.jsonl", "row": 2, "id": "v1", "reason": "target 'x' is not a number"},
    ]
    # A later run in the same folder with nothing to skip leaves no stale list behind.
    clean = tiny_config(tmp_path, {"train": numbered("t", [1.0, 2.0, 3.0]), "val": numbered("v", [1.0])},
                        on_error="skip")
    clean["trainer"]["overwrite"] = True  # the folder holds the finished first run
    again = fit(validate_config(clean), prepare_data(validate_config(clean)))
    assert again.skipped == {} and again.skipped_file is None and not (tmp_path / "run" / "skipped.jsonl").exists()


def test_manifest_template_raises_on_bad_rows() -> None:
    import yaml

    template = yaml.safe_load((Path(__file__).parents[1] / "configs" / "manifest-template.yaml").read_text())
    assert template["data"]["on_error"] == "raise"


def test_ids_shared_between_splits_are_an_error_unless_allowed(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Overlapping ids (a sample in train and in val or test) once went unnoticed."""
    train = numbered("t", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    splits = {"train": train, "val": [*train[:2], *numbered("v", [1.0])], "test": [train[1], *train[4:]]}
    raw = tiny_config(tmp_path, splits)
    message = (r"^5 sample ids appear in more than one split \(train and val: 2, train and test: 4, val and test: 1\), "
               r"e\.g\. t0, t1, t4, t5, t6; set data\.allow_overlap: true if that is intended$")
    with pytest.raises(DataError, match=message):
        prepare_data(validate_config(raw))
    caplog.set_level("WARNING", logger="mmfuse")
    data = prepare_data(validate_config(tiny_config(tmp_path, splits, allow_overlap=True)))
    assert len(data.datasets["test"]) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["5 sample ids appear in more than one split (train and val: 2, train and test: 4, "
                        "val and test: 1), e.g. t0, t1, t4, t5, t6 (data.allow_overlap: true)"]
    disjoint = {"train": train, "val": numbered("v", [1.0, 2.0])}
    caplog.clear()
    prepare_data(validate_config(tiny_config(tmp_path, disjoint)))
    assert not caplog.records


def test_cropped_clips_are_reported_once_per_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A long clip was cropped to data.audio.max_seconds without a word."""
    import numpy as np
    import soundfile as sf

    sr = 8000
    for name, seconds in (("long", 2.5), ("longer", 3.0), ("short", 0.5), ("exact", 1.0)):
        sf.write(tmp_path / f"{name}.wav", np.full(int(seconds * sr), 0.1, dtype=np.float32), sr)
    rows = [{"id": f"{n}{i}", "text": "a b", "audio": f"{n}.wav", "y": float(i)}
            for i, n in enumerate(["long", "short", "exact", "longer", "short"])]
    raw = tiny_config(tmp_path, {"train": rows[:3], "val": rows[3:]},
                      audio={"sample_rate": sr, "n_mels": 8, "n_fft": 256, "hop_length": 128, "max_seconds": 1.0})
    raw["data"]["modalities"]["audio"] = {"kind": "audio", "column": "audio"}
    raw["encoders"]["audio"] = {"name": "audio_cnn", "dim": 4, "channels": [4]}
    caplog.set_level("WARNING", logger="mmfuse")
    data = prepare_data(validate_config(raw))
    assert [s.inputs["audio"]["mel"].shape[1] for s in data.datasets["train"].samples] == [63, 32, 63]  # type: ignore[index]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["2 audio clips were longer than data.audio.max_seconds and were cropped to their first "
                        "1 s (the longest was 3 s)"]
