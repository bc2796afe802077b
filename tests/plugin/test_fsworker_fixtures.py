"""The fs worker fixtures, black-box: teardown after pass, fail, KeyboardInterrupt, kill -9."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_sandbox.runtime.ledger import Ledger
from tests.conftest import InnerPytest, pids_alive, wait_until

pytest_plugins = ["pytester"]

RECORDING = """
import json, os
from pathlib import Path

def record(*workers):
    out = Path(os.environ["FS_RECORD"])
    old = json.loads(out.read_text()) if out.exists() else []
    old += [{"pid": w.pid, "socket": str(w.socket_path), "root": str(w.root)} for w in workers]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(old))
    tmp.rename(out)
"""


def fs_rows(state_dir: Path) -> list[object]:
    ledger = Ledger.in_state_dir(state_dir)
    try:
        return [r for r in ledger.rows() if r.kind == "fsworker"]
    finally:
        ledger.close()


def assert_all_gone(record: Path, state_dir: Path, timeout: float = 10.0) -> list[dict[str, str]]:
    workers = json.loads(record.read_text())
    assert workers
    wait_until(lambda: pids_alive([w["pid"] for w in workers]) == [], timeout)
    wait_until(lambda: not any(Path(w["socket"]).exists() for w in workers), timeout)
    wait_until(lambda: not any(Path(w["root"]).exists() for w in workers), timeout)
    wait_until(lambda: fs_rows(state_dir) == [], timeout)
    return workers


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "workers.json"
    monkeypatch.setenv("FS_RECORD", str(path))
    return path


def test_sandbox_fs_pass_and_fail(pytester: pytest.Pytester, state_dir: Path, record: Path) -> None:
    pytester.makeconftest(RECORDING)
    pytester.makepyfile(
        """
        import pytest
        from conftest import record
        from pytest_sandbox.errors import PolicyDenied

        def test_pass(sandbox_fs):
            record(sandbox_fs)
            assert "policy" in sandbox_fs.enforcement
            sandbox_fs.write("hello.txt", b"hi")
            assert (sandbox_fs.root / "hello.txt").read_bytes() == b"hi"
            with pytest.raises(PolicyDenied):
                sandbox_fs.write("/etc/nope", b"x")

        def test_fail(sandbox_fs):
            record(sandbox_fs)
            sandbox_fs.write("a.txt", b"x")
            assert False, "boom"

        @pytest.mark.sandbox(kernel="require")
        def test_required_kernel(sandbox_fs):
            record(sandbox_fs)
            assert "landlock" in sandbox_fs.enforcement
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*sandbox log: fs worker*", "*0 leaked*"])
    assert_all_gone(record, state_dir)


def test_pool_hands_out_pristine_roots(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(20))
        def test_fresh(sandbox_fs, n):
            assert list(sandbox_fs.root.iterdir()) == []
            sandbox_fs.write(f"from-{n}.txt", b"x")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=20)
    assert fs_rows(state_dir) == []


def test_factory_and_proxy(pytester: pytest.Pytester, state_dir: Path, record: Path) -> None:
    pytester.makeconftest(RECORDING)
    pytester.makepyfile(
        """
        import pytest
        from conftest import record
        from pytest_sandbox.fsworker import NetPolicy, SandboxPolicy

        @pytest.mark.parametrize("sandbox_egress_proxy", [["127.0.0.1"]], indirect=True)
        def test_proxy(sandbox_fs_factory, sandbox_egress_proxy):
            policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
            with sandbox_fs_factory(policy=policy, proxy=sandbox_egress_proxy) as fs:
                record(fs)
                assert "landlock-net" in fs.enforcement
                env = fs.get_env(["HTTPS_PROXY"])
                assert env["HTTPS_PROXY"] == sandbox_egress_proxy.url

        def test_user(sandbox_fs_factory):
            fs = sandbox_fs_factory(user=65534)
            record(fs)
            assert fs.uid == 65534
            # not closed: the session-scoped factory stops it at session end
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2)
    assert_all_gone(record, state_dir)


def test_keyboard_interrupt_in_a_test(
    pytester: pytest.Pytester, state_dir: Path, record: Path
) -> None:
    pytester.makeconftest(RECORDING)
    pytester.makepyfile(
        """
        from conftest import record

        def test_interrupted(sandbox_fs, sandbox_fs_factory):
            record(sandbox_fs, sandbox_fs_factory())
            raise KeyboardInterrupt
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert_all_gone(record, state_dir)


KILLED = """
import json, os, threading, time
from pathlib import Path

def test_killed(sandbox_fs, sandbox_fs_factory):
    busy = sandbox_fs_factory()
    # a worker inside a long exec does not notice its connection going away: only the
    # reaper (or the sweep) can stop it
    threading.Thread(target=busy.exec, args=(["sleep", "600"],), kwargs={"timeout": 600},
                     daemon=True).start()
    workers = [sandbox_fs, busy, sandbox_fs_factory()]
    out = Path(os.environ["FS_RECORD"])
    assert sandbox_fs.zygote is not None  # workers are forked by the pool's fork server
    Path(str(out) + ".zygote").write_text(str(sandbox_fs.zygote.pid))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps([
        {"pid": w.pid, "socket": str(w.socket_path), "root": str(w.root)} for w in workers
    ]))
    time.sleep(0.5)
    tmp.rename(out)
    time.sleep(600)
"""


def test_kill_9_of_pytest(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, state_dir: Path, record: Path
) -> None:
    (tmp_path / "test_killed.py").write_text(KILLED)
    inner = inner_pytest("-p", "no:xdist", "test_killed.py", env={"FS_RECORD": str(record)})
    inner.wait_for_file(record)
    workers = json.loads(record.read_text())
    assert len(pids_alive([w["pid"] for w in workers])) == 3
    os.kill(inner.proc.pid, signal.SIGKILL)  # pytest only: the workers live in their own groups
    inner.wait()
    # The guarantee: the run's reaper releases every row of the dead owner — processes
    # stopped (identity checked), sockets and fresh roots removed.
    assert_all_gone(record, state_dir, timeout=15.0)
    # and the fork server is gone too (its control socket closed with pytest)
    zygote = int(Path(str(record) + ".zygote").read_text())
    wait_until(lambda: pids_alive([zygote]) == [], 15.0)
