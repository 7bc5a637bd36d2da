"""The ``mmfuse`` command line, one module per command group.

User errors (``MMFuseError``) print one red line and exit 1; ``--debug`` shows the traceback.
"""

import os

from mmfuse.cli import bench, cache, data, export, retrieval, serve, train, video
from mmfuse.cli.app import app

__all__ = ["app", "bench", "cache", "data", "export", "main", "retrieval", "serve", "train", "video"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mmfuse")
