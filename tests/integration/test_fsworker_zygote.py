"""The pool's fork server: forked workers are the same workers, and nothing outlives the pool."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.errors import FsWorkerExited, PolicyDenied
from pytest_sandbox.fsworker import EgressProxy, FsWorkerPool, NetPolicy, SandboxPolicy
from pytest_sandbox.fsworker.client import NET_LAYER_ENV
from pytest_sandbox.fsworker.zygote import ForkedProcess
from tests.conftest import pids_alive


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    return int(data[data.rindex(b")") + 2 :].split()[1])


@pytest.fixture
def pool() -> Iterator[FsWorkerPool]:
    with FsWorkerPool(size=1, kernel="require") as p:
        yield p


def test_workers_are_forked_by_the_zygote_and_fully_confined(
    pool: FsWorkerPool, tmp_path: Path
) -> None:
    zygote = pool.zygote()
    assert zygote is not None
    assert zygote.alive
    fs = pool.acquire()
    assert isinstance(fs._popen, ForkedProcess)
    assert _ppid(fs.pid) == zygote.pid
    assert os.getpgid(fs.pid) == fs.pid  # its own session and group, as a spawned worker
    assert {"policy", "landlock"} <= fs.enforcement
    with pytest.raises(PolicyDenied):
        fs.write("/etc/x", b"")
    fs.write("a.txt", b"hello")
    raw = fs.exec(["sh", "-c", f"cat a.txt; echo pwned > {tmp_path}/out"])
    assert raw.output.startswith(b"hello")
    assert b"Permission denied" in raw.output
    assert not (tmp_path / "out").exists()
    env = fs.get_env(["PYTEST_SANDBOX_FS_POLICY", "PATH", "HOME"])
    assert env["PYTEST_SANDBOX_FS_POLICY"] == SandboxPolicy().to_json()
    assert env["PATH"] == os.environ["PATH"]
    fs.close()


def test_uid_and_netns_apply_in_the_forked_child(pool: FsWorkerPool) -> None:
    fs = pool.acquire(user=65534)
    assert isinstance(fs._popen, ForkedProcess)
    assert fs.uid == 65534
    assert fs.exec(["id", "-u"]).output == b"65534\n"
    with EgressProxy(allow=["127.0.0.1"]) as proxy:
        policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
        fs = pool.acquire(policy=policy, proxy=proxy)
        assert "landlock-net" in fs.enforcement
        fs.close()


def test_exit_before_ready_keeps_its_code(pool: FsWorkerPool, tmp_path: Path) -> None:
    with pytest.raises(FsWorkerExited) as caught:
        pool.acquire(root=tmp_path / "missing")
    assert caught.value.returncode == 2
    assert "is not a directory" in str(caught.value)


def test_a_killed_worker_is_seen_dead(pool: FsWorkerPool) -> None:
    fs = pool.acquire()
    handle = fs._popen
    assert isinstance(handle, ForkedProcess)
    assert handle.poll() is None
    os.kill(fs.pid, signal.SIGKILL)
    assert handle.wait(timeout=10) == -signal.SIGKILL
    assert not fs.alive
    fs.close()


def test_a_dead_zygote_falls_back_to_plain_spawns(pool: FsWorkerPool) -> None:
    zygote = pool.zygote()
    assert zygote is not None
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while zygote.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    fs = pool.acquire(root=None, policy=SandboxPolicy(deny_read=("x",)))  # a cold bucket
    assert not isinstance(fs._popen, ForkedProcess)
    assert fs.ping()["pid"] == fs.pid
    fs.close()


def test_closing_the_pool_stops_the_zygote_and_its_workers() -> None:
    pool = FsWorkerPool(size=2, kernel="require")
    pool.prewarm(wait=True)
    zygote = pool.zygote()
    assert zygote is not None
    assert zygote.pid is not None
    lent = pool.acquire()
    pids = [zygote.pid, lent.pid]
    pool.close()
    deadline = time.monotonic() + 10
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pids_alive(pids) == []


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_netns_fallback_in_a_forked_worker(
    pool: FsWorkerPool, monkeypatch: pytest.MonkeyPatch, user: int | None
) -> None:
    monkeypatch.setenv(NET_LAYER_ENV, "netns")
    with EgressProxy(allow=["127.0.0.1"]) as proxy:
        policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
        fs = pool.acquire(policy=policy, proxy=proxy, user=user)
        assert isinstance(fs._popen, ForkedProcess)
        assert "netns" in fs.enforcement
        denied = fs.exec(["curl", "-sS", "-w", "%{http_code}", "http://localhost:9/"])
        assert denied.output.endswith(b"403"), denied
        code = "import socket; socket.create_connection(('127.0.0.1', 9))"
        direct = fs.exec(["/usr/bin/python3", "-c", code])
        assert b"ConnectionRefusedError" in direct.output, direct
        fs.close()
        pool.drain()
    assert [r.status for r in proxy.requests] == [403]
