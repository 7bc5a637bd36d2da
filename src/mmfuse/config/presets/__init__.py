"""Named presets: full experiment configs shipped as data files inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    from mmfuse.core.errors import ConfigError, did_you_mean

    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}'{did_you_mean(name, preset_names())}; "
                          f"valid presets: {', '.join(preset_names())}")
    return Path(str(resources.files(__package__) / f"{name}.yaml"))
