"""The sandbox_backend fixture, black-box: teardown, logs on failure, keep, and -n 4."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from pytest_sandbox.runtime.ledger import Ledger

pytest_plugins = ["pytester"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rows(state_dir: Path) -> list:
    ledger = Ledger.in_state_dir(state_dir)
    try:
        return [r for r in ledger.rows() if r.kind == "backend"]
    finally:
        ledger.close()


def test_backend_is_stopped_at_teardown(pytester, state_dir, tmp_path):
    out = tmp_path / "pids.json"
    pytester.makepyfile(
        f"""
        import json
        from pytest_sandbox.errors import BinaryOutsideRoot, LaunchRefused
        from pytest_sandbox.launcher import ServiceDefinition, TraceContext

        def test_launch(sandbox_backend, sandbox_run):
            httpd = sandbox_backend.install_demo_daemon()
            ctx = TraceContext.new()
            h = sandbox_backend.launch(sandbox_backend.service("web", httpd), trace=ctx)
            seen = json.loads(h.http("GET", "/")[1])
            assert seen["TRACEPARENT"] == ctx.traceparent
            assert seen["PYTEST_SANDBOX_RUN_ID"] == sandbox_run.run_id
            assert h.log_path.parent == sandbox_run.log_dir
            open({str(out)!r}, "w").write(json.dumps([h.pid, str(h.endpoint.path)]))

        def test_refusal_is_typed(sandbox_backend):
            import pytest
            with pytest.raises(LaunchRefused) as info:
                sandbox_backend.launch(
                    ServiceDefinition("x", "1", "/bin/true", sandbox_backend.allow_root))
            assert type(info.value) is BinaryOutsideRoot
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    pid, sock = json.loads(out.read_text())
    assert not _alive(pid)
    assert not Path(sock).exists()
    assert _rows(state_dir) == []
    result.stdout.fnmatch_lines(["*sandbox: 1 created, 1 released, 0 reaped*"])


def test_log_is_attached_to_a_failing_test(pytester, state_dir):
    pytester.makepyfile(
        """
        def test_fails(sandbox_backend):
            httpd = sandbox_backend.install_demo_daemon()
            h = sandbox_backend.launch(sandbox_backend.service("web", httpd))
            h.http("GET", "/health")
            assert False, "boom"
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*sandbox log: backend web log*", "*listening on unix:*"])
    assert _rows(state_dir) == []


def test_crashed_backend_errors_the_test_with_its_log(pytester, state_dir):
    pytester.makepyfile(
        """
        import time

        def test_crash(sandbox_backend):
            httpd = sandbox_backend.install_demo_daemon()
            h = sandbox_backend.launch(sandbox_backend.service(
                "flaky", httpd, args=("--exit-after", "0.1", "--exit-code", "9")))
            while h.returncode is None:
                time.sleep(0.02)
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*BackendUnexpectedExit*crashed: exit code 9*"])
    result.stdout.fnmatch_lines(["*exiting with code 9*"])


def test_keep_always_leaves_backend_running_and_marked(pytester, state_dir, tmp_path):
    out = tmp_path / "pid"
    pytester.makepyfile(
        f"""
        def test_keep(sandbox_backend):
            httpd = sandbox_backend.install_demo_daemon()
            h = sandbox_backend.launch(sandbox_backend.service("web", httpd))
            open({str(out)!r}, "w").write(str(h.pid))
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-keep=always")
    result.assert_outcomes(passed=1)
    pid = int(out.read_text())
    try:
        assert _alive(pid)
        (row,) = _rows(state_dir)
        assert row.kept
        assert row.details["identity"]["pid"] == pid
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        ledger = Ledger.in_state_dir(state_dir)
        for r in ledger.rows():
            ledger.remove(r.id)
        ledger.close()


XDIST_INNER = """
import json, os, time
from pathlib import Path

import pytest

OUT = Path(os.environ["LAUNCHER_OUT"])


def _barrier(worker):
    (OUT / f"arrived-{worker}").touch()
    deadline = time.monotonic() + 60
    while len(list(OUT.glob("arrived-*"))) < 4:
        assert time.monotonic() < deadline, "four workers never ran at once"
        time.sleep(0.01)


@pytest.mark.parametrize("i", range(8))
def test_launch(sandbox_backend, sandbox_run, i):
    httpd = sandbox_backend.install_demo_daemon()
    _barrier(sandbox_run.worker_id)
    h = sandbox_backend.launch(
        sandbox_backend.service(f"svc{i}", httpd, endpoint="tcp" if i % 2 else "unix")
    )
    seen = json.loads(h.http("GET", "/")[1])
    # The backend this test talks to is its own (instance, pid), launched by this worker.
    assert seen["PYTEST_SANDBOX_INSTANCE"] == h.instance
    assert seen["pid"] == h.pid
    time.sleep(0.2)
    assert json.loads(h.http("GET", "/")[1])["PYTEST_SANDBOX_INSTANCE"] == h.instance
    (OUT / f"result-{i}.json").write_text(json.dumps({
        "worker": sandbox_run.worker_id,
        "endpoint": str(h.endpoint),
        "pid": h.pid,
        "namespace": seen["PYTEST_SANDBOX_NAMESPACE"],
        "run_id": seen["PYTEST_SANDBOX_RUN_ID"],
        "allow_root": str(sandbox_backend.allow_root),
    }))
"""


def test_four_xdist_workers_launch_concurrently(pytester, state_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pytester.makepyfile(test_xdist_backends=XDIST_INNER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAUNCHER_OUT", str(out))
        result = pytester.runpytest_subprocess("-n", "4")
    result.assert_outcomes(passed=8)
    results = [json.loads(p.read_text()) for p in out.glob("result-*.json")]
    assert len(results) == 8
    assert {r["worker"] for r in results} == {"gw0", "gw1", "gw2", "gw3"}
    assert len({r["endpoint"] for r in results}) == 8
    assert len({r["pid"] for r in results}) == 8
    assert len({r["allow_root"] for r in results}) == 8
    assert len({r["run_id"] for r in results}) == 1
    for r in results:
        assert r["namespace"] == f"{r['run_id']}.{r['worker']}"
    assert all(not _alive(r["pid"]) for r in results)
    assert _rows(state_dir) == []
