"""One tiny generic registry: a name maps to a factory (timm's ``create_model`` pattern).

Encoders, fusion methods and tasks each own a ``Registry``; the three live here, at the bottom of
the layers, so the config can check a registry name without importing the packages that fill it.
Each registry imports its built-ins package on first lookup (and third-party plugins through entry
points), so registration never depends on an import the user could forget. Options given in a
config are checked against the factory's signature before anything is built, so an unknown option
or a wrong type is reported with the registry name and the closest valid option instead of a
``TypeError`` deep inside a constructor.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import pydantic

from mmfuse.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps registry names to factories of ``T``.

    ``reserved`` are keyword arguments the library itself passes (e.g. ``dims`` and ``out_dim`` for
    fusion); they are not user options and are skipped when validating a config's options.
    """

    def __init__(self, kind: str, reserved: tuple[str, ...] = (), entry_point_group: str | None = None,
                 builtins: str | None = None) -> None:
        self.kind = kind
        self.reserved = reserved
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._factories: dict[str, Callable[..., T]] = {}
        self._plugins_loaded = entry_point_group is None and builtins is None

    def _load_plugins(self) -> None:
        """Imports the built-ins package, then third-party packages of our entry-point group (once).

        Both register their components with the same decorator, so a user only installs a
        package; nothing needs importing by hand.
        """
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if self.builtins is not None:
            importlib.import_module(self.builtins)
        for entry_point in importlib.metadata.entry_points(group=self.entry_point_group or ""):
            try:
                entry_point.load()
            except Exception as exc:
                raise ConfigError(f"{self.kind} plugin '{entry_point.name}' ({entry_point.value}) "
                                  f"failed to load: {exc}") from exc

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        self._load_plugins()
        if name not in self._factories:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._factories)}; "
                f"valid choices: {', '.join(self.names())}"
            )
        return self._factories[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def validate_options(self, name: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Checks ``options`` against the factory's signature; returns them coerced to their types.

        ``where`` is the config path of the options (e.g. ``fusion``) so errors name the key.
        """
        factory = self.get(name)
        signature = inspect.signature(factory, eval_str=True)
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.name in self.reserved or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            annotation = param.annotation if param.annotation is not inspect.Parameter.empty else Any
            default = param.default if param.default is not inspect.Parameter.empty else ...
            fields[param.name] = (annotation, default)
        for key in options:
            if key not in fields:
                raise ConfigError(
                    f"unknown option '{where}.{key}' for {self.kind} '{name}'{did_you_mean(key, fields)}; "
                    f"valid options: {', '.join(sorted(fields)) or '(none)'}"
                )
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{name}_options",
            __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False),
            **fields,
        )
        try:
            validated = model(**options)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"invalid option '{where}.{loc}' for {self.kind} '{name}': {err['msg']}") from None
        return {key: getattr(validated, key) for key in options}


# The three registries of the pipeline; each fills itself from its package on first use.
ENCODERS: Registry[Any] = Registry("encoder", reserved=("context",), entry_point_group="mmfuse.encoders",
                                   builtins="mmfuse.encoders")
FUSIONS: Registry[Any] = Registry("fusion", reserved=("dims", "out_dim"), entry_point_group="mmfuse.fusion",
                                  builtins="mmfuse.fusion")
TASKS: Registry[Any] = Registry("task", entry_point_group="mmfuse.tasks", builtins="mmfuse.tasks")
