"""Per-method fusion options for ``mmfuse bench --methods-config methods.yaml``.

```yaml
lmf: {rank: 8}
mult: {heads: 2, layers: 1}
concat: {hidden: 256}
```

Without it every method but the config's own runs with the library defaults, so a method tuned
for the data (``mmfuse tune``) would be compared with untuned ones. A method's options in the file
apply on top of its defaults, or on top of the config's fusion options for the config's own method;
``out_dim`` may be given too (default: the config's, the same for every method). Every method name
and option is checked against the fusion registry when the file is read, so a typo is an error
naming it, not a silently ignored setting. The options each run used are in ``runs.csv``
(``fusion_options``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfuse.config import ExperimentConfig, FusionConfig
from mmfuse.config.loading import read_yaml
from mmfuse.core.errors import ConfigError
from mmfuse.fusion import FUSIONS

MethodOptions = dict[str, dict[str, Any]]


def parse_method_options(raw: Any, source: str = "methods config") -> MethodOptions:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must map fusion method names to their options, e.g. lmf: {{rank: 8}}")
    options: MethodOptions = {}
    for method, given in raw.items():
        try:
            FUSIONS.get(str(method))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: '{method}' must map option names to values, got {given!r}")
        try:
            checked = FUSIONS.validate_options(str(method), {k: v for k, v in given.items() if k != "out_dim"},
                                               where=str(method), common=[k for k in given if k == "out_dim"])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if "out_dim" in given:
            out_dim = given["out_dim"]
            if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
                raise ConfigError(f"{source}: '{method}.out_dim' must be a positive whole number, got {out_dim!r}")
            checked["out_dim"] = out_dim
        options[str(method)] = checked
    return options


def load_method_options(path: Path) -> MethodOptions:
    raw = read_yaml(path, "methods config")
    return parse_method_options(raw, str(path))


def method_fusion(config: ExperimentConfig, method: str, options: MethodOptions | None = None) -> FusionConfig:
    """The fusion a benchmarked method runs with: its defaults (the config's options for the config's
    own method), updated with its entry in the methods config."""
    extra = dict((options or {}).get(method, {}))
    out_dim = extra.pop("out_dim", config.fusion.out_dim)
    base = dict(config.fusion.options) if method == config.fusion.name else {}
    if method == config.fusion.name and not extra and out_dim == config.fusion.out_dim:
        return config.fusion
    if "out_dim" not in FUSIONS.common_options(method):  # late: its width is the task's
        return FusionConfig(name=method, **{**base, **extra})
    return FusionConfig(name=method, out_dim=out_dim, **{**base, **extra})


def unused_methods(options: MethodOptions, methods: list[str]) -> list[str]:
    """Methods given options that the bench does not run (a note, not an error: one file can serve
    several benches)."""
    return [m for m in options if m not in methods]
