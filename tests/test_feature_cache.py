"""The feature cache (mmfuse.engine.feature_cache) and frozen encoders (``encoders.<m>.freeze``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmfuse.config import validate_config
from mmfuse.core.errors import ConfigError
from mmfuse.data import arrays
from mmfuse.data.dataset import CACHED_POOLED, Collator
from mmfuse.datasets.feature_example import generate_feature_example
from mmfuse.engine.data import PreparedData, prepare_data
from mmfuse.engine.feature_cache import FeatureStore, cache_datasets, default_cache_dir, encoder_key
from mmfuse.engine.fit import fit
from mmfuse.model import MultimodalModel


@pytest.fixture(autouse=True)
def _fresh_mmaps() -> None:
    arrays.clear_cache()


@pytest.fixture
def features_data(tmp_path: Path) -> Path:
    return generate_feature_example(tmp_path / "data", n_samples=60, seed=1)


def features_config(manifest: Path, out: Path, cache_dir: Path, freeze: bool = True, **data: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 16, "cache": True, "cache_dir": str(cache_dir),
                 "modalities": {"words": {"kind": "features", "column": "words"},
                                "acoustic": {"kind": "features", "column": "acoustic"}}, **data},
        "encoders": {"words": {"name": "sequence", "dim": 16, "heads": 2, "freeze": freeze},
                     "acoustic": {"name": "identity", "dim": 16, "freeze": freeze}},
        "fusion": {"name": "attention", "out_dim": 16},
        "task": {"name": "sentiment"},
        "trainer": {"max_epochs": 2, "patience": None, "output_dir": str(out), "progress_bar": False},
    }


def build(config: Any, data: PreparedData, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    return MultimodalModel.from_config(config, data.preprocessor, data.task)


def test_cache_hit_gives_the_encoder_outputs(synth_missing_manifest: Path, tmp_path: Path) -> None:
    """Built-in text/image/audio encoders, frozen, some samples missing modalities."""
    raw = {
        "seed": 0,
        "data": {"manifest": str(synth_missing_manifest), "target_column": "label", "cache": True,
                 "text": {"max_length": 12}, "audio": {"n_mels": 32, "n_fft": 512, "hop_length": 256}},
        "encoders": {"text": {"name": "text_transformer", "dim": 16, "freeze": True},
                     "image": {"name": "image_cnn", "dim": 16, "channels": [8], "freeze": True},
                     "audio": {"name": "audio_cnn", "dim": 16, "channels": [8], "freeze": True}},
        "fusion": {"name": "mult", "out_dim": 16},
        "trainer": {"output_dir": str(tmp_path / "run")},
    }
    config = validate_config(raw)
    data = prepare_data(config)
    model = build(config, data).eval()
    first, stats = cache_datasets(model, data.datasets, tmp_path / "cache")
    present = {m: sum(s.inputs[m] is not None for d in data.datasets.values() for s in d.samples)
               for m in ("audio", "image", "text")}
    assert stats.computed == present and stats.hits == {m: 0 for m in present}
    again, stats = cache_datasets(model, data.datasets, tmp_path / "cache")
    assert stats.computed == {m: 0 for m in present} and stats.hits == present
    collate = Collator(data.preprocessor, data.task)
    rows = list(range(24))
    raw_batch = collate([data.datasets["train"][i] for i in rows])
    hit_batch = collate([again["train"][i] for i in rows])
    miss_batch = collate([first["train"][i] for i in rows])
    assert CACHED_POOLED in hit_batch.inputs["image"]
    for m in present:
        assert torch.equal(hit_batch.present[m], raw_batch.present[m])
        assert torch.equal(hit_batch.inputs[m][CACHED_POOLED], miss_batch.inputs[m][CACHED_POOLED])  # bitwise
    with torch.no_grad():
        direct, cached = model.encode(raw_batch), model.encode(hit_batch)
        for m in present:
            torch.testing.assert_close(cached[m].pooled, direct[m].pooled, atol=1e-5, rtol=1e-5)
            steps = cached[m].tokens.shape[1]
            assert torch.equal(cached[m].mask, direct[m].mask[:, :steps])
            assert not direct[m].mask[:, steps:].any()  # only trailing padding was left out
            valid = cached[m].mask[..., None]
            torch.testing.assert_close(cached[m].tokens * valid, direct[m].tokens[:, :steps] * valid,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(hit_batch), model(raw_batch), atol=1e-5, rtol=1e-5)


def test_changed_file_or_weights_invalidate(features_data: Path, tmp_path: Path) -> None:
    config = validate_config(features_config(features_data, tmp_path / "run", tmp_path / "cache"))
    data = prepare_data(config)
    model = build(config, data)
    _, stats = cache_datasets(model, data.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 60, "words": 60}
    # Same encoder weights (the same seed builds the same encoders, whatever the fusion): all hits.
    other_fusion = validate_config({**features_config(features_data, tmp_path / "run", tmp_path / "cache"),
                                    "fusion": {"name": "concat", "out_dim": 8}})
    _, stats = cache_datasets(build(other_fusion, data), data.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 0, "words": 0}
    # One file's bytes change: that sample alone is recomputed.
    path = features_data.parent / "words" / "s00003.npy"
    np.save(path, np.load(path) + 0.5)
    changed = prepare_data(config)
    _, stats = cache_datasets(model, changed.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 0, "words": 1}
    # Other weights (another seed, or an edited weight): every entry of that encoder is recomputed.
    _, stats = cache_datasets(build(config, changed, seed=1), changed.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 60, "words": 60}
    with torch.no_grad():
        model.encoders["acoustic"].proj.weight[0, 0] += 1.0  # type: ignore[index, union-attr, operator]
    _, stats = cache_datasets(model, changed.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 60, "words": 0}
    # Preprocessing settings are part of the key too.
    cropped = validate_config(features_config(features_data, tmp_path / "run", tmp_path / "cache",
                                              features={"max_length": 8}))
    cropped_data = prepare_data(cropped)
    _, stats = cache_datasets(build(cropped, cropped_data), cropped_data.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 60, "words": 60}
    assert not list((tmp_path / "cache").rglob("*.tmp")), "writes are atomic: no temp file is left behind"


def test_trainable_encoder_with_cache_is_a_config_error(features_data: Path, tmp_path: Path) -> None:
    raw = features_config(features_data, tmp_path / "run", tmp_path / "cache")
    raw["encoders"]["words"]["freeze"] = False
    config = validate_config(raw)
    with pytest.raises(ConfigError, match=r"data\.cache needs frozen encoders, but encoders\.words \('sequence'\) "
                                          r"has \d+ trainable parameter"):
        fit(config, prepare_data(config), save=False)
    assert not (tmp_path / "cache").exists()


def test_training_with_cache_matches_training_without(features_data: Path, tmp_path: Path) -> None:
    """Same seed, same model: the cached run reads what the encoders would compute, so it learns the same."""
    config = validate_config(features_config(features_data, tmp_path / "cached", tmp_path / "cache"))
    data = prepare_data(config)
    with_cache = fit(config, data, save=False)
    plain = validate_config(features_config(features_data, tmp_path / "plain", tmp_path / "cache", cache=False))
    without = fit(plain, data, save=False)
    for name in ("mae", "pearson", "acc2"):
        assert with_cache.val_metrics[name] == pytest.approx(without.val_metrics[name], abs=1e-3), name
    # The frozen encoders did not change, and the saved model reads raw inputs again.
    fresh = build(config, data)
    for m in ("words", "acoustic"):
        for (name, p), q in zip(with_cache.model.encoders[m].state_dict().items(),
                                fresh.encoders[m].state_dict().values(), strict=True):
            assert torch.equal(p, q), f"{m}.{name} changed although frozen"
    batch = Collator(data.preprocessor, data.task)([data.datasets["val"][i] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(with_cache.model(batch), without.model(batch), atol=1e-3, rtol=1e-3)


def test_frozen_encoder_stays_in_eval_mode_and_saves_freeze(features_data: Path, tmp_path: Path) -> None:
    raw = features_config(features_data, tmp_path / "run", tmp_path / "cache", cache=False)
    raw["encoders"]["words"]["dropout"] = 0.5
    config = validate_config(raw)
    data = prepare_data(config)
    model = build(config, data).train()
    words = model.encoders["words"]
    assert not words.training and all(not m.training for m in words.modules())
    assert words.trainable_parameter_names() == []  # type: ignore[operator]
    assert model.fusion is not None and model.fusion.training
    batch = Collator(data.preprocessor, data.task)([data.datasets["train"][i] for i in range(8)])
    torch.testing.assert_close(model.encode(batch)["words"].pooled, model.encode(batch)["words"].pooled)
    folder = model.save_pretrained(tmp_path / "saved")
    reloaded = MultimodalModel.from_pretrained(folder)
    assert reloaded.spec.encoders["words"].freeze and not any(
        p.requires_grad for p in reloaded.encoders["words"].parameters())


def test_damaged_pack_is_ignored_and_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "key"
    folder.mkdir()
    (folder / "broken.safetensors").write_bytes(b"not a pack")
    store = FeatureStore(folder)
    assert "anything" not in store
    entry = {"cached_tokens": torch.ones(2, 3), "cached_mask": torch.tensor([True, False]),
             "cached_pooled": torch.arange(3.0)}
    store.write({"k1": entry}, {"modality": "m"})
    loaded = FeatureStore(folder).load(["k1"])["k1"]
    for name, value in entry.items():
        assert torch.equal(loaded[name], value)
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "features"
    monkeypatch.delenv("MMFUSE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mmfuse" / "features"
    shutil.rmtree(folder)


def test_pretrained_frozen_encoder_is_cached_and_last_n_is_refused(tmp_path: Path) -> None:
    """A tiny random BERT (hf_text) saved to a folder: trainable=frozen caches, last_n is a ConfigError."""
    import transformers
    words = ["a", "red", "blue", "square", "circle", "the", "loud", "tone"]
    bert = tmp_path / "bert"
    bert.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(bert))
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32)).save_pretrained(str(bert))
    rng = np.random.default_rng(0)
    rows = [{"id": f"s{i}", "text": " ".join(rng.choice(words, size=int(rng.integers(1, 7)))),
             "label": ["x", "y"][i % 2], "split": ["train", "train", "val", "test"][i % 4]} for i in range(24)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(trainable: str) -> Any:
        return validate_config({
            "data": {"manifest": str(manifest), "cache": True, "cache_dir": str(tmp_path / "cache"),
                     "text": {"max_length": 12, "tokenizer": str(bert)}},
            "encoders": {"text": {"name": "hf_text", "model": str(bert), "trainable": trainable}},
            "fusion": {"name": "concat", "out_dim": 8},
            "trainer": {"max_epochs": 1, "patience": None, "output_dir": str(tmp_path / "run"),
                        "progress_bar": False},
        })

    frozen = config("frozen")
    data = prepare_data(frozen)
    model = build(frozen, data).eval()
    cached, stats = cache_datasets(model, data.datasets, tmp_path / "cache")
    assert stats.computed["text"] > 0
    collate = Collator(data.preprocessor, data.task)
    with torch.no_grad():
        direct = model(collate(data.datasets["train"].samples))
        from_cache = model(collate(cached["train"].samples))
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)
    fit(frozen, data, save=False)  # trains on the cache
    last_n = config("last_n")
    with pytest.raises(ConfigError, match=r"encoders\.text \('hf_text'\) has \d+ trainable parameter"):
        fit(last_n, prepare_data(last_n), save=False)


def test_bench_runs_read_the_cache_and_never_run_an_encoder(features_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfuse.analysis.bench import run_bench
    from mmfuse.encoders.features import FeatureIdentityEncoder, FeatureSequenceEncoder

    raw = features_config(features_data, tmp_path / "run", tmp_path / "cache")
    raw["trainer"]["max_epochs"] = 1
    config = validate_config(raw)
    first = run_bench(config, ["concat"], seeds=1, out_dir=tmp_path / "bench1", unimodal=False)
    packs = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(packs) == 2  # one per encoder

    def refuse(*args: Any) -> None:
        raise AssertionError("an encoder ran although its outputs are cached")

    monkeypatch.setattr(FeatureIdentityEncoder, "forward", refuse)
    monkeypatch.setattr(FeatureSequenceEncoder, "forward", refuse)
    second = run_bench(config, ["lmf", "concat"], seeds=1, out_dir=tmp_path / "bench2", unimodal=False)
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == packs  # nothing recomputed
    assert [r.method for r in second] == ["lmf", "concat"]
    assert second[1].metrics == pytest.approx(first[0].metrics)  # same run, from the cache both times
    assert any(key.endswith("_missing_mean") for key in second[0].missing)


# ------------------------------------------------------------------------------ stale keys


def test_file_rewritten_with_same_size_and_mtime_is_recomputed(features_data: Path, tmp_path: Path) -> None:
    """Neither the in-memory arrays nor the feature cache may serve the old content of such a file."""
    raw = features_config(features_data, tmp_path / "run", tmp_path / "cache", in_memory=True,
                          in_memory_cache=str(tmp_path / "arrays"))
    config = validate_config(raw)
    data = prepare_data(config)
    model = build(config, data).eval()
    _, stats = cache_datasets(model, data.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 60, "words": 60}
    path = features_data.parent / "words" / "s00003.npy"
    before, old = path.stat(), np.load(path)
    np.save(path, old + 0.5)  # same shape and dtype: the same number of bytes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    changed = prepare_data(config)
    split, row = next((name, i) for name, d in changed.datasets.items() for i, s in enumerate(d.ids)  # type: ignore[attr-defined]
                      if s == "s00003")
    values = changed.datasets[split][row].inputs["words"]["values"]  # type: ignore[index]
    np.testing.assert_allclose(values.numpy(), old[: len(values)] + 0.5)
    cached, stats = cache_datasets(model, changed.datasets, tmp_path / "cache")
    assert stats.computed == {"acoustic": 0, "words": 1}
    batch = Collator(changed.preprocessor, changed.task)([changed.datasets[split][row]])
    with torch.no_grad():
        direct = model.encode(batch)["words"].pooled[0]
    torch.testing.assert_close(cached[split][row].inputs["words"][CACHED_POOLED], direct)  # type: ignore[index]


def _key(model: MultimodalModel, data: PreparedData, modality: str = "acoustic") -> str:
    encoder = model.encoders[modality]
    return encoder_key(modality, encoder, model.spec.encoders[modality], data.preprocessor)  # type: ignore[arg-type]


def test_library_versions_are_part_of_the_encoder_key(features_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import mmfuse.core.version

    config = validate_config(features_config(features_data, tmp_path / "run", tmp_path / "cache"))
    data = prepare_data(config)
    model = build(config, data)
    base = _key(model, data)
    assert _key(build(config, data), data) == base  # stable for the same encoder
    with monkeypatch.context() as patch:
        patch.setattr(mmfuse.core.version, "__version__", "99.0.0")
        assert _key(model, data) != base
    real = importlib.metadata.version
    for library in ("transformers", "timm"):
        with monkeypatch.context() as patch:
            patch.setattr(importlib.metadata, "version",
                          lambda name, lib=library: "99.0" if name == lib else real(name))
            assert _key(model, data) != base, library
    assert _key(model, data) == base


_PROBE_SOURCE = '''
from mmfuse.encoders.features import FeatureIdentityEncoder


class Probe(FeatureIdentityEncoder):
    """A user's encoder: same name, same weights, edited code."""

    def forward(self, inputs, present):
        return super().forward({{**inputs, "values": inputs["values"] * {scale}}}, present)
