"""encoders.<modality>.init_from: an encoder starts from a saved model's encoder, or a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.warm_start import warm_start_encoders
from mmfuse.model import MultimodalModel


def config_for(manifest: Path, out: Path, encoders: dict[str, dict[str, Any]], lr: float = 0.002) -> Any:
    return validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32,
                 "modalities": {m: {"kind": "features", "column": m} for m in encoders}},
        "encoders": encoders, "fusion": {"name": "concat", "out_dim": 16},
        "optim": {"lr": lr, "weight_decay": 0.0},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(out), "progress_bar": False}})


@pytest.fixture(scope="module")
def xor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmfuse.datasets.xor_features import generate_xor_features

    return generate_xor_features(tmp_path_factory.mktemp("xor"), n_samples=120, dim=8)


@pytest.fixture(scope="module")
def source(xor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved model with one trained 'a' encoder (identity, dim 8)."""
    config = config_for(xor, tmp_path_factory.mktemp("source"), {"a": {"name": "identity", "dim": 8}})
    result = fit(config, prepare_data(config))
    assert result.model_dir is not None
    return result.model_dir


def test_the_encoder_starts_with_the_saved_weights(xor: Path, source: Path, tmp_path: Path) -> None:
    config = config_for(xor, tmp_path, {"a": {"name": "identity", "dim": 8, "init_from": str(source)},
                                        "b": {"name": "identity", "dim": 8}})
    data = prepare_data(config)
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    fresh_b = {k: v.clone() for k, v in model.encoders["b"].state_dict().items()}
    assert warm_start_encoders(model, config) == ["a"]
    saved = MultimodalModel.from_pretrained(source).encoders["a"].state_dict()
    ours = model.encoders["a"].state_dict()
    assert set(ours) == set(saved) and all(torch.equal(ours[k], saved[k]) for k in saved)
    assert all(torch.equal(v, model.encoders["b"].state_dict()[k]) for k, v in fresh_b.items())  # b untouched
    # Through fit: with a learning rate of ~0 the trained encoder still holds the saved weights.
    tiny = config.model_copy(deep=True)
    tiny.optim.lr = 1e-12
    trained = fit(tiny, data, save=False).model.encoders["a"].state_dict()
    assert all(torch.allclose(trained[k], saved[k], atol=1e-6) for k in saved)


def test_incompatible_sources_are_config_errors(xor: Path, source: Path, tmp_path: Path) -> None:
    from mmfuse.datasets.xor_features import generate_xor_features

    def build(encoders: dict[str, dict[str, Any]], manifest: Path = xor) -> None:
        config = config_for(manifest, tmp_path, encoders)
        data = prepare_data(config)
        warm_start_encoders(MultimodalModel.from_config(config, data.preprocessor, data.task), config)

    with pytest.raises(ConfigError, match=r"encoders.a.init_from .*not an mmfuse model folder: config.json"):
        build({"a": {"name": "identity", "dim": 8, "init_from": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"encoders.b.init_from .*no encoder for modality 'b' \(it has: a\)"):
        build({"b": {"name": "identity", "dim": 8, "init_from": str(source)}})
    with pytest.raises(ConfigError, match=r"its 'a' encoder is 'identity', this config's is 'sequence'"):
        build({"a": {"name": "sequence", "dim": 8, "init_from": str(source)}})
    with pytest.raises(ConfigError, match=r"tensor 'encoders.a.* has shape .* there, .* here"):
        build({"a": {"name": "identity", "dim": 4, "init_from": str(source)}})
    wide = generate_xor_features(tmp_path / "wide", n_samples=60, dim=12)
    with pytest.raises(ConfigError, match=r"feature width of 'a' is 8 there, 12 here"):
        build({"a": {"name": "identity", "dim": 8, "init_from": str(source)}}, wide)


def test_init_from_a_contrastive_model_then_classify(xor: Path, tmp_path: Path, one_thread: None) -> None:
    """The pre-alignment path: a contrastive run's encoders start a classification run."""
    aligned = validate_config({
        "seed": 0,
        "data": {"manifest": str(xor), "batch_size": 32,
                 "modalities": {m: {"kind": "features", "column": m} for m in ("a", "b")}},
        "encoders": {m: {"name": "identity", "dim": 8} for m in ("a", "b")},
        "task": {"name": "contrastive", "dim": 8},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(tmp_path / "aligned"), "progress_bar": False}})
    source = fit(aligned, prepare_data(aligned)).model_dir
    assert source is not None
    config = config_for(xor, tmp_path / "classify", {m: {"name": "identity", "dim": 8, "init_from": str(source)}
                                                      for m in ("a", "b")})
    data = prepare_data(config)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    assert warm_start_encoders(model, config) == ["a", "b"]
    saved = MultimodalModel.from_pretrained(source)
    for m in ("a", "b"):
        theirs, ours = saved.encoders[m].state_dict(), model.encoders[m].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
