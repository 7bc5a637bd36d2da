"""Stall detection: the per-epoch check against hand-computed values, one warning on a run that
cannot learn, none on a run that learns, and the end-of-run note near chance."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from config_helpers import fusion_section

from mmfuse.config import validate_config
from mmfuse.engine.fit import train
from mmfuse.engine.stall import EpochStats, epoch_stats, is_stalled, near_chance_note


def test_epoch_stats_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    stats = epoch_stats(logits, torch.tensor([0, 1, 1, 1]), num_classes=2)
    assert stats.loss == pytest.approx(math.log(2))
    assert stats.prior_entropy == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert stats.majority_rate == 0.75 and stats.predicted_classes == 1 and stats.accuracy == 0.25
    assert is_stalled(stats)  # one class for every sample
    three = epoch_stats(torch.eye(3) * 5, torch.tensor([0, 1, 2]), num_classes=4)
    assert three.accuracy == 1.0 and three.predicted_classes == 3 and three.prior_entropy == pytest.approx(math.log(3))
    assert not is_stalled(three)


def test_is_stalled_needs_the_prior_loss_and_chance_accuracy() -> None:
    at_prior = EpochStats(samples=100, loss=0.70, accuracy=0.51, predicted_classes=2,
                          prior_entropy=math.log(2), majority_rate=0.5)
    assert is_stalled(at_prior)
    assert not is_stalled(EpochStats(100, 0.70, 0.80, 2, math.log(2), 0.5))  # accurate, if overconfident
    assert not is_stalled(EpochStats(100, 0.45, 0.51, 2, math.log(2), 0.5))  # loss well below the prior
    assert is_stalled(EpochStats(100, 0.90, 0.48, 2, math.log(2), 0.5))  # fits noise: loss above the prior
    assert not is_stalled(EpochStats(0, 0.0, 0.0, 0, 0.0, 0.0))


def test_near_chance_note() -> None:
    stats = EpochStats(100, 0.69, 0.5, 2, math.log(2), 0.5)
    note = near_chance_note({"accuracy": 0.52}, stats, samples=10_000)
    assert note is not None and "0.520 is within 3 points" in note and "trainer.balance" in note
    assert "init_from" in note
    assert near_chance_note({"accuracy": 0.54}, stats, samples=10_000) is None
    # 100 samples: two standard errors of chance are 2 * sqrt(0.25 / 100) = 0.10.
    assert "within 10 points" in str(near_chance_note({"accuracy": 0.58}, stats, samples=100))
    assert near_chance_note({"accuracy": 0.61}, stats, samples=100) is None
    assert near_chance_note({"accuracy": 0.52}, None, samples=100) is None
    assert near_chance_note({"mae": 0.5}, stats, samples=100) is None


@pytest.fixture(scope="module")
def xor600(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmfuse.datasets.xor_features import generate_xor_features

    return generate_xor_features(tmp_path_factory.mktemp("xor600"), n_samples=600, dim=8)


def run(manifest: Path, out: Path, modalities: list[str], lr: float, fusion: str = "concat") -> Any:
    return train(validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32,
                 "modalities": {m: {"kind": "features", "column": m} for m in modalities}},
        "encoders": {m: {"name": "identity", "dim": 8} for m in modalities},
        "fusion": fusion_section(fusion, out_dim=16), "optim": {"lr": lr},
        "trainer": {"max_epochs": 5, "patience": None, "output_dir": str(out), "progress_bar": False}}))


def test_a_run_that_cannot_learn_warns_once(xor600: Path, tmp_path: Path, one_thread: None,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # One modality of an XOR task: exactly no signal, so validation stays at the prior.
    with caplog.at_level(logging.WARNING, logger="mmfuse.engine.stall"):
        result = run(xor600, tmp_path, ["a"], lr=0.002)
    warnings = [r for r in caplog.records if r.name == "mmfuse.engine.stall"]
    assert len(warnings) == 1
    assert result.stall_warning == warnings[0].getMessage()
    for option in ("trainer.unimodal_loss_weight", "trainer.balance", "trainer.modality_dropout", "optim.lr",
                   "warmup_steps", "init_from"):
        assert option in result.stall_warning
    assert result.chance_note is not None and "chance" in result.chance_note


def test_decision_level_fusion_is_told_it_cannot_learn_an_interaction(xor600: Path, tmp_path: Path,
                                                                      one_thread: None) -> None:
    # Late fusion sums one vote per modality: no sum u(a) + v(b) gets XOR right, so it stays at the
    # prior with the lr at which concat learns (next test), and every message leads with the fix.
    result = run(xor600, tmp_path, ["a", "b"], lr=0.01, fusion="late")
    assert result.val_metrics["accuracy"] < 0.6
    for message in (result.stall_warning, result.chance_note):
        assert message is not None
        assert "first, a feature-level fusion (fusion.name: concat, lmf or tfn): 'late'" in message
        assert "trainer.balance" in message  # the usual options follow
    # at the prior, all modalities score no better than the best one alone: the note says so, with the fix
    assert result.contribution_note is not None and "fusion adds nothing over it" in result.contribution_note
    assert "'late' averages one vote" in result.contribution_note


def test_a_learning_run_does_not_warn(xor600: Path, tmp_path: Path, one_thread: None,
                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmfuse.engine.stall"):
        result = run(xor600, tmp_path, ["a", "b"], lr=0.01)
    assert result.val_metrics["accuracy"] > 0.7
    assert result.stall_warning is None and result.chance_note is None
    assert not [r for r in caplog.records if r.name == "mmfuse.engine.stall"]


def test_mmfuse_train_says_when_a_run_ends_at_chance(tmp_path: Path, one_thread: None) -> None:
    import yaml
    from typer.testing import CliRunner

    from mmfuse.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["data", "xor-features", "--out", str(tmp_path / "xor"), "--n", "2000", "--dim", "8"])
    assert made.exit_code == 0, made.output
    config = tmp_path / "one-modality.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"manifest": str(tmp_path / "xor" / "manifest.jsonl"), "modalities": {"a": {"kind": "features",
                                                                                          "column": "a"}}},
        "encoders": {"a": {"name": "identity", "dim": 8}},
        "trainer": {"max_epochs": 3, "patience": None, "progress_bar": False}}))
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "points of chance (the majority-class rate 0.500; 300 samples)" in text and "trainer.balance" in text
