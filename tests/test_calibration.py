"""Calibration: temperature lookup by presence pattern, the fit itself, ECE, and a trained model's
validation NLL per pattern never worse than its raw softmax (the fit includes T = 1)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_training import small_config
from torch.nn import functional as F

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import Collator
from mmfuse.engine.calibration import collect_logits, fit_temperature
from mmfuse.engine.data import prepare_data
from mmfuse.engine.evaluate import evaluate
from mmfuse.engine.fit import fit
from mmfuse.model import MultimodalModel
from mmfuse.tasks.classification import ClassificationTask
from mmfuse.tasks.temperature import PresenceTemperature, pattern_name


def test_pattern_names_and_lookup_by_presence() -> None:
    assert pattern_name(["text", "audio"]) == "audio+text" and pattern_name([]) == "none"
    temps = PresenceTemperature(["text", "audio"], default=3.0, by_pattern={"audio+text": 1.0, "audio": 2.0})
    assert temps.modalities == ["audio", "text"]
    # codes: bit 0 = audio, bit 1 = text -> none, audio, text, both
    assert temps.table().tolist() == [3.0, 2.0, 3.0, 1.0]
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0], [2.0, -2.0], [2.0, -2.0]])
    present = {"audio": torch.tensor([True, True, False, False]), "text": torch.tensor([True, False, True, False])}
    scaled = temps.scale(logits, present)
    assert scaled[:, 0].tolist() == pytest.approx([2.0, 1.0, 2 / 3, 2 / 3])
    # a modality the batch does not carry counts as absent
    assert temps.scale(logits[:1], {"audio": torch.tensor([True])})[0, 0].item() == pytest.approx(1.0)
    assert PresenceTemperature.from_state(temps.state()) == temps
    with pytest.raises(ValueError, match="'audio' must be > 0"):
        PresenceTemperature(["audio"], by_pattern={"audio": 0.0})


def test_fit_recovers_a_known_temperature() -> None:
    torch.manual_seed(0)
    base = torch.randn(20000, 4) * 2
    targets = torch.distributions.Categorical(logits=base).sample()
    # logits twice as sharp as the labels' true distribution: the fit must find T = 2
    assert fit_temperature(base * 2.0, targets) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(base * 0.5, targets) == pytest.approx(0.5, rel=0.05)


def test_temperature_keeps_the_decision_and_the_state_round_trips() -> None:
    task = ClassificationTask(labels=["a", "b", "c"])
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 4.0]])
    present = {"image": torch.tensor([True, False])}
    task.temperature = PresenceTemperature(["image"], default=1.0, by_pattern={"none": 4.0, "image": 0.5})
    calibrated = task.calibrate(logits, present)
    assert calibrated.argmax(-1).tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(calibrated, torch.tensor([[6.0, 2.0, 0.0], [0.0, 0.125, 1.0]]))
    restored = ClassificationTask()
    restored.load_state(task.state())
    assert restored.temperature == task.temperature and restored.labels == task.labels
    plain = ClassificationTask(labels=["a", "b"])
    plain.load_state({"labels": ["a", "b"]})  # a model saved before calibration existed
    assert plain.temperature is None and torch.equal(plain.calibrate(logits, present), logits)


def test_ece_is_computed_from_probabilities_even_for_small_logits() -> None:
    task = ClassificationTask(labels=["a", "b"])
    metrics = task.metrics()
    # logits inside [0, 1] would be read as probabilities without the softmax in metric_inputs
    logits = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1, 1])
    metrics.update(*task.metric_inputs(logits, targets))
    probs = logits.softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == targets).float()
    # every confidence here falls in one of two 1/15-wide bins: compute the ECE by hand
    bins = (confidence * 15).floor()
    expected = sum(float((confidence[bins == b].sum() - correct[bins == b].sum()).abs()) for b in bins.unique()) / 4
    assert float(metrics.compute()["ece"]) == pytest.approx(expected, abs=1e-6)


def test_unknown_calibration_is_a_config_error(synth_manifest: Path, tmp_path: Path) -> None:
    raw = small_config(synth_manifest, tmp_path / "x", trainer__calibration="platt")
    with pytest.raises(ConfigError, match=r"trainer\.calibration"):
        validate_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """400 samples: a validation split of 40, over MIN_SAMPLES, so every pattern gets its own fit."""
    from mmfuse.datasets.synth import generate_synthetic

    manifest = generate_synthetic(tmp_path_factory.mktemp("synth400"), n_samples=400, seed=1)
    out = tmp_path_factory.mktemp("calibrated") / "run"
    raw = small_config(manifest, out, trainer__max_epochs=6)
    config = validate_config(raw)
    data = prepare_data(config)
    return fit(config, data), data


def test_training_fits_per_subset_temperatures_that_lower_validation_nll(trained: tuple) -> None:
    result, data = trained
    task = result.model.task
    assert isinstance(task, ClassificationTask) and task.temperature is not None
    assert data.task.temperature is None  # the shared PreparedData's task is left alone
    # 2 modalities: both, each alone, none; 40 validation samples each, so each has its own fit
    groups = collect_logits(result.model, data.datasets["val"], per_subset=True)
    assert set(groups) == set(task.temperature.by_pattern) == {"audio+text", "audio", "text", "none"}
    for name, (logits, targets) in groups.items():
        temperature = task.temperature.by_pattern[name]
        raw = float(F.cross_entropy(logits.double(), targets))
        calibrated = float(F.cross_entropy(logits.double() / temperature, targets))
        assert calibrated <= raw + 1e-9, f"{name}: NLL {calibrated} > uncalibrated {raw}"
    # hiding the pitch-carrying audio leaves text at chance: its temperature must flatten, not sharpen
    assert task.temperature.by_pattern["text"] > 1.0
    assert not math.isclose(task.temperature.by_pattern["audio+text"], task.temperature.by_pattern["text"])


def test_a_calibrated_model_reloads_to_identical_outputs(trained: tuple) -> None:
    result, data = trained
    reloaded = MultimodalModel.from_pretrained(result.model_dir)
    assert isinstance(reloaded.task, ClassificationTask) and reloaded.task.temperature == result.model.task.temperature
    batch = Collator(reloaded.preprocessor, reloaded.task)([data.datasets["test"][i] for i in range(8)])
    hidden = Collator(reloaded.preprocessor, reloaded.task)([data.datasets["test"][i] for i in range(8)])
    hidden.present["audio"] = torch.zeros_like(hidden.present["audio"])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(batch), reloaded(batch))
        # the audio-less pattern gets its own temperature
        plain = reloaded.head(reloaded.fusion(reloaded.encode(hidden)))
        temperature = reloaded.task.temperature.by_pattern["text"]
        assert torch.allclose(reloaded(hidden), plain / temperature)
    assert "ece" in evaluate(reloaded, data.datasets["test"])


def test_calibration_none_leaves_the_logits_raw(synth_manifest: Path, tmp_path: Path) -> None:
    raw = small_config(synth_manifest, tmp_path / "raw", trainer__max_epochs=1, trainer__calibration="none")
    config = validate_config(raw)
    result = fit(config, prepare_data(config), save=False)
    assert isinstance(result.model.task, ClassificationTask) and result.model.task.temperature is None
