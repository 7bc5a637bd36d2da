"""Exporting a saved model to runtimes that need no mmfuse training code (ONNX).

``export_onnx(model, path)`` writes the graph and its JSON sidecar; ``OnnxRunner(path)(batch)`` runs
it on a collated ``Batch`` with onnxruntime and returns what ``model(batch)`` would.
"""

from mmfuse.export.onnx import OnnxRunner, Parity, export_onnx, parity, self_check

__all__ = ["OnnxRunner", "Parity", "export_onnx", "parity", "self_check"]
