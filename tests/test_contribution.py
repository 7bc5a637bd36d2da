"""The end-of-training note on modality contributions (``mmfuse.engine.contribution``): exact values on a
hand-made model, the wording of both findings, silence when every modality helps."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfuse.config import validate_config
from mmfuse.engine.contribution import Contributions, contribution_note, contributions
from mmfuse.engine.fit import train


def synthetic_run(manifest: Path, out: Path, target: str) -> dict:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "target_column": target, "batch_size": 16, "text": {"max_length": 12},
                 "image": {"size": 16}, "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8, 16]}},
        "fusion": {"name": "concat", "out_dim": 16, "proj_dim": 16, "hidden": 16},
        "optim": {"lr": 0.01},
        "trainer": {"max_epochs": 12, "patience": None, "output_dir": str(out), "progress_bar": False, "threads": 1},
    }


def test_the_note_names_an_idle_modality_and_a_fusion_that_adds_nothing() -> None:
    everyone = Contributions(full=0.9, empty=0.1, alone={"a": 0.4, "b": 0.5}, shapley={"a": 0.35, "b": 0.45},
                             samples=200)
    assert contribution_note(everyone) is None and contribution_note(None) is None
    idle = Contributions(full=0.60, empty=0.10, alone={"audio": 0.595, "image": 0.12},
                         shapley={"audio": 0.49, "image": 0.01}, samples=300)
    note = contribution_note(idle)
    assert note is not None
    assert "audio alone reaches 0.595, within 1 point of all modalities together (0.600)" in note
    assert "image adds next to nothing" in note and "audio +0.490, image +0.010" in note
    assert "unimodal_loss_weight" in note and "trainer.balance" in note


def test_a_model_that_uses_one_modality_gets_the_note(synth_manifest: Path, tmp_path: Path,
                                                      one_thread: None) -> None:
    # The synthetic label's pitch factor is carried by the audio alone: image and text cannot help.
    result = train(validate_config(synthetic_run(synth_manifest, tmp_path / "pitch", "pitch")))
    found = contributions(result.model, _val(result, synth_manifest))
    assert found is not None and found.samples == 16
    assert found.full == pytest.approx(result.val_metrics["accuracy"])
    assert sum(found.shapley.values()) == pytest.approx(found.full - found.empty)  # efficiency, exactly
    assert found.alone["audio"] >= found.full - 0.07 and found.full >= 0.9
    assert result.contribution_note is not None and "next to nothing" in result.contribution_note
    assert "image" in result.contribution_note.split(":", 2)[-1]


def _val(result, manifest: Path):  # type: ignore[no-untyped-def]
    from mmfuse.engine.data import prepare_data

    return prepare_data(validate_config(synthetic_run(manifest, result.output_dir, "pitch"))).datasets["val"]
