"""BundlePuller, BundleServer, manifests and the sidecar, used directly (no plugin)."""

from __future__ import annotations

import fcntl
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.bundles.manifest import (
    Manifest,
    Version,
    VersionRange,
    build_manifest,
    check_paths,
    file_url_path,
    path_problem,
)
from pytest_sandbox.bundles.puller import BundlePuller, verify_tree
from pytest_sandbox.bundles.server import BundleServer
from pytest_sandbox.bundles.sidecar import SidecarStub, notify
from pytest_sandbox.errors import (
    IntegrityMismatch,
    ManifestInvalid,
    SignatureInvalid,
    UnknownScenario,
    UnsafeBundlePath,
)

KEY = "key-one"


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with BundleServer() as srv:
        yield srv
        srv.check()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # short path: Unix socket addresses are limited to 107 bytes
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="psb-b-", dir="/tmp"))
    yield directory / "sidecar.sock"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


# --- manifest ---------------------------------------------------------------------------


def test_semver_ordering_and_ranges() -> None:
    assert Version.parse("0.4.0-rc.1") < Version.parse("0.4.0") < Version.parse("0.4.10")
    assert (
        Version.parse("1.0.0-alpha") < Version.parse("1.0.0-alpha.1") < Version.parse("1.0.0-beta")
    )
    rng = VersionRange.parse(">=0.4.0,<0.5.0")
    assert Version.parse("0.4.9") in rng
    assert Version.parse("0.5.0") not in rng
    assert Version.parse("0.3.99") not in rng
    with pytest.raises(ValueError, match="operator"):
        VersionRange.parse("0.4.0")
    with pytest.raises(ValueError, match="semantic version"):
        Version.parse("v1.2")


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "../x",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "C:/x",
        "x" * 256,
        "cafe\u0301",
    ],
)
def test_unsafe_paths_are_named(path: str) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["a", "a/b.md", "dir with space/ü.md", ".hidden", "a..b"])
def test_safe_paths(path: str) -> None:
    assert path_problem(path) is None


@pytest.mark.parametrize(
    "paths",
    [["a", "a"], ["A.md", "a.md"], ["\ufb01", "fi"], ["d", "d/e"], ["Stra\u00dfe", "STRASSE"]],
)
def test_colliding_path_sets(paths: list[str]) -> None:
    with pytest.raises(UnsafeBundlePath):
        check_paths(paths)


def test_manifest_round_trip_and_integrity() -> None:
    manifest = build_manifest({"b": b"2", "a/x": b"1"}, version="0.4.0", ts="17")
    parsed = Manifest.parse(manifest.to_json())
    assert parsed == manifest
    parsed.check_integrity()
    assert [f.path for f in parsed.files] == ["a/x", "b"]
    from dataclasses import replace

    with pytest.raises(IntegrityMismatch):
        replace(parsed, size_bytes=3).check_integrity()
    with pytest.raises(ManifestInvalid, match="bundle_ts"):
        Manifest.parse(manifest.to_json().replace(b'"17"', b'"../x"'))
    assert file_url_path("17", "dir with space/ü.md") == (
        "/api/v1/memory/bundle/17/dir%20with%20space/%C3%BC.md"
    )


def test_signature_round_trip() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    signed = build_manifest({"a": b"1"}, version="0.4.0", ts="1").sign(key)
    Manifest.parse(signed.to_json()).verify(key.public_key())
    with pytest.raises(SignatureInvalid):
        signed.verify(Ed25519PrivateKey.generate().public_key())


# --- server ------------------------------------------------------------------------------


