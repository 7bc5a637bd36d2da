"""ONNX export: the graph computes ``model(batch)`` for every fusion method, batch size, audio length
and modality subset; the CLI writes a valid graph and sidecar; bad models, files and batches fail clearly.

One export per fusion method (seconds each), then every case runs on it. Exports of the methods
outside ``FAST`` are marked slow: all eleven together take about two minutes on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_model import LABELS, build_model, drop_modality, make_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config.schema import EncoderConfig
from mmfuse.core.contracts import Batch
from mmfuse.core.errors import MMFuseError
from mmfuse.data.dataset import Collator, Sample, build_sample
from mmfuse.data.manifest import Record
from mmfuse.export import OnnxRunner, export_onnx
from mmfuse.export.sidecar import sidecar_path
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("concat", "mult")
"""Exported in the default run: a pooled-vector method and the token-level one with the most attention."""
TOLERANCE = 1e-4
Exported = Callable[[str], tuple[MultimodalModel, Collator, Path]]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """Seven samples with real PNG and WAV files; rows lack different modalities."""
    folder = tmp_path_factory.mktemp("onnx-files")
    rng = np.random.default_rng(1)
    texts = ["a red square", None, "the blue circle", "a loud low tone here", "green", None, "two words"]
    has_image = [True, True, False, True, False, True, True]
    seconds = [0.1, 0.25, 0.4, None, 0.05, 0.2, None]
    out = []
    for i in range(7):
        fields: dict[str, str | None] = {"text": texts[i], "image": None, "audio": None}
        if has_image[i]:
            Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            fields["image"] = str(folder / f"img{i}.png")
        if seconds[i] is not None:
            t = np.arange(int(8000 * seconds[i])) / 8000
            wave = 0.5 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.01 * rng.standard_normal(t.shape)
            sf.write(folder / f"clip{i}.wav", wave.astype(np.float32), 8000)
            fields["audio"] = str(folder / f"clip{i}.wav")
        out.append(Record(source=folder / "manifest.jsonl", row=i + 1, id=f"s{i}", fields=fields,
                          target=LABELS[i % 3]))
    return out


@pytest.fixture(scope="module")
def exported(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """fusion -> (model, collator, graph path), each fusion exported once per module."""
    cache: dict[str, tuple[MultimodalModel, Collator, Path]] = {}

    def get(fusion: str) -> tuple[MultimodalModel, Collator, Path]:
        if fusion not in cache:
            model, collator, _ = build_model(records, fusion)
            cache[fusion] = model, collator, export_onnx(model, tmp_path_factory.mktemp(fusion) / "model.onnx")
        return cache[fusion]

    return get


def _crop_audio(sample: Sample, frames: int | None) -> Sample:
    audio = sample.inputs.get("audio")
    if frames is None or audio is None:
        return sample
    return dataclasses.replace(sample, inputs={**sample.inputs, "audio": {"mel": audio["mel"][:, :frames]}})


def _only(batch: Batch, modality: str) -> Batch:
    """Every other modality marked absent in every row (its tensors stay in the batch)."""
    present = {m: p if m == modality else torch.zeros_like(p) for m, p in batch.present.items()}
    return Batch(inputs=batch.inputs, present=present, target=batch.target, ids=batch.ids)


def parity_cases(model: MultimodalModel, collator: Collator, records: list[Record]) -> Iterator[tuple[str, Batch]]:
    """Batch 1 and 7, clips as decoded and cut to one frame, and three modality subsets.

    text+image drops audio from the batch altogether (the runner must fill it); audio-only keeps
    the other tensors but marks them absent. Batch 7 has rows lacking each modality already.
    """
    samples = [build_sample(r, model.preprocessor, model.task) for r in records]
    for size in (1, 7):
        for frames in (None, 1):
            batch = collator([_crop_audio(s, frames) for s in samples[:size]])
            label = f"batch {size}, {batch.inputs['audio']['mel'].shape[-1]} frames"
            yield f"{label}, all", batch
            yield f"{label}, text+image", drop_modality(batch, "audio")
            yield f"{label}, audio only", _only(batch, "audio")


@pytest.mark.parametrize("fusion", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FUSIONS.names()])
def test_graph_matches_pytorch(fusion: str, records: list[Record], exported: Exported) -> None:
    model, collator, path = exported(fusion)
    runner = OnnxRunner(path, threads=1)
    assert runner.modalities == ["audio", "image", "text"]
    outputs = {}
    for name, batch in parity_cases(model, collator, records):
        with torch.no_grad():
            expected = model(batch)
        got = runner(batch)
        assert got.dtype == torch.float32 and got.shape == expected.shape == (batch.size, len(LABELS))
        difference = float((got - expected).abs().max())
        assert difference <= TOLERANCE, f"{fusion}, {name}: max abs difference {difference:.3g}"
        outputs[name] = expected
    # The subsets must matter, or the comparison above could not catch a graph that ignores presence.
    assert float((outputs["batch 7, 32 frames, all"] - outputs["batch 7, 32 frames, audio only"]).abs().max()) > 1e-3


def test_cli_export_writes_a_valid_graph_and_sidecar(records: list[Record], tmp_path: Path) -> None:
    model, _, _ = build_model(records, "late")
    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "graphs" / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(folder), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = "".join(result.output.split())  # rich folds long paths over lines
    assert f"graphwrittento{out}" in printed and f"writtento{sidecar_path(out)}" in printed
    match = re.search(r"maxabsdifferenceONNXvsPyTorchonadummybatch=([-+.e0-9]+)", printed)
    assert match and float(match.group(1)) <= TOLERANCE, result.output
    onnx.checker.check_model(str(out), full_check=True)
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["modalities"] == ["audio", "image", "text"]
    assert sidecar["task"] == {"name": "classification", "num_outputs": 3, "state": {"labels": LABELS}}
    names = [i["name"] for i in sidecar["inputs"]]
    assert names == ["present", "audio.mel", "audio.frame_mask", "image.pixels", "text.input_ids",
                     "text.attention_mask"]
    assert sidecar["inputs"][0]["shape"] == ["batch", 3]
    assert sidecar["inputs"][1]["shape"] == ["batch", 16, "audio_frames"]
    graph_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in onnx.load(str(out)).graph.input}
    assert graph_inputs["text.input_ids"] == ["batch", "text_length"]
    assert sidecar["preprocessing"]["audio"]["settings"]["n_mels"] == 16


def test_cli_rejects_an_unknown_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "tflite"])
    assert result.exit_code == 1
    assert "--format tflite: unknown export format; choose from onnx" in " ".join(result.output.split())


def test_only_head_tasks_export(records: list[Record], tmp_path: Path) -> None:
    config = make_config()
    model, _, _ = build_model(records)
    task = TASKS.create("contrastive", dim=8)
    task.fit([r.target for r in records])
    contrastive = MultimodalModel.from_config(config, model.preprocessor, task)
    with pytest.raises(MMFuseError, match="task 'contrastive' cannot be exported to ONNX"):
        export_onnx(contrastive, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_an_encoder_the_exporter_cannot_follow_is_named(records: list[Record], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def gru_config(fusion: str = "concat", **options: object) -> object:
        config = make_config(fusion, **options)
        config.encoders["text"] = EncoderConfig(name="text_gru", dim=8)
        return config

    monkeypatch.setattr("test_model.make_config", gru_config)
    model, _, _ = build_model(records)
    with pytest.raises(MMFuseError, match="encoder 'text_gru' of modality 'text' cannot be exported"):
        export_onnx(model, tmp_path / "model.onnx")


def test_a_corrupt_or_missing_graph_is_named(records: list[Record], exported: Exported, tmp_path: Path) -> None:
    _, _, path = exported("concat")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    sidecar_path(truncated).write_bytes(sidecar_path(path).read_bytes())
    with pytest.raises(MMFuseError, match=f"{re.escape(str(truncated))}: not a loadable ONNX graph"):
        OnnxRunner(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a graph")
    with pytest.raises(MMFuseError, match=f"{re.escape(str(garbage))}: not a loadable ONNX graph"):
        OnnxRunner(garbage)
    with pytest.raises(MMFuseError, match="no such ONNX file"):
        OnnxRunner(tmp_path / "absent.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(MMFuseError, match=r"lonely\.onnx\.json: missing"):
        OnnxRunner(lonely)


def test_a_batch_that_does_not_fit_the_graph_is_refused(records: list[Record], exported: Exported) -> None:
    model, collator, path = exported("concat")
    runner = OnnxRunner(path, threads=1)
    batch = collator([build_sample(r, model.preprocessor, model.task) for r in records[:3]])

    def edited(modality: str, **inputs: torch.Tensor | None) -> Batch:
        changed = {k: v for k, v in {**batch.inputs[modality], **inputs}.items() if v is not None}
        return Batch(inputs={**batch.inputs, modality: changed}, present=batch.present)

    with pytest.raises(MMFuseError, match="'audio' inputs lack 'mel'"):
        runner(edited("audio", mel=None))
    with pytest.raises(MMFuseError, match=r"image\.pixels has shape \(3, 3, 8, 8\).*axis 2 must be 16"):
        runner(edited("image", pixels=torch.zeros(3, 3, 8, 8)))
    with pytest.raises(MMFuseError, match=r"text\.attention_mask has text_length = 2 but text\.input_ids has"):
        runner(edited("text", attention_mask=torch.ones(3, 2, dtype=torch.bool)))
    extra = Batch(inputs={**batch.inputs, "video": {}}, present={**batch.present, "video": batch.present["text"]})
    with pytest.raises(MMFuseError, match=r"modalities \['video'\] that this graph does not read"):
        runner(extra)


def test_a_calibrated_graph_applies_the_temperature_of_each_presence_pattern(
        records: list[Record], tmp_path: Path) -> None:
    from mmfuse.tasks.classification import ClassificationTask
    from mmfuse.tasks.temperature import PresenceTemperature

    model, collator, _ = build_model(records, "concat")
    assert isinstance(model.task, ClassificationTask)
    # distinct temperatures for the patterns the parity cases produce, a default for the rest
    model.task.temperature = PresenceTemperature(model.modalities, default=0.7, by_pattern={
        "audio+image+text": 2.0, "audio": 5.0, "image+text": 0.25, "none": 9.0})
    runner = OnnxRunner(export_onnx(model, tmp_path / "model.onnx"), threads=1)
    for name, batch in parity_cases(model, collator, records):
        with torch.no_grad():
            expected = model(batch)
        difference = float((runner(batch) - expected).abs().max())
        assert difference <= TOLERANCE, f"calibrated, {name}: max abs difference {difference:.3g}"
    model.task.temperature = None
    batch = collator([build_sample(r, model.preprocessor, model.task) for r in records])
    with torch.no_grad():
        raw = model(batch)
    # the graph holds the temperatures: its outputs differ from the raw logits by them
    assert float((runner(batch) - raw).abs().max()) > 1e-3
