"""What a cached result was computed with: file contents, library versions, the code that ran.

A cache keyed only by its inputs' names goes stale when anything else that shaped its outputs
changes: a file rewritten in place (same size, same mtime after a copy that preserves times), an
upgraded torch/transformers/timm, an edited encoder or decoder. mmfuse's caches (the in-memory
arrays, ``mmfuse.data.memory``; the feature cache, ``mmfuse.engine.feature_cache``) therefore add
these to their keys, computed here:

- ``file_digest``: SHA-256 of a file's bytes (content, never size/mtime; SHA-256 because
  OpenSSL's is about twice as fast as BLAKE2b on CPUs with SHA extensions);
- ``library_versions``: mmfuse's own version and installed distributions' versions, read from
  their metadata (``importlib.metadata``), so no heavy library is imported to learn its version;
- ``code_identity``: a hash of the code of some classes: see its docstring for what is covered.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import marshal
import os
import sys
from collections.abc import Collection, Iterable
from pathlib import Path

from mmfuse.core import version


def file_digest(path: str | Path) -> str | None:
    """SHA-256 (hex) of the file's bytes, read in chunks; None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def stat_stamp(path: str | Path) -> tuple[int, ...]:
    """(device, inode, size, mtime, ctime) of a file: a cheap in-process identity of its content.

    Unlike size + mtime alone it changes when a file is rewritten in place and its mtime restored
    (``os.utime`` can set mtime but never ctime) or replaced by another file. Used where hashing the
    bytes on every call would cost as much as the work being cached (decoded MNIST / FSDD).
    """
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def library_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """``{"mmfuse": version, <distribution>: version or None when not installed}``.

    Read at each call (``mmfuse.core.version.__version__`` and ``importlib.metadata.version``),
    so an upgrade between two runs, or in a test, changes the result.
    """
    out: dict[str, str | None] = {"mmfuse": version.__version__}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _root(module_name: str) -> str:
    return module_name.split(".", 1)[0]


def _outside(module_name: str, versioned: Collection[str]) -> bool:
    """Code identified otherwise: the interpreter's (builtins, the standard library) or versioned."""
    root = _root(module_name)
    return root in versioned or root == "builtins" or root in sys.stdlib_module_names


def code_modules(classes: Iterable[type], versioned: Collection[str] = ()) -> dict[str, list[type]]:
    """The modules whose code ``classes`` run, each with the given classes (and bases) it defines.

    That is the module of every class in the classes' MROs, plus one level of helpers: the
    modules that define the functions and classes those modules import from their own top-level
    package (``mmfuse.core.masking.masked_mean`` for ``mmfuse.encoders.features``). Modules of
    the standard library and of the ``versioned`` top-level packages (``torch``, ...: their
    versions are keyed instead) are left out.
    """
    owners: dict[str, list[type]] = {}
    for cls in classes:
        for base in inspect.getmro(cls):
            if not _outside(base.__module__, versioned):
                found = owners.setdefault(base.__module__, [])
                if base not in found:
                    found.append(base)
    for name in list(owners):
        module = sys.modules.get(name)
        for value in vars(module).values() if module is not None else ():
            owner = getattr(value, "__module__", None)
            if ((inspect.isfunction(value) or inspect.isclass(value)) and isinstance(owner, str)
                    and _root(owner) == _root(name) and not _outside(owner, versioned)):
                owners.setdefault(owner, [])
    return dict(sorted(owners.items()))


def module_identity(name: str, classes: Iterable[type] = ()) -> str:
    """The identity of one module's code, by the first of these that works.

    1. ``file:<sha256>``: the bytes of the module's file (``__file__``: source, or a compiled
       extension), read afresh, not through ``linecache`` (which trusts size and mtime);
    2. ``code:<sha256>``: no file (a class defined in a notebook or by ``exec``): the compiled
       bytecode (``marshal``) of every function of the given classes, i.e. the code that runs;
    3. ``unidentified:<name>``: nothing to hash (a module without file or Python functions).
    """
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if isinstance(path, str) and os.path.isfile(path):
        digest = file_digest(path)
        if digest is not None:
            return f"file:{digest}"
    code = hashlib.sha256()
    found = False
    for cls in classes:
        for attr, value in sorted(vars(cls).items()):
            function = getattr(value, "__func__", value)  # staticmethod / classmethod
            if inspect.isfunction(function):
                code.update(f"{cls.__qualname__}.{attr}".encode())
                code.update(marshal.dumps(function.__code__))
                found = True
    return f"code:{code.hexdigest()}" if found else f"unidentified:{name}"


def code_identity(classes: Iterable[type], versioned: Collection[str] = ()) -> str:
    """SHA-256 over ``module_identity`` of every module in ``code_modules(classes, versioned)``.

    An edit to any of those modules (the encoder's class, its bases, their direct helpers) gives a
    new identity; code outside them is identified by the versions keyed beside it.
    """
    digest = hashlib.sha256()
    for name, owned in code_modules(classes, versioned).items():
        digest.update(f"{name}={module_identity(name, owned)}\n".encode())
    return digest.hexdigest()
