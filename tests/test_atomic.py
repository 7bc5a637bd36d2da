"""staged_folder: the target path holds the old complete folder or the new one, never a partial one."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfuse.core.atomic import staged_folder


def test_success_replaces_the_old_folder_and_leaves_no_temporary_folders(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_folder(final) as staging:
        assert staging.parent == tmp_path and staging != final and not any(staging.iterdir())
        (staging / "new.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old"  # untouched until the block ends
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_error_keeps_the_old_folder_and_removes_the_partial_one(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_folder(final) as staging:
        (staging / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_folder_and_its_parents_are_created(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "model"
    with staged_folder(final) as staging:
        (staging / "x").write_text("1")
    assert (final / "x").read_text() == "1"
