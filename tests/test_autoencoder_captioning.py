"""Autoencoder (imputation) and captioning tasks: losses, metrics, search, save/reload, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config import load_config
from mmfuse.core.errors import ConfigError
from mmfuse.data.dataset import Collator
from mmfuse.engine.data import prepare_data
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS
from mmfuse.tasks.autoencoder import AutoencoderTask, ReconstructionMetric
from mmfuse.tasks.captioning import BOS, EOS, CaptioningTask, CaptionMetric

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_ENCODERS = {"text": {"name": "text_gru", "dim": 16},
                  "image": {"name": "image_cnn", "dim": 16, "channels": [8, 16]},
                  "audio": {"name": "audio_cnn", "dim": 16, "channels": [8, 16]}}


def small_config(tmp_path: Path, name: str, manifest: Path, epochs: int, **task: Any) -> Path:
    config = yaml.safe_load((CONFIGS / f"synthetic-{name}.yaml").read_text())
    data = config["data"]
    data.pop("synthetic")
    data.update({"manifest": str(manifest), "batch_size": 32})
    config["encoders"] = SMALL_ENCODERS
    config["fusion"] = {"name": "concat", "out_dim": 32}
    config["task"].update(task)
    config["optim"] = {"lr": 0.005}
    config["trainer"] = {"max_epochs": epochs, "patience": None, "progress_bar": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- autoencoder ----------------------------------------------------------------------------------


def test_reconstruction_metric_by_hand() -> None:
    metric = ReconstructionMetric({"a.features": 2})
    target = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    pred = torch.tensor([[1.0, 1.0], [2.0, 3.0], [4.0, 3.0]])
    weight = torch.ones(3, 2)
    metric.update("a.features.absent", pred, target, weight)
    out = metric.compute()
    # squared errors: 1 + 4 over 6 elements; per-dim variance of the targets: 8/3 each.
    assert float(out["a_features_absent_mse"]) == pytest.approx(5 / 6)
    assert float(out["a_features_absent_baseline_mse"]) == pytest.approx(8 / 3)
    assert float(out["a_features_absent_nmse"]) == pytest.approx((5 / 6) / (8 / 3))
    assert float(out["nmse_absent"]) == pytest.approx((5 / 6) / (8 / 3))
    # Predicting the mean gives NMSE 1 exactly; masked elements are ignored.
    metric.reset()
    mean = target.mean(dim=0).expand(3, 2)
    metric.update("a.features.present", mean, target, weight)
    metric.update("a.features.absent", torch.zeros(3, 2) + 99, target, torch.zeros(3, 2))
    assert float(metric.compute()["a_features_present_nmse"]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def autoencoder_model(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ae")
    config = small_config(tmp, "autoencoder", synth_manifest, epochs=6, hidden=64)
    result = runner.invoke(app, ["train", "-c", str(config), "--out", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "model"


def test_autoencoder_shapes_gradients_and_dropout(synth_manifest: Path, tmp_path: Path) -> None:
    config = load_config(small_config(tmp_path, "autoencoder", synth_manifest, epochs=1, hidden=0))
    data = prepare_data(config)
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, data.preprocessor, data.task)
    task = model.task
    assert isinstance(task, AutoencoderTask)
    assert task.inputs == {"audio": "mel", "image": "pixels", "text": "words"}
    assert task.sizes["image.pixels"] == 3 * 32 * 32 and task.sizes["audio.features"] == 16
    batch = Collator(data.preprocessor, task)([data.datasets["train"][i] for i in range(8)])
    assert model(batch).shape == (8, 32)
    model.train()
    loss = task.step_loss(model, batch)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # The feature targets are stop-gradient and standardised per sample (scale-free).
    features = model.encode(batch)
    targets = task._targets(model, batch, features)
    target, weight = targets["audio.features"]
    assert features["audio"].pooled.requires_grad and not target.requires_grad
    assert torch.allclose(target.mean(dim=1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(target.std(dim=1, unbiased=False), torch.ones(8), atol=1e-3)
    assert weight.shape == target.shape and bool((weight == 1).all())
    # Modality dropout hides modalities only in training mode, and never all of a sample's.
    keep = {m: f.present for m, f in features.items()}
    hidden_audio = task.reconstruct(model, features, {**keep, "audio": torch.zeros(8, dtype=torch.bool)})
    model.eval()
    shown = task.reconstruct(model, features, keep)
    assert not torch.allclose(hidden_audio["audio.features"], shown["audio.features"])


def test_trained_autoencoder_reports_and_learns(autoencoder_model: Path, synth_manifest: Path,
                                                tmp_path: Path) -> None:
    from mmfuse.engine.evaluate import evaluate

    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", "-m", str(autoencoder_model), "--data", str(synth_manifest),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    for m, kind in (("audio", "mel"), ("image", "pixels"), ("text", "words")):
        for target in ("features", kind):
            for cond in ("present", "absent"):
                key = f"{m}_{target}_{cond}"
                assert metrics[f"{key}_nmse"] == pytest.approx(
                    metrics[f"{key}_mse"] / metrics[f"{key}_baseline_mse"], rel=1e-4)
    # Six epochs on 128 samples: far from converged, but clearly better than the untrained model.
    trained = MultimodalModel.from_pretrained(autoencoder_model)
    config = load_config(autoencoder_model.parent / "config.yaml")
    data = prepare_data(config)
    torch.manual_seed(1)
    untrained = MultimodalModel.from_config(config, data.preprocessor, data.task)
    assert evaluate(trained, data.datasets["val"])["loss"] < 0.7 * evaluate(untrained, data.datasets["val"])["loss"]


@pytest.mark.slow
def test_autoencoder_imputation_beats_mean_baseline(tmp_path: Path) -> None:
    """Acceptance on more data (about a minute): imputed text words and audio features beat the mean."""
    config = load_config(CONFIGS / "synthetic-autoencoder.yaml",
                         ["data.synthetic.n_samples=1500", "trainer.max_epochs=15", "trainer.progress_bar=false",
                          f"trainer.output_dir={tmp_path}"])
    from mmfuse.engine.fit import train

    metrics = train(config).test_metrics
    assert metrics is not None
    assert metrics["text_words_absent_nmse"] < 0.9 and metrics["audio_features_absent_nmse"] < 0.5



def latent_pair_manifest(folder: Path, n: int = 300, seed: int = 0) -> Path:
    """Two feature modalities driven by one hidden 4-d factor z: a = z A + noise (8-d), b = z B + noise
    (6-d), so each can be imputed from the other, up to the noise. Per-split arrays, 70/15/15."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mix_a, mix_b = rng.normal(size=(4, 8)), rng.normal(size=(4, 6))
    rows, start = [], 0
    for split, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        count = n - start if split == "test" else round(n * fraction)
        z = rng.normal(size=(count, 4))
        np.save(folder / f"a_{split}.npy", (z @ mix_a + 0.3 * rng.normal(size=(count, 8))).astype(np.float32))
        np.save(folder / f"b_{split}.npy", (z @ mix_b + 0.3 * rng.normal(size=(count, 6))).astype(np.float32))
        # The autoencoder ignores the label; the manifest reader wants the column.
        rows += [{"id": f"s{start + i:03d}", "split": split, "a": f"a_{split}.npy#{i}", "b": f"b_{split}.npy#{i}",
                  "label": "x"} for i in range(count)]
        start += count
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.usefixtures("one_thread")
def test_imputation_of_a_missing_modality_beats_the_mean_on_held_out_rows(tmp_path: Path) -> None:
    """Acceptance, CI-fast form: trained on the train split only, the autoencoder imputes b from a on
    test rows where b is really missing, far better than imputing b's training mean.

    Parameter-free identity encoders make b's feature target a fixed function of b's values (per-sample
    standardised), so the score is about the data, not about encoder features that could drift.
    """
    import numpy as np
    import torch.nn.functional as F

    from mmfuse.config import validate_config
    from mmfuse.data.dataset import MultimodalDataset
    from mmfuse.data.manifest import read_manifest
    from mmfuse.engine.fit import fit

    manifest = latent_pair_manifest(tmp_path)
    identity = {"name": "identity", "dim": 0, "norm": False}
    config = validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 32,
                 "modalities": {m: {"kind": "features", "column": m} for m in ("a", "b")}},
        "encoders": {"a": identity, "b": identity},
        "fusion": {"name": "concat", "out_dim": 32},
        "task": {"name": "autoencoder", "hidden": 64},
        "optim": {"lr": 0.01},
        "trainer": {"max_epochs": 10, "patience": None, "output_dir": str(tmp_path / "run"), "progress_bar": False},
    })
    result = fit(config, prepare_data(config), save=False)
    # The library's own held-out report (NMSE against the test rows' per-dim mean, 1 = no better).
    assert result.test_metrics is not None
    assert result.test_metrics["b_features_absent_nmse"] < 0.5, result.test_metrics
    assert result.test_metrics["a_features_absent_nmse"] < 0.5, result.test_metrics

    # By hand: the test rows with b removed from the manifest, so the model cannot see it at all.
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    held_out = tmp_path / "test_without_b.jsonl"
    held_out.write_text("".join(json.dumps({**r, "b": None}) + "\n" for r in rows if r["split"] == "test"))
    model = result.model.eval()
    records = read_manifest(held_out, model.preprocessor.modalities, target_column=None)
    batch = Collator(model.preprocessor, None)(list(MultimodalDataset(records, model.preprocessor, None)))
    predictions = model.predict(batch)
    assert all(p["reconstructions"]["b"]["imputed"] for p in predictions)
    imputed = torch.tensor([p["reconstructions"]["b"]["features"] for p in predictions])

    def standardised(split: str) -> torch.Tensor:
        return F.layer_norm(torch.from_numpy(np.load(tmp_path / f"b_{split}.npy")), (6,))

    truth, train_mean = standardised("test"), standardised("train").mean(dim=0)
    assert imputed.shape == truth.shape == (45, 6)
    model_mse = float(((imputed - truth) ** 2).mean())
    mean_mse = float(((train_mean - truth) ** 2).mean())
    assert model_mse < 0.5 * mean_mse, f"imputed b: MSE {model_mse:.3f} vs the training mean's {mean_mse:.3f}"


