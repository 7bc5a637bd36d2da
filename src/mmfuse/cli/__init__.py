"""The ``mmfuse`` command line, one module per command group.

User errors (``MMFuseError``) print one red line and exit 1; ``--debug`` shows the traceback.
"""

import os

from mmfuse.cli import bench, cache, data, data_import, data_xor, export, retrieval, serve, train, tune, video
from mmfuse.cli.app import app

__all__ = ["app", "bench", "cache", "data", "data_import", "data_xor", "export", "main", "retrieval", "serve", "train",
           "tune", "video"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mmfuse")
