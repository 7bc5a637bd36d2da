"""Who may call ``mmfuse serve``: API keys, the Host allow-list, CORS origins, exposure on start-up.

The policy is plain data and pure functions here; the ASGI middleware that applies it to every
request is ``mmfuse.serve.middleware``. The conventions follow the servers users already know:

- API keys travel in a header, ``Authorization: Bearer <key>`` (TorchServe's token authorisation)
  or ``X-API-Key: <key>`` (LitServe's), never in the URL, which proxies and access logs record.
  They come from ``MMFUSE_API_KEYS`` (comma-separated) or a key file (one per line, ``#``
  comments), not from a command-line option, which any user of the machine can read in ``ps``.
  Several keys may be valid at once, so one can be rotated without downtime.
- A key is compared with every configured key through SHA-256 digests and ``hmac.compare_digest``
  without stopping at the first match, so the time taken says neither which key nor how much of
  one matched, nor its length.
- ``/health`` (liveness, for orchestrators that carry no secret) answers without a key, as do the
  page at ``/`` and its ``/static/`` files: a browser cannot attach a header to a navigation, the
  files are the same in every install, and the page sends the key the user types in with every
  call it makes. Everything that reveals or uses the model needs the key.
- The Host check defeats DNS rebinding: a web page from ``evil.example`` whose name is re-pointed
  at 127.0.0.1 reaches a loopback server with ``Host: evil.example``. A loopback server therefore
  answers only loopback names unless told more. Starlette's TrustedHostMiddleware has the same
  ``*.domain`` patterns but splits ``[::1]:8000`` at its first colon and answers in plain text,
  so the check here parses IPv6 literals and answers one JSON line like every other error.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mmfuse.core.errors import MMFuseError

API_KEYS_ENV = "MMFUSE_API_KEYS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
"""Host names a loopback server answers by default (an IPv6 literal is matched without brackets)."""
PUBLIC_PATHS = frozenset({"/health", "/"})
PUBLIC_PREFIXES = ("/static/",)
_KEY = re.compile(r"[!-+\--~]+")
"""Printable ASCII without space or comma: what a header carries intact and the variable can separate."""
_PORT = re.compile(r"[0-9]{1,5}")


class KeyRing:
    """The valid API keys, kept as SHA-256 digests; its repr shows how many, never a key.

    ``matches`` hashes the candidate once and compares it with every digest, OR-ing the results, so
    a wrong key costs the same time whichever key it resembles and however long it is.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(keys))

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self)} keys)"

    def matches(self, candidate: str) -> bool:
        given = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, given)
        return found


@dataclass(frozen=True)
class SecuritySettings:
    """The access policy of one server.

    ``api_keys`` empty: no key needed. ``allowed_hosts`` None: any Host header (the default for
    ``create_app`` in Python, where the caller decides how it is bound; ``mmfuse serve`` always
    sets it, see ``allowed_hosts_for``); otherwise names, ``*.domain`` patterns or ``*``.
    ``cors_origins`` empty: no cross-origin access (no Access-Control-* header at all).
    """

    api_keys: KeyRing = field(default_factory=KeyRing)
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            object.__setattr__(self, "allowed_hosts", tuple(_host_pattern(h) for h in self.allowed_hosts))
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise MMFuseError(f"--cors-origin {origin!r}: give an origin as scheme://host[:port] "
                                  "(e.g. https://app.example.com), without a path")


def parse_keys(text: str, where: str) -> list[str]:
    """The keys in ``text``: comma- or newline-separated, blank entries and ``#`` comment lines skipped.

    A key the header could not carry is refused by its position, never by its value.
    """
    keys = []
    entries = [e.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
               for e in line.split(",")]
    for number, entry in enumerate((e for e in entries if e), start=1):
        if not _KEY.fullmatch(entry):
            raise MMFuseError(f"{where}: key {number} has a character other than printable ASCII (no spaces or "
                              "commas); generate keys with e.g. `python -c 'import secrets; print(secrets."
                              "token_urlsafe(32))'`")
        keys.append(entry)
    return keys