def test_autoencoder_reload_and_predict_impute(autoencoder_model: Path, synth_manifest: Path,
                                               tmp_path: Path) -> None:
    row = json.loads(synth_manifest.read_text().splitlines()[0])
    args = ["predict", "-m", str(autoencoder_model), "--text", row["caption"],
            "--image", str(synth_manifest.parent / row["image"]), "--impute", "audio"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    imputed = json.loads(first.output)["reconstructions"]
    assert list(imputed) == ["audio"] and imputed["audio"]["imputed"] is True
    assert len(imputed["audio"]["features"]) == 16
    assert torch.tensor(imputed["audio"]["mel"]).shape == (32, 63)
    copy = MultimodalModel.from_pretrained(autoencoder_model).save_pretrained(tmp_path / "copy")
    again = runner.invoke(app, [*args[:2], str(copy), *args[3:]])
    assert again.output == first.output
    result = runner.invoke(app, [*args, "--audio", str(synth_manifest.parent / row["audio"])])
    assert result.exit_code == 1 and "do not give audio" in result.output
    result = runner.invoke(app, [*args[:-1], "video"])
    assert result.exit_code == 1 and "no such modality" in result.output


def test_autoencoder_needs_two_modalities() -> None:
    assert "autoencoder" in TASKS.names()
    with pytest.raises(ConfigError, match="drop_rate"):
        TASKS.create("autoencoder", drop_rate=1.0)


def test_autoencoder_with_input_targets_refuses_the_feature_cache(synth_manifest: Path, tmp_path: Path) -> None:
    """Cached batches hold encoder outputs, not pixels/mel/words: the input targets would vanish silently."""
    from mmfuse.engine.fit import fit

    path = small_config(tmp_path, "autoencoder", synth_manifest, epochs=1)
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.cache=true", f"trainer.output_dir={tmp_path / 'run'}",
                 *(f"encoders.{m}.freeze=true" for m in SMALL_ENCODERS)]
    config = load_config(path, overrides)
    with pytest.raises(ConfigError, match=r"reconstructs the inputs of audio, image, text; set task.input_targets"):
        fit(config, prepare_data(config), save=False)
    assert not (tmp_path / "cache").exists()


