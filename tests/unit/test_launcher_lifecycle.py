"""Launch, identity, probes, stop, idle and crash statuses — with real daemons."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pytest_sandbox import errors
from pytest_sandbox.launcher import (
    BackendIdentity,
    BackendLauncher,
    TraceContext,
    release_backend,
)
from pytest_sandbox.runtime.identity import BOOT_ID, HOST
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.run import RunContext

KILLED = -signal.SIGKILL


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout}s: {predicate}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger.in_state_dir(tmp_path / "state")
    yield ledger
    ledger.close()


@pytest.fixture
def launcher(tmp_path: Path, ledger: Ledger) -> Iterator[BackendLauncher]:
    run = RunContext.for_controller(tmp_path / "state")
    launcher = BackendLauncher(tmp_path / "root", run=run, tracker=Tracker(ledger, run))
    yield launcher
    launcher.close()
    shutil.rmtree(run.socket_dir, ignore_errors=True)


@pytest.fixture
def httpd(launcher: BackendLauncher) -> Path:
    return launcher.install_demo_daemon()


def test_launch_unix_env_identity_and_record(launcher, httpd, ledger, monkeypatch):
    monkeypatch.setenv("TRACEPARENT", "00-11111111111111111111111111111111-2222222222222222-01")
    handle = launcher.launch(launcher.service("web", httpd, version="2.5"))
    assert handle.status == "running"
    status, body = handle.http("GET", "/")
    assert status == 200
    seen = json.loads(body)
    assert seen["pid"] == handle.pid
    assert seen["PYTEST_SANDBOX_SERVICE_NAME"] == "web"
    assert seen["PYTEST_SANDBOX_SERVICE_VERSION"] == "2.5"
    assert seen["PYTEST_SANDBOX_ENDPOINT"] == str(handle.endpoint)
    assert seen["PYTEST_SANDBOX_INSTANCE"] == handle.instance
    assert seen["PYTEST_SANDBOX_RUN_ID"] == launcher.run_id
    assert seen["PYTEST_SANDBOX_NAMESPACE"] == launcher.namespace
    # No trace context was given: the test process's TRACEPARENT does not leak through.
    assert seen["TRACEPARENT"] is None
    assert seen["TRACESTATE"] is None

    assert str(handle.endpoint).startswith("unix:")
    assert len(os.fsencode(handle.endpoint.path)) < 108
    assert handle.endpoint.path.parent == launcher.socket_dir

    ident = handle.identity
    assert ident.pid == handle.pid
    assert ident.exe == os.path.realpath(sys.executable)  # a shebang script runs its interpreter
    assert ident.exe_sha256 == hashlib.sha256(Path(ident.exe).read_bytes()).hexdigest()
    assert ident.binary == str(httpd.resolve())
    assert ident.binary_sha256 == hashlib.sha256(httpd.read_bytes()).hexdigest()
    assert ident.start_time == pytest.approx(psutil.Process(handle.pid).create_time(), abs=0.02)
    assert ident.argv == (str(httpd.resolve()),)
    assert ident.endpoint == str(handle.endpoint)
    assert ident.run_id == launcher.run_id
    assert BackendIdentity.load(handle.record_path) == ident
    assert handle.record_path.parent == launcher.record_dir
    (row,) = ledger.rows()
    assert row.kind == "backend"
    assert row.releaser == "pytest_sandbox.launcher.launcher:release_backend"
    assert BackendIdentity.from_dict(row.details["identity"]) == ident
    assert handle.verify() == ident

    assert handle.stop() == 0
    assert handle.status == "stopped"
    assert not alive(handle.pid)
    assert not handle.endpoint.path.exists()
    assert not handle.record_path.exists()
    assert ledger.rows() == []
    assert "got SIGTERM, exiting" in handle.log_path.read_text()
    assert handle.stop() == 0  # idempotent


def test_trace_context_is_forwarded(launcher, httpd):
    ctx = TraceContext.new(tracestate="vendor=abc,other=1")
    handle = launcher.launch(launcher.service("web", httpd), trace=ctx)
    seen = json.loads(handle.http("GET", "/")[1])
    assert seen["TRACEPARENT"] == ctx.traceparent
    assert seen["TRACESTATE"] == "vendor=abc,other=1"
    as_string = launcher.launch(launcher.service("web2", httpd), trace=ctx.traceparent)
    seen = json.loads(as_string.http("GET", "/")[1])
    assert seen["TRACEPARENT"] == ctx.traceparent
    assert seen["TRACESTATE"] is None


def test_tcp_endpoint_with_http_probe_and_placeholders(launcher, httpd):
    handle = launcher.launch(
        launcher.service(
            "api", httpd, endpoint="tcp", probe="http:/health", args=("--endpoint", "{endpoint}")
        )
    )
    assert handle.endpoint.kind == "tcp"
    assert handle.endpoint.port > 0
    assert handle.identity.argv[1:] == ("--endpoint", f"tcp:127.0.0.1:{handle.endpoint.port}")
    assert handle.http("GET", "/health") == (200, b"ok")
    lock = launcher.socket_dir / f"port-{handle.endpoint.port}"
    assert lock.exists()  # the port stays reserved for this run while the backend lives
    handle.stop()
    assert not lock.exists()


def _fd_targets(pid):
    """What the process's open fds point at; an fd closed while we list (the daemon's
    readiness-probe connection) is skipped."""
    targets = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except FileNotFoundError:
            continue
    return targets


def test_fds_above_2_are_not_inherited(launcher, httpd, tmp_path):
    leaked = tmp_path / "leak-me"
    fd = os.open(leaked, os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(fd, True)
    try:
        handle = launcher.launch(launcher.service("web", httpd))
        targets = _fd_targets(handle.pid)
        assert str(leaked) not in targets
        assert os.readlink(f"/proc/{handle.pid}/fd/1") == str(handle.log_path)
    finally:
        os.close(fd)


def test_native_binary_identity_is_the_binary_itself(launcher):
    sleep = launcher.install(shutil.which("sleep") or "/bin/sleep", "sleepd")
    handle = launcher.launch(launcher.service("sleepd", sleep, args=("30",), probe=None))
    assert handle.identity.exe == str(sleep.resolve())
    assert handle.identity.exe_sha256 == handle.identity.binary_sha256
    assert handle.stop() == -signal.SIGTERM
    assert handle.status == "stopped"


@pytest.mark.parametrize(
    "tamper",
    [
        {"start_time": 12345.0},
        {"exe": "/usr/bin/sleep"},
        {"exe_sha256": "0" * 64},
    ],
    ids=["start_time", "exe", "exe_sha256"],
)
def test_substituted_identity_sends_no_signal(launcher, httpd, tamper):
    handle = launcher.launch(launcher.service("web", httpd))
    real = handle.identity
    handle.identity = dataclasses.replace(real, **tamper)
    with pytest.raises(errors.BackendIdentityMismatch) as info:
        handle.verify()
    assert str(handle.pid) in str(info.value)
    with pytest.raises(errors.BackendIdentityMismatch, match="Nothing was signalled"):
        handle.stop()
    time.sleep(0.2)
    assert alive(handle.pid)
    assert "got SIG" not in handle.log_path.read_text()
    assert handle.http("GET", "/health") == (200, b"ok")
    handle.identity = real
    assert handle.stop() == 0


def _details(ledger: Ledger) -> dict:
    (row,) = ledger.rows()
    return row.details


def test_releaser_verifies_before_signalling(launcher, httpd, ledger):
    handle = launcher.launch(launcher.service("web", httpd))
    details = _details(ledger)

    wrong_start = {**details, "identity": {**details["identity"], "start_time": 1.0}}
    with pytest.raises(errors.BackendIdentityMismatch):
        release_backend(wrong_start)
    wrong_exe = {**details, "identity": {**details["identity"], "exe": "/bin/sh"}}
    with pytest.raises(errors.BackendIdentityMismatch):
        release_backend(wrong_exe)
    # A substituted JSON record in the run dir is caught even when the ledger copy is right.
    on_disk = json.loads(handle.record_path.read_text())
    handle.record_path.write_text(json.dumps({**on_disk, "pid": 1}))
    with pytest.raises(errors.BackendIdentityMismatch, match="disagrees"):
        release_backend(details)
    time.sleep(0.2)
    assert alive(handle.pid)
    assert "got SIG" not in handle.log_path.read_text()

    handle.record_path.write_text(json.dumps(on_disk))
    release_backend(details)
    assert not alive(handle.pid)
    assert "got SIGTERM" in handle.log_path.read_text()
    release_backend(details)  # already gone: success, idempotent
    assert not handle.endpoint.path.exists()
    assert handle.status == "crashed: exit code 0"  # from the handle's view it exited unasked
    handle.stop(check=False)


def test_releaser_never_touches_a_recycled_pid(tmp_path):
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        identity = {
            "service": "gone",
            "pid": stranger.pid,
            "start_time": 1.0,
            "exe": "/usr/bin/sleep",
            "exe_sha256": "0" * 64,
            "binary": "/x",
            "binary_sha256": "",
            "boot_id": BOOT_ID,
            "host": HOST,
            "argv": ["/x"],
            "endpoint": "",
            "idle_timeout": None,
            "run_id": "r",
            "instance": "i",
            "token": "feedface",
        }
        release_backend({"token": "feedface", "identity": identity})  # nothing of ours: success
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_failed_probe_kills_group_and_cleans_up(launcher, httpd, ledger):
    with pytest.raises(errors.BackendNotReady) as info:
        launcher.launch(launcher.service("mute", httpd, args=("--no-listen",), ready_timeout=0.5))
    assert "not ready after 0.5s" in str(info.value)
    assert "not listening" in info.value.log_tail
    assert ledger.rows() == []
    assert list(launcher.socket_dir.glob("be-*.sock")) == []
    assert list(launcher.record_dir.glob("*.json")) == []
    children = psutil.Process().children(recursive=True)
    zombies = [p for p in children if p.status() == psutil.STATUS_ZOMBIE]
    ours = [p for p in children if str(httpd) in " ".join(p.cmdline())]
    assert zombies == []  # stopped and reaped
    assert ours == []


def test_exit_during_probe_fails_at_once_with_code_and_log(launcher, httpd, ledger):
    start = time.monotonic()
    with pytest.raises(errors.BackendNotReady) as info:
        launcher.launch(
            launcher.service(
                "dies",
                httpd,
                ready_timeout=60,
                args=("--no-listen", "--exit-after", "0.2", "--exit-code", "3"),
            )
        )
    assert time.monotonic() - start < 30  # did not wait for the 60 s deadline
    assert info.value.returncode == 3
    assert "exited with code 3" in str(info.value)
    assert "not listening" in str(info.value)
    assert ledger.rows() == []


def test_50_mb_of_stdout_never_blocks(launcher, httpd):
    size = 50 * 1024 * 1024
    handle = launcher.launch(
        launcher.service("chatty", httpd, args=("--spew-bytes", str(size)), ready_timeout=120)
    )
    assert handle.http("GET", "/health") == (200, b"ok")
    assert handle.log_path.stat().st_size >= size
    handle.stop()


def test_sigterm_ignoring_backend_is_killed_after_grace(launcher, httpd):
    handle = launcher.launch(
        launcher.service(
            "stubborn",
            httpd,
            args=("--ignore-sigterm",),
            grace=1.0,
            expected_exit_codes=(0, KILLED),
        )
    )
    start = time.monotonic()
    assert handle.stop() == KILLED
    took = time.monotonic() - start
    assert 0.9 <= took < 10
    assert handle.status == "killed after grace"
    assert not alive(handle.pid)
    assert "got SIGTERM, ignoring it" in handle.log_path.read_text()


def test_killed_after_grace_is_an_error_unless_expected(launcher, httpd):
    handle = launcher.launch(
        launcher.service("stubborn", httpd, args=("--ignore-sigterm",), grace=0.3)
    )
    with pytest.raises(errors.BackendUnexpectedExit, match="killed after grace"):
        handle.stop()
    assert not alive(handle.pid)


def test_idle_exit_is_reported_as_idle(launcher, httpd):
    handle = launcher.launch(launcher.service("lazy", httpd, idle_timeout=0.5))
    wait_until(lambda: handle.returncode is not None)
    assert handle.status == "exited: idle"
    assert "exiting: idle" in handle.log_path.read_text()
    with pytest.raises(errors.BackendUnexpectedExit, match="no longer running: exited: idle"):
        handle.verify()
    assert handle.stop() == 0  # an idle exit is not an error


def test_crash_is_distinct_from_idle(launcher, httpd):
    handle = launcher.launch(
        launcher.service(
            "flaky", httpd, idle_timeout=30, args=("--exit-after", "0.3", "--exit-code", "3")
        )
    )
    wait_until(lambda: handle.returncode is not None)
    assert handle.status == "crashed: exit code 3"
    with pytest.raises(errors.BackendUnexpectedExit, match="crashed: exit code 3"):
        handle.stop()


def test_early_clean_exit_before_idle_timeout_is_a_crash(launcher, httpd):
    handle = launcher.launch(
        launcher.service("quitter", httpd, idle_timeout=30, args=("--exit-after", "0.2"))
    )
    wait_until(lambda: handle.returncode is not None)
    assert handle.status == "crashed: exit code 0"
    with pytest.raises(errors.BackendUnexpectedExit):
        handle.stop()
    assert handle.stop() == 0  # only the first stop() reports


def test_killed_by_signal_is_a_crash(launcher, httpd):
    handle = launcher.launch(launcher.service("victim", httpd, idle_timeout=0.2))
    os.kill(handle.pid, signal.SIGKILL)
    wait_until(lambda: handle.returncode is not None)
    assert handle.status == "crashed: signal SIGKILL"
    assert handle.stop(check=False) == KILLED


def test_close_stops_everything_and_reports_crashes(tmp_path):
    with BackendLauncher(tmp_path / "root") as launcher:
        httpd = launcher.install_demo_daemon()
        handles = [launcher.launch(launcher.service(f"s{i}", httpd)) for i in range(3)]
    assert all(not alive(h.pid) for h in handles)
    assert [h.status for h in handles] == ["stopped"] * 3
    assert not launcher.socket_dir.exists()  # private dir of a launcher without a run

    launcher = BackendLauncher(tmp_path / "root2")
    httpd = launcher.install_demo_daemon()
    ok = launcher.launch(launcher.service("ok", httpd))
    bad = launcher.launch(
        launcher.service("bad", httpd, args=("--exit-after", "0.1", "--exit-code", "7"))
    )
    wait_until(lambda: bad.returncode is not None)
    with pytest.raises(errors.BackendUnexpectedExit, match="exit code 7"):
        launcher.close()
    assert not alive(ok.pid)
    launcher.close()  # idempotent


def test_binary_swapped_between_check_and_exec_is_killed(launcher, monkeypatch):
    from pytest_sandbox.launcher import launcher as launcher_mod

    sleep = launcher.install(shutil.which("sleep") or "/bin/sleep", "sleepd")
    real_check = launcher_mod.check_binary

    def checked_other_content(service):
        # What the check saw is not what exec ran (simulates a swap in the race window).
        return dataclasses.replace(real_check(service), sha256="0" * 64)

    monkeypatch.setattr(launcher_mod, "check_binary", checked_other_content)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(errors.BackendIdentityMismatch, match="changed between"):
        launcher.launch(launcher.service("sleepd", sleep, args=("30",), probe=None))
    new = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "sleepd" in " ".join(p.cmdline())
    ]
    assert new == []
