"""Loading the pickles MMSA and MultiBench publish as plain data, without letting them run code.

A pickle can name any importable callable and have it called while loading (``os.system`` in a
``__reduce__``), so ``pickle.load`` on a downloaded file is running that file as a program. Even
numpy's own reconstruction functions are not safe to hand over: ``numpy.dtype.__setstate__`` accepts
flags that make an object dtype claim to hold no objects, and an array of it reads attacker-chosen
bytes as object pointers (a crash, or worse). So no global of numpy or of the builtins is resolved
as itself. ``SafeUnpickler`` maps each global a published affect pickle needs to a checking stand-in:

- dtypes: only booleans, integers, floats, complex, bytes and str (``S``/``U``) and object, built
  from the type string alone; any field, sub-array or flag in the pickled state is refused;
- arrays: the shape must be non-negative ints, the raw bytes exactly ``prod(shape) * itemsize`` (so
  an array never costs more memory than its bytes in the file); an object array (MMSA's ``raw_text``)
  takes its elements from a list of already unpickled, plain values;
- builtins: containers only from other containers (``bytearray(10**10)`` or ``list(range(...))``
  would allocate without bound), ``_codecs.encode`` only with latin-1 (py2-era byte strings).

Reads never go past the end of the file, nesting is bounded, and every failure (refused global,
malformed state, truncated or corrupt data, ``MemoryError``/``RecursionError``) is one ``DataError``
naming the file. Pickles of torch tensors (as MMSA-FET writes them) are refused by name: loading
them needs torch's own unpickling machinery.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from mmfuse.core.errors import DataError

MAX_DEPTH = 200
"""Containers nested deeper than this are refused (published pickles nest a handful of levels)."""
_DTYPE_KINDS = frozenset("biufcSUO")
_PLAIN = (str, bytes, int, float, complex, bool, type(None))


class RefusedGlobal(DataError):
    """A pickle named a global outside the allowlist: it was not loaded."""


class _Refused(ValueError):
    """A checking stand-in found state it does not accept (turned into a DataError naming the file)."""


class _DtypeSpec:
    """What a pickled ``numpy.dtype(...)`` becomes: the type string, checked, and the pickled state,
    checked when ``BUILD`` applies it; ``resolve()`` gives the real dtype."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str):
            raise _Refused(f"a dtype from {type(spec).__name__}, not a type string")
        try:
            dtype = np.dtype(spec)
        except TypeError as exc:
            raise _Refused(f"unknown dtype '{spec[:40]}'") from exc
        if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise _Refused(f"dtype '{spec[:40]}' is not a plain number, string or object type")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[2:5] != (None, None, None):
            raise _Refused("a dtype state with fields, sub-arrays or an unknown layout")
        byteorder, elsize, flags = state[1], state[5], state[7]
        if byteorder not in ("<", ">", "|", "="):
            raise _Refused(f"dtype byte order {byteorder!r}")
        if self.dtype.kind in "SU" and isinstance(elsize, int) and elsize > 0:
            self.dtype = np.dtype(f"{self.dtype.kind}{elsize // (4 if self.dtype.kind == 'U' else 1)}")
        if flags != np.dtype(self.dtype).flags:
            raise _Refused(f"dtype flags {flags!r} do not match a '{self.dtype.str}' dtype")
        if byteorder in "<>":
            self.dtype = self.dtype.newbyteorder(byteorder)

    def resolve(self) -> np.dtype[Any]:
        return self.dtype


def _dtype_of(value: Any) -> np.dtype[Any]:
    if not isinstance(value, _DtypeSpec):
        raise _Refused(f"an array whose dtype is a {type(value).__name__}")
    return value.resolve()


def _shape_of(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(n) is int and n >= 0 for n in value) or len(value) > 32:
        raise _Refused(f"array shape {str(value)[:60]}")
    return value


def _raw_bytes(raw: Any) -> bytes:
    if isinstance(raw, str):  # py2-era pickles store numpy buffers as latin-1 str
        return raw.encode("latin1")
    if isinstance(raw, (bytes, bytearray, pickle.PickleBuffer)):
        return bytes(raw)
    raise _Refused(f"array data of type {type(raw).__name__}")