# ---- captioning -----------------------------------------------------------------------------------


def test_caption_vocabulary_and_targets() -> None:
    task = CaptioningTask()
    task.fit(["A red circle.", "a blue square", "a red circle.", None])
    assert task.vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert task.vocab[4:] == ["a", ".", "circle", "red", "blue", "square"]  # by count, then alphabetical
    assert task.constant == "a red circle ."
    ids = task.encode_target("a green circle")
    assert ids.tolist() == [BOS, 4, 1, 6, EOS]
    assert task.decode_ids([*ids.tolist()[1:], 7]) == "a <unk> circle"
    padded = task.collate_targets([ids, torch.tensor([BOS, EOS])])
    assert padded.shape == (2, 5) and padded[1].tolist() == [BOS, EOS, 0, 0, 0]
    clone = CaptioningTask()
    clone.load_state(task.state())
    assert clone.encode_target("a red square").tolist() == task.encode_target("a red square").tolist()
    with pytest.raises(ValueError, match="empty"):
        task.encode_target("  ")


def test_caption_metric_matches_sacrebleu() -> None:
    import sacrebleu

    metric = CaptionMetric("a red circle")
    hyps, refs = ["a red circle with a low tone", "a blue square"], ["a red circle with a high tone", "a blue square"]
    metric.update(hyps, refs)
    out = metric.compute()
    assert float(out["bleu"]) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert float(out["chrf"]) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert float(out["constant_bleu"]) == pytest.approx(sacrebleu.corpus_bleu(["a red circle"] * 2, [refs]).score)


