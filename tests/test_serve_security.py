"""Who may call ``mmfuse serve`` (issue 30, item 4): API keys, TLS, CORS, the Host check, request ids.

Unit tests of the policy (``mmfuse.serve.security``), the middleware on the real app in process, and
the real command in a subprocess over HTTPS with a self-signed certificate, whose whole output is
searched for the keys. Every server binds 127.0.0.1 and every request goes there; a non-loopback
``--host`` is only ever refused, never bound.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serve_helpers import free_port, running_server, train_small_model
from typer.testing import CliRunner

from mmfuse.cli import app as cli
from mmfuse.core.errors import MMFuseError
from mmfuse.serve import security
from mmfuse.serve.app import create_app
from mmfuse.serve.middleware import ApiKeyAuth, RequestId, install_access_controls
from mmfuse.serve.security import (
    KeyRing,
    SecuritySettings,
    allowed_hosts_for,
    check_tls,
    exposure_problem,
    host_allowed,
    is_loopback,
    read_api_keys,
)
from mmfuse.serve.settings import ServeSettings

KEYS = ("k1-alpha-0123456789", "k2-bravo-9876543210")
LOOPBACK_URL = "http://127.0.0.1:8000"
"""The base URL of the in-process clients: their Host header is 127.0.0.1:8000 (TestClient's default,
'testserver', is not a loopback name)."""
MISSING = "this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def model_dir(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_model(synth_manifest, tmp_path_factory.mktemp("security-model"))


@pytest.fixture(scope="module")
def row(synth_manifest: Path) -> dict[str, Any]:
    first = json.loads(synth_manifest.read_text().splitlines()[0])
    first["image"], first["audio"] = (str(synth_manifest.parent / first[m]) for m in ("image", "audio"))
    return dict(first)


def client_for(model_dir: Path, policy: SecuritySettings) -> TestClient:
    client = TestClient(create_app(model_dir, ServeSettings(security=policy)), base_url=LOOPBACK_URL)
    client.__enter__()
    return client


@pytest.fixture(scope="module")
def keyed(model_dir: Path) -> Iterator[TestClient]:
    policy = SecuritySettings(api_keys=KeyRing(KEYS), allowed_hosts=allowed_hosts_for("127.0.0.1"))
    client = client_for(model_dir, policy)
    deadline = time.monotonic() + 60
    while client.get("/ready", headers={"X-API-Key": KEYS[0]}).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    yield client
    client.__exit__(None, None, None)


# --- the policy ----------------------------------------------------------------------------------------------


def test_a_key_is_compared_with_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing(["first-key", "second-key", "third-key"])
    assert repr(ring) == "KeyRing(3 keys)" and len(ring) == 3 and ring
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for candidate, expected in (("first-key", True), ("third-key", True), ("first-ke", False), ("", False),
                                ("first-key" * 1000, False)):
        calls.clear()
        assert ring.matches(candidate) is expected
        assert len(calls) == 3, "every key is compared, even after a match"
        assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}, "digests of one length"
    assert not KeyRing() and not KeyRing().matches("")


def test_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    file.write_text("# rotated 2026-12-01\n\n  file-key-1  \nfile-key-2 # not a comment: a bad key\n")
    with pytest.raises(MMFuseError) as bad:
        read_api_keys(file, {})
    assert str(bad.value).startswith(f"{file}: key 2 has a character other than printable ASCII")
    assert "file-key-2" not in str(bad.value) and "not a comment" not in str(bad.value)
    file.write_text("# rotated 2026-12-01\n\n  file-key-1  \nfile-key-2\n")
    file.chmod(0o600)
    ring, note = read_api_keys(file, {"MMFUSE_API_KEYS": "env-key-1, env-key-2,,file-key-1"})
    assert note == f"API keys required: 4 (3 from MMFUSE_API_KEYS, 2 from {file})"
    assert all(ring.matches(k) for k in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"))
    assert not ring.matches("# rotated 2026-12-01") and not ring.matches("")
    file.chmod(0o644)
    assert read_api_keys(file, {})[1].endswith("(warning: other users can read it; chmod 600 it))")
    assert read_api_keys(None, {})[1] == "no API key required" and not read_api_keys(None, {})[0]
    file.write_text("# only a comment\n\n")
    with pytest.raises(MMFuseError, match=r"holds no key \(one key per line; # starts a comment\)$"):
        read_api_keys(file, {})
    with pytest.raises(MMFuseError, match=r"--api-key-file .*missing: cannot read it \(FileNotFoundError"):
        read_api_keys(tmp_path / "missing", {})


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.10.0.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("192.168.1.5", False), ("example.com", False), ("localhost.example.com", False), ("128.0.0.1", False)])
def test_loopback_is_127_8_and_1_and_localhost(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (exposure_problem(host, KeyRing(), insecure=False) is None) is loopback
    assert exposure_problem(host, KeyRing(["a-key"]), insecure=False) is None
    assert exposure_problem(host, KeyRing(), insecure=True) is None


@pytest.mark.parametrize(("header", "allowed"), [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("[::1]", True),
    ("LocalHost:1", True), ("localhost.", True), (None, False), ("", False), ("evil.example", False),
    ("evil.example:8000", False), ("localhost.evil.example", False), ("127.0.0.1.evil.example", False),
    ("[::1", False), ("[::2]:8000", False), ("localhost:80:80", False), ("localhost:http", False),
    ("127.0.0.1 ", True), ("local host", False)])
def test_the_host_check_answers_loopback_names_only_by_default(header: str | None, allowed: bool) -> None:
    assert host_allowed(header, allowed_hosts_for("127.0.0.1")) is allowed


def test_allowed_hosts_extend_loopback_and_are_all_that_a_network_bind_answers() -> None:
    assert allowed_hosts_for("127.0.0.2", ["Box.Example."]) == ("localhost", "127.0.0.1", "::1", "127.0.0.2",
                                                                "box.example")
    assert allowed_hosts_for("[::1]") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts_for("0.0.0.0") == ("*",)
    wild = SecuritySettings(allowed_hosts=allowed_hosts_for("0.0.0.0", ["*.example.com", "[fd00::1]"])).allowed_hosts
    assert wild == ("*.example.com", "fd00::1")
    assert host_allowed("api.example.com:443", wild) and host_allowed("[fd00::1]:8000", wild)
    assert not host_allowed("example.com", wild) and not host_allowed("localhost", wild)
    with pytest.raises(MMFuseError, match=r"^--allowed-host 'a/b': give a host name, an address, "):
        SecuritySettings(allowed_hosts=("a/b",))
    with pytest.raises(MMFuseError, match=r"^--cors-origin 'https://a.example/path': give an origin as "):
        SecuritySettings(cors_origins=("https://a.example/path",))


# --- the middleware on the real app -------------------------------------------------------------------------

PROTECTED = [("GET", "/ready"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("POST", "/predict"), ("GET", "/no-such-route"), ("GET", "/health/../info")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_but_liveness_and_the_page_needs_a_key(keyed: TestClient, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic " + KEYS[0]}, {"X-API-Key": ""}):
        response = keyed.request(method, path, headers=headers, json={"text": "a"} if method == "POST" else None)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"detail": MISSING}
        assert response.headers["www-authenticate"] == "Bearer"
        assert HEX_ID.fullmatch(response.headers["x-request-id"])
    for headers in ({"Authorization": "Bearer not-a-key"}, {"X-API-Key": KEYS[0][:-1]},
                    {"X-API-Key": KEYS[0] + "x"}):
        response = keyed.request(method, path, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "the API key is not valid"}
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert not any(v in response.text + str(response.headers) for v in headers.values())


def test_a_refusal_keeps_the_connection_unless_a_large_body_is_left_unread(model_dir: Path) -> None:
    """Over a real socket: a refused request whose body was read to its end leaves the connection open for the
    next one; a streamed body over 1 MiB is not read on, and the answer closes the connection."""
    policy = SecuritySettings(api_keys=KeyRing(KEYS), allowed_hosts=allowed_hosts_for("127.0.0.1"))
    application = create_app(model_dir, ServeSettings(security=policy))
    with running_server(application, ready_headers={"X-API-Key": KEYS[0]}) as url, httpx.Client(base_url=url) as client:
        small = client.post("/predict", content=b"x" * 1000, headers={"Content-Type": "application/json"})
        assert small.status_code == 401 and "connection" not in small.headers
        rebound = client.get("/info", headers={"Host": "evil.example"})
        assert rebound.status_code == 400 and "connection" not in rebound.headers
        assert client.get("/info", headers={"X-API-Key": KEYS[0]}).status_code == 200

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b"x" * 65536

        large = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
        assert large.status_code == 401 and large.headers["connection"] == "close"
        assert large.json() == {"detail": MISSING}


def test_refusals_are_counted_in_the_metrics(keyed: TestClient) -> None:
    def count(route: str, status: int) -> float:
        text = keyed.get("/metrics", headers={"X-API-Key": KEYS[0]}).text
        found = re.search(rf'^mmfuse_requests_total{{route="{re.escape(route)}",status="{status}"}} (\S+)$', text,
                          flags=re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    before = count("/info", 401), count("/info", 400)
    keyed.get("/info")
    keyed.get("/info", headers={"Host": "evil.example"})
    assert (count("/info", 401), count("/info", 400)) == (before[0] + 1, before[1] + 1)


def test_the_openapi_description_states_the_keys(keyed: TestClient, model_dir: Path) -> None:
    schema = keyed.get("/openapi.json", headers={"X-API-Key": KEYS[0]}).json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    assert schema["paths"]["/predict"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/info"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    with TestClient(create_app(model_dir)) as open_client:
        assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


def test_a_valid_key_in_either_header_is_let_in(keyed: TestClient, row: dict[str, Any]) -> None:
    for headers in ({"Authorization": f"Bearer {KEYS[0]}"}, {"authorization": f"bearer  {KEYS[1]}"},
                    {"X-API-Key": KEYS[1]}, {"X-API-Key": "wrong", "Authorization": f"Bearer {KEYS[0]}"}):
        assert keyed.get("/info", headers=headers).status_code == 200, headers
        files = {"image": ("a.png", Path(row["image"]).read_bytes())}
        answer = keyed.post("/predict", data={"text": row["text"]}, files=files, headers=headers)
        assert answer.status_code == 200 and "label" in answer.json()
    assert keyed.get("/no-such-route", headers={"X-API-Key": KEYS[0]}).status_code == 404
    for path in ("/health", "/", "/static/app.js"):  # liveness and the page's static files
        assert keyed.get(path).status_code == 200, path


def test_a_bad_host_is_refused_before_anything_else(keyed: TestClient) -> None:
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "[::1"):
        for path in ("/", "/health", "/info"):
            response = keyed.get(path, headers={"Host": host, "X-API-Key": KEYS[0]})
            assert response.status_code == 400, (host, path)
            assert response.json() == {"detail": f"Host {host!a} is not allowed; this server answers to localhost, "
                                                 "127.0.0.1, [::1] (add names with --allowed-host)"}
            assert HEX_ID.fullmatch(response.headers["x-request-id"])
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert keyed.get("/health", headers={"Host": host}).status_code == 200


def test_cors_is_off_by_default_and_an_allow_list_opens_it(keyed: TestClient, model_dir: Path) -> None:
    evil = {"Origin": "https://evil.example", "X-API-Key": KEYS[0]}
    assert "access-control-allow-origin" not in keyed.get("/info", headers=evil).headers
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    answer = keyed.options("/predict", headers=preflight)
    assert not any(k.startswith("access-control-") for k in answer.headers)
    policy = SecuritySettings(api_keys=KeyRing(KEYS), allowed_hosts=allowed_hosts_for("127.0.0.1"),
                              cors_origins=("https://app.example", "http://localhost:3000"))
    client = client_for(model_dir, policy)
    try:
        ok = client.options("/predict", headers={**preflight, "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        refused = client.options("/predict", headers=preflight)
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        unauthorised = client.get("/ready", headers={"Origin": "http://localhost:3000"})
        assert unauthorised.status_code == 401  # ... and the page on that origin can read why
        assert unauthorised.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "x-request-id" in unauthorised.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-origin" not in client.get("/health", headers=evil).headers
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(("given", "kept"), [
    ("trace-123.abc_DEF", True), ("a" * 128, True), ("a" * 129, False), ("two words", False), ("", False),
    ("x\\r\\nINFO forged", False), ("é", False), ("id;drop", False)])
def test_every_response_has_a_request_id(keyed: TestClient, given: str, kept: bool) -> None:
    for path in ("/health", "/info", "/no-such-route"):
        rid = keyed.get(path, headers={"X-Request-ID": given.encode("latin-1")}).headers["x-request-id"]
        assert rid == given if kept else HEX_ID.fullmatch(rid), (path, given, rid)


def test_a_route_that_raises_still_answers_with_its_request_id() -> None:
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a fault of the server")

    install_access_controls(app, SecuritySettings())
    app.add_middleware(RequestId)
    with TestClient(app, base_url=LOOPBACK_URL, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "r-1"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-1"
    assert response.json() == {"detail": "internal server error (request id r-1; the server's log has the details)"}


def test_no_key_no_host_check_by_default_in_python(model_dir: Path) -> None:
    """``create_app`` without a policy (how tests and Python callers use it) lets everyone in."""
    client = TestClient(create_app(model_dir, ServeSettings()))  # Host: testserver
    with client:
        assert client.get("/health").status_code == 200
        assert "x-request-id" in client.get("/health").headers
    assert not any(m.cls is ApiKeyAuth for m in create_app(model_dir).user_middleware)


# --- the command ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "box.example"])
def test_the_command_refuses_a_network_host_without_a_key(model_dir: Path, host: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMFUSE_API_KEYS", raising=False)
    # --onnx names a missing file, checked after the exposure: a broken check fails here, never binds the host
    result = CliRunner().invoke(cli, ["serve", str(model_dir), "--host", host, "--port", "1", "--onnx", "missing.onnx"])
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == (
        f"error: --host {host} exposes the server to the network without an API key: set MMFUSE_API_KEYS or give "
        "--api-key-file (and --ssl-certfile/--ssl-keyfile for TLS), or pass --insecure to serve it open")


def test_the_command_names_a_bad_key_file_or_certificate(model_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMFUSE_API_KEYS", raising=False)
    monkeypatch.delenv("MMFUSE_SSL_KEYFILE_PASSWORD", raising=False)
    run = CliRunner().invoke
    missing = run(cli, ["serve", str(model_dir), "--api-key-file", str(tmp_path / "nope"), "--onnx", "missing.onnx"])
    assert missing.exit_code == 1 and "--api-key-file" in missing.output and "FileNotFoundError" in missing.output
    cert, key = self_signed(tmp_path, password=b"s3cret-pw")
    for args, message in (
            (["--ssl-keyfile", str(key)], "--ssl-keyfile and --ssl-keyfile-password need --ssl-certfile"),
            (["--ssl-certfile", str(tmp_path / "none.pem")], "none.pem: no such file"),
            (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)], "an encrypted key needs --ssl-keyfile-password"),
            (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-keyfile-password", "wrong"],
             "cannot load the certificate and key"),
            (["--ssl-certfile", str(key)], "cannot load the certificate and key")):
        result = run(cli, ["serve", str(model_dir), "--port", "1", "--onnx", "missing.onnx", *args])
        assert result.exit_code == 1, args
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    check_tls(cert, key, "s3cret-pw")  # the right password loads


def self_signed(folder: Path, password: bytes | None = None) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (encrypted with ``password``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmfuse test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def test_the_real_command_over_https_with_keys_and_request_ids_in_its_logs(
        model_dir: Path, row: dict[str, Any], tmp_path: Path) -> None:
    """``mmfuse serve`` with a key file, a key in the variable and TLS: HTTPS answers, keys are needed, and
    the whole output (stdout and stderr) holds the request ids and none of the keys, right or wrong."""
    cert, key = self_signed(tmp_path, password=b"s3cret-pw")
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# ops keys\n{KEYS[0]}\n")
    key_file.chmod(0o600)
    env_key, wrong_key = "env-key-5fa1c0ffee", "wrong-key-deadbeef42"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mmfuse.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--threads", "1", "--api-key-file", str(key_file), "--ssl-certfile", str(cert), "--ssl-keyfile",
               str(key)]
    environment = {**_clean_environment(), "MMFUSE_API_KEYS": env_key, "MMFUSE_SSL_KEYFILE_PASSWORD": "s3cret-pw"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(base_url=url, verify=trust, timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.get("/ready", headers={"X-API-Key": env_key}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
            assert client.get("/health").status_code == 200
            refused = client.get("/info", headers={"X-Request-ID": "no-key-req"})
            assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key-req"
            wrong = client.get("/info", headers={"Authorization": f"Bearer {wrong_key}", "X-Request-ID": "wrong-req"})
            assert wrong.status_code == 401
            files = {"audio": ("a.wav", Path(row["audio"]).read_bytes())}
            answer = client.post("/predict", data={"text": row["text"]}, files=files,
                                 headers={"Authorization": f"Bearer {KEYS[0]}", "X-Request-ID": "predict-req"})
            assert answer.status_code == 200 and answer.headers["x-request-id"] == "predict-req"
            assert answer.json()["modalities"] == ["audio", "text"]
            evil = client.get("/health", headers={"Host": "evil.example", "X-Request-ID": "rebind-req"})
            assert evil.status_code == 400
        with pytest.raises(httpx.TransportError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    output = out + err
    assert f"serving {model_dir} on https://127.0.0.1:{port}" in " ".join(output.split())
    assert f"API keys required: 2 (1 from MMFUSE_API_KEYS, 1 from {key_file})" in " ".join(output.split())
    for secret in (*KEYS, env_key, wrong_key, "s3cret-pw"):
        assert secret not in output, f"{secret} appears in the server's output"
    lines = output.splitlines()
    assert any(re.search(r"\[predict-req\] 127\.0\.0\.1:\d+ - \"POST /predict HTTP/1\.1\" 200", line) for line in lines)
    assert any("[no-key-req] refused GET /info from 127.0.0.1: no API key" in line for line in lines)
    assert any("[wrong-req] refused GET /info from 127.0.0.1: wrong API key" in line for line in lines)
    assert any("[rebind-req] refused a request with Host 'evil.example'" in line for line in lines)
    assert any(re.search(r"\[no-key-req\] 127\.0\.0\.1:\d+ - \"GET /info HTTP/1\.1\" 401", line) for line in lines)


def _clean_environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MMFUSE_API_KEYS", "MMFUSE_SSL_KEYFILE_PASSWORD")}


def test_keys_are_hashed_not_kept() -> None:
    ring = KeyRing(["plain-secret", "plain-secret"])
    assert vars(ring) == {"_digests": (hashlib.sha256(b"plain-secret").digest(),)}
