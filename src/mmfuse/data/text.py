"""Built-in word-level tokenizer: fitted on the training split, saved with the model.

A from-scratch text encoder needs token ids but not a pretrained vocabulary, so the vocabulary is
counted from the training texts. Fitting is deterministic (ties are broken alphabetically), so the
same data always gives the same ids, and the whole tokenizer round-trips through plain JSON so a
saved model encodes text exactly as it did during training.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from typing import Any

from mmfuse.config import TextPrep
from mmfuse.core.errors import DataError

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
_FORMAT = "mmfuse-word-tokenizer"


class Tokenizer:
    """Maps text to word ids; id 0 is padding and id 1 stands for every out-of-vocabulary word."""

    PAD_ID = 0
    UNK_ID = 1

    def __init__(self, vocab: list[str], lowercase: bool, max_length: int) -> None:
        _check_vocab(vocab)
        if max_length <= 0:
            raise DataError(f"tokenizer max_length must be positive, got {max_length}")
        self.vocab = list(vocab)
        self.lowercase = lowercase
        self.max_length = max_length
        self._ids = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def fit(cls, texts: Iterable[str], prep: TextPrep) -> Tokenizer:
        """Keeps words seen at least ``min_freq`` times, the ``max_vocab - 2`` most frequent first.

        ``max_vocab`` counts the two special tokens, so ``vocab_size <= prep.max_vocab``.
        """
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_split(text, prep.lowercase))
        kept = [(word, n) for word, n in counts.items() if n >= prep.min_freq]
        kept.sort(key=lambda item: (-item[1], item[0]))
        words = [word for word, _ in kept[: prep.max_vocab - 2]]
        return cls([PAD_TOKEN, UNK_TOKEN, *words], lowercase=prep.lowercase, max_length=prep.max_length)

    def tokenize(self, text: str) -> list[str]:
        """Words and single punctuation marks, lowercased if the tokenizer was fitted that way."""
        return _split(text, self.lowercase)

    def encode(self, text: str) -> list[int]:
        """Token ids, truncated to ``max_length``; [] for text with no tokens (the caller decides)."""
        tokens = _split(text, self.lowercase, limit=self.max_length)
        return [self._ids.get(token, self.UNK_ID) for token in tokens]

    @property
    def vocab_size(self) -> int:
        """Number of ids including [PAD] and [UNK]: the size of the encoder's embedding table."""
        return len(self.vocab)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state, stored beside the model weights."""
        return {
            "format": _FORMAT,
            "vocab": list(self.vocab),
            "lowercase": self.lowercase,
            "max_length": self.max_length,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        """Rebuilds a tokenizer saved by ``to_dict``; a malformed dict is a DataError, not a KeyError."""
        if not isinstance(d, dict) or d.get("format", _FORMAT) != _FORMAT:
            raise DataError("tokenizer state is not an mmfuse word tokenizer")
        try:
            vocab, lowercase, max_length = d["vocab"], d["lowercase"], d["max_length"]
        except KeyError as exc:
            raise DataError(f"tokenizer state lacks the key {exc}") from None
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise DataError("tokenizer state: 'vocab' must be a list of strings")
        if not isinstance(lowercase, bool) or not isinstance(max_length, int):
            raise DataError("tokenizer state: 'lowercase' must be a bool and 'max_length' an int")
        return cls(vocab, lowercase=lowercase, max_length=max_length)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
            f"max_length={self.max_length})"
        )


def well_formed(text: str) -> str:
    """``text`` with each lone surrogate (U+D800-U+DFFF) replaced by U+FFFD, as a UTF-8 encoder does.

    A JSON body may escape one (``"\\ud800"``), and Python keeps it in the str, but a Hugging Face
    tokenizer (Rust, UTF-8 only) raises TypeError on it: a 500 from one escaped character before this.
    """
    return _SURROGATE.sub(REPLACEMENT, text)


def _split(text: str, lowercase: bool, limit: int | None = None) -> list[str]:
    """The one tokenization rule, shared by fitting and encoding so they can never disagree.

    ``limit`` stops after that many tokens: encoding keeps ``max_length`` of them, and splitting all
    of a 50 MB text first cost 1.3 s and 530 MB for 16 ids. The text is lowercased whole, as before,
    because lowercasing can change where a token ends ('İ' becomes 'i' + a combining dot).
    """
    if lowercase:
        text = text.lower()
    if limit is None:
        return _TOKEN_RE.findall(text)
    return [match.group() for match in islice(_TOKEN_RE.finditer(text), limit)]


def _check_vocab(vocab: list[str]) -> None:
    """The special tokens must sit at their fixed ids and no word may appear twice."""
    if vocab[:2] != [PAD_TOKEN, UNK_TOKEN]:
        raise DataError(f"tokenizer vocab must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
    if len(set(vocab)) != len(vocab):
        raise DataError("tokenizer vocab has duplicate tokens")
