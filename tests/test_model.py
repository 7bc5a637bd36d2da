"""MultimodalModel end to end on real (tiny) files: forward, predict, save_pretrained/from_pretrained."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from config_helpers import fusion_section, head_options
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mmfuse.config import ExperimentConfig, TaskConfig, validate_config
from mmfuse.core.contracts import Batch
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.data.dataset import Collator, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor
from mmfuse.fusion import FUSIONS
from mmfuse.model import CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE, MultimodalModel
from mmfuse.tasks import TASKS

LABELS = ["a", "b", "c"]


def make_config(fusion: str = "concat", **fusion_options: Any) -> ExperimentConfig:
    return validate_config({
        "seed": 0,
        "data": {
            "synthetic": {"n_samples": 20},
            "text": {"max_length": 8},
            "image": {"size": 16, "mode": "rgb"},
            "audio": {"sample_rate": 8000, "n_mels": 16, "n_fft": 256, "hop_length": 64, "max_seconds": 0.25,
                      "pad_mode": "longest"},
        },
        "encoders": {
            "text": {"name": "text_transformer", "dim": 8, "layers": 1, "heads": 2},
            "image": {"name": "image_cnn", "dim": 12, "channels": [4, 8]},
            "audio": {"name": "audio_cnn", "dim": 10, "channels": [4]},
        },
        "fusion": fusion_section(fusion, out_dim=16, **fusion_options),
        "task": {"name": "classification", **head_options(fusion, head_hidden=8)},
    })


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """Six samples with real PNG and WAV files; some lack a modality."""
    folder = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    texts = ["a red square", "the blue circle", None, "a loud low tone here", "", "green"]
    has_image = [True, False, True, True, True, False]
    seconds = [0.1, 0.25, 0.4, None, 0.05, 0.2]
    out = []
    for i in range(6):
        fields: dict[str, str | None] = {"text": texts[i] or None, "image": None, "audio": None}
        if has_image[i]:
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
            fields["image"] = str(folder / f"img{i}.png")
        if seconds[i] is not None:
            t = np.arange(int(8000 * seconds[i])) / 8000
            wave = 0.5 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.01 * rng.standard_normal(t.shape)
            sf.write(folder / f"clip{i}.wav", wave.astype(np.float32), 8000)
            fields["audio"] = str(folder / f"clip{i}.wav")
        out.append(Record(source=folder / "manifest.jsonl", row=i + 1, id=f"s{i}", fields=fields,
                          target=LABELS[i % 3]))
    return out


def build_model(records: list[Record], fusion: str = "concat", seed: int = 0,
                **fusion_options: Any) -> tuple[MultimodalModel, Collator, ExperimentConfig]:
    config = make_config(fusion, **fusion_options)
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio)
    prep.fit(records)
    task = TASKS.create(config.task.name, **config.task.options)
    task.fit([r.target for r in records])
    torch.manual_seed(seed)
    model = MultimodalModel.from_config(config, prep, task)
    model.eval()
    return model, Collator(prep, task), config


def collate(records: list[Record], model: MultimodalModel, collator: Collator) -> Batch:
    return collator([build_sample(r, model.preprocessor, model.task) for r in records])


def drop_modality(batch: Batch, modality: str) -> Batch:
    return Batch(inputs={m: v for m, v in batch.inputs.items() if m != modality},
                 present={m: v for m, v in batch.present.items() if m != modality},
                 target=batch.target, ids=batch.ids)


def test_forward_shape(records: list[Record]) -> None:
    model, collator, _ = build_model(records)
    batch = collate(records, model, collator)
    assert batch.present["text"].tolist() == [True, True, False, True, False, True]
    assert batch.present["audio"].tolist() == [True, True, True, False, True, True]
    out = model(batch)
    assert out.shape == (6, len(LABELS))
    assert torch.isfinite(out).all()
    assert model.modalities == ["audio", "image", "text"]
    assert batch.target is not None
    loss = model.task.loss(out, batch.target)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_gradients_reach_every_parameter(records: list[Record], fusion: str) -> None:
    model, collator, _ = build_model(records, fusion)
    model.train()
    batch = collate(records, model, collator)
    assert batch.target is not None
    model.task.loss(model(batch), batch.target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{fusion}: {name} gets no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{fusion}: {name} gets a zero gradient"


def test_late_fusion_has_no_head(records: list[Record]) -> None:
    model, collator, _ = build_model(records, "late")
    assert isinstance(model.head, torch.nn.Identity)
    assert model.fusion.out_dim == len(LABELS)
    assert model(collate(records, model, collator)).shape == (6, len(LABELS))


def test_rows_are_independent_of_the_batch(records: list[Record]) -> None:
    """Audio uses pad_mode 'longest': a sample's prediction must not depend on its batch mates."""
    model, collator, _ = build_model(records)
    with torch.no_grad():
        together = model(collate(records, model, collator))
        for i, record in enumerate(records):
            alone = model(collate([record], model, collator))
            assert torch.allclose(alone[0], together[i], atol=1e-5), f"sample {record.id}"


