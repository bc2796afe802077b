"""FsWorkerPool: exact buckets, pristine resets, discards, handover, teardown (real workers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.errors import FsWorkerError, PolicyDenied
from pytest_sandbox.fsworker import EgressProxy, FsWorkerPool, SandboxPolicy
from tests.conftest import pids_alive


@pytest.fixture
def pool() -> Iterator[FsWorkerPool]:
    with FsWorkerPool(size=1) as p:
        yield p


def test_returned_worker_is_reset_and_reused(pool: FsWorkerPool) -> None:
    worker = pool.acquire()
    pid, root = worker.pid, worker.root
    worker.write("dirty/file", b"x")
    (root / "link").symlink_to("/etc")
    worker.close()
    pool.drain()
    # the bucket also holds the refill started by the first acquire: take both
    [again] = [w for w in (pool.acquire(), pool.acquire()) if w.pid == pid]
    assert again.root == root
    assert list(again.root.iterdir()) == []  # pristine: the last test's files are gone
    assert Path("/etc/passwd").exists()  # the reset removed the link, not its target
    assert pool.stats["reset"] == 1


def test_old_handle_cannot_reach_the_next_holder(pool: FsWorkerPool) -> None:
    first = pool.acquire()
    first.close()
    [second] = [w for w in (pool.acquire(), pool.acquire()) if w.pid == first.pid]
    with pytest.raises(FsWorkerError, match="not connected"):
        first.write("x", b"sneaky")
    first.close()  # a second close of the old handle does nothing to the new holder
    assert second.ping()["pid"] == second.pid


@pytest.mark.parametrize("taint", ["error", "exec", "denied"])
def test_tainted_worker_is_discarded(pool: FsWorkerPool, taint: str) -> None:
    worker = pool.acquire()
    pid = worker.pid
    if taint == "error":
        worker.request({"kind": "no-such-kind"})
    elif taint == "exec":
        worker.exec(["true"])
    else:
        with pytest.raises(PolicyDenied):
            worker.write("/etc/x", b"")
    worker.close()
    pool.drain()
    assert pids_alive([pid]) == []
    assert pool.acquire().pid != pid
    assert pool.stats["discarded"] >= 1


def test_dead_worker_is_discarded(pool: FsWorkerPool) -> None:
    worker = pool.acquire()
    pid = worker.pid
    worker._popen.kill()  # type: ignore[union-attr]
    worker._popen.wait()  # type: ignore[union-attr]
    worker.close()
    assert pool.acquire().pid != pid


def test_buckets_are_exact(pool: FsWorkerPool, tmp_path: Path) -> None:
    a = pool.acquire(policy=SandboxPolicy(deny_read=("secret",)))
    a_pid = a.pid
    a.close()
    b = pool.acquire(policy=SandboxPolicy(deny_read=("other",)))
    assert b.pid != a_pid
    b.close()
    given_root = tmp_path / "given"
    given_root.mkdir()
    c = pool.acquire(root=given_root)
    assert c.root == given_root
    assert c.pid != a_pid
    c.write("keep.txt", b"mine")
    c_pid = c.pid
    c.close()
    d = pool.acquire(root=given_root)
    assert d.pid == c_pid
    assert (given_root / "keep.txt").read_bytes() == b"mine"  # a given root is never emptied
    again = pool.acquire(policy=SandboxPolicy(deny_read=("secret",)))
    assert again.pid not in (b.pid, c_pid)
    assert again.policy == SandboxPolicy(deny_read=("secret",))


def test_proxy_buckets_are_per_proxy(pool: FsWorkerPool) -> None:
    with EgressProxy(allow=["127.0.0.1"]) as one, EgressProxy(allow=["127.0.0.1"]) as two:
        first = pool.acquire(proxy=one)
        pid = first.pid
        first.close()
        assert pool.acquire(proxy=two).pid != pid
        assert pool.acquire(proxy=one).pid == pid


def test_workers_of_a_closed_proxy_are_not_reused(pool: FsWorkerPool) -> None:
    proxy = EgressProxy(allow=["127.0.0.1"]).start()
    worker = pool.acquire(proxy=proxy)
    pid = worker.pid
    proxy.close()
    worker.close()
    pool.drain()  # discarded workers are stopped in the background
    assert pids_alive([pid]) == []


def test_prewarm_and_warm_acquire(pool: FsWorkerPool) -> None:
    pool.prewarm(wait=True)
    assert pool.idle_count() == 1
    worker = pool.acquire()
    assert pool.stats["reused"] == 1
    worker.close()


def test_keep_takes_the_worker_out_of_the_pool(pool: FsWorkerPool) -> None:
    worker = pool.acquire()
    worker.write("evidence.txt", b"look at me")
    pid, root = worker.pid, worker.root
    worker.keep()
    try:
        assert pids_alive([pid]) == []
        assert (root / "evidence.txt").read_bytes() == b"look at me"  # kept for inspection
        assert pool.acquire().pid != pid
        pool.close()
        assert root.exists()  # the pool does not own it any more
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_close_stops_idle_and_lent_workers() -> None:
    pool = FsWorkerPool(size=2)
    lent = pool.acquire()
    pool.drain()
    pids = [lent.pid, *(w.pid for ws in pool._idle.values() for w in ws)]
    roots = [lent.root]
    assert len(pids) == 3
    pool.close()
    pool.close()
    assert pids_alive(pids) == []
    assert not any(r.exists() for r in roots)
    with pytest.raises(FsWorkerError, match="closed"):
        pool.acquire()


def test_acquire_waits_for_the_refill_under_way_instead_of_spawning_beside_it() -> None:
    with FsWorkerPool(size=1, kernel="off") as pool:
        first = pool.acquire()  # empty bucket, nothing pending: spawned here, refill queued
        second = pool.acquire()  # the refill is pending: this acquire takes it
        assert second.pid != first.pid
        pool.drain()
        assert pool.stats["spawned"] == 3  # first, the refill, the top-up after the second
        assert pool.stats["reused"] == 1


def test_a_discarded_worker_is_stopped_in_the_background(pool: FsWorkerPool) -> None:
    worker = pool.acquire()
    pid = worker.pid
    worker.exec(["true"])  # tainted: discarded at close
    os.kill(pid, signal.SIGSTOP)  # it cannot answer shutdown: stopping it takes >= 1 s
    try:
        worker.close()  # returns at once: the test does not wait for the stop
        assert pids_alive([pid]) == [pid]
        pool.drain()
        assert pids_alive([pid]) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
