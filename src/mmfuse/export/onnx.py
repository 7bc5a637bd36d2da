"""Export a ``MultimodalModel`` to one ONNX graph that serves any subset of its modalities.

The graph reads the preprocessed tensors of every modality plus a presence matrix (see
``mmfuse.export.graph``) and outputs exactly ``model(batch)``; preprocessing (tokenising, decoding
images, log-mel) stays outside. ``model.onnx.json`` beside it documents the layout
(``mmfuse.export.sidecar``) and ``OnnxRunner`` (``mmfuse.export.runner``) runs it on a ``Batch``.

Why the torch.export-based ("dynamo") exporter and not the legacy TorchScript one: the legacy
tracer turns Python ints computed from shapes into constants. ``nn.MultiheadAttention`` (inside the
text encoder) reshapes by ``batch * heads`` computed in Python, so a legacy graph traced at batch 3
fails at batch 1, and it cannot export the fused transformer fast path at all. torch.export keeps
such sizes symbolic, and with ``Dim.DYNAMIC`` it refuses to specialise a dynamic axis instead of
silently freezing it. It is slower (seconds per model), which only export pays. torch.export is
called directly, not through ``torch.onnx.export``'s fallbacks, because its last fallback
(``draft_export``) would accept a graph with the batch size frozen.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfuse.core.atomic import atomic_file, write_text_atomic
from mmfuse.core.errors import MMFuseError
from mmfuse.core.logs import logger_levels
from mmfuse.core.tracing import graph_capture
from mmfuse.export.deps import require
from mmfuse.export.graph import (
    BATCH_AXIS,
    OUTPUTS,
    PRESENT,
    GraphInput,
    GraphModel,
    example_batch,
    flat_arguments,
    graph_inputs,
)
from mmfuse.export.runner import OnnxRunner
from mmfuse.export.sidecar import describe, sidecar_path
from mmfuse.model import MultimodalModel
from mmfuse.tasks import HeadTask

__all__ = ["TOLERANCE", "OnnxRunner", "Parity", "export_onnx", "parity", "self_check"]

TOLERANCE = 1e-5
"""The largest ``Parity.error`` (difference in units of the output's scale) that counts as the same output."""


@dataclass(frozen=True)
class Parity:
    """How far a graph's outputs are from the PyTorch model's on one batch.

    ``difference`` is the max abs difference, ``scale`` the max abs PyTorch output and ``error``
    their ratio, ``difference / max(1, scale)``: the plain max abs difference for outputs below 1,
    relative to the largest output above. Both sides compute in float32 and sum in different
    orders, so they differ by a few roundings of the largest values, not by a fixed amount: a
    trained demo ``concat`` model (logits up to 189 on the self-check's random batch) differs by
    1.1e-4 there, 5.7e-7 of its scale, and against its float64 copy both sides err by that order. A bound on
    the plain difference would fail such a model; a frozen branch or a wrong input differs by a
    sizeable fraction of the outputs.
    """

    difference: float
    scale: float

    @property
    def error(self) -> float:
        return self.difference / max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        """``error <= TOLERANCE``; a NaN anywhere fails."""
        return self.error <= TOLERANCE


def parity(got: Tensor, expected: Tensor) -> Parity:
    """The ``Parity`` of a graph's outputs ``got`` against PyTorch's ``expected`` (same shape)."""
    if got.shape != expected.shape:
        raise MMFuseError(f"the graph's outputs have shape {tuple(got.shape)}, the model's {tuple(expected.shape)}")
    got, expected = got.double(), expected.double()
    return Parity(float((got - expected).abs().max()), float(expected.abs().max()))


def export_onnx(model: MultimodalModel, out: Path, opset: int | None = None) -> Path:
    """Writes ``out`` (the graph) and ``out.json`` (the sidecar), each atomically; returns ``out``.

    Only models whose task is a ``HeadTask`` (classification, multilabel, regression, sentiment)
    export: their ``model(batch)`` is one (B, num_outputs) tensor that the task decodes on its
    own. ``opset`` defaults to the exporter's; the graph is traced in eval mode.
    """
    onnx = require("onnx")
    require("onnxscript")
    if not isinstance(model.task, HeadTask):
        raise MMFuseError(f"task '{model.task.name}' cannot be exported to ONNX: only tasks whose output is one "
                          "(batch, outputs) tensor can (classification, multilabel, regression, sentiment)")
    for m in model.modalities:
        blocker = getattr(model.encoders[m], "export_blocker", "")
        if blocker:
            raise MMFuseError(f"encoder '{model.spec.encoders[m].name}' of modality '{m}' cannot be exported to ONNX: "
                              f"{blocker}")
    out = Path(out)
    if out.is_dir():
        raise MMFuseError(f"{out}: is a folder; give the graph's file name (e.g. model.onnx)")
    inputs = graph_inputs(model.preprocessor)
    proto = _trace(model, inputs, opset)
    _name_axes(proto, inputs)
    written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise MMFuseError(f"the graph could not be converted to opset {opset} (it needs opset {written}); "
                          f"use --opset {written} or leave --opset out")
    with atomic_file(out) as tmp:
        onnx.save_model(proto, str(tmp))
    write_text_atomic(sidecar_path(out), json.dumps(describe(model, inputs, written), indent=2) + "\n")
    return out


def _trace(model: MultimodalModel, inputs: list[GraphInput], opset: int | None) -> Any:
    """The ONNX ModelProto of ``model`` in eval mode, every value-dependent shortcut disabled."""
    dynamic = torch.export.Dim.DYNAMIC
    shapes = {"present": {0: dynamic},
              "tensors": tuple({i: dynamic for i, axis in enumerate(s.shape) if isinstance(axis, str)} for s in inputs)}
    was_training = model.training
    model.eval()
    graph = GraphModel(model, inputs)
    args = flat_arguments(example_batch(model, inputs, size=3), model.modalities, inputs)
    # The exporter logs warnings and tracebacks (a failed opset conversion logs both); what matters
    # reaches the user as one MMFuseError.
    quiet = logger_levels(("torch.onnx", "onnxscript"), logging.CRITICAL)
    try:
        with graph_capture(), torch.no_grad(), warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")  # the exporter's advice is for its developers, not our users
            program = torch.export.export(graph, args, dynamic_shapes=shapes, strict=False)
            exported = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[PRESENT, *(s.name for s in inputs)], output_names=[OUTPUTS])
    except Exception as exc:  # what fails here is an encoder or fusion the exporter cannot follow
        parts = ", ".join(f"{m}: {model.spec.encoders[m].name}" for m in model.modalities)
        message = " ".join(str(exc).split())[:400]
        raise MMFuseError(f"cannot export this model to ONNX (fusion '{model.spec.fusion.name}', encoders {parts}): "
                          f"{type(exc).__name__}: {message}") from exc
    finally:
        model.train(was_training)
    assert exported is not None
    return exported.model_proto