def test_absent_inputs_are_ignored(records: list[Record]) -> None:
    model, collator, _ = build_model(records)
    batch = collate(records, model, collator)
    with torch.no_grad():
        reference = model(batch)
        noisy = Batch(inputs={m: {k: v.clone() for k, v in d.items()} for m, d in batch.inputs.items()},
                      present=batch.present, target=batch.target, ids=batch.ids)
        absent = ~batch.present["image"]
        noisy.inputs["image"]["pixels"][absent] = torch.randn_like(noisy.inputs["image"]["pixels"][absent]) * 1e3
        assert torch.equal(model(noisy), reference)


def test_batch_lacking_a_modality_entirely(records: list[Record]) -> None:
    model, collator, _ = build_model(records)
    batch = collate(records, model, collator)
    without = drop_modality(batch, "audio")
    out = model(without)
    assert out.shape == (6, len(LABELS)) and torch.isfinite(out).all()
    # The same as a batch in which no sample has audio.
    masked = Batch(inputs=batch.inputs, present={**batch.present, "audio": torch.zeros(6, dtype=torch.bool)},
                   target=batch.target, ids=batch.ids)
    with torch.no_grad():
        assert torch.equal(model(without), model(masked))
        assert not torch.allclose(model(without), model(batch))
    predictions = model.predict(without)
    assert len(predictions) == 6
    for pred, i in zip(predictions, range(6), strict=True):
        assert pred["label"] in LABELS
        assert "audio" not in pred["modalities"]
        expected = [m for m in ("image", "text") if bool(batch.present[m][i])]
        assert pred["modalities"] == expected
    assert model.predict(batch)[2]["modalities"] == ["audio", "image"]
    # Only text, as `mmfuse predict` with a text-only manifest would send.
    text_only = drop_modality(drop_modality(batch, "audio"), "image")
    assert [p["modalities"] for p in model.predict(text_only)][:2] == [["text"], ["text"]]


def test_predict_restores_training_mode(records: list[Record]) -> None:
    model, collator, _ = build_model(records)
    model.train()
    predictions = model.predict(collate(records, model, collator))
    assert model.training
    probs = predictions[0]["probabilities"]
    assert set(probs) == set(LABELS) and abs(sum(probs.values()) - 1) < 1e-4


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_save_and_load_gives_identical_outputs(records: list[Record], tmp_path: Path, fusion: str) -> None:
    model, collator, _ = build_model(records, fusion)
    batch = collate(records, model, collator)
    with torch.no_grad():
        expected = model(batch)
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE])
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["fusion"]["name"] == fusion and "mmfuse_version" in config
    assert set(config["encoders"]) == {"audio", "image", "text"}

    loaded = MultimodalModel.from_pretrained(folder)
    assert not loaded.training
    assert loaded.preprocessor.state() == model.preprocessor.state()
    assert loaded.task.state() == model.task.state()
    # Preprocess the raw records again with the loaded preprocessor: same tensors, same outputs.
    reloaded_batch = collate(records, loaded, Collator(loaded.preprocessor, loaded.task))
    for m in batch.inputs:
        for key, value in batch.inputs[m].items():
            assert torch.equal(value, reloaded_batch.inputs[m][key])
    with torch.no_grad():
        assert torch.equal(loaded(batch), expected)
        assert torch.equal(loaded(reloaded_batch), expected)
    assert loaded.predict(batch) == model.predict(batch)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_from_pretrained_honours_map_location(records: list[Record], tmp_path: Path) -> None:
    model, _, _ = build_model(records)
    folder = model.save_pretrained(tmp_path / "model")
    loaded = MultimodalModel.from_pretrained(folder, map_location="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert {p.device.type for p in MultimodalModel.from_pretrained(folder).parameters()} == {"cpu"}


def test_custom_fusion_options_survive_saving(records: list[Record], tmp_path: Path) -> None:
    model, collator, _ = build_model(records, "concat", proj_dim=6, hidden=0)
    batch = collate(records, model, collator)
    loaded = MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.spec.fusion.options == {"proj_dim": 6, "hidden": 0}
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_saved_contrastive_model_of_an_older_version_with_head_options_loads(records: list[Record],
                                                                          tmp_path: Path) -> None:
    """Before tasks declared their common options every config.json had ``head_hidden``/``head_dropout``,
    which a contrastive task does not take: such folders still load, and saving again leaves them out."""
    config = make_config()
    config = config.model_copy(update={"task": TaskConfig(name="contrastive", dim=8)})
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio)
    prep.fit(records)
    task = TASKS.create("contrastive", dim=8)
    task.fit([r.target for r in records])
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, prep, task).eval()
    folder = model.save_pretrained(tmp_path / "new")
    assert json.loads((folder / CONFIG_FILE).read_text())["task"] == {"name": "contrastive", "dim": 8}
    old = json.loads((folder / CONFIG_FILE).read_text())
    old["task"].update(head_hidden=0, head_dropout=0.1)  # what older versions wrote
    (folder / CONFIG_FILE).write_text(json.dumps(old))
    loaded = MultimodalModel.from_pretrained(folder)
    batch = collate(records, model, Collator(prep, task))
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    again = loaded.save_pretrained(tmp_path / "again")
    assert json.loads((again / CONFIG_FILE).read_text())["task"] == {"name": "contrastive", "dim": 8}


