"""SIGTERM and Ctrl-C: a run that is stopped says so, with a non-zero status, and stops where it can resume.

Lightning's own SIGTERM handling raises ``SystemExit`` with no code, so a preempted job used to exit
0 with no model and scripts saw success; and Lightning stops inside validation too, where the
metrics gathered so far are not in any checkpoint. Here:

* outside the training loop (data preparation, final evaluation) SIGTERM raises ``SignalInterrupt``
  at once, as Ctrl-C raises ``KeyboardInterrupt`` (``raise_on_signals``);
* inside it, SIGTERM and the first Ctrl-C only set a ``StopRequest``; ``LastCheckpoint`` saves a
  resumable checkpoint at the next optimizer-step boundary (after validation, when the signal came
  during the last batch or validation) and then raises ``SignalInterrupt``. A second Ctrl-C raises
  at once, without a new checkpoint.

``SignalInterrupt`` is a ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` blocks
(``data.on_error: skip`` and friends) must not swallow it. A shell reports a process ended by
signal N as 128 + N (143 for SIGTERM, 130 for Ctrl-C); ``exit_code`` is that number.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class SignalInterrupt(BaseException):
    """The run was stopped by ``signum``; ``checkpoint`` is the resumable checkpoint written on the way out."""

    def __init__(self, signum: int, checkpoint: Path | None = None, epoch: int | None = None,
                 step: int | None = None, note: str = "") -> None:
        saved = f"; a resumable checkpoint was saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal_name(signum)}{saved}{'; ' + note if note else ''}")
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Installs ``handler`` for SIGTERM and SIGINT; returns the handlers it replaced ({} off the main
    thread, where Python allows no signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in HANDLED}


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For data-loader workers: SIGTERM and Ctrl-C reach a whole process group (a terminal, a
    scheduler preempting the job), and a worker killed by them makes the main process fail with
    'DataLoader worker exited unexpectedly' instead of stopping cleanly. The main process decides
    when to stop and ends its workers itself; a worker whose parent dies exits on its own."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise SignalInterrupt(signum)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGTERM and Ctrl-C raise ``SignalInterrupt`` at once while the block runs."""
    previous = _install(_raise)
    try:
        yield
    finally:
        _restore(previous)


@dataclass
class StopRequest:
    """Set by the first SIGTERM or Ctrl-C while the training loop runs; read at step boundaries."""

    signum: int | None = None
    _previous: dict[int, Any] | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # asked twice: the user will not wait for the step to end
                raise SignalInterrupt(signum)
            return
        self.signum = signum
        if signum == signal.SIGINT:
            print("\nCtrl-C: stopping after this step with a resumable checkpoint (Ctrl-C again: stop now)",
                  file=sys.stderr, flush=True)

    def install(self) -> None:
        """Replaces the current SIGTERM/SIGINT handlers (Lightning's among them) until ``restore``."""
        if self._previous is None:
            self._previous = _install(self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            _restore(self._previous)
            self._previous = None
