"""``python -m mmfuse.cli``: the same as the ``mmfuse`` command."""

from mmfuse.cli import main

main()
