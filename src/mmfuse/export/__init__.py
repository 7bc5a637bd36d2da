"""Exporting a saved model to runtimes that need no mmfuse training code (ONNX)."""
