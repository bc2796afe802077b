"""The plugin driven black-box with pytester: summary, ledger, keep, logs, settings, xdist."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import pids_alive

PIDS_TEST = """
import os, sys
def record(p):
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{p.pid}\\n")

def test_pass(sandbox_process):
    record(sandbox_process(["sleep", "60"]))

def test_fail(sandbox_process):
    p = sandbox_process(["sh", "-c", "echo child-says-hello; exec sleep 60"], ready="hello")
    record(p)
    assert False, "deliberate"
"""


def recorded(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def pids_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pids.txt"
    monkeypatch.setenv("PIDS_FILE", str(path))
    return path


@pytest.mark.parametrize("xdist", [["-p", "no:xdist"], ["-n", "2"]], ids=["no-xdist", "n2"])
def test_pass_and_fail_leave_nothing_and_summarise(
    pytester: pytest.Pytester,
    state_dir: Path,
    pids_file: Path,
    ledger_rows: Callable[[], list[object]],
    xdist: list[str],
) -> None:
    pytester.makepyfile(PIDS_TEST)
    result = pytester.runpytest_subprocess(*xdist)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*sandbox log: sh*",
            "*child-says-hello*",
            "sandbox: 2 created, 2 released, 0 reaped, 0 kept, 0 leaked",
        ]
    )
    pids = recorded(pids_file)
    assert len(pids) == 2
    assert pids_alive(pids) == []
    assert ledger_rows() == []


RUN_ID_TEST = """
import os
import pytest

@pytest.mark.parametrize("n", range(4))
def test_record_run(sandbox_run, n):
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{sandbox_run.run_id} {sandbox_run.worker_id}\\n")
"""


def test_xdist_loaded_by_module_name_with_autoload_off_still_shares_one_run(
    pytester: pytest.Pytester,
    state_dir: Path,
    pids_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `-p xdist.plugin` registers xdist under its module name, not "xdist": the workers must
    # still join the controller's run instead of each starting a run (and a reaper) of its own.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(RUN_ID_TEST)
    result = pytester.runpytest_subprocess(
        "-p", "xdist.plugin", "-p", "pytest_sandbox.plugin", "-n", "2"
    )
    result.assert_outcomes(passed=4)
    lines = pids_file.read_text().split("\n")
    runs = {line.split()[0] for line in lines if line}
    workers = {line.split()[1] for line in lines if line}
    assert len(runs) == 1, runs
    assert workers <= {"gw0", "gw1"}
    result.stdout.fnmatch_lines([f"sandbox: run {runs.pop()}, *"])


def test_report_header_names_settings_engine_landlock_reaper(
    pytester: pytest.Pytester, state_dir: Path
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--sandbox-keep=failed")
    result.stdout.fnmatch_lines(
        [
            "sandbox: run *, keep=failed docker=auto kernel=auto guest=auto reaper=on state_dir=*",
            "sandbox: engine: *; landlock ABI: *; reaper: pid *",
        ]
    )


def test_keep_failed_keeps_only_the_failed_tests_process(
    pytester: pytest.Pytester,
    state_dir: Path,
    pids_file: Path,
    ledger_rows: Callable[[], list[object]],
) -> None:
    pytester.makepyfile(PIDS_TEST)
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--sandbox-keep=failed")
    result.stdout.fnmatch_lines(
        [
            "sandbox: 2 created, 1 released, 0 reaped, 1 kept, 0 leaked",
            "*pytest-sandbox reap --kept --run *",
        ]
    )
    passed_pid, failed_pid = recorded(pids_file)
    assert pids_alive([passed_pid]) == []
    assert pids_alive([failed_pid]) == [failed_pid]
    assert len(ledger_rows()) == 1
    # The kept process survives the next session's sweep, and goes with reap --kept.
    pytester.makepyfile(test_other="def test_y(): pass")
    pytester.runpytest_subprocess("-p", "no:xdist", "test_other.py")
    assert pids_alive([failed_pid]) == [failed_pid]
    from pytest_sandbox.cli import main

    assert main(["reap", "--kept"]) == 1
    assert pids_alive([failed_pid]) == []
    assert ledger_rows() == []


def test_marker_overrides_keep(
    pytester: pytest.Pytester, state_dir: Path, ledger_rows: Callable[[], list[object]]
) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.sandbox(keep="always")
        def test_keep(sandbox_process, sandbox_settings):
            assert sandbox_settings.keep == "always"
            sandbox_process(["sleep", "60"])
    """)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.stdout.fnmatch_lines(["sandbox: 1 created, 0 released, 0 reaped, 1 kept, 0 leaked"])
    rows = ledger_rows()
    assert len(rows) == 1
    from pytest_sandbox.cli import main

    assert main(["reap", "--kept"]) == 1


