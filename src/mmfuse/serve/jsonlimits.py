"""Bounded JSON: a body's nesting, number literals and value count are checked before it is parsed.

Python's ``json`` recurses once per level (about 1,000 levels raise ``RecursionError``), refuses an
integer of more than 4,300 digits with a bare ``ValueError`` (and converting a long one costs
quadratic time), and builds a Python object of ~32 bytes per value, so an unchecked body can crash
the route or cost many times its size. ``check_json`` scans the raw bytes once, vectorised with
numpy a block at a time (strings masked out once escape pairs are dropped: exact for valid JSON),
and names the top-level field holding the first excess. ``parse_json`` then parses with hooks that
refuse ``NaN``/``Infinity`` and repeat the number check, as a second line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_BLOCK = 1 << 20
_NUMBER_RUN = re.compile(rb"[-+.eE0-9]+")
_LONG_STRING = 64
"""Strings longer than this (base64 payloads) are dropped before the scan; shorter ones (keys) kept."""


def _table(chars: bytes) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(chars)] = True
    return table


_OPENS, _CLOSES, _NUMBER = _table(b"[{"), _table(b"]}"), _table(b"-+.eE0123456789")


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int = 8
    max_number_chars: int = 64
    max_values: int = 1_000_000


class JsonTooLarge(ValueError):
    """The body exceeds a JSON limit (answered 413); the message names the field."""


class JsonInvalid(ValueError):
    """The body is not valid JSON (answered 422)."""


def parse_json(data: bytes, limits: JsonLimits, where: str = "the body") -> Any:
    """``data`` parsed, after ``check_json``; strictly UTF-8 and standard JSON (no NaN/Infinity)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonInvalid(f"{where} is not valid JSON (not UTF-8)") from None
    check_json(data, limits)

    def number(literal: str, convert: type) -> Any:
        if len(literal) > limits.max_number_chars:  # check_json saw it first; this is the second line
            raise JsonTooLarge(f"a JSON number of {len(literal):,} characters; the limit is "
                               f"{limits.max_number_chars:,}")
        return convert(literal)

    def constant(name: str) -> Any:
        raise JsonInvalid(f"{where} is not valid JSON ({name} is not a JSON value)")

    try:
        return json.loads(text, parse_int=lambda s: number(s, int), parse_float=lambda s: number(s, float),
                          parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise JsonInvalid(f"{where} is not valid JSON ({exc.msg})") from None
    except RecursionError:  # unreachable after check_json unless max_depth is set near the interpreter's
        raise JsonTooLarge(f"{where}: JSON nested deeper than the limit of {limits.max_depth} levels") from None


def check_json(data: bytes, limits: JsonLimits) -> None:
    """Raises ``JsonTooLarge`` if ``data`` nests deeper than ``limits.max_depth``, holds a number
    literal longer than ``max_number_chars`` or more than ``max_values`` values (counted by their
    separating commas). Costs a few passes over the bytes and memory for one block, whatever the size."""
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # left to right: exactly JSON's escape pairs
    codes = _without_long_strings(np.frombuffer(text, dtype=np.uint8), limits)
    text = codes.tobytes()
    parity, depth, run, commas, last_key = 0, 0, 0, 0, -1
    for start in range(0, codes.size, _BLOCK):
        block = codes[start: start + _BLOCK]
        quote = block == 34
        inside = (np.cumsum(quote, dtype=np.int32) + parity) & 1  # 1: within a string after this byte
        outside = (inside == 0) & ~quote
        delta = outside * (_OPENS[block].astype(np.int32) - _CLOSES[block])
        level = np.cumsum(delta) + depth
        keys = np.flatnonzero(quote & (inside == 1) & (level - delta == 1))  # strings opening at the top level

        def key_before(offset: int, keys: np.ndarray = keys, start: int = start,
                       last_key: int = last_key) -> str | None:
            """The top-level field holding ``offset``: the last top-level string opened before it."""
            earlier = keys[keys < offset]
            position = int(earlier[-1]) + start if earlier.size else last_key
            return _key_at(text, position) if position >= 0 else None

        over = np.flatnonzero(level > limits.max_depth)
        if over.size:
            raise JsonTooLarge(f"{_where(key_before(int(over[0])))}: JSON nested deeper than the limit of "
                               f"{limits.max_depth} levels")
        number = outside & _NUMBER[block]
        index = np.arange(block.size, dtype=np.int32)
        last_break = np.maximum.accumulate(np.where(number, -1 - run, index))
        length = np.where(number, index - last_break, 0)
        long = np.flatnonzero(length > limits.max_number_chars)
        if long.size:
            first = start + int(long[0]) - limits.max_number_chars
            match = _NUMBER_RUN.match(text, first)
            size = len(match.group()) if match else limits.max_number_chars + 1
            raise JsonTooLarge(f"{_where(key_before(int(long[0])))}: a JSON number of {size:,} characters; "
                               f"the limit is {limits.max_number_chars:,}")
        separators = np.flatnonzero(outside & (block == 44))
        if commas + separators.size + 1 > limits.max_values:
            offset = int(separators[limits.max_values - commas - 1])
            raise JsonTooLarge(f"{_where(key_before(offset))}: more than {limits.max_values:,} JSON values; "
                               f"the limit is {limits.max_values:,}")
        parity, depth, commas = int(inside[-1]), int(level[-1]), commas + separators.size
        run = int(length[-1])
        if keys.size:
            last_key = int(keys[-1]) + start


def _without_long_strings(codes: np.ndarray, limits: JsonLimits) -> np.ndarray:
    """The bytes without the contents of long strings: nothing inside a string counts, and a body is
    mostly its base64 strings. Every value or key is at most one string, so a body with more than
    twice ``max_values`` strings is refused here, before anything costs more than one pass."""
    quotes = np.flatnonzero(codes == 34)
    if quotes.size > 4 * limits.max_values + 2:
        raise JsonTooLarge(f"the JSON body: more than {limits.max_values:,} JSON values; the limit is "
                           f"{limits.max_values:,}")
    opens, closes = quotes[0::2], quotes[1::2]
    long = np.flatnonzero(closes - opens[: closes.size] > _LONG_STRING)
    if not long.size:
        return codes
    edges = np.zeros(codes.size + 1, dtype=np.int8)
    edges[opens[long] + 1] = 1
    edges[closes[long]] = -1
    return codes[np.cumsum(edges[:-1], dtype=np.int8) == 0]


def _key_at(text: bytes, position: int) -> str:
    """The top-level key whose string opens at ``position``, shortened and printable (it is echoed)."""
    end = text.find(b'"', position + 1)
    raw = text[position + 1: end if end >= 0 else position + 41]
    name = raw[:40].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in name) + ("..." if len(raw) > 40 else "")


def _where(key: str | None) -> str:
    return f"field '{key}'" if key is not None else "the JSON body"
