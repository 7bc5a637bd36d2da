"""The README's component tables are checked against the registries, so an undocumented component fails.

README's "### Config" table has one row per registered encoder, task and preset (what `mmfuse list`
prints); the "### Fusion methods" table has one row per fusion method. Registering a built-in without
a row, or leaving a row for a name that is gone, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmfuse.config.presets import preset_names
from mmfuse.core.registry import ENCODERS, FUSIONS, TASKS, Registry

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    """The text of the README section headed ``### {title}``, up to the next heading of level <= 3."""
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{1,3}} )", README, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README has no '### {title}' section"
    return match.group(1)


def _table(section: str, header: tuple[str, ...]) -> list[list[str]]:
    """The body rows of the markdown table in ``section`` whose first header cells are ``header``."""
    rows: list[list[str]] = []
    found = False
    for line in section.splitlines():
        if not line.startswith("|"):
            if found:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not found:
            found = tuple(cells[:len(header)]) == header
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the |---|---| line
        rows.append(cells)
    assert found, f"no table with header {header}"
    return rows


def _code_name(cell: str) -> str:
    names = re.findall(r"`([^`]+)`", cell)
    assert len(names) == 1, f"expected one `name` in the cell {cell!r}"
    return names[0]


def _builtin_names(registry: Registry[object]) -> set[str]:
    """The registry's names that mmfuse itself registers (third-party plugins document themselves)."""
    return {name for name in registry.names() if registry.get(name).__module__.startswith("mmfuse.")}


def test_config_table_names_every_encoder_task_and_preset() -> None:
    documented: dict[str, set[str]] = {"encoder": set(), "task": set(), "preset": set()}
    fusion_rows = []
    for piece, name_cell, what in _table(_section("Config"), ("piece", "name", "what it is")):
        if piece == "fusion":
            fusion_rows.append(name_cell)
            continue
        assert piece in documented, f"unknown piece {piece!r} in README's Config table"
        name = _code_name(name_cell)
        assert name not in documented[piece], f"{piece} {name} has two rows"
        assert what, f"{piece} {name} has no description"
        documented[piece].add(name)
    assert documented["encoder"] == _builtin_names(ENCODERS)
    assert documented["task"] == _builtin_names(TASKS)
    assert documented["preset"] == set(preset_names())
    assert fusion_rows == ["every name in the [Fusion methods](#fusion-methods) table"]


def test_fusion_methods_table_names_every_fusion() -> None:
    rows = _table(_section("Fusion methods"), ("name", "what it does"))
    names = [_code_name(row[0]) for row in rows]
    assert len(names) == len(set(names)), "a fusion method has two rows"
    assert all(row[1] for row in rows), "every fusion method has a description"
    assert set(names) == _builtin_names(FUSIONS)


def test_every_in_page_link_names_a_heading() -> None:
    prose = re.sub(r"^```.*?^```", "", README, flags=re.MULTILINE | re.DOTALL)  # no code-block comments
    anchors = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
               for heading in re.findall(r"^#+ (.+)$", prose, flags=re.MULTILINE)}
    missing = sorted(set(re.findall(r"\]\(#([^)]+)\)", prose)) - anchors)
    assert not missing, f"README links to headings that do not exist: {missing}"
