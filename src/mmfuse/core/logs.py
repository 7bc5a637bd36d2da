"""Temporarily raising other libraries' log levels, restored afterwards whatever happens."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def logger_levels(names: tuple[str, ...], level: int) -> Iterator[None]:
    """Sets the named loggers to ``level`` for the block, then back to what each had."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)
