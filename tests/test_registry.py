"""The generic registry: names, clear errors, option validation, and entry-point plugins."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

from mmfuse.core.errors import ConfigError
from mmfuse.core.registry import Registry


def make_registry(group: str | None = None) -> Registry[Any]:
    registry: Registry[Any] = Registry("widget", reserved=("size",), entry_point_group=group)

    @registry.register("square")
    def square(size: int, colour: str = "red", sharp: bool = False) -> tuple[int, str, bool]:
        return size, colour, sharp

    return registry


def test_create_and_names() -> None:
    registry = make_registry()
    assert registry.names() == ["square"] and "square" in registry
    assert registry.create("square", size=3, colour="blue") == (3, "blue", False)


def test_unknown_name_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown widget 'sqare' \(did you mean 'square'\?\); valid choices: square"):
        make_registry().get("sqare")


def test_duplicate_registration_is_refused() -> None:
    registry = make_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("square")(lambda: None)


def test_options_are_checked_and_coerced() -> None:
    registry = make_registry()
    assert registry.validate_options("square", {"sharp": "true"}, where="w") == {"sharp": True}
    expected = r"unknown option 'w.colour_' .*did you mean 'colour'.*valid options: colour, sharp"
    with pytest.raises(ConfigError, match=expected):
        registry.validate_options("square", {"colour_": "x"}, where="w")
    with pytest.raises(ConfigError, match=r"invalid option 'w.sharp' for widget 'square'"):
        registry.validate_options("square", {"sharp": "maybe"}, where="w")


class FakeEntryPoint:
    def __init__(self, name: str, load: Any) -> None:
        self.name, self.value, self._load = name, f"plugin_pkg:{name}", load

    def load(self) -> Any:
        return self._load()


def test_entry_point_plugins_register_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = make_registry(group="mmfuse.widgets")
    calls = []

    def plugin_module() -> None:
        calls.append(1)
        registry.register("circle")(lambda size: ("circle", size))

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        return [FakeEntryPoint("circle", plugin_module)] if group == "mmfuse.widgets" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert registry.names() == ["circle", "square"]
    assert registry.create("circle", size=2) == ("circle", 2)
    assert calls == [1]  # loaded once


def test_a_broken_plugin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = make_registry(group="mmfuse.widgets")

    def broken() -> None:
        raise ImportError("No module named 'torch_scatter'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [FakeEntryPoint("gnn", broken)])
    with pytest.raises(ConfigError, match=r"widget plugin 'gnn' \(plugin_pkg:gnn\) failed to load: No module"):
        registry.names()
