"""Teardown guarantees under crashes, with real processes and real signals.

Each test runs an inner pytest in its own session (so its whole group can be killed) against a
private state dir, and checks the process table and the ledger afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pytest_sandbox.runtime.ledger import Ledger
from tests.conftest import InnerPytest, pids_alive, wait_until

HOLDS_THREE = """
import os, time
from pathlib import Path

def test_holds(sandbox_process):
    pids = [sandbox_process(["sleep", "300"]).pid for _ in range(3)]
    Path(os.environ["PIDS_FILE"]).write_text(" ".join(map(str, pids)))
    time.sleep(300)
"""


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def live_rows(state_dir: Path) -> list[object]:
    ledger = Ledger.in_state_dir(state_dir)
    try:
        return list(ledger.rows())
    finally:
        ledger.close()


def reaper_of(inner: InnerPytest, state_dir: Path) -> int:
    runs = state_dir / "runs"
    wait_until(lambda: any(runs.glob("*/reaper.json")), 20)
    records = [json.loads(p.read_text()) for p in runs.glob("*/reaper.json")]
    return int(records[-1]["pid"])


@pytest.fixture
def pids_file(tmp_path: Path) -> Path:
    return tmp_path / "pids.txt"


def start_holder(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, pids_file: Path, *args: str
) -> tuple[InnerPytest, list[int]]:
    (tmp_path / "test_hold.py").write_text(HOLDS_THREE)
    inner = inner_pytest("-p", "no:xdist", "test_hold.py", *args, env={"PIDS_FILE": str(pids_file)})
    inner.wait_for_file(pids_file)
    pids = read_pids(pids_file)
    assert len(pids_alive(pids)) == 3
    return inner, pids


def test_ctrl_c_leaves_nothing(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, pids_file: Path, state_dir: Path
) -> None:
    inner, pids = start_holder(inner_pytest, tmp_path, pids_file)
    os.kill(inner.proc.pid, signal.SIGINT)
    assert inner.wait(60) == pytest.ExitCode.INTERRUPTED
    assert pids_alive(pids) == []
    assert live_rows(state_dir) == []
    # KeyboardInterrupt skips fixture teardown: the run end releases them (counted reaped).
    assert "sandbox: 3 created, 0 released, 3 reaped, 0 kept, 0 leaked" in inner.text()


@pytest.mark.parametrize("whole_group", [False, True], ids=["pytest-only", "process-group"])
def test_kill_9_reaper_cleans_within_2s(
    inner_pytest: Callable[..., InnerPytest],
    tmp_path: Path,
    pids_file: Path,
    state_dir: Path,
    whole_group: bool,
) -> None:
    inner, pids = start_holder(inner_pytest, tmp_path, pids_file)
    reaper_pid = reaper_of(inner, state_dir)
    if whole_group:
        inner.kill_group(signal.SIGKILL)
    else:
        os.kill(inner.proc.pid, signal.SIGKILL)
    took = wait_until(lambda: not pids_alive(pids), 2.0, interval=0.01)
    print(f"clean-up after kill -9 took {took * 1000:.0f} ms")
    wait_until(lambda: live_rows(state_dir) == [], 2.0)
    wait_until(lambda: not psutil.pid_exists(reaper_pid), 15)  # reaper exits after its work


def test_kill_9_of_pytest_and_reaper_swept_next_session_sparing_live_session(
    inner_pytest: Callable[..., InnerPytest],
    tmp_path: Path,
    pids_file: Path,
    state_dir: Path,
) -> None:
    victim, victim_pids = start_holder(inner_pytest, tmp_path, pids_file)
    victim_reaper = reaper_of(victim, state_dir)
    # A second session, alive, sharing the same state dir.
    other_pids_file = tmp_path / "other-pids.txt"
    (tmp_path / "test_other_hold.py").write_text(HOLDS_THREE)
    bystander = inner_pytest(
        "-p", "no:xdist", "test_other_hold.py", env={"PIDS_FILE": str(other_pids_file)}
    )
    bystander.wait_for_file(other_pids_file)
    bystander_pids = read_pids(other_pids_file)

    os.kill(victim_reaper, signal.SIGKILL)
    victim.kill_group(signal.SIGKILL)
    victim.wait()
    time.sleep(0.5)
    assert len(pids_alive(victim_pids)) == 3, "nothing should have cleaned up yet"

    (tmp_path / "test_next.py").write_text("def test_nothing(): pass\n")
    nxt = inner_pytest("-p", "no:xdist", "test_next.py")
    assert nxt.wait(60) == 0
    assert pids_alive(victim_pids) == []
    assert "sandbox: 0 created, 0 released, 3 reaped, 0 kept, 0 leaked" in nxt.text()
    assert nxt.text().count("swept from a dead run: process") == 3
    assert pids_alive(bystander_pids) == bystander_pids
    assert len(live_rows(state_dir)) == 3  # the bystander's rows

    os.kill(bystander.proc.pid, signal.SIGINT)
    bystander.wait(60)
    assert pids_alive(bystander_pids) == []


def test_pytest_timeout_thread_method_leaves_nothing(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, pids_file: Path, state_dir: Path
) -> None:
    (tmp_path / "test_hold.py").write_text(HOLDS_THREE)
    inner = inner_pytest(
        "-p",
        "no:xdist",
        "test_hold.py",
        "--timeout=3",
        "--timeout-method=thread",
        env={"PIDS_FILE": str(pids_file)},
    )
    inner.wait_for_file(pids_file)
    pids = read_pids(pids_file)
    inner.wait(60)  # os._exit from pytest-timeout's thread
    assert "Timeout" in inner.text()
    wait_until(lambda: not pids_alive(pids), 2.0)
    wait_until(lambda: live_rows(state_dir) == [], 2.0)


SHARED_TEST = """
import os, time
from pathlib import Path
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.processes import spawn
from pytest_sandbox.runtime.shared import SharedResource

