"""ONNX export: the graph computes ``model(batch)`` for every fusion method, batch size, sequence length
and modality subset; the CLI writes a valid graph and sidecar; bad models, files and batches fail clearly.

Every registered fusion method is exported in the default run, on a small model of two pre-extracted
feature modalities (2-12 s per export on a busy 2-core machine). The full model, with the text, image and
audio encoders on real PNG and WAV files, is exported for ``concat`` by default and for every other
method under ``-m slow`` (about two and a half minutes for the other ten).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (the test extra: a missing one fails this file rather than skipping it)
import onnxscript  # noqa: F401
import pytest
import soundfile as sf
import torch
from config_helpers import fusion_section
from PIL import Image
from test_model import LABELS, build_model, drop_modality, make_config
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.config import validate_config
from mmfuse.config.schema import EncoderConfig
from mmfuse.core.contracts import Batch
from mmfuse.core.errors import MMFuseError
from mmfuse.data.dataset import Collator, Sample, build_sample
from mmfuse.data.manifest import Record
from mmfuse.data.preprocess import Preprocessor
from mmfuse.export import OnnxRunner, export_onnx, parity, self_check
from mmfuse.export.onnx import TOLERANCE as SELF_CHECK_TOLERANCE
from mmfuse.export.sidecar import sidecar_path
from mmfuse.fusion import FUSIONS
from mmfuse.model import MultimodalModel
from mmfuse.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-6
"""Allowed max abs difference ONNX vs PyTorch, times max(1, max |PyTorch output|) (outputs here stay below 1).

Measured max abs differences (float32, onnxruntime CPU, one thread), feature model / full model:
lmf 2.4e-7 / 3.0e-7 (its product of per-modality factors compounds rounding), late 6e-8 / 1.2e-7,
graph 6e-8 / 3e-8, every other method 3.4e-8 or less: the size of float32 rounding."""


def assert_same(got: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape, label
    difference = float((got - expected).abs().max())
    bound = TOLERANCE * max(1.0, float(expected.abs().max()))
    assert difference <= bound, f"{label}: max abs difference {difference:.3g} > {bound:.3g}"


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


@dataclasses.dataclass(frozen=True)
class Export:
    model: MultimodalModel
    collator: Collator
    path: Path
    output: str
    """What ``mmfuse export`` printed."""


Exported = Callable[[str], Export]

@pytest.fixture(scope="module")
def exported(records: list[Record], tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """fusion -> the full model and its graph, which ``mmfuse export`` wrote from the model's saved
    folder (once per fusion and module): the parity tests check the graph users get."""
    cache: dict[str, Export] = {}

    def get(fusion: str) -> Export:
        if fusion not in cache:
            model, collator, _ = build_model(records, fusion)
            folder = model.save_pretrained(tmp_path_factory.mktemp(fusion) / "model")
            out = folder.parent / "graphs" / "model.onnx"
            result = CliRunner().invoke(app, ["export", str(folder), "--format", "onnx", "--out", str(out)])
            assert result.exit_code == 0, result.output
            cache[fusion] = Export(model, collator, out, result.output)
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


def compare_cases(runner: OnnxRunner, model: MultimodalModel, cases: Iterator[tuple[str, Batch]],
                  fusion: str) -> dict[str, torch.Tensor]:
    """Each case through the graph and through PyTorch, asserted equal; PyTorch's outputs by case name."""
    outputs = {}
    for name, batch in cases:
        with torch.no_grad():
            expected = model(batch)
        assert expected.shape == (batch.size, len(LABELS))
        assert_same(runner(batch), expected, f"{fusion}, {name}")
        outputs[name] = expected
    return outputs


@pytest.mark.parametrize("fusion", [f if f == "concat" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FUSIONS.names()])
def test_graph_of_the_full_model_matches_pytorch(fusion: str, records: list[Record], exported: Exported) -> None:
    export = exported(fusion)
    model, collator = export.model, export.collator
    runner = OnnxRunner(export.path, threads=1)
    assert runner.modalities == ["audio", "image", "text"]
    outputs = compare_cases(runner, model, parity_cases(model, collator, records), fusion)
    # The subsets must matter, or the comparison above could not catch a graph that ignores presence.
    assert float((outputs["batch 7, 32 frames, all"] - outputs["batch 7, 32 frames, audio only"]).abs().max()) > 1e-3


