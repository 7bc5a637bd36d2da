"""The locked test environment: requirements/test.lock is what this run has installed, and it honours
every range pyproject.toml declares, so the lock and the library's own requirements cannot drift apart."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "test.lock"


def locked() -> dict[str, Requirement]:
    """Package name -> its pinned requirement, for the lines whose marker holds on this machine."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[canonicalize_name(req.name)] = req
    return pins


def declared(extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    """mmfuse's core requirements plus those of ``extras``, following self-references (mmfuse[pack,...])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == "mmfuse":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def test_every_lock_line_is_an_exact_pin() -> None:
    for req in locked().values():
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{LOCK.name}: '{req}' is not an exact pin"


def test_the_lock_honours_every_declared_range() -> None:
    pins = locked()
    env = default_environment()
    for req in declared():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required by pyproject.toml but missing from {LOCK.name}"
        version = next(iter(pins[name].specifier)).version
        assert req.specifier.contains(version, prereleases=True), \
            f"{LOCK.name} pins {req.name}=={version}, outside pyproject.toml's '{req.specifier}'"


def test_this_run_uses_the_locked_versions() -> None:
    """README command 2 installs the lock; a run against other versions would not prove it passes."""
    wrong = []
    for name, req in locked().items():
        want = next(iter(req.specifier)).version
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append(f"{name} {have} (locked {want})")
    assert not wrong, ("installed versions differ from requirements/test.lock; install it with "
                       "pip install --no-deps -r requirements/test.lock -e . : " + ", ".join(wrong))