def test_auth_and_tenant_isolation(server: BundleServer) -> None:
    import http.client

    manifest = server.tenant("a").publish({"secret.md": b"a's"}, version="0.4.0")
    server.tenant("b").publish({"other.md": b"b's"}, version="0.4.0")

    def get(path: str, key: str | None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", path, headers={"X-API-Key": key} if key else {})
        status = conn.getresponse().status
        conn.close()
        return status

    url = file_url_path(manifest.bundle_ts, "secret.md")
    assert get("/api/v1/memory/bundle/manifest", None) == 401
    assert get("/api/v1/memory/bundle/manifest", "nobody") == 403
    assert get(url, "a") == 200
    assert get(url, "b") == 404  # b cannot see a's bundles
    server.assert_requested(url, count=2)
    with pytest.raises(AssertionError):
        server.assert_no_file_requests()


def test_unknown_scenarios_are_refused(server: BundleServer) -> None:
    with pytest.raises(UnknownScenario, match="Known"):
        server.scenario("teleport")
    with pytest.raises(UnknownScenario, match="no parameter"):
        server.scenario("stall", forever=True)
    with pytest.raises(UnknownScenario, match="kind"):
        server.scenario("unsafe_path", kind="nope")


def test_check_reraises_server_thread_errors(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish({"a": b"1"}, version="0.4.1")
    server.scenario("mix_and_match")  # needs a second bundle: a server-side error
    result = BundlePuller(server.url, KEY, tmp_path / "r").tick()
    assert result.code == "fetch_failed"
    from pytest_sandbox.errors import BundleServerError

    with pytest.raises(BundleServerError, match="mix_and_match"):
        server.check()
    server.reset()


def test_close_is_prompt_with_a_stalled_client_and_idempotent(tmp_path: Path) -> None:
    import socket

    server = BundleServer().start()
    server.tenant(KEY).publish({"a": b"1" * 1000}, version="0.4.1")
    server.scenario("stall", after=1, seconds=60)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /api/v1/memory/bundle/manifest HTTP/1.1\r\nX-API-Key: key-one\r\n\r\n")
    time.sleep(0.2)
    started = time.monotonic()
    server.close()
    server.close()
    assert time.monotonic() - started < 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)
    sock.close()


def test_tls_server_and_puller(tmp_path: Path) -> None:
    with BundleServer(tls=True) as server:
        server.tenant(KEY).publish({"a.md": b"over tls"}, version="0.4.1")
        assert server.url.startswith("https://")
        puller = BundlePuller(
            server.url, KEY, tmp_path / "r", ssl_context=server.client_ssl_context()
        )
        assert puller.tick().status == "installed"
        assert (puller.current / "a.md").read_bytes() == b"over tls"
        # without the test CA the puller refuses to talk
        assert BundlePuller(server.url, KEY, tmp_path / "r2").tick().code == "fetch_failed"
        server.check()


# --- puller ------------------------------------------------------------------------------


def test_install_layout_and_up_to_date(server: BundleServer, tmp_path: Path) -> None:
    files = {"notes/a.md": b"a", "dir with space/ü.md": b"u", "empty": b""}
    manifest = server.tenant(KEY).publish(files, version="0.4.0")
    events: list[Any] = []
    puller = BundlePuller(server.url, KEY, tmp_path / "r", audit=events.append)
    result = puller.tick()
    assert result.status == "installed"
    assert result.bundle_ts == manifest.bundle_ts
    assert os.readlink(puller.current) == f"bundles/{manifest.bundle_ts}"
    assert verify_tree(puller.current.resolve(), manifest) == []
    assert puller.tick().status == "up_to_date"
    assert [e.event for e in events] == ["installed", "up_to_date"]
    assert puller.floor() == "0.4.0"
    assert KEY not in repr(puller)


def test_retention_keeps_n_and_never_current(server: BundleServer, tmp_path: Path) -> None:
    tenant = server.tenant(KEY)
    puller = BundlePuller(server.url, KEY, tmp_path / "r", keep=2, fsync=False)
    seen = []
    for patch in range(5):
        tenant.publish({"v": str(patch).encode()}, version=f"0.4.{patch}")
        seen.append(puller.tick().bundle_ts)
        assert len(puller.installed()) <= 2
        assert puller.current_ts() in puller.installed()
    assert sorted(puller.installed()) == sorted(seen[-2:])
    # even if current is the oldest dir on disk, it is kept
    old = puller.bundles_dir / seen[-1]
    os.utime(old, (1, 1))
    puller._retention()
    assert seen[-1] in puller.installed()


def test_tenant_switch_wipes_old_bundles_first(server: BundleServer, tmp_path: Path) -> None:
    server.tenant("one").publish({"one.md": b"1"}, version="0.4.3")
    server.tenant("two").publish({"two.md": b"2"}, version="0.4.0")
    root = tmp_path / "r"
    assert BundlePuller(server.url, "one", root).tick().status == "installed"
    events: list[Any] = []
    result = BundlePuller(server.url, "two", root, audit=events.append).tick()
    # the floor was one's (0.4.3): two's 0.4.0 is not a rollback
    assert result.status == "installed"
    assert events[0].event == "tenant_changed"
    assert [p.name for p in (root / "current").iterdir()] == ["two.md"]
    assert len(list((root / "bundles").iterdir())) == 1


def test_tenant_switch_with_refused_manifest_leaves_nothing_of_the_old(
    server: BundleServer, tmp_path: Path
) -> None:
    server.tenant("one").publish({"one.md": b"1"}, version="0.4.0")
    root = tmp_path / "r"
    BundlePuller(server.url, "one", root).tick()
    result = BundlePuller(server.url, "unknown", root).tick()
    assert result.code == "fetch_failed"
    assert not os.path.lexists(root / "current")


def test_busy_when_the_lock_is_held(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
    root = tmp_path / "r"
    root.mkdir()
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = BundlePuller(server.url, KEY, root).tick()
        assert result.status == "busy"
        assert server.requests == []
    finally:
        os.close(fd)
    assert BundlePuller(server.url, KEY, root).tick().status == "installed"


def test_stale_leftovers_are_cleaned(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
    root = tmp_path / "r"
    (root / ".staging-1-dead" / "x").mkdir(parents=True)
    (root / ".trash-dead").mkdir()
    os.symlink("bundles/nowhere", root / ".current-dead")
    puller = BundlePuller(server.url, KEY, root)
    assert puller.tick().status == "installed"
    assert sorted(p.name for p in root.iterdir()) == [".lock", "bundles", "current", "state.json"]


def test_signed_manifests(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    with BundleServer(signing_key=key) as server:
        server.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
        puller = BundlePuller(server.url, KEY, tmp_path / "r", public_key=key.public_key())
        assert puller.tick().status == "installed"
        server.tenant(KEY).publish({"a": b"2"}, version="0.4.1")
        server.scenario("bad_signature")
        result = puller.tick()
        assert result.code == "signature_invalid"
        assert not server.file_requests()[1:]
        server.clear_scenarios()
        assert puller.tick().status == "installed"
    with BundleServer() as unsigned:
        unsigned.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
        strict = BundlePuller(unsigned.url, KEY, tmp_path / "r2", public_key=key.public_key())
        assert strict.tick().code == "signature_invalid"


def test_max_bundle_bytes_refuses_before_download(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish({"big": b"x" * 10_000}, version="0.4.0")
    result = BundlePuller(server.url, KEY, tmp_path / "r", max_bundle_bytes=1000).tick()
    assert result.code == "manifest_invalid"
    server.assert_no_file_requests()


def test_publish_lies_are_explicit(server: BundleServer, tmp_path: Path) -> None:
    tenant = server.tenant(KEY)
    tenant.publish({"a": b"abc"}, version="0.4.0", corrupt=["a"])
    assert BundlePuller(server.url, KEY, tmp_path / "r").tick().code == "hash_mismatch"
    tenant.publish({"a": b"abc"}, version="0.4.1", lie_size={"a": 2})
    assert BundlePuller(server.url, KEY, tmp_path / "r").tick().code == "size_mismatch"


def test_publish_a_directory(server: BundleServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_bytes(b"f")
    (src / "top.md").write_bytes(b"t")
    manifest = server.tenant(KEY).publish(src, version="0.4.0")
    assert sorted(f.path for f in manifest.files) == ["sub/f.txt", "top.md"]


# --- sidecar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "status", "calls"),
    [
        ([200], "ok", 1),
        ([409, 200], "ok", 2),
        ([409, 409], "conflict", 2),
        ([500], "error", 1),
        (["close"], "error", 1),
    ],
)
def test_sidecar_replies(
    server: BundleServer,
    tmp_path: Path,
    socket_path: Path,
    replies: list[Any],
    status: str,
    calls: int,
) -> None:
    server.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
    events: list[Any] = []
    with SidecarStub(socket_path) as stub:
        stub.reply(*replies)
        puller = BundlePuller(
            server.url, KEY, tmp_path / "r", sidecar_socket=socket_path, audit=events.append
        )
        result = puller.tick()
        assert result.status == "installed"  # the install stands whatever the sidecar says
        assert result.sidecar.status == status
        assert len(stub.calls) == calls
        assert stub.calls[0].path == "/bundle/reload"
        assert stub.calls[0].body["bundle_ts"] == result.bundle_ts
        assert (status == "ok") == ("sidecar_failed" not in [e.event for e in events])


def test_sidecar_missing_socket(server: BundleServer, tmp_path: Path, socket_path: Path) -> None:
    server.tenant(KEY).publish({"a": b"1"}, version="0.4.0")
    result = BundlePuller(server.url, KEY, tmp_path / "r", sidecar_socket=socket_path).tick()
    assert result.status == "installed"
    assert result.sidecar.status == "unavailable"


def test_sidecar_that_never_answers_is_bounded(socket_path: Path) -> None:
    with SidecarStub(socket_path) as stub:
        stub.reply("hang")
        started = time.monotonic()
        outcome = notify(socket_path, {"bundle_ts": "1"}, timeout=0.5)
        assert outcome.status == "timeout"
        assert time.monotonic() - started < 3
        assert len(stub.calls) == 1


def test_sidecar_stub_close_removes_socket(socket_path: Path) -> None:
    stub = SidecarStub(socket_path).start()
    assert socket_path.exists()
    stub.close()
    stub.close()
    assert not socket_path.exists()


def test_client_ssl_context_type() -> None:
    with BundleServer(tls=True) as server:
        assert isinstance(server.client_ssl_context(), ssl.SSLContext)
        assert server.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
