"""Loading the pickles MMSA and MultiBench publish without letting them run code.

A pickle can name any importable callable and have it called while loading (``os.system`` in a
``__reduce__``), so ``pickle.load`` on a downloaded file is running that file as a program. The
affect pickles only hold dicts, lists, strings, numbers and numpy arrays, so ``SafeUnpickler``
resolves exactly the globals those need (numpy's array and scalar reconstruction, ``dtype``,
``OrderedDict`` and builtin containers) and refuses every other one *before* anything is called,
with an error naming the file and the refused global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError

# (module, name) pairs a published affect pickle needs; numpy 2 moved numpy.core to numpy._core.
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
     ("numpy._core.numeric", "_frombuffer")}
_BUILTIN_GLOBALS = {("builtins", name) for name in (
    "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool",
    "slice", "range",
)} | {("collections", "OrderedDict"), ("_codecs", "encode")}
ALLOWED_GLOBALS = frozenset(_NUMPY_GLOBALS | _BUILTIN_GLOBALS)


class RefusedGlobal(DataError):
    """A pickle named a global outside the allowlist: it was not loaded."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only resolves ``ALLOWED_GLOBALS``; ``source`` names the file in errors."""

    def __init__(self, handle: io.BufferedIOBase, source: Path) -> None:
        super().__init__(handle, encoding="latin1")  # py2-era pickles store numpy buffers as str
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobal(f"{self.source}: refused to load the pickle: it calls '{module}.{name}', which is not "
                                "a container, number, string or numpy array (a pickle can run code; only data is "
                                "accepted)")
        return super().find_class(module, name)


def safe_load(path: Path) -> Any:
    """The object pickled in ``path``, or a ``DataError`` naming the file (refused, corrupt, missing)."""
    if not path.is_file():
        raise DataError(f"pickle not found: {path}")
    try:
        with path.open("rb") as handle:
            return SafeUnpickler(handle, path).load()  # type: ignore[arg-type]
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
