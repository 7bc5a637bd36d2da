"""The restricted unpickler (``mmfuse.datasets.importers.safe_pickle``) against hostile files: each
would run code, corrupt memory or allocate far beyond its size with ``pickle.load``; each must give
one ``DataError`` naming the file, fast, and legitimate published data must still load exactly."""

from __future__ import annotations

import pickle
import tracemalloc
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.safe_pickle import RefusedGlobal, safe_load


class _Reduces:
    """Pickles as ``func(*args)``: what a hostile file asks the loader to call."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


class _ArrayState:
    """Pickles exactly as numpy pickles an array, with a state of the test's choosing."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


def write(tmp_path: Path, data: bytes, name: str = "hostile.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_an_object_dtype_that_claims_no_objects_is_refused(tmp_path: Path) -> None:
    """The memory-corruption file: a float array's dtype renamed to object while its state keeps the
    flags of a type without objects, so numpy would read the raw bytes as object pointers."""
    data = pickle.dumps({"train": {"audio": np.array([4.0e-320, 1.0])}}, protocol=2)
    assert data.count(b"f8") == 1
    path = write(tmp_path, data.replace(b"f8", b"O8"))
    with pytest.raises(DataError, match=r"hostile\.pkl: .*dtype flags"):
        safe_load(path)


@pytest.mark.parametrize("field", ["names", "subarray"])
def test_a_dtype_state_with_fields_or_subarrays_is_refused(tmp_path: Path, field: str) -> None:
    data = np.zeros(2, dtype=[("a", "<f8")]) if field == "names" else np.dtype(("<f4", (2,)))
    path = write(tmp_path, pickle.dumps(data, protocol=2))
    with pytest.raises(DataError, match=r"hostile\.pkl: "):
        safe_load(path)


def test_array_bytes_must_match_the_shape(tmp_path: Path) -> None:
    """An array whose shape claims 10^11 floats over 16 bytes of data is refused, not allocated."""
    state = (1, (10**11,), np.dtype("<f8"), False, b"\0" * 16)  # what ndarray.__reduce__ gives, shape inflated
    hostile = pickle.dumps(_ArrayState(state), protocol=2)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"hostile\.pkl: .*bytes, not 800000000000"):
            safe_load(write(tmp_path, hostile))
        assert tracemalloc.get_traced_memory()[1] < 50_000_000
    finally:
        tracemalloc.stop()


def test_a_50_byte_file_claiming_40_gb_is_truncated_data(tmp_path: Path) -> None:
    claim = (40 * 2**30).to_bytes(8, "little")
    path = write(tmp_path, b"\x80\x04\x8e" + claim + b"abc.")  # BINBYTES8 of 40 GB, then 4 bytes
    assert path.stat().st_size < 50
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"hostile\.pkl: not a readable pickle"):
            safe_load(path)
        assert tracemalloc.get_traced_memory()[1] < 50_000_000
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("payload", [
    _Reduces(bytearray, 10**10),
    _Reduces(bytes, 10**10),
    _Reduces(list, range(10**12)),
    _Reduces(str, _Reduces(bytearray, 10**10)),
    _Reduces(int, "9" * 100_000),
])
def test_builtins_never_allocate_beyond_the_file(tmp_path: Path, payload: Any) -> None:
    path = write(tmp_path, pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"hostile\.pkl: "):
        safe_load(path)


def test_an_unknown_codec_is_one_line(tmp_path: Path) -> None:
    import _codecs

    path = write(tmp_path, pickle.dumps(_Reduces(_codecs.encode, "abc", "no-such-codec"), protocol=2))
    with pytest.raises(DataError, match=r"hostile\.pkl: .*latin-1"):
        safe_load(path)


def test_nesting_is_bounded(tmp_path: Path) -> None:
    depth = 100_000
    path = write(tmp_path, b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")  # lists in lists
    with pytest.raises(DataError, match=r"hostile\.pkl: .*nested deeper than"):
        safe_load(path)


def test_a_list_that_contains_itself_is_refused(tmp_path: Path) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(DataError, match=r"hostile\.pkl: .*nested deeper than"):
        safe_load(write(tmp_path, pickle.dumps(loop, protocol=2)))


def test_torch_tensors_are_refused_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps({"audio": torch.zeros(2, 3)}))
    with pytest.raises(RefusedGlobal, match=r"hostile\.pkl: refused .*'torch\..*torch tensors"):
        safe_load(path)


