"""Unimodal auxiliary heads: the loss they add, that they train, and that a saved model ignores them."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.nn import functional

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import Collator
from mmfuse.engine.auxiliary import UnimodalHeads
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.engine.module import FusionModule
from mmfuse.model import MultimodalModel
from mmfuse.tasks.base import Task


def tiny_config(manifest: Path, out: Path, weight: float) -> dict:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32, "text": {"max_length": 12},
                 "audio": {"n_mels": 16, "n_fft": 256, "hop_length": 256}},
        "encoders": {"text": {"name": "text_gru", "dim": 16},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8]},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8]}},
        "fusion": {"name": "concat", "out_dim": 16},
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(out), "progress_bar": False,
                    "unimodal_loss_weight": weight},
    }


@pytest.fixture(scope="module")
def prepared(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    config = validate_config(tiny_config(synth_manifest, tmp_path_factory.mktemp("aux"), 1.0))
    return config, prepare_data(config)


def test_loss_is_the_mean_over_modalities_of_the_loss_on_present_samples(prepared: tuple) -> None:
    config, data = prepared
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    heads = UnimodalHeads(model)
    batch = Collator(data.preprocessor, data.task)([data.datasets["train"][i] for i in range(12)])
    assert batch.target is not None
    batch.present["audio"][:5] = False
    batch.present["text"][:] = False  # absent everywhere: must not count as a zero loss
    with torch.no_grad():
        features = model.encode(batch)
        expected = [functional.cross_entropy(heads.heads[m](features[m].pooled[batch.present[m]]),
                                             batch.target[batch.present[m]]) for m in ("audio", "image")]
        assert heads.loss(features, batch.target).item() == pytest.approx(float(sum(expected)) / 2, rel=1e-6)


def test_heads_train_and_stay_out_of_the_saved_model(prepared: tuple, tmp_path: Path) -> None:
    config, data = prepared
    result = fit(config, data)
    assert result.model_dir is not None
    saved = MultimodalModel.from_pretrained(result.model_dir)
    assert not any("unimodal" in key for key in saved.state_dict())
    assert set(saved.state_dict()) == set(result.model.state_dict())

    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    module = FusionModule(model, config.optim, unimodal_loss_weight=1.0)
    assert module.unimodal_heads is not None
    before = {k: v.clone() for k, v in module.unimodal_heads.state_dict().items()}
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    batch = Collator(data.preprocessor, data.task)([data.datasets["train"][i] for i in range(16)])
    loss = module._loss_with_unimodal_heads(batch)
    loss.backward()
    for name, param in module.unimodal_heads.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    after = module.unimodal_heads.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_a_task_without_a_prediction_head_is_a_config_error(prepared: tuple) -> None:
    config, data = prepared
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    model.task = mock.Mock(spec=Task)
    model.task.name = "contrastive"
    with pytest.raises(ConfigError, match=r"unimodal_loss_weight.*'contrastive'"):
        UnimodalHeads(model)