@pytest.fixture(scope="module")
def caption_model(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cap")
    config = small_config(tmp, "captioning", synth_manifest, epochs=12, dim=32, layers=1)
    result = runner.invoke(app, ["train", "-c", str(config), "--out", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "model"


def test_captioning_beats_constant_caption(caption_model: Path, synth_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    """Scored on the test split, which training never saw (train fits, val picks the epoch): the
    baseline is the training set's most common caption, which the template words alone make strong."""
    result = runner.invoke(app, ["evaluate", "-m", str(caption_model), "--data", str(synth_manifest),
                                 "--split", "test", "--json", str(out)])
    assert result.exit_code == 0, result.output
    n_test = sum(json.loads(line)["split"] == "test" for line in synth_manifest.read_text().splitlines())
    assert f"{n_test} samples" in " ".join(result.output.split())
    metrics = json.loads(out.read_text())
    assert metrics["bleu"] > metrics["constant_bleu"] + 3, metrics
    assert metrics["chrf"] > metrics["constant_chrf"] + 3, metrics


def test_beam_one_equals_greedy_and_reload(caption_model: Path, synth_manifest: Path, tmp_path: Path) -> None:
    from mmfuse.data.dataset import MultimodalDataset
    from mmfuse.data.manifest import read_manifest

    model = MultimodalModel.from_pretrained(caption_model)
    task = model.task
    assert isinstance(task, CaptioningTask)
    records = read_manifest(synth_manifest, model.preprocessor.modalities, target_column=None)[:12]
    batch = Collator(model.preprocessor, None)(list(MultimodalDataset(records, model.preprocessor, None)))
    with torch.no_grad():
        memory, pad = task.memory(model, batch)
        greedy = [task.decode_ids(row) for row in task.greedy(model, memory, pad).tolist()]
        beam1 = [task.decode_ids(row) for row in task.beam_search(model, memory, pad, beam=1)]
        beam4 = [task.decode_ids(row) for row in task.beam_search(model, memory, pad, beam=4)]
    assert greedy == beam1
    assert all(caption for caption in beam4)
    first = model.predict(batch)
    again = MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "copy")).predict(batch)
    assert first == again and first[0]["caption"] == greedy[0]


def test_predict_beam_cli_and_errors(caption_model: Path, synth_manifest: Path) -> None:
    row = json.loads(synth_manifest.read_text().splitlines()[0])
    args = ["predict", "-m", str(caption_model), "--image", str(synth_manifest.parent / row["image"]),
            "--audio", str(synth_manifest.parent / row["audio"]), "--text", row["text"]]
    result = runner.invoke(app, [*args, "--beam", "3"])
    assert result.exit_code == 0, result.output
    prediction = json.loads(result.output)
    assert prediction["search"] == "beam 3" and prediction["caption"]
    result = runner.invoke(app, [*args, "--impute", "audio"])
    assert result.exit_code == 1 and "task 'autoencoder'" in result.output
    result = runner.invoke(app, [*args, "--beam", "0"])
    assert result.exit_code == 1 and ">= 1" in result.output


def test_caption_column_must_not_be_an_input(synth_manifest: Path, tmp_path: Path) -> None:
    config = load_config(small_config(tmp_path, "captioning", synth_manifest, epochs=1),
                         ["data.modalities.text.kind=text", "data.modalities.text.column=caption"])
    data = prepare_data(config)
    with pytest.raises(ConfigError, match="would see the caption"):
        MultimodalModel.from_config(config, data.preprocessor, data.task)


# ---- other encoders: pre-extracted feature modalities ------------------------------------------------


@pytest.mark.parametrize("task", [{"name": "contrastive", "dim": 8}, {"name": "autoencoder", "hidden": 16}])
def test_feature_modalities_train_and_reload_identically(tmp_path: Path, task: dict[str, Any]) -> None:
    """The new tasks run on non-built-in encoders too (identity / sequence over pre-extracted arrays)."""
    from mmfuse.config import validate_config
    from mmfuse.datasets.feature_example import generate_feature_example
    from mmfuse.engine.fit import fit

    manifest = generate_feature_example(tmp_path / "data", n_samples=60, seed=0)
    config = validate_config({
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 16, "features": {"max_length": 24},
                 "modalities": {"words": {"kind": "features", "column": "words"},
                                "acoustic": {"kind": "features", "column": "acoustic"}}},
        "encoders": {"words": {"name": "sequence", "dim": 16, "layers": 1, "heads": 2},
                     "acoustic": {"name": "identity", "dim": 16}},
        **({} if task["name"] == "contrastive" else {"fusion": {"name": "concat", "out_dim": 16}}),  # it builds none
        "task": task,
        "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(tmp_path / "run"), "progress_bar": False},
    })
    data = prepare_data(config)
    result = fit(config, data)
    assert result.model_dir is not None and result.test_metrics is not None
    if task["name"] == "autoencoder":  # no input decoders for these encoders: feature targets only
        assert set(result.model.task.sizes) == {"acoustic.features", "words.features"}  # type: ignore[attr-defined]
        assert "acoustic_features_absent_nmse" in result.test_metrics
    else:
        assert "acoustic_to_words_r1" in result.test_metrics
    reloaded = MultimodalModel.from_pretrained(result.model_dir)
    batch = Collator(reloaded.preprocessor, None)([data.datasets["test"][i] for i in range(5)])
    assert result.model.eval().predict(batch) == reloaded.predict(batch)