def test_bad_marker_value_is_an_error(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.sandbox(keep="sometimes")
        def test_keep(sandbox_settings):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.stdout.fnmatch_lines(["*--sandbox-keep (from marker on *) = 'sometimes'*"])


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--sandbox-keep=sometimes"], {}, "--sandbox-keep (from command line) = 'sometimes'"),
        (
            [],
            {"PYTEST_SANDBOX_KEEP": "sometimes"},
            "--sandbox-keep (from environment PYTEST_SANDBOX_KEEP) = 'sometimes'",
        ),
        (
            [],
            {"PYTEST_SANDBOX_DOCKER": "maybe"},
            "--sandbox-docker (from environment PYTEST_SANDBOX_DOCKER) = 'maybe'",
        ),
        (
            ["--sandbox-socket-dir=/tmp/" + "s" * 90],
            {},
            "--sandbox-socket-dir (from command line) = '/tmp/sss*over the 107-byte limit*",
        ),
        (
            [],
            {"TMPDIR": "/tmp/" + "t" * 90},
            "--sandbox-socket-dir (from default ($TMPDIR))*over the 107-byte limit*",
        ),
        (
            [],
            {"PYTEST_SANDBOX_REAPER": "perhaps"},
            "PYTEST_SANDBOX_REAPER (from environment PYTEST_SANDBOX_REAPER) = 'perhaps'*",
        ),
    ],
)
def test_bad_settings_refused_at_startup(
    pytester: pytest.Pytester,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    for key, value in env.items():
        if key == "TMPDIR":
            os.makedirs(value, exist_ok=True)
        monkeypatch.setenv(key, value)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{expected}*"])


def test_ini_value_is_used_and_named_as_source(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makeini("[pytest]\nsandbox_keep = often\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.stderr.fnmatch_lines(["*--sandbox-keep (from ini sandbox_keep) = 'often'*"])


def test_unwritable_state_dir_refused(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("PYTEST_SANDBOX_STATE_DIR", str(blocker / "state"))
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--sandbox-state-dir (from environment PYTEST_SANDBOX_STATE_DIR) = *not writable*"]
    )


def test_no_reaper_option(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--sandbox-no-reaper")
    result.stdout.fnmatch_lines(["*reaper=off*", "*reaper: off*"])


def test_fixtures_are_documented(pytester: pytest.Pytester, state_dir: Path) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:xdist")
    result.stdout.fnmatch_lines(
        [
            "sandbox_run* [[]session scope[]]*",
            "*run this test session belongs to*",
            "sandbox_process*",
            "*Factory ``(argv*",
        ]
    )


def test_plugin_can_be_disabled(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:sandbox", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    assert "sandbox:" not in result.stdout.str()


def test_process_log_and_ready_probe_by_port(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("""
        import socket, sys
        SERVER = "import socket,time;s=socket.socket();s.bind(('127.0.0.1',0));s.listen();" \\
                 "print(s.getsockname()[1],flush=True);time.sleep(60)"
        def test_server(sandbox_process, sandbox_run):
            proc = sandbox_process([sys.executable, "-c", SERVER], ready=r"^\\d+$")
            port = int(proc.log_path.read_text().split()[0])
            assert str(proc.log_path).startswith(str(sandbox_run.log_dir))
            socket.create_connection(("127.0.0.1", port)).close()
            assert proc.identity.pid == proc.pid
    """)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1)


def test_no_process_left_after_factory_error(
    pytester: pytest.Pytester, state_dir: Path, ledger_rows: Callable[[], list[object]]
) -> None:
    pytester.makepyfile("""
        import pytest
        from pytest_sandbox.errors import ReadinessTimeout
        def test_timeout(sandbox_process):
            with pytest.raises(ReadinessTimeout):
                sandbox_process(["sleep", "61.4321"], ready="never", timeout=0.2)
    """)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox: 1 created, 1 released, 0 reaped, 0 kept, 0 leaked"])
    leftovers = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.cmdline() == ["sleep", "61.4321"]:
                leftovers.append(proc)
    assert leftovers == []
    assert ledger_rows() == []