WIDTHS = {"a": 4, "b": 3}
"""The feature model's modalities and their widths D: 'a' a sequence of 1-4 steps, 'b' one vector a sample."""
SMALL = {"dim": 8, "heads": 2, "proj_dim": 8, "hidden": 8, "score_hidden": 8, "rank_dim": 4, "layers": 1,
         "fusion_layer": 0}
"""Options a fusion method is built with where it takes the option and its default is larger: small
widths, and one layer where the default stacks two (export time grows with the layers). With one
layer, bottleneck fuses from its first (``fusion_layer`` 0). The slow full-model test exports every
method at its defaults."""


def small_options(fusion: str) -> dict[str, int]:
    parameters = inspect.signature(FUSIONS.get(fusion)).parameters
    return {k: v for k, v in SMALL.items() if k in parameters and isinstance(parameters[k].default, int)
            and parameters[k].default > v}


@pytest.fixture(scope="module")
def feature_records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """Five samples: 'a' has 3, 1, -, 4, 2 steps, 'b' a vector in rows 0, 2 and 3."""
    folder = tmp_path_factory.mktemp("onnx-features")
    rng = np.random.default_rng(2)
    steps = {"a": [3, 1, None, 4, 2], "b": [1, None, 1, 1, None]}
    out = []
    for i in range(5):
        fields: dict[str, str | None] = {}
        for m, width in WIDTHS.items():
            count = steps[m][i]
            fields[m] = None
            if count is not None:
                values = 2 * rng.standard_normal((count, width) if m == "a" else (width,))
                np.save(folder / f"{m}{i}.npy", values.astype(np.float32))
                fields[m] = str(folder / f"{m}{i}.npy")
        out.append(Record(source=folder / "manifest.jsonl", row=i + 1, id=f"f{i}", fields=fields,
                          target=LABELS[i % 3]))
    return out


def build_feature_model(records: list[Record], fusion: str) -> tuple[MultimodalModel, Collator]:
    """Two ``identity`` encoders (widths 6 and 5) and ``fusion`` at small widths, seeded, in eval mode."""
    config = validate_config({
        "seed": 0,
        "data": {"synthetic": {"n_samples": 20}, "features": {"max_length": 6},
                 "modalities": {m: {"kind": "features", "column": m} for m in WIDTHS}},
        "encoders": {"a": {"name": "identity", "dim": 6}, "b": {"name": "identity", "dim": 5}},
        "fusion": fusion_section(fusion, out_dim=8, **small_options(fusion)),
        "task": {"name": "classification"},
    })
    prep = Preprocessor(config.data.modalities, config.data.text, config.data.image, config.data.audio,
                        features=config.data.features)
    prep.fit(records)
    task = TASKS.create(config.task.name, **config.task.options)
    task.fit([r.target for r in records])
    torch.manual_seed(0)
    model = MultimodalModel.from_config(config, prep, task)
    model.eval()
    return model, Collator(prep, task)


def feature_cases(model: MultimodalModel, collator: Collator, records: list[Record]) -> Iterator[tuple[str, Batch]]:
    """Row 0 alone, row 1 alone ('a' of one step, no 'b'), all five rows; each with both modalities,
    'b' dropped from the batch altogether (the runner fills it) and 'b' only ('a' marked absent)."""
    samples = [build_sample(r, model.preprocessor, model.task) for r in records]
    for rows in ((0,), (1,), (0, 1, 2, 3, 4)):
        batch = collator([samples[i] for i in rows])
        yield f"rows {rows}, both", batch
        yield f"rows {rows}, a only", drop_modality(batch, "b")
        yield f"rows {rows}, b only", _only(batch, "b")


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_graph_matches_pytorch(fusion: str, feature_records: list[Record], tmp_path: Path) -> None:
    model, collator = build_feature_model(feature_records, fusion)
    runner = OnnxRunner(export_onnx(model, tmp_path / "model.onnx"), threads=1)
    assert runner.modalities == ["a", "b"]
    outputs = compare_cases(runner, model, feature_cases(model, collator, feature_records), fusion)
    # Presence must change the outputs, or the comparison above could not catch a graph that ignores it.
    everything = "rows (0, 1, 2, 3, 4)"
    assert float((outputs[f"{everything}, both"] - outputs[f"{everything}, a only"]).abs().max()) > 1e-3
    assert float((outputs[f"{everything}, both"] - outputs[f"{everything}, b only"]).abs().max()) > 1e-3