def test_saving_over_an_existing_folder_replaces_it(records: list[Record], tmp_path: Path) -> None:
    first, collator, _ = build_model(records, seed=0)
    second, _, _ = build_model(records, seed=1)
    target = tmp_path / "out" / "model"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    first.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    second.save_pretrained(target)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"], "staging or backup left behind"
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE])
    batch = collate(records, second, collator)
    with torch.no_grad():
        assert torch.equal(MultimodalModel.from_pretrained(target)(batch), second(batch))
        assert not torch.equal(first(batch), second(batch))


@pytest.mark.parametrize("missing", [CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE])
def test_folder_missing_a_file_is_a_clear_error(records: list[Record], tmp_path: Path, missing: str) -> None:
    model, _, _ = build_model(records)
    folder = model.save_pretrained(tmp_path / "model")
    (folder / missing).unlink()
    with pytest.raises(MMFuseError, match=f"{missing} is missing"):
        MultimodalModel.from_pretrained(folder)
    with pytest.raises(MMFuseError, match=r"not an mmfuse model folder"):
        MultimodalModel.from_pretrained(tmp_path / "does-not-exist")


def test_weights_are_plain_safetensors(records: list[Record], tmp_path: Path) -> None:
    model, _, _ = build_model(records)
    folder = model.save_pretrained(tmp_path / "model")
    raw = (folder / WEIGHTS_FILE).read_bytes()
    # safetensors: 8-byte little-endian header length, then a JSON header; no pickle, no zip.
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")
    state = load_file(str(folder / WEIGHTS_FILE))
    assert set(state) == set(model.state_dict())
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_wrong_encoder_kind_fails_at_build(records: list[Record]) -> None:
    config = make_config()
    config.encoders["text"] = config.encoders["image"]
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio)
    prep.fit(records)
    task = TASKS.create("classification")
    task.fit(LABELS)
    with pytest.raises(ConfigError, match=r"image_cnn.*'text'"):
        MultimodalModel.from_config(config, prep, task)


def test_two_text_modalities(tmp_path: Path) -> None:
    """Custom modality names: a 'title' and a 'body', both text, each with its own vocabulary."""
    config = validate_config({
        "data": {"train": str(tmp_path / "t.jsonl"), "text": {"max_length": 6},
                 "modalities": {"title": {"kind": "text", "column": "title"},
                                "body": {"kind": "text", "column": "body"}}},
        "encoders": {"title": {"name": "text_gru", "dim": 8}, "body": {"name": "text_transformer", "dim": 8,
                                                                       "heads": 2, "layers": 1}},
        "fusion": {"name": "concat", "out_dim": 8},
    })
    rows = [("cats purr", "long body about cats"), ("dogs bark", None), (None, "a body about dogs")]
    recs = [Record(source=tmp_path / "t.jsonl", row=i, id=str(i), fields={"title": t, "body": b},
                   target=["x", "y", "x"][i]) for i, (t, b) in enumerate(rows)]
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio)
    prep.fit(recs)
    assert prep.tokenizers["title"].vocab != prep.tokenizers["body"].vocab
    task = TASKS.create("classification")
    task.fit([r.target for r in recs])
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, prep, task).eval()
    collator = Collator(prep, task)
    batch = collator([build_sample(r, prep, task) for r in recs])
    with torch.no_grad():  # eval + no_grad may take the Transformer fast path: compare like with like
        out = model(batch)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert [p["modalities"] for p in model.predict(batch)] == [["body", "title"], ["title"], ["body"]]
    loaded = MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(loaded(batch), out)


# ---- corrupted or incomplete model folders: one clear line naming the file ---------------------------


@pytest.fixture(scope="module")
def saved_folder(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _, _ = build_model(records)
    return model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


def _edit_json(name: str, edit: Any) -> Any:
    def corrupt(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    return corrupt


def _edit_weights(edit: Any) -> Any:
    def corrupt(folder: Path) -> None:
        from safetensors.torch import save_file

        state = load_file(str(folder / WEIGHTS_FILE))
        edit(state)
        save_file(state, str(folder / WEIGHTS_FILE))
    return corrupt


def _truncate(folder: Path) -> None:
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])


