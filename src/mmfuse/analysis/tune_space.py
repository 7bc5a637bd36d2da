"""The search space of ``mmfuse tune``: a YAML file mapping dotted config keys to distributions.

```yaml
optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
fusion.name: {type: categorical, choices: [concat, lmf, mult]}
fusion.rank: {type: int, low: 2, high: 16, when: {fusion.name: lmf}}
trainer.unimodal_loss_weight: {type: float, low: 0, high: 1}
data.batch_size: {type: int, low: 16, high: 64, step: 16}
```

Every key is checked when the space is read, by building the experiment config with the key set
to each end of its range (each choice of a categorical), so a typo or an out-of-range bound fails
before any training with an error naming the key. ``when`` makes a parameter conditional on other
parameters' values (a value or a list of values): ``fusion.rank`` is only sampled, and only set,
in trials that picked ``lmf``. Switching ``fusion.name`` away from the config's method drops the
config's fusion options (another method's options rarely fit) and keeps ``out_dim`` (for a method
that takes it: not ``late``), as ``mmfuse bench`` does, and the task's ``head_*`` (unless the method is
``late``, which no MLP head follows); the space's own ``fusion.*`` parameters then apply.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmfuse.config import ExperimentConfig, validate_config
from mmfuse.config.loading import read_yaml
from mmfuse.config.schema import outputs_decisions
from mmfuse.core.errors import ConfigError, did_you_mean
from mmfuse.core.registry import FUSIONS, TASKS

if TYPE_CHECKING:
    import optuna

ParamType = Literal["float", "int", "categorical"]
_FIELDS: dict[str, set[str]] = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}


@dataclass(frozen=True)
class Param:
    """One searched config key: its distribution, and the values of other keys it depends on."""

    key: str
    type: ParamType
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def probe_values(self) -> list[Any]:
        """The values that the validation tries: both ends of a range, every choice."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def active(self, params: dict[str, Any]) -> bool:
        return all(key in params and params[key] in values for key, values in self.when.items())


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = "search space"

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Samples a trial's values in file order; a conditional parameter only when its condition holds."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.key] = param.suggest(trial)
        return values


def _number(source: str, key: str, spec: dict[str, Any], name: str, required: bool = True) -> float | None:
    value = spec.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{source}: '{key}' needs '{name}'")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}': '{name}' must be a number, got {value!r}")
    return float(value)


def parse_param(key: str, spec: Any, source: str = "search space") -> Param:
    """One entry of the space, checked for shape (not yet against the config)."""
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: '{key}' is not a dotted config key like optim.lr")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: '{key}' must map to a distribution like {{type: float, low: 0, high: 1}}, "
                          f"got {spec!r}")
    kind = spec.get("type")
    if kind not in _FIELDS:
        raise ConfigError(f"{source}: '{key}': type must be one of float, int, categorical, got {kind!r}")
    for name in spec:
        if name not in _FIELDS[kind]:
            raise ConfigError(f"{source}: '{key}': unknown field '{name}' for type {kind}"
                              f"{did_you_mean(str(name), _FIELDS[kind])}")
    when = _parse_when(key, spec.get("when"), source)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{source}: '{key}': categorical needs a non-empty list 'choices'")
        if any(not isinstance(c, str | int | float | bool) and c is not None for c in choices):
            raise ConfigError(f"{source}: '{key}': choices must be plain values (text, numbers, true/false, null)")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    low, high = _number(source, key, spec, "low"), _number(source, key, spec, "high")
    step = _number(source, key, spec, "step", required=False)
    log = spec.get("log", False)
    assert low is not None and high is not None
    if not isinstance(log, bool):
        raise ConfigError(f"{source}: '{key}': log must be true or false")
    if low > high:
        raise ConfigError(f"{source}: '{key}': low {low:g} is above high {high:g}")
    if log and low <= 0:
        raise ConfigError(f"{source}: '{key}': a log scale needs low > 0, got {low:g}")
    if log and step is not None:
        raise ConfigError(f"{source}: '{key}': give 'step' or 'log: true', not both")
    if step is not None and step <= 0:
        raise ConfigError(f"{source}: '{key}': step must be positive, got {step:g}")
    if kind == "int" and any(v is not None and not float(v).is_integer() for v in (low, high, step)):
        raise ConfigError(f"{source}: '{key}': an int range needs whole numbers for low, high and step")
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def _parse_when(key: str, when: Any, source: str) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{source}: '{key}': 'when' must map other keys to a value or list, e.g. "
                          "{fusion.name: lmf}")
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def parse_space(raw: Any, source: str = "search space") -> SearchSpace:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: the search space must map config keys to distributions, e.g. "
                          "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    params = tuple(parse_param(key, spec, source) for key, spec in raw.items())
    seen: dict[str, Param] = {}
    for param in params:
        for other, values in param.when.items():
            if other not in seen:
                raise ConfigError(f"{source}: '{param.key}': 'when' names '{other}', which must be a parameter "
                                  "listed above it in the space")
            if seen[other].type == "categorical":
                unknown = [v for v in values if v not in seen[other].choices]
                if unknown:
                    raise ConfigError(f"{source}: '{param.key}': 'when' value {unknown[0]!r} is not a choice of "
                                      f"'{other}' ({', '.join(map(str, seen[other].choices))})")
        seen[param.key] = param
    return SearchSpace(params, source)


def load_space(path: Path, base: ExperimentConfig) -> SearchSpace:
    """Reads a space file and checks every key against the config it will be applied to."""
    raw = read_yaml(path, "search space file")
    space = parse_space(raw, str(path))
    check_space(space, base)
    return space


def apply_params(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with a trial's values set (validated: registry names and options too)."""
    raw = base.model_dump(mode="json")
    if "fusion.name" in params and params["fusion.name"] != base.fusion.name:
        raw["fusion"] = {"name": params["fusion.name"]}
        if params["fusion.name"] in FUSIONS and "out_dim" in FUSIONS.common_options(params["fusion.name"]):
            raw["fusion"]["out_dim"] = base.fusion.out_dim
        if outputs_decisions(params["fusion.name"]):  # late: no MLP head follows it to take task.head_*
            for key in TASKS.common:
                raw.get("task", {}).pop(key, None)
    for key, value in params.items():
        _set(raw, key, value)
    return validate_config(raw)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{key}': '{part}' is not a config section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def check_space(space: SearchSpace, base: ExperimentConfig) -> None:
    """Builds the config with each parameter at each probe value (its conditions met, the others at
    their first probe value), so an unknown key or a value the config refuses names the key now.

    A ``fusion.*`` option searched beside ``fusion.name`` without a ``when`` on it is probed with
    every method of that list: an option one of them does not take is an error now, not a failed
    trial later.
    """
    methods = next((p.choices for p in space.params if p.key == "fusion.name"), ())
    for param in space.params:
        contexts: list[dict[str, Any]] = [{k: values[0] for k, values in param.when.items()}]
        if param.key.startswith("fusion.") and param.key != "fusion.name" and "fusion.name" not in param.when:
            contexts = [{**contexts[0], "fusion.name": method} for method in methods] or contexts
        for context in contexts:
            for value in param.probe_values():
                params = {**context, param.key: value}
                try:
                    apply_params(base, params)
                except ConfigError as exc:
                    where = (f" with fusion.name = {context['fusion.name']!r} (add `when: {{fusion.name: ...}}` to "
                             "search it only for the methods that take it)") if "fusion.name" in context else ""
                    raise ConfigError(f"{space.source}: '{param.key}' = {value!r}{where} does not make a valid "
                                      f"config: {exc}") from None