def _name_axes(proto: Any, inputs: list[GraphInput]) -> None:
    """Gives the graph's dynamic axes the sidecar's names (``batch``, ``text_length``...).

    torch.export names them s0, s1...; renaming everywhere keeps the graph self-describing. An axis
    that came out fixed, or two named axes the exporter found must be equal, means the graph would
    be wrong for other sizes: that is refused here rather than discovered by a user.
    """
    wanted = {PRESENT: (BATCH_AXIS, None), **{s.name: s.shape for s in inputs}}
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            name = wanted[value.name][axis]
            if not isinstance(name, str):
                continue
            if not dim.dim_param:
                raise MMFuseError(f"the exporter fixed axis {axis} ('{name}') of input {value.name} to "
                                  f"{dim.dim_value}; the graph would reject other sizes")
            if rename.setdefault(dim.dim_param, name) != name:
                raise MMFuseError(f"the exported graph requires '{rename[dim.dim_param]}' and '{name}' to be equal")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def self_check(model: MultimodalModel, path: Path, size: int = 4) -> Parity:
    """The ``Parity`` of the graph at ``path`` against ``model`` on a random batch.

    The batch differs from the export example in size, lengths (odd against even) and which rows
    lack which modality, so a size or branch the export froze shows up as a large difference.
    """
    inputs = graph_inputs(model.preprocessor)
    batch = example_batch(model, inputs, size=size, shrink=1, seed=1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(batch).float()
    finally:
        model.train(was_training)
    return parity(OnnxRunner(path)(batch), expected)
