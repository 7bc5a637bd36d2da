"""Modality-imbalance remedies (trainer.balance): each one's key quantity against hand-computed values,
the gradients they change, end-to-end training with missing modalities, and option errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import Collator
from mmfuse.engine.balance import AGM, OGMGE, GradBlend, build_balance
from mmfuse.engine.balance.agm import agm_coefficients, shapley_responses
from mmfuse.engine.balance.grad_blend import blend_weights
from mmfuse.engine.balance.ogm_ge import ogm_coefficients
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.module import FusionModule
from mmfuse.model import MultimodalModel


def xor_config(manifest: Path, out: Path, balance: str = "none", options: dict | None = None,
               task: str = "classification") -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32,
                 "modalities": {"a": {"kind": "features", "column": "a"}, "b": {"kind": "features", "column": "b"}}},
        "encoders": {"a": {"name": "identity", "dim": 8}, "b": {"name": "identity", "dim": 8}},
        "fusion": {"name": "concat", "out_dim": 16},
        "task": {"name": task},
        "trainer": {"max_epochs": 2, "patience": None, "output_dir": str(out), "progress_bar": False,
                    "balance": balance, "balance_options": options or {}},
    }


@pytest.fixture(scope="module")
def xor_missing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmfuse.datasets.xor_features import generate_xor_features

    return generate_xor_features(tmp_path_factory.mktemp("xor"), n_samples=160, dim=8, missing_rate=0.3)


@pytest.fixture(scope="module")
def prepared(xor_missing: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, PreparedData]:
    config = validate_config(xor_config(xor_missing, tmp_path_factory.mktemp("run")))
    return config, prepare_data(config)


def module_for(prepared: tuple[Any, PreparedData], balance: str, options: dict | None = None) -> FusionModule:
    config, data = prepared
    config = config.model_copy(deep=True)
    config.trainer.balance, config.trainer.balance_options = balance, options or {}
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    return FusionModule(model, config.optim, balance=build_balance(config.trainer, model))


def a_batch(data: PreparedData, n: int = 32) -> Any:
    return Collator(data.preprocessor, data.task)([data.datasets["train"][i] for i in range(n)])


def backward(module: FusionModule, batch: Any) -> dict[str, torch.Tensor]:
    """Runs the remedy's loss and backward; returns the encoders' gradients before any modulation."""
    module.zero_grad()
    assert module.balance is not None
    module.balance.training_loss(module.model, module.model.encode(batch), batch.target, epoch=0).loss.backward()
    return {n: p.grad.clone() for n, p in module.model.encoders.named_parameters() if p.grad is not None}


# ---- OGM-GE --------------------------------------------------------------------------------------


def test_ogm_coefficients_follow_the_formula() -> None:
    k = ogm_coefficients({"a": 0.8, "b": 0.4}, alpha=0.5)
    assert k == {"a": pytest.approx(1 - math.tanh(0.5 * (2.0 - 1))), "b": 1.0}
    assert k["a"] == pytest.approx(0.537882842)
    # Three modalities: rho_m = s_m / mean of the others.
    k3 = ogm_coefficients({"a": 0.9, "b": 0.3, "c": 0.6}, alpha=1.0)
    assert k3["a"] == pytest.approx(1 - math.tanh(0.9 / 0.45 - 1))
    assert k3["b"] == 1.0 and k3["c"] == 1.0  # 0.6 / 0.6 = 1: not ahead
    assert ogm_coefficients({"a": 0.7}, alpha=1.0) == {"a": 1.0}  # one modality scored: nothing to balance


def test_ogm_scales_the_dominant_encoder_by_exactly_k_and_leaves_the_other(prepared: tuple) -> None:
    module = module_for(prepared, "ogm_ge", {"alpha": 0.8, "noise": False})
    balance = module.balance
    assert isinstance(balance, OGMGE)
    grads = backward(module, a_batch(prepared[1]))
    scores = balance.step_scores()
    assert set(scores) == {"a", "b"} and all(0 < s < 1 for s in scores.values())
    # Hand-set scores: b is ahead by rho = 3.
    balance._sums, balance._counts = {"a": 2.0, "b": 6.0}, {"a": 10, "b": 10}
    logs = balance.before_optimizer_step(module.model, epoch=0)
    k = 1 - math.tanh(0.8 * 2.0)
    assert logs == {"balance_k_a": 1.0, "balance_k_b": pytest.approx(k)}
    for name, param in module.model.encoders.named_parameters():
        if name.startswith("b."):
            assert torch.allclose(param.grad, grads[name] * k, rtol=0, atol=1e-12), name
        else:
            assert torch.equal(param.grad, grads[name]), name
    assert balance._sums == {}  # the step's scores are used once


def test_ogm_noise_has_the_gradient_std_and_the_window_is_honoured(prepared: tuple) -> None:
    module = module_for(prepared, "ogm_ge", {"alpha": 0.8, "noise": True, "start_epoch": 1})
    balance = module.balance
    assert isinstance(balance, OGMGE)
    grads = backward(module, a_batch(prepared[1]))
    assert balance.before_optimizer_step(module.model, epoch=0) == {}  # before the window: untouched
    assert all(torch.equal(p.grad, grads[n]) for n, p in module.model.encoders.named_parameters())
    grads = backward(module, a_batch(prepared[1]))
    balance._sums, balance._counts = {"a": 2.0, "b": 6.0}, {"a": 10, "b": 10}
    torch.manual_seed(1)
    balance.before_optimizer_step(module.model, epoch=1)
    k = 1 - math.tanh(0.8 * 2.0)
    weight = "b.proj.weight"  # the identity encoder's 8 x 8 projection: 64 values for the std
    noise = module.model.encoders.get_parameter(weight).grad - k * grads[weight]
    assert noise.abs().sum() > 0
    assert float(noise.std()) == pytest.approx(float(grads[weight].std()), rel=0.35)


# ---- Gradient-Blending -----------------------------------------------------------------------------


def test_blend_weights_follow_the_formula() -> None:
    anchor_t, anchor_v = [1.0, 1.0, 1.0], [1.2, 1.1, 1.3]
    train, val = [0.6, 0.8, 0.5], [0.9, 1.0, 1.1]
    # dG = [0.3, 0.1, 0.2]; O before = [0.2, 0.1, 0.3], after = [0.3, 0.2, 0.6]; dO = [0.1, 0.1, 0.3]
    raw = [0.3 / 0.1**2, 0.1 / 0.1**2, 0.2 / 0.3**2]
    weights = blend_weights(anchor_t, anchor_v, train, val)
    assert weights == pytest.approx([r / sum(raw) for r in raw])
    assert weights == pytest.approx([0.710526, 0.236842, 0.052632], abs=1e-6)
    # A head whose validation loss rose gets 0; none generalising gives None (keep the old weights).
    assert blend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [1.2, 0.9]) == pytest.approx([0.0, 1.0])
    assert blend_weights([1.0], [1.0], [0.5], [1.1]) is None
    assert blend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [float("nan"), 0.9]) == pytest.approx([0.0, 1.0])


def test_grad_blend_loss_is_the_weighted_sum_and_weights_update_from_the_window(prepared: tuple) -> None:
    module = module_for(prepared, "grad_blend", {"every_n_epochs": 1})
    balance = module.balance
    assert isinstance(balance, GradBlend) and balance.keys == ["a", "b", "fused"]
    module.eval()  # no dropout: the same losses on every call
    batch = a_batch(prepared[1])
    features = module.model.encode(batch)
    losses = balance._losses(module.model, features, batch.target)
    step = balance.training_loss(module.model, features, batch.target, epoch=0)
    assert float(step.loss.detach()) == pytest.approx(sum(float(x.detach()) for x in losses) / 3, rel=1e-6)
    # Feed two epochs of hand-set mean losses (sum, count rows) and check the weights.
    for epoch, (train, val) in enumerate([([1.0, 1.0, 1.0], [1.2, 1.1, 1.3]), ([0.6, 0.8, 0.5], [0.9, 1.0, 1.1])]):
        balance._train_sums.copy_(torch.tensor([[2 * t for t in train], [2.0, 2.0, 2.0]]))
        balance._val_sums.copy_(torch.tensor([[4 * v for v in val], [4.0, 4.0, 4.0]]))
        balance.on_validation_epoch_end(epoch)
    assert balance.weights.tolist() == pytest.approx([0.710526, 0.236842, 0.052632], abs=1e-5)
    step = balance.training_loss(module.model, features, batch.target, epoch=1)
    expected = sum(w * float(x.detach()) for w, x in zip(balance.weights.tolist(), losses, strict=True))
    assert float(step.loss.detach()) == pytest.approx(expected, rel=1e-5)


# ---- AGM ---------------------------------------------------------------------------------------------


def test_shapley_responses_for_two_and_three_modalities() -> None:
    f = {frozenset(): torch.tensor([[0.0, 0.0]]), frozenset("a"): torch.tensor([[1.0, 0.0]]),
         frozenset("b"): torch.tensor([[0.0, 2.0]]), frozenset("ab"): torch.tensor([[3.0, 1.0]])}
    phi = shapley_responses(f, ["a", "b"])
    # phi_a = ((f(ab) - f(b)) + (f(a) - f({}))) / 2 = ((3, -1) + (1, 0)) / 2
    assert phi["a"].tolist() == [[2.0, -0.5]] and phi["b"].tolist() == [[1.0, 1.5]]
    torch.manual_seed(0)
    subsets = [frozenset(s) for s in ("", "a", "b", "c", "ab", "ac", "bc", "abc")]
    f3 = {s: torch.randn(4, 3) for s in subsets}
    phi3 = shapley_responses(f3, ["a", "b", "c"])
    # Efficiency: the responses add up to f(all) - f(none).
    assert torch.allclose(sum(phi3.values()), f3[frozenset("abc")] - f3[frozenset()], atol=1e-6)
    # phi_a by hand: weights 1/3 (|S| = 0), 1/6 (|S| = 1), 1/3 (|S| = 2).
    by_hand = ((f3[frozenset("a")] - f3[frozenset()]) / 3 + (f3[frozenset("ab")] - f3[frozenset("b")]) / 6
               + (f3[frozenset("ac")] - f3[frozenset("c")]) / 6 + (f3[frozenset("abc")] - f3[frozenset("bc")]) / 3)
    assert torch.allclose(phi3["a"], by_hand, atol=1e-6)


def test_agm_coefficients_follow_the_formula() -> None:
    c = agm_coefficients({"a": 0.5, "b": 1.0}, {"a": 0.6, "b": 0.9}, alpha=1.0, clip=7.0)
    assert c["a"] == pytest.approx(math.exp(math.exp(0.3) - math.exp(0.5)))  # a pulled further ahead: < 1
    assert c["b"] == pytest.approx(math.exp(math.exp(-0.3) - math.exp(-0.5)))  # b fell further behind: > 1
    assert c["a"] < 1 < c["b"]
    clipped = agm_coefficients({"a": 5.0, "b": 0.0}, {"a": 0.0, "b": 5.0}, alpha=0.5, clip=2.0)
    assert clipped["a"] == pytest.approx(math.exp(0.5 * 2.0))
    assert agm_coefficients({"a": 0.5, "b": 1.0}, {}, alpha=1.0, clip=7.0) == {"a": 1.0, "b": 1.0}


def test_agm_scales_encoder_gradients_by_c_and_keeps_a_running_mean(prepared: tuple) -> None:
    module = module_for(prepared, "agm", {"alpha": 1.0})
    balance = module.balance
    assert isinstance(balance, AGM)
    grads = backward(module, a_batch(prepared[1]))
    scores = {m: balance._sums[m] / balance._counts[m] for m in balance._sums}
    assert set(scores) == {"a", "b"}
    assert balance.before_optimizer_step(module.model, epoch=0)["balance_c_a"] == 1.0  # no history yet
    assert all(torch.equal(p.grad, grads[n]) for n, p in module.model.encoders.named_parameters())
    assert balance.mean_scores.tolist() == pytest.approx([scores["a"], scores["b"]], rel=1e-6)
    means = {"a": scores["a"], "b": scores["b"]}
    grads = backward(module, a_batch(prepared[1]))
    balance._sums, balance._counts = {"a": 0.2, "b": 1.2}, {"a": 1, "b": 1}
    logs = balance.before_optimizer_step(module.model, epoch=0)
    expected = agm_coefficients({"a": 0.2, "b": 1.2}, means, 1.0, 7.0)
    assert logs["balance_c_a"] == pytest.approx(expected["a"]) and logs["balance_c_b"] == pytest.approx(expected["b"])
    for name, param in module.model.encoders.named_parameters():
        assert torch.allclose(param.grad, grads[name] * expected[name.split(".")[0]], atol=1e-12), name
    assert balance.mean_scores.tolist() == pytest.approx([(means["a"] + 0.2) / 2, (means["b"] + 1.2) / 2])


# ---- every remedy: end to end, missing modalities, errors ---------------------------------------------


@pytest.mark.parametrize("balance", ["ogm_ge", "grad_blend", "agm"])
def test_each_remedy_sends_gradient_to_every_encoder_with_missing_modalities(prepared: tuple, balance: str) -> None:
    module = module_for(prepared, balance, {"noise": False} if balance == "ogm_ge" else {})
    batch = a_batch(prepared[1], 48)
    assert not bool(batch.present["a"].all()) and not bool(batch.present["b"].all())  # missing_rate 0.3
    backward(module, batch)
    assert module.balance is not None
    module.balance.before_optimizer_step(module.model, epoch=0)
    for name, param in module.model.encoders.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    batch.present["a"][:] = False  # a modality absent from the whole batch
    backward(module, batch)
    module.balance.before_optimizer_step(module.model, epoch=0)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.model.encoders.parameters())


@pytest.mark.parametrize("balance", ["ogm_ge", "grad_blend", "agm"])
def test_each_remedy_trains_end_to_end(prepared: tuple, balance: str, tmp_path: Path, one_thread: None) -> None:
    config, data = prepared
    config = config.model_copy(deep=True)
    config.trainer.balance, config.trainer.output_dir = balance, tmp_path / balance
    torch.manual_seed(0)
    initial = MultimodalModel.from_config(config, data.preprocessor, data.task).state_dict()
    result = fit(config, data, save=False)
    assert result.epochs == 2 and math.isfinite(result.val_metrics["loss"])
    trained = result.model.state_dict()
    for m in ("a", "b"):  # both encoders moved
        keys = [k for k in initial if k.startswith(f"encoders.{m}.")]
        assert any(not torch.equal(initial[k], trained[k]) for k in keys), m
    assert not any("balance" in k for k in trained)  # the remedy stays out of the model


def test_bad_balance_options_are_config_errors(xor_missing: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance_options for 'ogm_ge'.*alpah.*did you mean 'alpha'"):
        validate_config(xor_config(xor_missing, tmp_path, "ogm_ge", {"alpah": 0.5}))
    with pytest.raises(ConfigError, match=r"balance_options for 'ogm_ge'.*alpha.*greater than 0"):
        validate_config(xor_config(xor_missing, tmp_path, "ogm_ge", {"alpha": 0}))
    with pytest.raises(ConfigError, match=r"end_epoch 1 is before start_epoch 3"):
        validate_config(xor_config(xor_missing, tmp_path, "ogm_ge", {"start_epoch": 3, "end_epoch": 1}))
    with pytest.raises(ConfigError, match=r"balance_options for 'grad_blend'.*every_n_epochs"):
        validate_config(xor_config(xor_missing, tmp_path, "grad_blend", {"every_n_epochs": 0}))
    with pytest.raises(ConfigError, match=r"trainer.balance is 'none'"):
        validate_config(xor_config(xor_missing, tmp_path, "none", {"alpha": 0.5}))
    with pytest.raises(ConfigError, match=r"balance"):
        validate_config(xor_config(xor_missing, tmp_path, "ogm"))


def test_a_task_the_remedy_cannot_use_is_a_config_error(prepared: tuple) -> None:
    config, data = prepared
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    model.task = type("Regression", (), {"name": "regression"})()  # type: ignore[assignment]
    for balance in ("ogm_ge", "agm", "grad_blend"):
        trainer = config.trainer.model_copy(update={"balance": balance})
        with pytest.raises(ConfigError, match=rf"trainer.balance '{balance}'.*'regression'"):
            build_balance(trainer, model)


@pytest.mark.parametrize("balance", ["ogm_ge", "grad_blend", "agm"])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(prepared: tuple, balance: str, tmp_path: Path,
                                                          one_thread: None) -> None:
    """The remedy's state (blend weights and window, AGM's running means, the GE noise stream) resumes."""
    config, data = prepared
    config = config.model_copy(deep=True)
    config.trainer.balance, config.trainer.max_epochs = balance, 3
    config.trainer.output_dir = tmp_path / "straight"
    fit(config, data, save=False)
    first = config.model_copy(deep=True)
    first.trainer.output_dir, first.trainer.max_epochs = tmp_path / "resumed", 1
    fit(first, data, save=False)
    second = first.model_copy(deep=True)
    second.trainer.max_epochs = 3
    fit(second, data, save=False, resume=True)
    # The last epoch's full training state: the model and the remedy's parameters and buffers.
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                         for run in ("straight", "resumed"))
    assert any(k.startswith("balance.") for k in straight) and set(straight) == set(resumed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
