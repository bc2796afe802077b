"""Every server scenario against the puller: the expected typed refusal, no file request where
a version or a path was bad, ``current`` unchanged and complete, and recovery on the next tick."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.bundles import faults
from pytest_sandbox.bundles.manifest import Manifest
from pytest_sandbox.bundles.puller import BundlePuller, verify_tree
from pytest_sandbox.bundles.server import BundleServer
from pytest_sandbox.errors import BundleRefused

KEY = "tenant-a-key"
FILES_A = {"notes/a.md": b"alpha\n" * 50, "b.txt": b"bravo", "deep/x/y/z.json": b"{}"}
FILES_B = {"notes/a.md": b"ALPHA\n" * 50, "b.txt": b"BRAVO", "deep/x/y/z.json": b"[1]"}


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with BundleServer() as srv:
        yield srv
        srv.check()


def installed_manifest(server: BundleServer, puller: BundlePuller) -> Manifest:
    ts = puller.current_ts()
    assert ts is not None
    return server.tenant(KEY).bundles[ts].manifest


def assert_current_intact(server: BundleServer, puller: BundlePuller, ts: str) -> None:
    assert puller.current_ts() == ts
    assert verify_tree(puller.current.resolve(), server.tenant(KEY).bundles[ts].manifest) == []
    leftovers = [
        p.name for p in puller.root.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]
    assert leftovers == [], leftovers


# (scenario, params, expected refusal code, puller options, no file request expected)
MATRIX: list[tuple[str, dict[str, Any], str, dict[str, Any], bool]] = [
    ("rollback", {"version": "0.4.0"}, "rollback", {}, True),
    ("out_of_range", {}, "version_out_of_range", {}, True),
    ("out_of_range", {"version": "0.3.9"}, "version_out_of_range", {}, True),
    ("fast_forward", {}, "version_out_of_range", {}, True),
    ("frozen", {}, "expired", {}, True),
    ("expired", {}, "expired", {}, True),
    ("stale", {}, "stale", {"max_age": 3600}, True),
    ("wrong_integrity", {}, "integrity_mismatch", {}, True),
    ("size_bytes_lie", {}, "integrity_mismatch", {}, True),
    *[("unsafe_path", {"kind": k}, "unsafe_path", {}, True) for k in faults.UNSAFE_PATHS],
    *[("malformed", {"kind": k}, "manifest_invalid", {}, True) for k in faults.MALFORMED],
    ("oversized", {}, "manifest_invalid", {}, True),
    ("oversized", {"content_length": False}, "manifest_invalid", {}, True),
    ("changed_bytes", {}, "hash_mismatch", {}, False),
    ("endless_data", {}, "size_mismatch", {}, False),
    ("short_data", {}, "size_mismatch", {}, False),
    ("mix_and_match", {}, "hash_mismatch", {}, False),
    ("header_delay", {"seconds": 3.0, "on": "manifest"}, "timeout", {"gap_timeout": 0.3}, True),
    ("header_delay", {"seconds": 3.0, "on": "file"}, "timeout", {"gap_timeout": 0.3}, False),
    ("trickle", {"on": "file", "interval": 0.02}, "timeout", {"deadline": 0.6}, False),
    ("stall", {"on": "file", "after": 10}, "timeout", {"gap_timeout": 0.3}, False),
    ("stall", {"on": "manifest", "after": 5}, "timeout", {"gap_timeout": 0.3}, True),
    ("truncate", {"on": "file"}, "size_mismatch", {}, False),
    ("truncate", {"on": "manifest"}, "fetch_failed", {}, True),
    ("reset", {"on": "manifest"}, "fetch_failed", {}, True),
    ("reset", {"on": "file"}, "fetch_failed", {}, False),
    ("reset", {"on": "file", "after": 7}, "fetch_failed", {}, False),
    ("garbage", {"on": "manifest"}, "fetch_failed", {}, True),
    ("garbage", {"on": "file"}, "fetch_failed", {}, False),
    ("not_found", {"on": "manifest"}, "fetch_failed", {}, True),
    ("server_error", {"on": "file"}, "fetch_failed", {}, False),
    ("unavailable", {"on": "manifest"}, "fetch_failed", {}, True),
    ("manifest_changes", {}, "fetch_failed", {}, False),
]


def _id(case: tuple[str, dict[str, Any], str, dict[str, Any], bool]) -> str:
    extra = "-".join(f"{k}={v}" for k, v in case[1].items() if k in ("kind", "on", "version"))
    return (
        case[0]
        + (f"[{extra}]" if extra else "")
        + ("" if "content_length" not in case[1] else "-nolength")
    )


@pytest.mark.parametrize("case", MATRIX, ids=[_id(c) for c in MATRIX])
def test_scenario_is_refused_and_current_survives(
    server: BundleServer,
    tmp_path: Path,
    case: tuple[str, dict[str, Any], str, dict[str, Any], bool],
) -> None:
    name, params, code, options, no_files = case
    events: list[Any] = []
    tenant = server.tenant(KEY)
    tenant.publish(FILES_A, version="0.4.1")
    puller = BundlePuller(
        server.url,
        KEY,
        tmp_path / "root",
        audit=events.append,
        **{"gap_timeout": 2.0, "fsync": False, **options},
    )
    first = puller.tick()
    assert first.status == "installed", first.reason
    ts_a = first.bundle_ts
    assert ts_a is not None
    tenant.publish(FILES_B, version="0.4.2")
    mark = len(server.requests)

    params = dict(params)
    on = params.pop("on", None)
    server.scenario(name, on=on, **params)
    result = puller.tick()

    assert result.status == "refused", result
    assert result.code == code, result.reason
    assert isinstance(result.error, BundleRefused)
    assert events[-1].event == "refused"
    assert events[-1].code == code
    assert KEY not in repr(events)
    assert KEY not in result.reason
    assert_current_intact(server, puller, ts_a)
    file_requests = [r for r in server.requests[mark:] if r.kind == "file"]
    if no_files:
        assert file_requests == []
    if name == "unavailable":
        assert result.retry_after == 5
    if name != "manifest_changes":  # that one changes the server once, then is honest
        with pytest.raises(type(result.error)):
            puller.pull()

    # the next tick with an honest server recovers
    server.clear_scenarios()
    again = puller.tick()
    assert again.status == "installed", again.reason
    assert verify_tree(puller.current.resolve(), installed_manifest(server, puller)) == []
    assert installed_manifest(server, puller).bundle_version >= "0.4.2"


def test_rollback_replay_of_an_older_signed_manifest(server: BundleServer, tmp_path: Path) -> None:
    tenant = server.tenant(KEY)
    tenant.publish(FILES_A, version="0.4.1")
    puller = BundlePuller(server.url, KEY, tmp_path / "root")
    assert puller.tick().status == "installed"
    tenant.publish(FILES_B, version="0.4.2")
    newest = puller.tick()
    assert newest.status == "installed"
    mark = len(server.requests)
    server.scenario("rollback")  # replays the 0.4.1 manifest, genuine in every byte
    result = puller.tick()
    assert result.code == "rollback"
    assert result.version == "0.4.1"
    assert not [r for r in server.requests[mark:] if r.kind == "file"]
    assert puller.current_ts() == newest.bundle_ts
    assert puller.floor() == "0.4.2"


def test_rollback_floor_survives_a_new_puller_instance(
    server: BundleServer, tmp_path: Path
) -> None:
    tenant = server.tenant(KEY)
    tenant.publish(FILES_A, version="0.4.3")
    assert BundlePuller(server.url, KEY, tmp_path / "r").tick().status == "installed"
    tenant.publish(FILES_B, version="0.4.2")
    result = BundlePuller(server.url, KEY, tmp_path / "r").tick()
    assert result.code == "rollback"
    state = (tmp_path / "r" / "state.json").read_text()
    assert "0.4.3" in state
    assert KEY not in state


def test_one_shot_faults_fire_in_order(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish(FILES_A, version="0.4.1")
    server.queue("unavailable")
    server.queue("reset")
    puller = BundlePuller(server.url, KEY, tmp_path / "root")
    assert puller.tick().retry_after == 5
    assert puller.tick().code == "fetch_failed"
    assert puller.tick().status == "installed"
    assert [r.fault for r in server.requests[:2]] == ["unavailable", "reset"]


def test_reset_is_a_real_tcp_rst(server: BundleServer) -> None:
    import socket

    server.tenant(KEY).publish(FILES_A, version="0.4.1")
    server.scenario("reset")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/memory/bundle/manifest HTTP/1.1\r\nHost: x\r\n\r\n")

        def drain() -> None:
            while sock.recv(4096):
                pass

        with pytest.raises(ConnectionResetError):
            drain()


def test_endless_data_is_cut_at_the_declared_size(server: BundleServer, tmp_path: Path) -> None:
    tenant = server.tenant(KEY)
    tenant.publish(FILES_A, version="0.4.1")
    server.scenario("endless_data", limit=1 << 30)
    puller = BundlePuller(server.url, KEY, tmp_path / "root")
    result = puller.tick()
    assert result.code == "size_mismatch"
    # the puller stopped reading: the server did not push anywhere near its 1 GiB limit
    assert sum(r.bytes_sent for r in server.requests) < 64 << 20
    staging = [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".staging")]
    assert staging == []
    assert not os.path.lexists(puller.current)
