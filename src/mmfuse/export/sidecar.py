"""The JSON file written next to an exported graph: what to feed it and what comes out.

``model.onnx`` holds the computation only. A runtime without mmfuse (C++, Java, a browser) also has
to know the modality order of the ``present`` columns, each input's dtype and symbolic shape, how
absent inputs are filled, how the preprocessing turned raw files into those tensors, and how to read
the outputs (label names, target standardisation). ``model.onnx.json`` says all of that; the
``OnnxRunner`` reads it too, so the two cannot disagree about the layout.

What a client does with the outputs is spelled out in ``postprocessing``, because the graph's
output is ``model(batch)`` and that already includes what training fitted afterwards: a calibrated
classifier's logits are divided by its presence-pattern temperatures *inside* the graph. Version 1
listed those temperatures under ``task.state`` next to the labels, and a client applying them
again moved the probabilities by up to 0.12. Version 2 keeps them only under ``calibration``,
marked ``applied_in_graph``, and ``postprocessing.steps`` is the complete recipe from ``outputs``
to the values ``mmfuse serve`` and ``mmfuse predict`` report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfuse.core.errors import MMFuseError
from mmfuse.core.version import __version__
from mmfuse.data.audio import SILENCE_LOG_MEL
from mmfuse.data.preprocess import Preprocessor
from mmfuse.data.text import Tokenizer
from mmfuse.export.graph import BATCH_AXIS, DTYPES, OUTPUTS, PRESENT, GraphInput
from mmfuse.model import PREPROCESSING_FILE, MultimodalModel
from mmfuse.tasks import HeadTask
from mmfuse.tasks.classification import ClassificationTask, MultilabelTask
from mmfuse.tasks.regression import RegressionTask

FORMAT = "mmfuse-onnx"
VERSION = 2
READABLE_VERSIONS = (1, 2)
"""The graph layout (inputs, shapes, fill) is the same in both; version 2 changed only what a client is
told to do with the outputs, so a runner reads either."""


def sidecar_path(graph: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return graph.with_name(graph.name + ".json")


@dataclass(frozen=True)
class Sidecar:
    """The part of the sidecar a runner needs: the modality order and the graph inputs."""

    modalities: list[str]
    inputs: list[GraphInput]
    num_outputs: int
    task: str


def describe(model: MultimodalModel, inputs: list[GraphInput], opset: int) -> dict[str, Any]:
    """The sidecar's content for ``model`` exported with ``inputs``."""
    assert isinstance(model.task, HeadTask)
    present = {"name": PRESENT, "dtype": "bool", "shape": [BATCH_AXIS, len(model.modalities)],
               "meaning": "present[b, j]: sample b has modality modalities[j]; False rows of a modality "
                          "are ignored whatever their tensors hold"}
    return {
        "format": FORMAT,
        "version": VERSION,
        "mmfuse_version": __version__,
        "opset": opset,
        "modalities": model.modalities,
        "inputs": [present, *({"name": s.name, "modality": s.modality, "input": s.key, "dtype": s.dtype,
                                "shape": list(s.shape), "fill_shape": list(s.fill)} for s in inputs)],
        "outputs": [{"name": OUTPUTS, "dtype": "float32", "shape": [BATCH_AXIS, model.task.num_outputs],
                     "meaning": _output_meaning(model.task),
                     "calibrated": getattr(model.task, "temperature", None) is not None}],
        "postprocessing": postprocessing(model.task),
        "calibration": calibration(model.task),
        "feeding": [
            "Every input must be fed, for every modality, with the same batch size B.",
            "Dynamic axes (named in 'shape') may differ between batches; inputs sharing a name must agree.",
            "A modality absent from a sample: present False and any values (zeros) in its rows.",
            "A modality absent from the whole batch: present False and zeros of shape [B, *fill_shape].",
            "Masks are True on real tokens / frames / steps; padding past a sample's end is False.",
        ],
        "task": {"name": model.task.name, "num_outputs": model.task.num_outputs,
                 "state": {k: v for k, v in model.task.state().items() if k != "temperature"}},
        "preprocessing": {m: _modality_preprocessing(model.preprocessor, m) for m in model.modalities},
        "preprocessing_note": f"the full preprocessing state (word vocabularies included) is {PREPROCESSING_FILE} "
                              "in the saved model folder",
    }


def _output_meaning(task: HeadTask) -> str:
    if isinstance(task, MultilabelTask):
        return f"logits per label in task.state.labels order; sigmoid >= {task.threshold} means the label applies"
    if isinstance(task, ClassificationTask):
        calibrated = ("calibrated logits (already divided by the temperature of each row's presence pattern)"
                      if task.temperature is not None else "logits")
        return f"{calibrated} per label in task.state.labels order; softmax over axis 1 gives the probabilities"
    if isinstance(task, RegressionTask):
        return "standardised values; value = output * task.state.std + task.state.mean"
    return f"the raw outputs of task '{task.name}' (task.decode in mmfuse)"