'''


def test_encoder_code_is_part_of_the_encoder_key(features_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    config = validate_config(features_config(features_data, tmp_path / "run", tmp_path / "cache"))
    data = prepare_data(config)
    model = build(config, data)
    reference = model.encoders["acoustic"]
    (tmp_path / "probe_encoder_mod.py").write_text(_PROBE_SOURCE.format(scale="1.0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_encoder_mod", raising=False)
    module = importlib.import_module("probe_encoder_mod")

    def probe_key() -> str:
        probe = module.Probe(reference.proj.in_features, 16, True, 0.0)  # type: ignore[union-attr]
        probe.load_state_dict(reference.state_dict())
        model.encoders["acoustic"] = probe
        return _key(model, data)

    first = probe_key()
    assert probe_key() == first
    (tmp_path / "probe_encoder_mod.py").write_text(_PROBE_SOURCE.format(scale="2.50"))
    module = importlib.reload(module)
    assert probe_key() != first
    model.encoders["acoustic"] = reference
    monkeypatch.delitem(sys.modules, "probe_encoder_mod")


def test_code_identity_falls_back_to_bytecode_without_a_file() -> None:
    """A class with no source file (a notebook cell, ``exec``) is identified by its compiled code."""
    from mmfuse.core.identity import code_identity, module_identity

    def make(body: str) -> type:
        namespace: dict[str, Any] = {"__name__": "no_file_module"}
        exec(f"class Cell:\n    def forward(self, x):\n        return {body}\n", namespace)
        return namespace["Cell"]  # type: ignore[no-any-return]

    one, same, other = make("x * 2"), make("x * 2"), make("x * 3")
    assert module_identity("no_file_module", [one]).startswith("code:")
    assert module_identity("no_file_module", [one]) == module_identity("no_file_module", [same])
    assert module_identity("no_file_module", [one]) != module_identity("no_file_module", [other])
    assert code_identity([one]) != code_identity([other])
    assert module_identity("no_file_module") == "unidentified:no_file_module"