def _first_key(state: dict[str, torch.Tensor], prefix: str) -> str:
    return next(k for k in sorted(state) if k.startswith(prefix) and state[k].ndim == 2)


CORRUPTIONS: dict[str, tuple[Any, str]] = {
    "truncated weights": (_truncate, rf"{WEIGHTS_FILE}: cannot read the weights .*corrupt or incomplete"),
    "weights not safetensors": (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x00" * 7),
                                rf"{WEIGHTS_FILE}: cannot read the weights"),
    "config bad json": (lambda f: (f / CONFIG_FILE).write_text('{"fusion": '),
                        rf"{CONFIG_FILE}: not valid JSON \(line 1 column 12"),
    "config not utf-8": (lambda f: (f / CONFIG_FILE).write_bytes(b"\xff\xfe{}"), rf"{CONFIG_FILE}: not valid JSON"),
    "config not an object": (lambda f: (f / CONFIG_FILE).write_text("[1, 2]"),
                             rf"{CONFIG_FILE}: the top level must be a JSON object"),
    "config missing key": (_edit_json(CONFIG_FILE, lambda d: d.pop("encoders")),
                           rf"{CONFIG_FILE}: invalid model config: encoders: Field required"),
    "config bad option": (_edit_json(CONFIG_FILE, lambda d: d["encoders"]["image"].update(dim="wide")),
                          rf"{CONFIG_FILE}: invalid option 'encoders.image.dim'"),
    "config unknown encoder": (_edit_json(CONFIG_FILE, lambda d: d["encoders"]["image"].update(name="image_cnm")),
                               rf"{CONFIG_FILE}: unknown encoder 'image_cnm'"),
    "preprocessing bad json": (lambda f: (f / PREPROCESSING_FILE).write_text("{"),
                               rf"{PREPROCESSING_FILE}: not valid JSON"),
    "preprocessing missing key": (_edit_json(PREPROCESSING_FILE, lambda d: d.pop("task")),
                                  rf"{PREPROCESSING_FILE}: missing key 'task'"),
    "preprocessing missing nested key": (_edit_json(PREPROCESSING_FILE, lambda d: d["preprocessor"].pop("image")),
                                         rf"{PREPROCESSING_FILE}: missing key 'image'"),
    "preprocessing wrong type": (_edit_json(PREPROCESSING_FILE, lambda d: d["task"].update(labels=3)),
                                 rf"{PREPROCESSING_FILE}: invalid content"),
    "tensor of the wrong shape": (
        _edit_weights(lambda s: s.update({_first_key(s, "head"): torch.zeros(2, 3)})),
        rf"{WEIGHTS_FILE}: tensor 'head\.[\w.]+' has shape \(2, 3\) but {CONFIG_FILE} needs \(\d+, \d+\)"),
    "tensor missing": (_edit_weights(lambda s: s.pop(_first_key(s, "encoders.image"))),
                       rf"{WEIGHTS_FILE}: lacks tensor 'encoders\.image\.[\w.]+' that {CONFIG_FILE} needs"),
    "unexpected tensor": (_edit_weights(lambda s: s.update({"extra.weight": torch.zeros(1)})),
                          rf"{WEIGHTS_FILE}: has tensor 'extra\.weight' that {CONFIG_FILE} does not describe"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_model_folder_is_one_line_naming_the_file(saved_folder: Path, tmp_path: Path, case: str) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    corrupt, message = CORRUPTIONS[case]
    corrupt(folder)
    with pytest.raises(MMFuseError) as info:
        MultimodalModel.from_pretrained(folder)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(folder / "")), text
    assert re.search(message, text), text


# ---- saved folders: permissions follow the umask, leftovers of killed writers are removed ------------


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folder_permissions_follow_the_umask(records: list[Record], tmp_path: Path, umask: int,
                                                   folder_mode: int, file_mode: int) -> None:
    import os
    import stat

    model, _, _ = build_model(records)
    previous = os.umask(umask)
    try:
        folder = model.save_pretrained(tmp_path / "model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {CONFIG_FILE: file_mode, PREPROCESSING_FILE: file_mode, WEIGHTS_FILE: file_mode}


def test_save_removes_the_staging_folder_of_a_killed_writer(records: list[Record], tmp_path: Path) -> None:
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid now names no process: the writer was killed mid-save
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".model.tmp-{finished.pid}-x"
        live = tmp_path / f".model.tmp-{running.pid}-y"  # a concurrent writer still at work
        for leftover in (stale, live):
            leftover.mkdir()
            (leftover / WEIGHTS_FILE).write_bytes(b"half")
        model, _, _ = build_model(records)
        model.save_pretrained(tmp_path / "model")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])
    finally:
        running.kill()
        running.wait()