def postprocessing(task: HeadTask) -> dict[str, Any]:
    """What turns ``outputs`` into the values mmfuse reports, as data (``function``...) and as ``steps``.

    Nothing else is to be applied: in particular not the temperatures under ``calibration``.
    """
    if isinstance(task, MultilabelTask):
        return {"output": OUTPUTS, "function": "sigmoid", "elementwise": True, "threshold": task.threshold,
                "steps": [f"probabilities = sigmoid({OUTPUTS}), element by element; column j is task.state.labels[j]",
                          f"the labels of a row are those with probability >= {task.threshold}"]}
    if isinstance(task, ClassificationTask):
        steps = [f"probabilities = softmax({OUTPUTS}, axis=1); column j is task.state.labels[j]",
                 "label = task.state.labels[argmax(probabilities, axis=1)]"]
        if task.temperature is not None:
            steps.append("the calibration temperatures are already applied inside the graph: do not divide again")
        return {"output": OUTPUTS, "function": "softmax", "axis": 1, "steps": steps}
    if isinstance(task, RegressionTask):
        steps = [f"value[:, j] = {OUTPUTS}[:, j] * task.state.std[j] + task.state.mean[j]"]
        if task.name == "sentiment":
            steps.append("sentiment = 'positive' if value >= 0 else 'negative'")
        return {"output": OUTPUTS, "function": "affine", "scale": list(task.std), "shift": list(task.mean),
                "steps": steps}
    return {"output": OUTPUTS, "function": "none",
            "steps": [f"{OUTPUTS} are task '{task.name}''s raw outputs; mmfuse's task.decode reads them"]}


def calibration(task: HeadTask) -> dict[str, Any]:
    """Whether the outputs are calibrated and with what; for information only, nothing to apply."""
    temperature = getattr(task, "temperature", None)
    if temperature is None:
        return {"applied_in_graph": False, "method": "none", "note": "the outputs are the head's own logits"}
    return {"applied_in_graph": True, "method": "temperature per presence pattern",
            "temperatures": temperature.state(),
            "note": "for information only: the graph already divides each row's logits by the temperature of its "
                    "presence pattern; applying it again changes the probabilities"}


def _modality_preprocessing(prep: Preprocessor, modality: str) -> dict[str, Any]:
    """The settings that turned a raw field into this modality's tensors."""
    kind = prep.kind(modality)
    entry: dict[str, Any] = {"kind": kind, "column": prep.modalities[modality].column}
    if kind == "text":
        tokenizer = prep.tokenizers.get(modality)
        entry["settings"] = prep.text.model_dump(mode="json")
        entry["tokenizer"] = ({"type": "word", "vocab_size": tokenizer.vocab_size, "pad_id": Tokenizer.PAD_ID,
                               "unknown_id": Tokenizer.UNK_ID} if isinstance(tokenizer, Tokenizer) else
                              {"type": "pretrained", "source": getattr(tokenizer, "source", None)})
        entry["padding"] = "input_ids 0 and attention_mask False past the end of each text"
    elif kind == "image":
        entry["settings"] = prep.image.model_dump(mode="json")
        entry["layout"] = "channels first; pixels = (value / 255 - mean) / std"
    elif kind == "audio":
        entry["settings"] = prep.audio.model_dump(mode="json")
        entry["max_frames"] = prep.audio.max_frames
        entry["padding"] = (f"mel frames past a clip's end hold {SILENCE_LOG_MEL!r} (the log-mel of silence) with "
                            "frame_mask False" if prep.audio.features == "log_mel" else
                            "waveform 0.0 and sample_mask False past a clip's end")
    else:
        entry["settings"] = prep.features.model_dump(mode="json")
        entry["feature_dim"] = prep.feature_dims.get(modality)
    return entry


def read_sidecar(path: Path) -> Sidecar:
    """The layout recorded by ``describe``; a missing or malformed file is a one-line MMFuseError."""
    if not path.is_file():
        raise MMFuseError(f"{path}: missing; the export writes it next to the graph and it must travel with it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMFuseError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MMFuseError(f"{path}: not an mmfuse ONNX sidecar (no \"format\": \"{FORMAT}\")")
    if data.get("version") not in READABLE_VERSIONS:
        raise MMFuseError(f"{path}: sidecar version {data.get('version')!r}; this mmfuse reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        inputs = [GraphInput(modality=str(i["modality"]), key=str(i["input"]), dtype=str(i["dtype"]),
                             shape=tuple(d if isinstance(d, str) else int(d) for d in i["shape"]),
                             fill=tuple(int(d) for d in i["fill_shape"]))
                  for i in data["inputs"] if i["name"] != PRESENT]
        unknown = [i.name for i in inputs if i.dtype not in DTYPES]
        if unknown:
            raise MMFuseError(f"{path}: inputs {unknown} have a dtype other than {', '.join(DTYPES)}")
        return Sidecar(modalities=[str(m) for m in data["modalities"]], inputs=inputs,
                       num_outputs=int(data["task"]["num_outputs"]), task=str(data["task"]["name"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MMFuseError(f"{path}: malformed sidecar ({type(exc).__name__}: {exc})") from None
