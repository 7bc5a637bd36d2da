"""The ONNX sidecar tells a client exactly how to get the served probabilities (issue 30, item 7).

A calibrated classifier's graph already divides its logits by the presence-pattern temperatures.
The client below knows nothing of mmfuse's model code: it feeds the graph as the sidecar's
``inputs``/``feeding`` say (the tensors come from mmfuse's preprocessing, which the sidecar points
to), applies ``postprocessing`` literally, and must get ``mmfuse predict``'s and ``mmfuse serve``'s
probabilities to 1e-6 (they are rounded to 6 decimals). Applying the temperatures once more, which
version 1 of the sidecar invited, is shown to move them by far more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from fastapi.testclient import TestClient
from serve_helpers import train_small_model
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.data.dataset import Collator, build_sample
from mmfuse.data.manifest import Record
from mmfuse.export import OnnxRunner, export_onnx
from mmfuse.export.sidecar import VERSION, sidecar_path
from mmfuse.model import MultimodalModel
from mmfuse.serve.app import create_app
from mmfuse.serve.settings import ServeSettings
from mmfuse.tasks.classification import ClassificationTask
from mmfuse.tasks.temperature import PresenceTemperature

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPERATURES = {"audio+image+text": 2.5, "image": 0.4, "audio+text": 4.0}
"""Far from 1 and different per pattern, so applying them twice, or the wrong one, shows."""
CASES = (("text", "image", "audio"), ("image",), ("text", "audio"), ("text",))


@pytest.fixture(scope="module")
def calibrated(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A trained tri-modal classifier with set temperatures, saved, and its exported graph."""
    folder = tmp_path_factory.mktemp("sidecar")
    saved = train_small_model(synth_manifest, folder, text_encoder="text_transformer")
    trained = MultimodalModel.from_pretrained(saved)
    assert isinstance(trained.task, ClassificationTask)
    trained.task.temperature = PresenceTemperature(trained.modalities, default=1.7, by_pattern=TEMPERATURES)
    model_dir = trained.save_pretrained(folder / "calibrated")
    graph = export_onnx(MultimodalModel.from_pretrained(model_dir), folder / "model.onnx")
    return model_dir, graph


def rows(manifest: Path) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in manifest.read_text().splitlines()[:len(CASES)]]
    for row in found:
        row["image"], row["audio"] = (str(manifest.parent / row[m]) for m in ("image", "audio"))
    return found


def client_probabilities(graph: Path, model_dir: Path, row: dict[str, Any], modalities: tuple[str, ...],
                         ) -> tuple[np.ndarray, dict[str, Any]]:
    """What a client holding only the graph and its sidecar computes (preprocessing from mmfuse)."""
    sidecar = json.loads(sidecar_path(graph).read_text())
    model = MultimodalModel.from_pretrained(model_dir)  # its preprocessing only, as the sidecar says
    fields = {m: (row[m] if m in modalities else None) for m in model.preprocessor.modalities}
    sample = build_sample(Record(source=Path("-"), row=0, id="x", fields=fields), model.preprocessor, None)
    batch = Collator(model.preprocessor, None)([sample])
    feed: dict[str, Any] = {}
    for spec in sidecar["inputs"]:
        if spec["name"] == "present":
            feed["present"] = np.array([[m in modalities for m in sidecar["modalities"]]], dtype=bool)
        elif spec["modality"] in modalities:
            feed[spec["name"]] = batch.inputs[spec["modality"]][spec["input"]].numpy().astype(spec["dtype"])
        else:  # "absent from the whole batch: present False and zeros of shape [B, *fill_shape]"
            feed[spec["name"]] = np.zeros((1, *spec["fill_shape"]), dtype=spec["dtype"])
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    post = sidecar["postprocessing"]
    outputs = session.run([post["output"]], feed)[0].astype(np.float64)
    assert post["function"] == "softmax"
    shifted = np.exp(outputs - outputs.max(axis=post["axis"], keepdims=True))
    return shifted / shifted.sum(axis=post["axis"], keepdims=True), sidecar


def cli_predict(model_dir: Path, row: dict[str, Any], modalities: tuple[str, ...]) -> dict[str, Any]:
    command = ["predict", "-m", str(model_dir)]
    for m in modalities:
        command += [f"--{m}", row[m]]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_the_sidecar_says_the_temperatures_are_applied_and_nothing_else_is(calibrated: tuple[Path, Path]) -> None:
    _, graph = calibrated
    sidecar = json.loads(sidecar_path(graph).read_text())
    assert sidecar["version"] == VERSION == 2
    assert sidecar["task"]["state"] == {"labels": sidecar["task"]["state"]["labels"]}  # no temperature to apply
    assert sidecar["outputs"][0]["calibrated"] is True
    assert sidecar["outputs"][0]["meaning"].startswith("calibrated logits (already divided by the temperature")
    assert sidecar["calibration"]["applied_in_graph"] is True
    assert sidecar["calibration"]["temperatures"] == {"modalities": ["audio", "image", "text"], "default": 1.7,
                                                      "by_pattern": TEMPERATURES}
    assert sidecar["postprocessing"] == {
        "output": "outputs", "function": "softmax", "axis": 1,
        "steps": ["probabilities = softmax(outputs, axis=1); column j is task.state.labels[j]",
                  "label = task.state.labels[argmax(probabilities, axis=1)]",
                  "the calibration temperatures are already applied inside the graph: do not divide again"]}
    OnnxRunner(graph)  # the runner reads version 2


def test_following_the_sidecar_gives_the_served_and_predicted_probabilities(
        calibrated: tuple[Path, Path], synth_manifest: Path) -> None:
    model_dir, graph = calibrated
    client = TestClient(create_app(model_dir, ServeSettings()))
    client.__enter__()
    try:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        largest_double_move = 0.0
        for row, modalities in zip(rows(synth_manifest), CASES, strict=True):
            got, sidecar = client_probabilities(graph, model_dir, row, modalities)
            labels = sidecar["task"]["state"]["labels"]
            predicted = cli_predict(model_dir, row, modalities)
            files: dict[str, Any] = {m: (Path(row[m]).name, Path(row[m]).read_bytes())
                                     for m in ("image", "audio") if m in modalities}
            served = client.post("/predict", data={"text": row["text"]} if "text" in modalities else {},
                                 files=files).json()
            for expected in (predicted, served):
                assert labels[int(got[0].argmax())] == expected["label"]
                assert got[0] == pytest.approx([expected["probabilities"][name] for name in labels], abs=1e-6)
            # what a client applying the temperature once more (sidecar version 1's invitation) would get
            pattern = "+".join(sorted(modalities))
            temperature = TEMPERATURES.get(pattern, 1.7)
            twice = np.exp(np.log(got[0]) / temperature)
            largest_double_move = max(largest_double_move, float(np.abs(twice / twice.sum() - got[0]).max()))
        assert largest_double_move > 0.05, "the temperatures are too mild for this test to tell"
    finally:
        client.__exit__(None, None, None)


def test_an_uncalibrated_model_says_so(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, _ = calibrated
    model = MultimodalModel.from_pretrained(model_dir)
    assert isinstance(model.task, ClassificationTask)
    model.task.temperature = None
    graph = export_onnx(model, tmp_path / "raw.onnx")
    sidecar = json.loads(sidecar_path(graph).read_text())
    assert sidecar["outputs"][0]["calibrated"] is False
    assert sidecar["calibration"] == {"applied_in_graph": False, "method": "none",
                                      "note": "the outputs are the head's own logits"}
    assert sidecar["postprocessing"]["steps"][-1] == "label = task.state.labels[argmax(probabilities, axis=1)]"
