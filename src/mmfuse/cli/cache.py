"""``mmfuse cache list | prune``: see and remove cached arrays, features and generated data sets."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mmfuse.cli.app import app, console, friendly_errors
from mmfuse.core.cache_home import KINDS, CacheEntry, cache_entries, cache_home, remove_entry
from mmfuse.core.errors import MMFuseError

cache_app = typer.Typer(no_args_is_help=True, help="See and remove cached arrays, features and generated data.")
app.add_typer(cache_app, name="cache")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


@cache_app.command("list")
@friendly_errors
def cache_list() -> None:
    """Every cache entry with its size, file count and age, and the total per kind."""
    home = cache_home()
    entries = cache_entries(home)
    if not entries:
        console.print(f"nothing cached under {home}")
        return
    table = Table(title=f"cache: {home}")
    for column in ("kind", "entry", "size", "files", "age (days)"):
        table.add_column(column, justify="left" if column in ("kind", "entry") else "right")
    for e in entries:
        table.add_row(e.kind, e.path.name, _size(e.size_bytes), f"{e.files:,}", f"{e.age_days:.1f}")
    console.print(table)
    for kind in KINDS:
        chosen = [e for e in entries if e.kind == kind]
        if chosen:
            console.print(f"{kind}: {len(chosen)} entries, {_size(sum(e.size_bytes for e in chosen))}")


@cache_app.command("prune")
@friendly_errors
def cache_prune(
    older_than: Annotated[float | None, typer.Option(
        min=0, help="Remove entries not modified for this many days.")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry (of --kind).")] = False,
    kind: Annotated[list[str] | None, typer.Option(help=f"Only these kinds: {', '.join(KINDS)}.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
) -> None:
    """Remove cache entries; the next run that needs one builds it again."""
    if older_than is None and not everything:
        raise MMFuseError("say what to prune: --older-than DAYS or --all (see what is there: mmfuse cache list)")
    unknown = [k for k in kind or [] if k not in KINDS]
    if unknown:
        raise MMFuseError(f"--kind {unknown[0]}: not a cache kind; choose from {', '.join(KINDS)}")
    chosen: list[CacheEntry] = [
        e for e in cache_entries()
        if (not kind or e.kind in kind) and (everything or (older_than is not None and e.age_days >= older_than))]
    if not chosen:
        console.print("nothing to prune")
        return
    for entry in chosen:
        if not dry_run:
            remove_entry(entry)
        console.print(f"{'would remove' if dry_run else 'removed'} {entry.kind}/{entry.path.name} "
                      f"({_size(entry.size_bytes)})")
    total = _size(sum(e.size_bytes for e in chosen))
    console.print(f"{'would free' if dry_run else 'freed'} {total} in {len(chosen)} entries")