def test_cli_export_writes_a_valid_graph_and_sidecar(exported: Exported) -> None:
    export = exported("concat")
    out = export.path
    printed = "".join(export.output.split())  # rich folds long paths over lines
    assert f"graphwrittento{out}" in printed and f"writtento{sidecar_path(out)}" in printed
    match = re.search(r"maxabsdifferenceONNXvsPyTorchonadummybatch=([-+.e0-9]+)\(outputsupto([-+.e0-9]+);", printed)
    assert match, export.output
    difference, scale = float(match.group(1)), float(match.group(2))
    assert 0.01 < scale < 100 and difference <= TOLERANCE * max(1.0, scale), export.output
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
    path = exported("concat").path
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
    export = exported("concat")
    runner = OnnxRunner(export.path, threads=1)
    model = export.model
    batch = export.collator([build_sample(r, model.preprocessor, model.task) for r in records[:3]])

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


def test_parity_is_the_difference_in_units_of_the_outputs_scale() -> None:
    outputs = torch.tensor([[189.0, -3.0], [0.5, 0.0]], dtype=torch.float64)
    shifted = outputs.clone()
    shifted[0, 0] += 1.2e-4  # a few float32 roundings of the largest output: the same output
    check = parity(shifted, outputs)
    assert check.difference == pytest.approx(1.2e-4, rel=0.01) and check.scale == 189.0
    assert check.error == pytest.approx(1.2e-4 / 189, rel=0.01) and check.ok
    small = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    assert parity(small + 1e-6, small).ok  # outputs below 1: the plain max abs difference
    assert not parity(small + 2 * SELF_CHECK_TOLERANCE, small).ok
    shifted[1, 1] = 0.01  # 0.01 where the model says 0: not rounding however large the other outputs
    assert not parity(shifted, outputs).ok
    assert not parity(torch.full_like(small, float("nan")), small).ok
    assert not parity(small, torch.full_like(small, float("nan"))).ok
    with pytest.raises(MMFuseError, match=r"outputs have shape \(1, 2\), the model's \(2, 2\)"):
        parity(small, outputs)


def test_the_self_check_passes_large_outputs_and_fails_another_models_graph(
        feature_records: list[Record], tmp_path: Path) -> None:
    model, _ = build_feature_model(feature_records, "concat")
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # logits in the thousands, as a model trained to confidence may give on noise
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)
    path = export_onnx(model, tmp_path / "model.onnx")
    check = self_check(model, path)
    assert check.scale > 1000 and check.ok, check
    other, _ = build_feature_model(feature_records, "concat")  # the same layout, other weights
    check = self_check(other, path)
    assert not check.ok and check.error > 0.01, check


def test_a_calibrated_graph_applies_the_temperature_of_each_presence_pattern(
        feature_records: list[Record], tmp_path: Path) -> None:
    from mmfuse.tasks.classification import ClassificationTask
    from mmfuse.tasks.temperature import PresenceTemperature

    model, collator = build_feature_model(feature_records, "concat")
    assert isinstance(model.task, ClassificationTask)
    samples = [build_sample(r, model.preprocessor, model.task) for r in feature_records]
    with torch.no_grad():
        raw = model(collator(samples))
    # distinct temperatures for the patterns the cases produce; 'b' alone takes the default
    temperatures = {"a+b": 2.0, "a": 5.0, "none": 9.0}
    model.task.temperature = PresenceTemperature(model.modalities, default=0.25, by_pattern=temperatures)
    runner = OnnxRunner(export_onnx(model, tmp_path / "model.onnx"), threads=1)
    for name, batch in feature_cases(model, collator, feature_records):
        with torch.no_grad():
            expected = model(batch)
        assert_same(runner(batch), expected, f"calibrated, {name}")
    # the graph divides each row's raw logits by its pattern's temperature
    patterns = ["a+b", "a", "b", "a+b", "a"]  # rows 0-4 of feature_records
    divisor = torch.tensor([temperatures.get(p, 0.25) for p in patterns])[:, None]
    assert_same(runner(collator(samples)), raw / divisor, "calibrated rows against raw logits / temperature")
