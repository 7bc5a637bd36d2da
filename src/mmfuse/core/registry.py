"""One tiny generic registry: a name maps to a factory (timm's ``create_model`` pattern).

Encoders, fusion methods and tasks each own a ``Registry``; the three live here, at the bottom of
the layers, so the config can check a registry name without importing the packages that fill it.
Each registry imports its built-ins package on first lookup (and third-party plugins through entry
points), so registration never depends on an import the user could forget. Options given in a
config are checked against the factory's signature before anything is built, so an unknown option
or a wrong type is reported with the registry name and the closest valid option instead of a
``TypeError`` deep inside a constructor.

Besides its factory's parameters, a component may take some of its registry's *common options*:
config fields the schema declares once for every component of a kind (``fusion.out_dim``,
``task.head_hidden``), because the library, not the factory, reads them. Each component says at
registration which of them it takes, so one it does not take (``head_hidden`` for a contrastive
task, which has no MLP head) is refused like any unknown option instead of being silently ignored;
``why`` says in that error why it does not take it (``late``: its width is the task's outputs).

A registry may also declare *traits*: facts about a component the config needs before anything is
built (``uses_fusion``: a contrastive task builds no fusion, so a ``fusion`` section is refused).
Each has a default; a component states the ones it differs in at registration.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, Generic, TypeVar

import pydantic

from mmfuse.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps registry names to factories of ``T``.

    ``reserved`` are keyword arguments the library itself passes (e.g. ``dims`` and ``out_dim`` for
    fusion); they are not user options and are skipped when validating a config's options.
    ``common`` are the registry's common options: the names of the schema's own fields for this kind
    of component (besides ``name``) that a component may take; ``register(name, common=...)`` says
    which ones it does. ``traits`` maps each trait a component may state to its default.
    """

    def __init__(self, kind: str, reserved: tuple[str, ...] = (), common: tuple[str, ...] = (),
                 traits: Mapping[str, Any] | None = None, entry_point_group: str | None = None,
                 builtins: str | None = None) -> None:
        self.kind = kind
        self.reserved = reserved
        self.common = common
        self.traits: dict[str, Any] = dict(traits or {})
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._factories: dict[str, Callable[..., T]] = {}
        self._common: dict[str, tuple[str, ...]] = {}
        self._why: dict[str, str] = {}
        self._traits: dict[str, dict[str, Any]] = {}
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

    def register(self, name: str, common: tuple[str, ...] | None = None, why: str = "",
                 **traits: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Registers a factory under ``name``; ``common``: which of the registry's common options the
        component takes (None, the default: all of them, as every component did before they were
        declared; ``()``: none); ``why``: why it does not take the others, for the error that refuses
        one; ``traits``: the registry's traits in which it differs from their defaults."""
        takes = self.common if common is None else tuple(common)
        unknown = [key for key in takes if key not in self.common]
        if unknown:
            raise ValueError(f"{self.kind} '{name}': {unknown[0]!r} is not a common option of {self.kind}s "
                             f"({', '.join(self.common) or 'none'})")
        unknown = [key for key in traits if key not in self.traits]
        if unknown:
            raise ValueError(f"{self.kind} '{name}': {unknown[0]!r} is not a trait of {self.kind}s "
                             f"({', '.join(self.traits) or 'none'})")

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._factories[name] = factory
            self._common[name] = takes
            self._why[name] = why
            self._traits[name] = {**self.traits, **traits}
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

    def common_options(self, name: str) -> tuple[str, ...]:
        """The registry's common options that component ``name`` takes."""
        self.get(name)
        return self._common[name]

    def trait(self, name: str, key: str) -> Any:
        """The value of trait ``key`` of component ``name`` (the registry's default unless it stated one)."""
        self.get(name)
        if key not in self.traits:
            raise KeyError(f"{key!r} is not a trait of {self.kind}s ({', '.join(self.traits) or 'none'})")
        return self._traits[name][key]

    def option_names(self, name: str) -> list[str]:
        """The options of component ``name`` a config may set: its factory's, without the common ones."""
        return sorted(self._fields(name))

    def _fields(self, name: str) -> dict[str, Any]:
        """The factory's user options as (annotation, default) pairs, for pydantic."""
        signature = inspect.signature(self.get(name), eval_str=True)
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.name in self.reserved or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            annotation = param.annotation if param.annotation is not inspect.Parameter.empty else Any
            default = param.default if param.default is not inspect.Parameter.empty else ...
            fields[param.name] = (annotation, default)
        return fields

    def validate_options(self, name: str, options: Mapping[str, Any], where: str,
                         common: Collection[str] = ()) -> dict[str, Any]:
        """Checks ``options`` against the factory's signature; returns them coerced to their types.

        ``where`` is the config path of the options (e.g. ``fusion``) so errors name the key.
        ``common``: the common options the config sets (its values are the schema's to check): one the
        component does not take is an error, and the valid options an error lists include those it does.
        """
        fields = self._fields(name)
        valid = sorted({*fields, *self._common[name]})
        for key in common:
            if key not in self._common[name]:
                why = self._why[name] or f"other {self.kind}s take it"
                raise ConfigError(f"option '{where}.{key}' does not apply to {self.kind} '{name}' ({why}): remove "
                                  f"it; valid options: {', '.join(valid) or '(none)'}")
        for key in options:
            if key not in fields:
                raise ConfigError(
                    f"unknown option '{where}.{key}' for {self.kind} '{name}'{did_you_mean(key, valid)}; "
                    f"valid options: {', '.join(valid) or '(none)'}"
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
# Common options: the fields of FusionConfig / TaskConfig (mmfuse.config.schema) besides ``name``. Every
# built-in fusion but late takes out_dim (late's width is the task's number of outputs); contrastive,
# autoencoder and captioning take no head_* option. Trait ``uses_fusion``: False for a task that builds
# no fusion (contrastive; its class says the same in ``Task.uses_fusion``).
FUSIONS: Registry[Any] = Registry("fusion", reserved=("dims", "out_dim"), common=("out_dim",),
                                  entry_point_group="mmfuse.fusion", builtins="mmfuse.fusion")
TASKS: Registry[Any] = Registry("task", common=("head_hidden", "head_dropout"), traits={"uses_fusion": True},
                                entry_point_group="mmfuse.tasks", builtins="mmfuse.tasks")