def read_api_keys(file: Path | None, environ: dict[str, str] | None = None) -> tuple[KeyRing, str]:
    """The keys from ``$MMFUSE_API_KEYS`` and ``file`` together, and a line saying where they came from.

    An empty or unreadable file is an error (a server meant to be protected must not start open);
    a file others may read gets a warning in that line.
    """
    environ = dict(os.environ) if environ is None else environ
    keys = parse_keys(environ.get(API_KEYS_ENV, ""), API_KEYS_ENV)
    sources = [f"{len(keys)} from {API_KEYS_ENV}"] if keys else []
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
            mode = file.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise MMFuseError(f"--api-key-file {file}: cannot read it ({type(exc).__name__}: "
                              f"{getattr(exc, 'strerror', None) or exc})") from None
        from_file = parse_keys(text, str(file))
        if not from_file:
            raise MMFuseError(f"--api-key-file {file}: holds no key (one key per line; # starts a comment)")
        keys += from_file
        loose = " (warning: other users can read it; chmod 600 it)" if mode & (stat.S_IRWXG | stat.S_IRWXO) else ""
        sources.append(f"{len(from_file)} from {file}{loose}")
    ring = KeyRing(keys)
    return ring, (f"API keys required: {len(ring)} ({', '.join(sources)})" if ring else "no API key required")


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only: 127.0.0.0/8, ::1, localhost.

    Any other name counts as exposed: what it resolves to can change after the check.
    """
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def exposure_problem(host: str, keys: KeyRing, insecure: bool) -> str | None:
    """Why ``mmfuse serve --host host`` must not start as configured, or None when it may."""
    if keys or insecure or is_loopback(host):
        return None
    return (f"--host {host} exposes the server to the network without an API key: set {API_KEYS_ENV} or give "
            "--api-key-file (and --ssl-certfile/--ssl-keyfile for TLS), or pass --insecure to serve it open")


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names ``mmfuse serve --host bind_host --allowed-host ...`` answers.

    Bound to loopback: the loopback names, the bind address and ``extra``. Bound to the network:
    ``extra`` only, or any host (``*``) when none is given; such a server needs a key anyway.
    """
    extra = tuple(_host_pattern(h) for h in extra)
    if is_loopback(bind_host):
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, _host_pattern(bind_host), *extra)))
    return extra or ("*",)


def host_of(header: str) -> str | None:
    """The host part of a Host header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``), lower-case,
    brackets and trailing dot dropped; None for a malformed header."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
        return None
    name = name.rstrip(".")
    return name if name and re.fullmatch(r"[a-z0-9.\-_:]+", name) else None


def host_allowed(header: str | None, patterns: tuple[str, ...]) -> bool:
    """TrustedHostMiddleware's rule: an exact name, ``*.domain`` for its sub-domains, or ``*``."""
    if "*" in patterns:
        return True
    name = host_of(header) if header is not None else None
    if name is None:
        return False
    return any(name == p or (p.startswith("*.") and name.endswith(p[1:])) for p in patterns)


def is_public(path: str) -> bool:
    """Paths served without a key (see the module docstring)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _host_pattern(host: str) -> str:
    """A configured host in the form ``host_of`` produces (``[::1]`` -> ``::1``, ``Example.`` -> ``example``)."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name or not re.fullmatch(r"(\*|\*\.)?[a-z0-9.\-_:]*", name):
        raise MMFuseError(f"--allowed-host {host!r}: give a host name, an address, '*.domain' or '*'")
    return name


def check_tls(certfile: Path | None, keyfile: Path | None, password: str | None) -> None:
    """Loads the certificate chain once before the server starts, so a wrong file, a key that does not
    match or a missing password is one line here, not uvicorn's traceback (or its interactive prompt
    for the password of an encrypted key)."""
    import ssl

    if certfile is None:
        if keyfile is not None or password is not None:
            raise MMFuseError("--ssl-keyfile and --ssl-keyfile-password need --ssl-certfile (the certificate chain)")
        return
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not path.is_file():
            raise MMFuseError(f"{option} {path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile, lambda: (password or "").encode())
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise MMFuseError(f"--ssl-certfile {certfile}{f' --ssl-keyfile {keyfile}' if keyfile else ''}: cannot load "
                          f"the certificate and key ({reason}); they must be PEM files that belong together, and an "
                          "encrypted key needs --ssl-keyfile-password") from None
