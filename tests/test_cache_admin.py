"""``mmfuse cache list | prune``: every cache kind is found under one root, sized, aged and removable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmfuse.cli import app
from mmfuse.core.cache_home import cache_entries
from mmfuse.data.memory import cache_root
from mmfuse.engine.feature_cache import default_cache_dir

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root with an old array entry (3 files), a new feature file and a new synth folder."""
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    old = cache_root() / "aaaa"
    old.mkdir(parents=True)
    for i in range(3):
        (old / f"part{i}.npy").write_bytes(b"x" * 1000)
    ten_days_ago = time.time() - 10 * 86400
    for path in (*old.iterdir(), old):
        os.utime(path, (ten_days_ago, ten_days_ago))
    default_cache_dir().mkdir(parents=True)
    (default_cache_dir() / "enc.safetensors").write_bytes(b"y" * 500)
    synth = tmp_path / "cache" / "synth" / "v3-n10"
    synth.mkdir(parents=True)
    (synth / "manifest.jsonl").write_text("{}\n")
    return tmp_path / "cache"


def test_the_kinds_share_one_root_and_entries_are_measured(home: Path) -> None:
    entries = {(e.kind, e.path.name): e for e in cache_entries()}
    assert set(entries) == {("arrays", "aaaa"), ("features", "enc.safetensors"), ("synth", "v3-n10")}
    old = entries[("arrays", "aaaa")]
    assert (old.size_bytes, old.files) == (3000, 3) and 9.9 < old.age_days < 10.1
    assert entries[("features", "enc.safetensors")].size_bytes == 500
    assert entries[("synth", "v3-n10")].age_days < 0.1


def test_list_shows_each_entry_and_totals(home: Path) -> None:
    result = runner.invoke(app, ["cache", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "aaaa" in result.output and "enc.safetensors" in result.output and "v3-n10" in result.output
    assert "arrays: 1 entries, 2.9 KB" in result.output


def test_prune_older_than_removes_only_old_entries_and_dry_run_removes_nothing(home: Path) -> None:
    dry = runner.invoke(app, ["cache", "prune", "--older-than", "7", "--dry-run"])
    assert dry.exit_code == 0 and "would remove arrays/aaaa" in dry.output
    assert (home / "arrays" / "aaaa").is_dir()
    result = runner.invoke(app, ["cache", "prune", "--older-than", "7"])
    assert result.exit_code == 0, result.output
    assert "removed arrays/aaaa" in result.output and "freed 2.9 KB in 1 entries" in result.output
    assert not (home / "arrays" / "aaaa").exists()
    assert (home / "features" / "enc.safetensors").is_file() and (home / "synth" / "v3-n10").is_dir()


def test_prune_all_of_one_kind(home: Path) -> None:
    result = runner.invoke(app, ["cache", "prune", "--all", "--kind", "features"])
    assert result.exit_code == 0, result.output
    assert not (home / "features" / "enc.safetensors").exists()
    assert (home / "arrays" / "aaaa").is_dir() and (home / "synth" / "v3-n10").is_dir()


@pytest.mark.parametrize(("args", "message"), [
    (["cache", "prune"], "say what to prune: --older-than DAYS or --all"),
    (["cache", "prune", "--all", "--kind", "models"], "--kind models: not a cache kind"),
])
def test_prune_refuses_vague_or_wrong_requests(home: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and message in result.output
    assert len(cache_entries()) == 3