def test_a_numpy_function_outside_the_list_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps(_Reduces(np.load, "/etc/passwd"), protocol=2))
    with pytest.raises(RefusedGlobal, match=r"'numpy\..*load'"):
        safe_load(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_of_every_supported_kind_loads_exactly(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(0)
    data = OrderedDict(
        floats=rng.standard_normal((3, 4)).astype(np.float32),
        fortran=np.asfortranarray(rng.standard_normal((2, 5))),
        big_endian=np.arange(6, dtype=">u2").reshape(2, 3),
        flags=np.array([True, False, True]),
        ints=np.array([-(2**62), 3], dtype=np.int64),
        complex=np.array([1 + 2j], dtype=np.complex64),
        text=np.array(["ab", "cde"], dtype="U3"),
        raw=np.array([b"x", b"yz"], dtype="S2"),
        empty=np.zeros((0, 7)),
        zero_d=np.array(2.5),
        scalars=[np.float32(2.5), np.int16(-3), np.bool_(True)],
        objects=np.array(["a b", None, 3], dtype=object),
        nested=np.array([np.arange(3), "x"], dtype=object),
        misc=({1, 2}, frozenset({"a"}), (1, 2.0, b"z", None), bytearray(b"q"), "ünïcode"),
        dtype=np.dtype("<f4"),
    )
    loaded = safe_load(write(tmp_path, pickle.dumps(data, protocol=protocol), f"p{protocol}.pkl"))
    assert list(loaded) == list(data) and isinstance(loaded, OrderedDict)
    for key in ("floats", "fortran", "big_endian", "flags", "ints", "complex", "text", "raw", "empty", "zero_d"):
        got, want = loaded[key], data[key]
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want)
    assert loaded["fortran"].flags.f_contiguous
    assert [type(v) for v in loaded["scalars"]] == [np.float32, np.int16, np.bool_]
    assert loaded["scalars"] == data["scalars"]
    assert list(loaded["objects"]) == ["a b", None, 3] and loaded["objects"].dtype == object
    assert type(loaded["nested"][0]) is np.ndarray and list(loaded["nested"][0]) == [0, 1, 2]
    assert loaded["misc"] == data["misc"] and loaded["dtype"] == np.dtype("<f4")


def _raw(*parts: bytes) -> bytes:
    """A protocol-2 pickle from opcodes (what a hand-crafted hostile file holds)."""
    return b"\x80\x02" + b"".join(parts) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(module: str, name: str, *args: str) -> bytes:
    """``module.name(*args)`` with string arguments: GLOBAL, MARK, the strings, TUPLE, REDUCE."""
    strings = b"".join(b"X" + len(a.encode()).to_bytes(4, "little") + a.encode() for a in args)
    return _global(module, name) + b"(" + strings + b"tR"


def _hostile_variants(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(_Reduces(__import__("os").system, touch), protocol=2),
        "posix.system by its C name": _raw(_call("posix", "system", touch)),
        "subprocess.Popen": _raw(_call("subprocess", "Popen", "touch", str(marker))),
        "builtins.eval": _raw(_call("builtins", "eval", f"open({str(marker)!r}, 'w')")),
        "builtins.exec": _raw(_call("builtins", "exec", f"open({str(marker)!r}, 'w')")),
        "__builtin__.eval (a py2 name)": _raw(_call("__builtin__", "eval", f"open({str(marker)!r}, 'w')")),
        "builtins.open for writing": _raw(_call("builtins", "open", str(marker), "w")),
        "builtins.__import__": _raw(_call("builtins", "__import__", "os")),
        "builtins.getattr": _raw(_global("builtins", "getattr") + b"(" + _call("builtins", "__import__", "os")
                                 + b"X\x06\x00\x00\x00systemtR"),
        "operator.attrgetter": _raw(_call("operator", "attrgetter", "system")),
        "functools.partial": _raw(_call("functools", "partial", "x")),
        "copyreg._reconstructor": _raw(_call("copyreg", "_reconstructor", "x")),
        "pickle.loads (a pickle in a pickle)": _raw(_call("pickle", "loads", "x")),
        "runpy.run_path": _raw(_call("runpy", "run_path", "/dev/null")),
        "shutil.rmtree": _raw(_call("shutil", "rmtree", str(marker.parent / "nothing"))),
        "pathlib.Path.touch via a dotted name (protocol 4)": pickle.dumps(_Reduces(Path.touch, marker), protocol=4),
        "webbrowser.open": _raw(_call("webbrowser", "open", "http://127.0.0.1:1/")),
        "types.FunctionType": _raw(_call("types", "FunctionType", "x")),
        "numpy.load with pickles": _raw(_call("numpy", "load", str(marker))),
        "numpy.testing (outside the list)": _raw(_call("numpy.testing", "assert_equal", "x")),
        "numpy.ctypeslib": _raw(_call("numpy.ctypeslib", "load_library", "libc", ".")),
        "torch rebuild_tensor": _raw(_call("torch._utils", "_rebuild_tensor_v2", "x")),
        "an object built with INST": b"(i" + b"os\nsystem\n" + b"X" + len(touch).to_bytes(4, "little")
                                     + touch.encode() + b".",
        "an object built with OBJ": _raw(b"(" + _global("os", "system") + b"X" + len(touch).to_bytes(4, "little")
                                         + touch.encode() + b"o"),
        "a persistent id": _raw(b"X\x01\x00\x00\x00xQ"),
        "an extension code": _raw(b"\x82\x01"),
        "a memo index never stored": _raw(b"h\x05"),
        "a STACK_GLOBAL of a non-string": b"\x80\x04K\x01K\x02\x93.",
        "BUILD state on a container": _raw(_global("collections", "OrderedDict") + b")R}X\x01\x00\x00\x00aK\x01sb"),
    }


def test_hostile_pickles_run_nothing_and_give_one_line(tmp_path: Path) -> None:
    """The acceptance battery: every way a pickle can ask for code or an object, refused in one line
    naming the file, in this process (no crash), with nothing created."""
    marker = tmp_path / "created"
    variants = _hostile_variants(marker)
    assert len(variants) >= 25
    outcomes = {}
    for name, data in variants.items():
        path = write(tmp_path, data)
        try:
            value = safe_load(path)
        except DataError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (name, str(exc))
            outcomes[name] = "refused"
        else:
            outcomes[name] = f"loaded {type(value).__name__}"
        assert not marker.exists(), name
    assert outcomes == dict.fromkeys(variants, "refused")
    # The battery is real: the plain unpickler runs the first ones.
    for name in ("os.system", "posix.system by its C name", "builtins.open for writing"):
        pickle.loads(variants[name])
        assert marker.exists(), name
        marker.unlink()
