"""User-facing errors.

Every problem a user can cause (a bad config key, a missing file, a corrupt WAV) raises an
``MMFuseError`` whose message is one line naming the file/row/key. The CLI prints that line and
exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MMFuseError(Exception):
    """An error caused by the user's input, reported as one clear line."""


class ConfigError(MMFuseError):
    """The experiment config is invalid (unknown key, wrong type, unknown registry name)."""


class DataError(MMFuseError):
    """A manifest, file or sample cannot be read or is invalid."""


class InputTooLarge(DataError):
    """An input exceeds a size limit (pixels, seconds, bytes): refused before it is decoded in full."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``word``, so errors can say 'did you mean ...?'."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    match = closest(word, choices)
    return f" (did you mean '{match}'?)" if match else ""
