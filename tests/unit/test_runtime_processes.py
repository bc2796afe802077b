"""Process identity, spawn and the stop ladder, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pytest_sandbox.errors import (
    IdentityMismatch,
    ProcessExitedEarly,
    ReadinessTimeout,
    SpawnFailed,
)
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.processes import (
    TOKEN_ENV,
    TrackedProcess,
    release_process,
    spawn,
    stop_group,
)
from tests.conftest import pids_alive, wait_until

IGNORES_TERM = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def test_identity_of_self_matches() -> None:
    me = ProcessIdentity.current()
    assert me.pid == os.getpid()
    assert me.mismatch() is None
    assert ProcessIdentity.from_dict(me.to_dict()) == me


def test_recycled_pid_is_reported_and_never_signalled(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        real = ProcessIdentity.of(victim.pid)
        # A record of "the same pid" started at another time: what a recycled pid looks like.
        forged = ProcessIdentity(
            victim.pid, real.start_time - 100.0, real.exe, real.boot_id, real.host
        )
        assert "belongs to another process" in (forged.mismatch() or "")
        with pytest.raises(IdentityMismatch):
            stop_group(forged, grace=0.1)
        release_process({"identity": forged.to_dict(), "token": "nope", "grace": 0.1})
        time.sleep(0.2)
        assert victim.poll() is None, "a process with a mismatching identity was signalled"
    finally:
        victim.kill()
        victim.wait()


def test_dead_pid_is_a_mismatch() -> None:
    proc = subprocess.Popen(["true"])
    ident = ProcessIdentity.of(proc.pid) if proc.poll() is None else None
    proc.wait()
    if ident is not None:
        assert ident.mismatch() is not None


def test_spawn_puts_child_in_own_session_with_token_and_log(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    proc = spawn(
        [
            sys.executable,
            "-c",
            "import os; print(os.environ['" + TOKEN_ENV + "']); "
            "import sys; print('err', file=sys.stderr)",
        ],
        log_path=log,
        token="tok123",
    )
    assert proc.wait(10) == 0
    assert os.getsid(os.getpid()) != proc.pid  # we did not become its session
    text = log.read_text()
    assert "tok123" in text
    assert "err" in text


def test_spawn_missing_binary_is_typed(tmp_path: Path) -> None:
    with pytest.raises(SpawnFailed, match="no-such-binary"):
        spawn(["/no-such-binary"], log_path=tmp_path / "x.log")


def test_ladder_kills_term_ignoring_daemon_and_its_children(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    proc = TrackedProcess(
        [sys.executable, "-c", IGNORES_TERM], log_path=log, ready=r"child \d+", grace=0.5
    ).start()
    child_pid = int(log.read_text().split()[1])
    assert pids_alive([proc.pid, child_pid]) == [proc.pid, child_pid]
    started = time.monotonic()
    proc.stop()
    took = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL
    wait_until(lambda: not pids_alive([child_pid]), 5)
    assert took >= 0.5  # the grace was honoured before SIGKILL


def test_polite_process_stops_on_sigterm_without_waiting_grace(tmp_path: Path) -> None:
    proc = TrackedProcess(["sleep", "60"], log_path=tmp_path / "s.log", grace=5).start()
    started = time.monotonic()
    assert proc.stop() == -signal.SIGTERM
    assert time.monotonic() - started < 2.5
    proc.stop()  # idempotent


def test_exit_while_probing_fails_at_once_with_code_and_tail(tmp_path: Path) -> None:
    proc = TrackedProcess(
        ["sh", "-c", "echo boom-line; exit 3"],
        log_path=tmp_path / "e.log",
        ready=lambda: False,
        timeout=30,
    )
    started = time.monotonic()
    with pytest.raises(ProcessExitedEarly) as info:
        proc.start()
    assert time.monotonic() - started < 10
    assert info.value.returncode == 3
    assert "boom-line" in str(info.value)


def test_ready_timeout_stops_the_process(tmp_path: Path) -> None:
    proc = TrackedProcess(
        ["sleep", "60"], log_path=tmp_path / "t.log", ready="never-printed", timeout=0.3
    )
    with pytest.raises(ReadinessTimeout, match="never-printed"):
        proc.start()
    assert proc.returncode is not None


def test_release_by_token_when_leader_gone(tmp_path: Path) -> None:
    # A leader that exits at once, leaving a grandchild in its group.
    log = tmp_path / "g.log"
    popen = spawn(
        ["sh", "-c", "sleep 60 & echo $!"],
        log_path=log,
        token="tok-grandchild",
    )
    ident = ProcessIdentity.of(popen.pid) if popen.poll() is None else None
    popen.wait()
    wait_until(lambda: log.read_text().strip() != "", 5)
    orphan = int(log.read_text().split()[0])
    assert pids_alive([orphan])
    details = {"token": "tok-grandchild", "grace": 0.2}
    if ident is not None:
        details["identity"] = ident.to_dict()
    release_process(details)
    wait_until(lambda: not pids_alive([orphan]), 5)


def test_stranger_in_reused_group_is_not_touched_without_token(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ident = ProcessIdentity.of(stranger.pid)
        forged = ProcessIdentity(
            ident.pid, ident.start_time + 50, ident.exe, ident.boot_id, ident.host
        )
        release_process({"identity": forged.to_dict(), "token": "other", "grace": 0.1})
        time.sleep(0.1)
        assert psutil.pid_exists(stranger.pid)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_package_import_is_cheap() -> None:
    """Child processes import submodules: the package itself must not pull psutil or sqlite."""
    code = (
        "import sys, pytest_sandbox, pytest_sandbox.errors; "
        "print(sorted(m for m in ('psutil', 'sqlite3', 'docker', 'pytest') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
