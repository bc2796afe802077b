"""Ledger, sweep, shared resources, cleanup stack and waiting, used directly."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.errors import ProcessExitedEarly, ReadinessTimeout
from pytest_sandbox.runtime.cleanup import CleanupStack
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Ledger, Tracked, Tracker, track
from pytest_sandbox.runtime.reaper import sweep_ledger
from pytest_sandbox.runtime.run import RunContext, socket_dir_problem
from pytest_sandbox.runtime.shared import SharedResource
from pytest_sandbox.runtime.waiting import HttpStatus, LogRegex, TcpPort, UnixSocket, wait_for
from tests.conftest import dead_identity

RELEASED: list[dict[str, Any]] = []


def record_release(details: dict[str, Any]) -> None:
    """A releaser used by these tests: remembers what it was asked to release."""
    RELEASED.append(dict(details))
    marker = details.get("marker")
    if marker:
        Path(marker).write_text("released")


def test_add_update_remove_and_counts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    me = ProcessIdentity.current()
    rid = ledger.add(
        "thing", "k1", run_id="r1", worker="master", owner=me, releaser="x:y", details={"a": 1}
    )
    ledger.update(rid, key="k2", b=2)
    row = ledger.get(rid)
    assert row is not None
    assert row.key == "k2"
    assert row.details == {"a": 1, "b": 2}
    assert row.owner == me
    ledger.mark_kept(rid)
    assert ledger.rows(kept=True)[0].id == rid
    assert ledger.remove(rid) is True
    assert ledger.remove(rid) is False
    assert ledger.counts("r1") == {"created": 1, "released": 1, "reaped": 0, "kept": 1, "leaked": 0}


def _writer(path: str, n: int) -> None:
    ledger = Ledger(Path(path))
    me = ProcessIdentity.current()
    for i in range(n):
        rid = ledger.add("w", f"k{i}", run_id="conc", worker="w", owner=me, releaser="x:y")
        if i % 2:
            ledger.remove(rid)


def test_concurrent_writers_from_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    Ledger(path).close()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), 50))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ledger = Ledger(path)
    assert len(ledger.rows(run_id="conc")) == 4 * 25
    assert ledger.counts("conc")["created"] == 200
    assert json.loads(json.dumps(ledger.counts("conc")))


def test_sweep_releases_only_dead_owners_and_never_the_current_run(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    releaser = f"{__name__}:record_release"
    dead = dead_identity()
    alive = ProcessIdentity.current()
    other_host = ProcessIdentity(dead.pid, dead.start_time, "", dead.boot_id, "elsewhere")
    RELEASED.clear()
    ledger.add(
        "t",
        "dead",
        run_id="old",
        worker="master",
        owner=dead,
        releaser=releaser,
        details={"name": "dead"},
    )
    ledger.add(
        "t",
        "alive",
        run_id="live",
        worker="master",
        owner=alive,
        releaser=releaser,
        details={"name": "alive"},
    )
    ledger.add(
        "t",
        "remote",
        run_id="old",
        worker="master",
        owner=other_host,
        releaser=releaser,
        details={"name": "remote"},
    )
    kept = ledger.add(
        "t",
        "kept",
        run_id="old",
        worker="master",
        owner=dead,
        releaser=releaser,
        details={"name": "kept"},
    )
    ledger.mark_kept(kept)
    ledger.add(
        "t",
        "mine",
        run_id="now",
        worker="master",
        owner=dead,
        releaser=releaser,
        details={"name": "mine"},
    )
    report = sweep_ledger(ledger, current_run_id="now")
    assert [d["name"] for d in RELEASED] == ["dead"]
    assert len(report.released) == 1
    assert {r.key for r in ledger.rows()} == {"alive", "remote", "kept", "mine"}
    assert ledger.counts("now")["reaped"] == 1
    sweep_ledger(ledger, current_run_id="now", include_kept=True)
    assert "kept" in [d["name"] for d in RELEASED]


def test_sweep_keeps_row_whose_release_fails(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.add(
        "t",
        "bad",
        run_id="old",
        worker="master",
        owner=dead_identity(),
        releaser="no.such.module:release",
    )
    report = sweep_ledger(ledger, current_run_id="now")
    assert report.failed
    assert "bad" in report.failed[0]
    assert len(ledger.rows()) == 1


def test_tracker_marks_shared_rows_as_run_owned(tmp_path: Path) -> None:
    controller = dead_identity()
    run = RunContext("run1", "gw0", tmp_path, tmp_path / "s", run_owner=controller)
    ledger = Ledger(tmp_path / "l.sqlite3")
    tracker = Tracker(ledger, run, "test_x")
    own = tracker.track("k", "a", releaser="x:y")
    shared = tracker.track("k", "b", releaser="x:y", shared=True)
    rows = {r.key: r for r in ledger.rows()}
    assert rows["a"].owner == run.me
    assert rows["a"].nodeid == "test_x"
    assert rows["b"].owner == controller
    assert rows["b"].details["shared"] is True
    assert rows["a"].details["token"] == own.token
    shared.released()
    shared.released()  # idempotent
    assert [r.key for r in ledger.rows()] == ["a"]
    untracked = track(None, "k", "c", releaser="x:y")
    untracked.update(x=1)
    untracked.released()
    assert isinstance(untracked, Tracked)


def test_socket_dir_problem_names_the_limit(tmp_path: Path) -> None:
    assert socket_dir_problem(Path("/tmp/psb")) is None
    assert "108" in (socket_dir_problem(Path("/tmp/" + "x" * 100)) or "") or "107" in (
        socket_dir_problem(Path("/tmp/" + "x" * 100)) or ""
    )


def test_shared_resource_created_once_across_threads(tmp_path: Path) -> None:
    run = RunContext.for_controller(tmp_path, tmp_path / "s")
    created: list[int] = []

    def create() -> dict[str, int]:
        time.sleep(0.05)
        created.append(1)
        return {"port": 1234}

    results = []

    def use(holder: str) -> None:
        results.append(SharedResource(run, "db").acquire(create, holder))

    threads = [threading.Thread(target=use, args=(f"gw{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == [1]
    assert results == [{"port": 1234}] * 4
    resource = SharedResource(run, "db")
    destroyed: list[object] = []
    assert resource.release(destroyed.append, "gw0") is False
    assert sorted(resource.holders()) == ["gw1", "gw2", "gw3"]
    for holder in ("gw1", "gw2"):
        resource.release(destroyed.append, holder)
    assert destroyed == []
    assert resource.release(destroyed.append, "gw3", final=True) is True
    assert destroyed == [{"port": 1234}]
    assert resource.peek() is None


def test_cleanup_stack_runs_every_step_lifo_and_groups_errors() -> None:
    order: list[str] = []
    stack = CleanupStack()
    stack.push(order.append, "first")

    def boom(msg: str) -> None:
        order.append(msg)
        raise ValueError(msg)

    stack.push(boom, "b1")
    stack.push(order.append, "middle")
    stack.push(boom, "b2")
    with pytest.raises(ExceptionGroup) as info:
        stack.close()
    assert order == ["b2", "middle", "b1", "first"]
    assert [str(e) for e in info.value.exceptions] == ["b2", "b1"]
    stack.close()  # nothing left: no error
    single = CleanupStack()
    single.push(boom, "only")
    with pytest.raises(ValueError, match="only"):
        single.close()


def test_probes_tcp_unix_http_and_log(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    wait_for(TcpPort(port), timeout=2)
    unix_path = tmp_path / "u.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix.listen()
    wait_for(UnixSocket(unix_path), timeout=2)
    log = tmp_path / "l.log"
    probe = LogRegex(log, r"ready on \d+")
    assert probe() is False  # missing file is not an error
    log.write_text("starting\nready on ")
    assert probe() is False
    with open(log, "a") as handle:
        handle.write("80\n")
    assert probe() is True  # match spanning two reads
    server.close()
    unix.close()
    with pytest.raises(ReadinessTimeout, match=str(port)):
        wait_for(HttpStatus(port), timeout=0.2)


def test_wait_for_fails_fast_when_process_exits(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    started = time.monotonic()
    with pytest.raises(ProcessExitedEarly) as info:
        wait_for(lambda: False, timeout=30, process=proc, log_tail=lambda: "tail-text")
    assert info.value.returncode == 7
    assert "tail-text" in str(info.value)
    assert time.monotonic() - started < 10


def test_wait_for_retries_transient_errors() -> None:
    calls = []

    def flaky() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError
        return True

    wait_for(flaky, timeout=5)
    assert len(calls) == 3


def test_prune_old_runs_spares_recent_and_live_runs(tmp_path: Path) -> None:
    import os

    from pytest_sandbox.runtime.reaper import prune_old_runs

    ledger = Ledger.in_state_dir(tmp_path)
    runs = tmp_path / "runs"
    for name in ("old", "recent", "old-with-kept"):
        (runs / name / "logs").mkdir(parents=True)
    long_ago = time.time() - 30 * 24 * 3600
    for name in ("old", "old-with-kept"):
        os.utime(runs / name, (long_ago, long_ago))
    rid = ledger.add(
        "t",
        "k",
        run_id="old-with-kept",
        worker="master",
        owner=ProcessIdentity.current(),
        releaser="x:y",
    )
    ledger.mark_kept(rid)
    assert prune_old_runs(ledger, tmp_path) == 1
    assert sorted(p.name for p in runs.iterdir()) == ["old-with-kept", "recent"]
