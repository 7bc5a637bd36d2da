"""Where a pack (or any file mmfuse reads remotely) may live: a local path, or a URL of an allowed protocol.

Why in ``core``: the config layer checks ``data.pack`` when a config is validated (a URL given to a
field typed as a path became ``s3:/bucket/pack``), and the data layer opens the same locations; the
rule is one function both import.

No shell, ever: a ``pipe:`` location would paste names from a pack's own ``pack.json`` into a command,
so whoever could write the bucket could run commands on the reader's machine. URLs are opened with
fsspec's library calls only; other fsspec protocols (archives, chained caches, ``memory``...) are
refused rather than guessed at.
"""

from __future__ import annotations

from mmfuse.core.errors import ConfigError

PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "abfss", "hf")
"""The fsspec protocols a pack may be read from or written to: object stores, web servers and local files."""


def is_url(location: str) -> bool:
    """True for ``scheme://...`` and ``pipe:...``; a plain path (even ``C:\\data``) is not a URL."""
    return location.startswith("pipe:") or ("://" in location and location.index("://") > 1)


def check_location(location: str) -> str:
    """``location`` if it is a URL of a protocol in ``PROTOCOLS``; else a ConfigError saying what works."""
    if location.startswith("pipe:"):
        raise ConfigError(f"pack location '{location[:120]}': pipe: commands are not run (a command built from a "
                          "pack's file names lets whoever writes the pack run commands here); give the pack's URL "
                          "instead (s3://bucket/pack, gs://bucket/pack, https://host/pack) or a mounted folder")
    protocol = location.split("://", 1)[0].lower()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"pack location '{location[:120]}': '{protocol}://' is not a protocol a pack is read from; "
                          f"use one of {', '.join(p + '://' for p in PROTOCOLS)}")
    return location


def member_url(location: str, name: str) -> str:
    """The URL of the pack's file ``name`` (a name from ``checked_shards`` or a fixed one like pack.json)."""
    return check_location(location).rstrip("/") + "/" + name