LOG = Path(os.environ["SHARED_LOG"])

def note(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")

def make(run, tracker):
    tracked = tracker.track("process", "shared sleeper",
                            releaser="pytest_sandbox.runtime.processes:release_process",
                            shared=True)
    popen = spawn(["sleep", "300"], log_path=run.new_log_path("shared"), token=tracked.token)
    tracked.update(identity=ProcessIdentity.of(popen.pid).to_dict(), grace=1)
    note(f"created {popen.pid} {os.getpid()}")
    return {"pid": popen.pid}

def acquire(run, tracker):
    value = SharedResource(run, "sleeper").acquire(lambda: make(run, tracker))
    note(f"use {value['pid']} {os.getpid()}")
    return value

def wait_for(path):
    deadline = time.time() + 60
    while not Path(path).exists() and time.time() < deadline:
        time.sleep(0.05)

def test_creator(sandbox_run, _sandbox_session_tracker):
    acquire(sandbox_run, _sandbox_session_tracker)
    wait_for(os.environ["GO_FILE"])  # gets killed before this ends

def test_user(sandbox_run, _sandbox_session_tracker):
    wait_for(os.environ["CREATED_FILE"])
    value = acquire(sandbox_run, _sandbox_session_tracker)
    Path(os.environ["WAIT_FILE"]).write_text("waiting")
    wait_for(os.environ["GO_FILE"])
    os.kill(value["pid"], 0)  # still alive while we use it
"""


def test_shared_resource_once_per_run_survives_creator_released_at_end(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, state_dir: Path
) -> None:
    (tmp_path / "test_shared.py").write_text(SHARED_TEST)
    log, created_file = tmp_path / "shared.log", tmp_path / "created"
    wait_file, go_file = tmp_path / "wait", tmp_path / "go"
    inner = inner_pytest(
        "-n",
        "2",
        "test_shared.py",
        env={
            "SHARED_LOG": str(log),
            "WAIT_FILE": str(wait_file),
            "GO_FILE": str(go_file),
            "CREATED_FILE": str(created_file),
        },
    )
    wait_until(lambda: log.exists() and "created" in log.read_text(), 60)
    created_file.write_text("yes")
    inner.wait_for_file(wait_file)
    lines = [line.split() for line in log.read_text().splitlines()]
    created = [line for line in lines if line[0] == "created"]
    users = {line[2] for line in lines if line[0] == "use"}
    assert len(created) == 1, lines
    pid, creator_worker = int(created[0][1]), int(created[0][2])
    assert len(users) == 2, "both workers must use the one shared resource"
    assert {line[1] for line in lines if line[0] == "use"} == {str(pid)}

    os.kill(creator_worker, signal.SIGKILL)  # the worker that created it dies
    time.sleep(1.0)
    assert pids_alive([pid]) == [pid], "the shared resource died with its creator"
    go_file.write_text("go")
    inner.wait(60)
    assert pids_alive([pid]) == []
    assert live_rows(state_dir) == []


WORKER_CRASH_TEST = """
import os, time
from pathlib import Path

def test_victim(sandbox_process):
    p = sandbox_process(["sleep", "300"])
    Path(os.environ["VICTIM_FILE"]).write_text(f"{p.pid} {os.getpid()}")
    time.sleep(300)

def test_survivor(sandbox_process):
    p = sandbox_process(["sleep", "300"])
    Path(os.environ["SURVIVOR_FILE"]).write_text(f"{p.pid} {os.getpid()}")
    deadline = time.time() + 60
    while not Path(os.environ["GO_FILE"]).exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, 0)
"""


def test_xdist_worker_crash_is_reaped_while_the_run_goes_on(
    inner_pytest: Callable[..., InnerPytest], tmp_path: Path, state_dir: Path
) -> None:
    (tmp_path / "test_crash.py").write_text(WORKER_CRASH_TEST)
    victim_file, survivor_file, go_file = (tmp_path / n for n in ("victim", "survivor", "go"))
    inner = inner_pytest(
        "-n",
        "2",
        "test_crash.py",
        env={
            "VICTIM_FILE": str(victim_file),
            "SURVIVOR_FILE": str(survivor_file),
            "GO_FILE": str(go_file),
        },
    )
    inner.wait_for_file(victim_file)
    inner.wait_for_file(survivor_file)
    victim_pid, victim_worker = map(int, victim_file.read_text().split())
    survivor_pid, survivor_worker = map(int, survivor_file.read_text().split())
    assert victim_worker != survivor_worker
    os.kill(victim_worker, signal.SIGKILL)
    took = wait_until(lambda: not pids_alive([victim_pid]), 2.0, interval=0.01)
    print(f"worker crash clean-up took {took * 1000:.0f} ms")
    assert pids_alive([survivor_pid]) == [survivor_pid], "another worker's process was touched"
    go_file.write_text("go")
    inner.wait(60)
    assert pids_alive([survivor_pid]) == []
    assert live_rows(state_dir) == []
    assert "0 leaked" in inner.text()