def _build_array(shape: tuple[int, ...], dtype: np.dtype[Any], fortran: bool, raw: Any) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    order: Literal["C", "F"] = "F" if fortran else "C"
    if dtype.kind == "O":
        if not isinstance(raw, list) or len(raw) != count:
            raise _Refused(f"an object array of shape {shape} without its {count} elements")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(raw):
            out[i] = item
        return out.reshape(shape, order=order)
    data = _raw_bytes(raw)
    if len(data) != count * dtype.itemsize:
        raise _Refused(f"array of shape {shape} and dtype {dtype.str} with {len(data)} bytes, not "
                       f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy(order=order)


class _ArraySpec:
    """What ``numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')`` becomes; ``BUILD`` gives it
    the state ``(version, shape, dtype, is_fortran, data)``, checked and built by ``_build_array``."""

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("an array state of unknown layout")
        _, shape, dtype, fortran, raw = state
        self.array = _build_array(_shape_of(shape), _dtype_of(dtype), bool(fortran), raw)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArraySpec:
    if subtype is not _NDARRAY:
        raise _Refused(f"an array of type {subtype!r}")
    return _ArraySpec()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    resolved = _dtype_of(dtype)
    if resolved.kind == "O":
        raise _Refused("a numpy object scalar")
    data = _raw_bytes(raw)
    if len(data) != resolved.itemsize:
        raise _Refused(f"a {resolved.str} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=resolved)[0]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray[Any, Any]:
    resolved = _dtype_of(dtype)
    if resolved.kind == "O":
        raise _Refused("an object array from a buffer")
    return _build_array(_shape_of(shape), resolved, order == "F", buffer)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode of anything but a latin-1 str")
    return text.encode("latin1")


def _from_container(kind: Callable[..., Any]) -> Callable[..., Any]:
    """``kind(x)`` only when ``x`` is already materialised data, so the result costs no more than
    what the file held (``list(range(10**12))``, ``bytearray(10**12)`` are refused); a second or third
    argument may only be a short string (an encoding, an error mode)."""
    sources: tuple[type, ...] = (str, bytes, bytearray) if kind in (bytes, bytearray, str) else (
        list, tuple, set, frozenset, dict, str, bytes)

    def build(*args: Any) -> Any:
        if (args and not isinstance(args[0], sources)) or len(args) > 3 or any(
                not isinstance(a, str) or len(a) > 20 for a in args[1:]):
            raise _Refused(f"{kind.__name__}() of {', '.join(type(a).__name__ for a in args)}")
        return kind(*args)

    return build


def _number(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if any(not isinstance(a, (int, float, str, bytes)) or (isinstance(a, (str, bytes)) and len(a) > 400)
               for a in args):
            raise _Refused(f"{kind.__name__}() of {type(args[0]).__name__}")
        return kind(*args)

    return build


_NDARRAY = object()  # what 'numpy.ndarray' resolves to: only a marker for _reconstruct
_NUMPY_CORES = ("numpy.core", "numpy._core")
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in _NUMPY_CORES},
    **{(f"{core}.multiarray", "scalar"): _scalar for core in _NUMPY_CORES},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in _NUMPY_CORES},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeSpec,
    ("_codecs", "encode"): _encode,
    ("collections", "OrderedDict"): OrderedDict,
    **{("builtins", kind.__name__): _from_container(kind)
       for kind in (dict, list, tuple, set, frozenset, bytes, bytearray)},
    **{("builtins", kind.__name__): _number(kind) for kind in (int, float, complex, bool)},
    ("builtins", "str"): _from_container(str),
}


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that resolves only ``ALLOWED_GLOBALS``, each to a checking stand-in;
    ``source`` names the file in errors.

    It is the pure-Python unpickler: CPython 3.11's C one allocates the size a length field claims
    before reading it (a 50-byte file can ask for 40 GB), while this one reads through
    ``_BoundedReader`` and never gets more than the file holds.
    """

    def __init__(self, handle: Any, source: Path) -> None:
        super().__init__(handle, encoding="latin1")  # py2-era pickles store numpy buffers as str
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # py2-era names ('__builtin__.bytes'), mapped as pickle itself maps them
        if getattr(self, "proto", 0) < 3 and getattr(self, "fix_imports", True):
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in ALLOWED_GLOBALS:
            hint = (" (a pickle of torch tensors, as MMSA-FET writes: convert it to numpy arrays first)"
                    if module.split(".")[0] == "torch" else "")
            raise RefusedGlobal(f"{self.source}: refused to load the pickle: it calls '{module}.{name}', which is not "
                                f"a container, number, string or numpy array (a pickle can run code; only data is "
                                f"accepted){hint}")
        return ALLOWED_GLOBALS[(module, name)]

    def load_build(self) -> None:
        """BUILD (``obj.__setstate__(state)``, else ``obj.__dict__.update(state)``) only on the array and
        dtype stand-ins, which check their state: on a container it would hang attributes of the file's
        choosing on what is meant to be plain data."""
        stack = self.stack  # type: ignore[attr-defined]  # (the pure-Python unpickler's; typeshed knows the C one)
        if len(stack) < 2 or not isinstance(stack[-2], (_ArraySpec, _DtypeSpec)):
            raise _Refused("a BUILD of an object that is not an array or dtype")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]


class _BoundedReader(io.RawIOBase):
    """A file that never hands out more than it has left: a length field claiming 40 GB in a 50-byte
    pickle then reads as truncated data instead of allocating the claimed size."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle, self.left = handle, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.handle.read(n)
        self.left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, limit: int | None = -1) -> bytes:
        line = self.handle.readline(self.left if limit is None or limit < 0 else min(limit, self.left))
        self.left -= len(line)
        return line


def _plain(value: Any, depth: int = 0) -> Any:
    """The loaded structure with the stand-ins replaced by real arrays and dtypes."""
    if depth > MAX_DEPTH:
        raise _Refused(f"data nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, _ArraySpec):
        if value.array is None:
            raise _Refused("an array without its state")
        return _plain(value.array, depth + 1) if value.array.dtype.kind == "O" else value.array
    if isinstance(value, _DtypeSpec):
        return value.resolve()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            flat = value.reshape(-1)
            for i, item in enumerate(flat):
                flat[i] = _plain(item, depth + 1)
        return value
    if isinstance(value, np.generic):
        return value
    if isinstance(value, dict):
        pairs = [(_plain(k, depth + 1), _plain(v, depth + 1)) for k, v in value.items()]
        return type(value)(pairs)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item, depth + 1) for item in value]
        return items if isinstance(value, list) else type(value)(items)
    if isinstance(value, bytearray):
        return value
    raise _Refused(f"a {type(value).__name__} object")


def safe_load(path: Path) -> Any:
    """The object pickled in ``path`` as plain data, or a ``DataError`` naming the file (refused,
    corrupt, truncated, missing)."""
    if not path.is_file():
        raise DataError(f"pickle not found: {path}")
    try:
        with path.open("rb") as handle:
            reader = _BoundedReader(handle, path.stat().st_size)
            return _plain(SafeUnpickler(reader, path).load())
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, LookupError, OverflowError, MemoryError, RecursionError, struct.error) as exc:
        # struct.error: a cut BINFLOAT/LONG4 operand, found by fuzzing (tests/test_fuzz_files.py)
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                        ) from None
