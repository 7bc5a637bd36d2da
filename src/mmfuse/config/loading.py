"""Reading a YAML config, applying ``--set`` overrides and validating it, with errors that name the key.

Registry names (encoders, fusion, task) are checked through the registries in ``mmfuse.core``,
which import their built-in packages on first use: the config layer never imports them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import yaml

from mmfuse.config.schema import ComponentConfig, ExperimentConfig, builds_fusion, outputs_decisions
from mmfuse.core.errors import ConfigError
from mmfuse.core.registry import FUSIONS, TASKS


def _format_error(exc: pydantic.ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(lines)


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Builds an ExperimentConfig from plain data, checking registry names and their options."""
    try:
        config = ExperimentConfig.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    check_components(config)
    return config


def check_components(config: ExperimentConfig) -> None:
    """Registry names and options are checked here, after registration of all built-ins.

    A common option the config sets (``task.head_hidden``) must be one the chosen component takes;
    left at its default, it is no setting and never an error. The same holds for a whole section: a
    task that builds no fusion refuses a ``fusion`` section that sets anything; and for the task's
    head options after a fusion that outputs the predictions itself (late: no MLP head follows it).
    """
    for modality, enc in config.encoders.items():
        _check_component(enc, f"encoders.{modality}")
    _check_component(config.task, "task")
    if not builds_fusion(config.task.name):
        _refuse_section(config.fusion, "fusion", f"task '{config.task.name}' (it builds no fusion: it projects "
                        "each modality itself)")
    _check_component(config.fusion, "fusion")
    if builds_fusion(config.task.name) and outputs_decisions(config.fusion.name):
        _refuse_head_options(config)


def _refuse_head_options(config: ExperimentConfig) -> None:
    """``task.head_*`` with late fusion: its per-modality heads output the predictions, no head follows."""
    keys = config.task.set_common()
    if keys:
        fusion = config.fusion.name
        own = ", ".join(f"fusion.{key}" for key in FUSIONS.option_names(fusion)) or "none"
        valid = ", ".join(TASKS.option_names(config.task.name)) or "(none)"
        raise ConfigError(f"option 'task.{keys[0]}' does not apply with fusion '{fusion}' (it outputs the task's "
                          f"predictions itself, so no MLP head follows it; its own options: {own}): remove it, or "
                          f"choose a feature-level fusion such as concat; valid options: {valid}")


def _refuse_section(component: ComponentConfig, where: str, to: str) -> None:
    """An error naming the keys of section ``where`` that the config sets, if it sets any."""
    keys = sorted({*component.model_fields_set, *component.options})
    if keys:
        raise ConfigError(f"section '{where}' does not apply to {to}: remove it (it sets "
                          f"{', '.join(f'{where}.{key}' for key in keys)})")


def _check_component(component: ComponentConfig, where: str) -> None:
    """Checks the component's options, and keeps the validated values (``dim: "16"`` -> 16), so
    factories get the types they declare."""
    assert component.registry is not None
    options = component.registry.validate_options(component.name, component.options, where=where,
                                                  common=component.set_common())
    if component.model_extra is not None:
        component.model_extra.update(options)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies one ``a.b.c=value`` override in place; the value is parsed as YAML (typed)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.path=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


_PATH_KEYS = ("manifest", "train", "val", "test")
"""The data files a config reads: the only paths that resolve against the YAML file's folder."""


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict):
        for key in _PATH_KEYS:
            if isinstance(data.get(key), str):
                given = Path(data[key]).expanduser()
                data[key] = str(given if given.is_absolute() else (base / given).resolve())


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content, or a ConfigError naming the file: missing (``what`` not found) or invalid."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Reads a YAML config, applies ``--set`` overrides and validates it.

    How relative paths resolve, one rule: **the data files written in the YAML file**
    (``data.manifest``, ``data.train``, ``data.val``, ``data.test``) **resolve against the YAML
    file's folder**, so a config and its data move together and work from any working directory;
    **every other relative path resolves against the current working directory**: anything given on
    the command line (``--set data.manifest=x.jsonl``, ``--out``, the config path itself), as every
    CLI user expects, and the folders a run writes (``trainer.output_dir``, cache folders), so
    ``mmfuse train -c configs/x.yaml`` writes ``runs/...`` where it is run, never inside ``configs/``.
    Data paths from overrides are made absolute here, so the run's saved ``config.yaml`` is usable
    from anywhere.
    """
    path = Path(path)
    raw = read_yaml(path, "config file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    _resolve_data_paths(raw, path.parent)  # what the YAML says: against its folder
    for assignment in overrides or []:
        apply_override(raw, assignment)
    _resolve_data_paths(raw, Path.cwd())  # only command-line values are still relative
    return validate_config(raw)
