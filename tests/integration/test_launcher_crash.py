"""kill -9 of pytest with backends up: the run's reaper, or the sweep, stops them (verified)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pytest_sandbox.launcher import BackendIdentity
from pytest_sandbox.runtime.ledger import Ledger


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        time.sleep(0.02)


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


INNER = """
import json, os, time
from pathlib import Path


def test_three_backends(sandbox_backend):
    httpd = sandbox_backend.install_demo_daemon()
    handles = [
        sandbox_backend.launch(sandbox_backend.service("b0", httpd)),
        sandbox_backend.launch(sandbox_backend.service("b1", httpd, endpoint="tcp")),
        # one that ignores SIGTERM: the reaper must still get rid of it
        sandbox_backend.launch(sandbox_backend.service("b2", httpd, args=("--ignore-sigterm",))),
    ]
    out = Path(os.environ["LAUNCHER_OUT"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps([h.identity.to_dict() for h in handles]))
    tmp.rename(out)
    time.sleep(600)
"""


def _start(inner_pytest, tmp_path: Path, *extra: str):
    test_file = tmp_path / "test_inner_backends.py"
    test_file.write_text(INNER)
    out = tmp_path / "identities.json"
    inner = inner_pytest(str(test_file), "-q", *extra, env={"LAUNCHER_OUT": str(out)})
    inner.wait_for_file(out, timeout=60)
    identities = [BackendIdentity.from_dict(d) for d in json.loads(out.read_text())]
    assert len(pids_alive([i.pid for i in identities])) == 3
    return inner, identities


def _endpoint_files(identities: list[BackendIdentity]) -> list[Path]:
    return [Path(i.endpoint[5:]) for i in identities if i.endpoint.startswith("unix:")]


def test_kill_9_of_pytest_reaps_three_backends_within_2s(inner_pytest, tmp_path, state_dir):
    inner, identities = _start(inner_pytest, tmp_path)
    pids = [i.pid for i in identities]
    inner.kill_group(signal.SIGKILL)
    inner.wait()
    # The guarantee: the run's reaper notices the owner's death and stops every backend.
    wait_until(lambda: not pids_alive(pids), timeout=2.0)
    wait_until(lambda: not any(p.exists() for p in _endpoint_files(identities)), timeout=5.0)
    ledger = Ledger.in_state_dir(state_dir)
    try:
        wait_until(lambda: not [r for r in ledger.rows() if r.kind == "backend"], timeout=5.0)
    finally:
        ledger.close()


def test_sweep_after_kill_9_is_identity_checked(inner_pytest, tmp_path, state_dir):
    inner, identities = _start(inner_pytest, tmp_path, "--sandbox-no-reaper")
    pids = [i.pid for i in identities]
    inner.kill_group(signal.SIGKILL)
    inner.wait()
    time.sleep(0.5)
    assert len(pids_alive(pids)) == 3  # no reaper: they outlive pytest until the sweep

    # Substitute one backend's record (ledger copy and JSON file): start time off by 10 s.
    ledger = Ledger.in_state_dir(state_dir)
    try:
        rows = [r for r in ledger.rows() if r.kind == "backend"]
        assert len(rows) == 3
        victim = next(r for r in rows if r.details["identity"]["service"] == "b0")
        forged = {
            **victim.details["identity"],
            "start_time": victim.details["identity"]["start_time"] - 10,
        }
        ledger.update(victim.id, identity=forged)
        Path(victim.details["record_path"]).write_text(json.dumps(forged))
        protected = forged["pid"]

        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pytest_sandbox.cli import main; sys.exit(main(sys.argv[1:]))",
                "reap",
            ],
            env={**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(state_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result
        others = [p for p in pids if p != protected]
        wait_until(lambda: not pids_alive(others), timeout=5.0)
        # The forged record names a live process that is not what it says: no signal, an error.
        assert pids_alive([protected]) == [protected]
        log = Path(victim.details["log_path"]).read_text()
        assert "got SIG" not in log
        assert "failed" in result.stderr
        assert "start" in result.stderr or "another process" in result.stderr
        assert [r.id for r in ledger.rows() if r.kind == "backend"] == [victim.id]
    finally:
        for pid in pids_alive([i.pid for i in identities]):
            os.killpg(pid, signal.SIGKILL)  # our own backend, known by this test
        for row in ledger.rows():
            ledger.remove(row.id)
        ledger.close()
