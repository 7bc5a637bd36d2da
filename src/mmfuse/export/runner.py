"""``OnnxRunner``: an exported graph, run with onnxruntime on the ``Batch`` mmfuse's ``Collator`` builds.

``OnnxRunner(path)(batch)`` returns the (B, num_outputs) float32 tensor ``model(batch)`` would, so a
caller decodes it with the saved model's ``task.decode`` as usual (``mmfuse serve --onnx`` does).
Everything a user can get wrong (a missing or corrupt file, a batch from another model) is a
one-line ``MMFuseError``; the graph itself is only ever fed tensors whose names, dtypes and shapes
were checked against its sidecar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfuse.core.contracts import Batch
from mmfuse.core.errors import MMFuseError
from mmfuse.data.dataset import CACHED_POOLED
from mmfuse.export.deps import require
from mmfuse.export.graph import BATCH_AXIS, OUTPUTS, PRESENT, GraphInput
from mmfuse.export.sidecar import read_sidecar, sidecar_path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


class OnnxRunner:
    """Loads ``path`` (and ``path.json``) on onnxruntime's CPU provider.

    ``threads`` caps onnxruntime's intra-op threads (default: onnxruntime's, one per core); a
    server running several workers, or a test on a shared machine, wants 1.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise MMFuseError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise MMFuseError(f"{self.path}: not a loadable ONNX graph ({_one_line(exc)}); the file is corrupt "
                              "or incomplete: export it again") from None
        self.sidecar = read_sidecar(sidecar_path(self.path))
        self.modalities: list[str] = list(self.sidecar.modalities)
        names = sorted(i.name for i in self.session.get_inputs())
        expected = sorted([PRESENT, *(s.name for s in self.sidecar.inputs)])
        if names != expected:
            raise MMFuseError(f"{self.path}: the graph reads {names} but {sidecar_path(self.path).name} describes "
                              f"{expected}; the two files come from different exports")

    def __call__(self, batch: Batch) -> Tensor:
        """(B, num_outputs) float32 CPU outputs, the same as ``model(batch)``."""
        feed = self.feed(batch)
        try:
            outputs = self.session.run([OUTPUTS], feed)[0]
        except Exception as exc:  # shapes are checked in feed(); anything left is the runtime's
            raise MMFuseError(f"{self.path}: onnxruntime could not run this batch: {_one_line(exc)}") from None
        return torch.from_numpy(np.asarray(outputs, dtype=np.float32))

    def feed(self, batch: Batch) -> dict[str, Any]:
        """The graph's inputs for ``batch``, as numpy arrays of the graph's dtypes.

        A modality the batch lacks entirely (no key, or every row absent) is fed as zeros of its
        ``fill_shape`` with ``present`` False, as the sidecar tells other runtimes to do.
        """
        extra = sorted((set(batch.inputs) | set(batch.present)) - set(self.modalities))
        if extra:
            raise MMFuseError(f"the batch has modalities {extra} that this graph does not read "
                              f"(it reads {', '.join(self.modalities)})")
        if not batch.present:
            raise MMFuseError("the batch has no modality at all (an empty 'present')")
        size = batch.size
        columns = []
        for m in self.modalities:
            present = batch.present.get(m)
            if present is None:
                if m in batch.inputs:
                    raise MMFuseError(f"the batch has inputs for '{m}' but no present mask for it")
                present = torch.zeros(size, dtype=torch.bool)
            if tuple(present.shape) != (size,):
                raise MMFuseError(f"present['{m}'] has shape {tuple(present.shape)}, expected ({size},)")
            if m not in batch.inputs and bool(present.any()):
                raise MMFuseError(f"the batch marks '{m}' present but has no inputs for it")
            columns.append(present.detach().to("cpu", torch.bool).numpy())
        feed: dict[str, Any] = {PRESENT: np.stack(columns, axis=1)}
        axes: dict[str, tuple[int, str]] = {BATCH_AXIS: (size, PRESENT)}
        for spec in self.sidecar.inputs:
            feed[spec.name] = self._array(batch, spec, size, axes)
        return feed

    @staticmethod
    def _array(batch: Batch, spec: GraphInput, size: int, axes: dict[str, tuple[int, str]]) -> Any:
        """One input as a numpy array, its shape checked against the sidecar and the other inputs."""
        given = batch.inputs.get(spec.modality)
        if given is None:
            return np.zeros((size, *spec.fill), dtype=spec.dtype)
        if spec.key not in given:
            if CACHED_POOLED in given:
                raise MMFuseError(f"'{spec.modality}' holds cached encoder outputs (feature cache); an exported "
                                  "graph reads the preprocessed inputs")
            raise MMFuseError(f"the batch's '{spec.modality}' inputs lack '{spec.key}' (they have "
                              f"{', '.join(sorted(given)) or 'nothing'})")
        tensor = given[spec.key]
        if tensor.dim() != len(spec.shape):
            raise MMFuseError(f"{spec.name} has shape {tuple(tensor.shape)}; the graph reads "
                              f"{_layout(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise MMFuseError(f"{spec.name} has shape {tuple(tensor.shape)}; the graph reads "
                                  f"{_layout(spec.shape)} (axis {axis} must be {want})")
            if isinstance(want, str):
                seen, where = axes.setdefault(want, (int(got), spec.name))
                if seen != got:
                    raise MMFuseError(f"{spec.name} has {want} = {got} but {where} has {seen}")
        return tensor.detach().to("cpu", spec.torch_dtype).numpy()


def _layout(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
