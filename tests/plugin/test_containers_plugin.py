"""The containers fixtures black-box: kill -9 of pytest, the next session's sweep, xdist sharing,
keep=failed. Inner pytest runs in a subprocess against a real engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pytest_sandbox.containers.engine import (
    Engine,
    labels_for,
    release_docker_object,
    sweep_lock,
)
from pytest_sandbox.runtime.identity import ProcessIdentity

pytest_plugins = ["pytester"]

INNER = """
import time
from pytest_sandbox.containers.engine import Engine

def test_hold(sandbox_container, sandbox_docker, _sandbox_tracker, sandbox_run):
    for _ in range(3):
        sandbox_container("busybox", command=["sleep", "600"], volume=False)
    sandbox_docker.create_volume(tracker=_sandbox_tracker)
    sandbox_docker.create_network(tracker=_sandbox_tracker)
    (sandbox_run.state_dir / "inner-run-id").write_text(sandbox_run.run_id)
    time.sleep(600)
"""


def _objects(engine: Engine, run_id: str) -> list[str]:
    flt = {"label": [f"pytest-sandbox.run={run_id}"]}
    api = engine.client.api
    return (
        [c["Id"] for c in api.containers(all=True, filters=flt)]
        + [v["Name"] for v in api.volumes(filters=flt).get("Volumes") or []]
        + [n["Id"] for n in api.networks(filters=flt)]
    )


def _start_inner(
    tmp_path: Path, state: Path, *extra: str, source: str = INNER
) -> subprocess.Popen[bytes]:
    (tmp_path / "test_inner.py").write_text(source)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            str(tmp_path / "test_inner.py"),
            f"--sandbox-state-dir={state}",
            "--sandbox-docker=require",
            *extra,
        ],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_objects(engine: Engine, state: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        marker = state / "inner-run-id"
        if marker.exists():
            run_id = marker.read_text()
            if len(_objects(engine, run_id)) == 5:
                return run_id
        assert proc.poll() is None, "inner pytest exited early"
        time.sleep(0.1)
    raise AssertionError("inner pytest never created its 5 objects")


@pytest.fixture
def decoys(sandbox_docker: Engine, sandbox_image: Any) -> Any:
    """An unlabelled container and a container of another, live run (owned by this process)."""
    api = sandbox_docker.client.api
    image = sandbox_image("busybox")
    plain = api.create_container(image, ["sleep", "600"], name=f"decoy-{os.getpid()}")
    live_labels = labels_for(None, token="livetoken")
    live_labels["pytest-sandbox.run"] = "a-live-run"
    live = api.create_container(image, ["sleep", "600"], labels=live_labels)
    yield [plain["Id"], live["Id"]]
    for ident in (plain["Id"], live["Id"]):
        release_docker_object({"type": "container", "id": ident})


def _kill_tree(proc: subprocess.Popen[bytes], *, reaper_too: bool) -> list[int]:
    reapers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "pytest_sandbox.runtime.reaper" in " ".join(p.info["cmdline"] or [])
        and p.ppid() in (proc.pid, 1)
    ]
    if reaper_too:
        for pid in reapers:
            ident = ProcessIdentity.of(pid)
            assert ident.mismatch() is None
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return reapers


@pytest.mark.slow
def test_kill_9_reaper_removes_everything_and_spares_decoys(
    tmp_path: Path, sandbox_docker: Engine, decoys: list[str]
) -> None:
    state = tmp_path / "state"
    proc = _start_inner(tmp_path, state)
    run_id = _wait_for_objects(sandbox_docker, state, proc)
    _kill_tree(proc, reaper_too=False)
    killed = time.monotonic()
    while _objects(sandbox_docker, run_id) and time.monotonic() - killed < 30:
        time.sleep(0.05)
    latency = time.monotonic() - killed
    assert _objects(sandbox_docker, run_id) == []
    print(f"reaper clean-up latency: {latency:.2f}s")  # goal 2 s: see benchmarks
    for ident in decoys:
        assert sandbox_docker.client.api.containers(all=True, filters={"id": ident}), ident


@pytest.mark.slow
def test_kill_9_with_reaper_killed_is_swept_by_the_next_session(
    tmp_path: Path, sandbox_docker: Engine, decoys: list[str]
) -> None:
    state = tmp_path / "state"
    proc = _start_inner(tmp_path, state)
    run_id = _wait_for_objects(sandbox_docker, state, proc)
    # Other sessions on this host sweep dead owners' objects at their start: hold their
    # sweeps off until it is shown that nothing of this run cleaned up after the kill.
    with sweep_lock():
        _kill_tree(proc, reaper_too=True)
        time.sleep(1.0)
        assert len(_objects(sandbox_docker, run_id)) == 5  # nobody cleaned up yet
    (tmp_path / "test_inner.py").write_text("def test_nothing():\n    pass\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            str(tmp_path / "test_inner.py"),
            f"--sandbox-state-dir={state}",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout.decode()
    deadline = time.monotonic() + 30  # the docker sweep runs in the new run's reaper
    while _objects(sandbox_docker, run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _objects(sandbox_docker, run_id) == []
    for ident in decoys:
        assert sandbox_docker.client.api.containers(all=True, filters={"id": ident}), ident


SHARED = """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_uses_shared(sandbox_container, sandbox_run, n):
    c = sandbox_container("busybox", command=["sleep", "600"], shared=True)
    assert c.status == "running"
    path = sandbox_run.run_dir / f"seen-{sandbox_run.worker_id}-{n}"
    path.write_text(c.id)
"""


@pytest.mark.slow
def test_xdist_shared_container_is_one_and_gone_at_run_end(
    pytester: pytest.Pytester, sandbox_docker: Engine, sandbox_image: Any
) -> None:
    sandbox_image("busybox")  # built before the inner run, so both workers find it
    state = pytester.path / "state"
    pytester.makepyfile(test_shared=SHARED)
    result = pytester.runpytest_subprocess(
        "-n", "2", f"--sandbox-state-dir={state}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)
    seen = list(state.glob("runs/*/seen-*"))
    assert len(seen) == 4
    assert {p.name.split("-")[1] for p in seen} == {"gw0", "gw1"}
    assert len({p.read_text() for p in seen}) == 1  # one container for both workers
    ident = seen[0].read_text()
    assert sandbox_docker.client.api.containers(all=True, filters={"id": ident}) == []


KEEP = """
def test_fails(sandbox_container, sandbox_run):
    c = sandbox_container("busybox", command=["sleep", "600"])
    (sandbox_run.state_dir / "kept-id").write_text(c.id)
    assert False

def test_passes(sandbox_container, sandbox_run):
    c = sandbox_container("busybox", command=["sleep", "600"])
    (sandbox_run.state_dir / "passed-id").write_text(c.id)
"""


def test_keep_failed_keeps_only_the_failed_tests_container(
    pytester: pytest.Pytester, sandbox_docker: Engine
) -> None:
    state = pytester.path / "state"
    pytester.makepyfile(test_keep=KEEP)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--sandbox-keep=failed", f"--sandbox-state-dir={state}"
    )
    result.assert_outcomes(passed=1, failed=1)
    kept = (state / "kept-id").read_text()
    passed = (state / "passed-id").read_text()
    api = sandbox_docker.client.api
    try:
        found = api.containers(all=True, filters={"id": kept})
        assert found
        assert found[0]["Names"][0].endswith("-kept")
        assert api.containers(all=True, filters={"id": passed}) == []
        result.stdout.fnmatch_lines(["*kept*pytest-sandbox reap --kept*"])
    finally:
        info = api.inspect_container(kept)
        release_docker_object({"type": "container", "id": kept})
        for mount in info.get("Mounts") or []:
            release_docker_object({"type": "volume", "name": mount["Name"]})


LOGGED = """
import time

def test_fails_after_the_app_logged(sandbox_container):
    c = sandbox_container(
        "busybox", command=["sh", "-c", "echo app-started-XYZ; echo oops-on-stderr >&2; "
        "exec sleep 600"], ready="oops-on-stderr"
    )
    c.stop(timeout=0)
    c.start(wait=False)  # a restart keeps the whole log in the file
    time.sleep(0.3)
    assert False, "the app misbehaved"

def test_passes_quietly(sandbox_container):
    sandbox_container("busybox", command=["sh", "-c", "echo quiet-ABC; exec sleep 600"])

def test_start_failure_names_the_image(sandbox_container):
    sandbox_container("busybox", command=["/no/such/binary"], init=False)

def test_exit_names_the_image(sandbox_container):
    sandbox_container("busybox", command=["false"], ready="never", timeout=5)
"""


def test_failed_test_report_carries_its_containers_log_and_image_name(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_logged=LOGGED)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", f"--sandbox-state-dir={pytester.path / 'state'}"
    )
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    section = out[out.index("test_fails_after_the_app_logged") :]
    result.stdout.fnmatch_lines(["*sandbox log: container busybox*"])
    assert section.count("app-started-XYZ") >= 2  # before and after the restart
    assert "oops-on-stderr" in section
    assert "quiet-ABC" not in out  # a passing test's log is not shown
    # the image the user named, not the id it resolved to
    result.stdout.fnmatch_lines(["*container from image 'busybox' (*) could not be started*"])
    result.stdout.fnmatch_lines(["*(image 'busybox' (*)) exited with code 1 before it was ready*"])


PULL = """
import pytest
from pytest_sandbox import errors

def test_missing_user_image(sandbox_image):
    with pytest.raises(errors.ImageUnavailable):
        sandbox_image("no-such-image-psb:progress")
"""


def test_image_progress_reaches_the_terminal_through_capture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_pull=PULL)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", f"--sandbox-state-dir={pytester.path / 'state'}"
    )
    result.assert_outcomes(passed=1)  # a passing test: its captured output is never shown...
    result.stderr.fnmatch_lines(
        ["pytest-sandbox: image no-such-image-psb:progress is not present locally; pulling it"]
    )  # ...but the progress line went past the capture


SHARED_CREATOR_DIES = """
import os, signal, time
import pytest

def _wait(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)

@pytest.mark.parametrize("role", ["creator", "user"])
def test_shared(sandbox_container, sandbox_run, role):
    d = sandbox_run.run_dir
    if role == "creator":
        c = sandbox_container("busybox", command=["sleep", "600"], shared=True)
        (d / "shared-id").write_text(c.id)
        _wait(d / "user-has-it")
        os.kill(os.getpid(), signal.SIGKILL)  # the worker that made it dies
    _wait(d / "shared-id")
    c = sandbox_container("busybox", command=["sleep", "600"], shared=True)
    assert c.id == (d / "shared-id").read_text()
    (d / "user-has-it").write_text("yes")
    time.sleep(3)  # the run's reaper reacts to a dead worker within a second
    assert c.status == "running"
    (d / "survived").write_text(c.id)
"""


@pytest.mark.slow
def test_shared_container_survives_the_death_of_the_worker_that_made_it(
    pytester: pytest.Pytester, sandbox_docker: Engine, sandbox_image: Any
) -> None:
    sandbox_image("busybox")
    state = pytester.path / "state"
    pytester.makepyfile(test_shared_dies=SHARED_CREATOR_DIES)
    result = pytester.runpytest_subprocess(
        "-n", "2", f"--sandbox-state-dir={state}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, failed=1)  # the creator's worker crashed
    result.stdout.fnmatch_lines(["*test_shared*creator*crashed*"])
    survived = list(state.glob("runs/*/survived"))
    assert len(survived) == 1
    ident = survived[0].read_text()
    # used by the other worker after its creator died, and gone at run end
    assert sandbox_docker.client.api.containers(all=True, filters={"id": ident}) == []


TEARDOWN_OVERLAPS = """
import psutil

seen = {}


def test_first(sandbox_container, sandbox_guest):
    c = sandbox_container("busybox", command=["sleep", "600"])
    seen["pid"] = c.inspect()["State"]["Pid"]
    seen["ids"] = [c.id, sandbox_guest.id]


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_second(sandbox_docker):
    # the first test's teardown stopped its container and guest, and left their removal to
    # the engine's threads
    assert _gone(seen["pid"])
    assert sandbox_docker.pending_removals == 2
    sandbox_docker.wait_for_removals()
    for ident in seen["ids"]:
        assert sandbox_docker.client.api.containers(all=True, filters={"id": ident}) == []
"""


def test_fixture_teardown_stops_the_container_and_leaves_its_removal_to_the_engine(
    pytester: pytest.Pytester, sandbox_image: Any
) -> None:
    sandbox_image("busybox")
    sandbox_image("debian-git")
    state = pytester.path / "state"
    pytester.makepyfile(test_overlap=TEARDOWN_OVERLAPS)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--sandbox-guest=container", f"--sandbox-state-dir={state}"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*sandbox: * created, * released, 0 reaped, 0 kept, 0 leaked*"])


KILLED_MID_REMOVAL = """
import os, signal


def test_first(sandbox_container, sandbox_run):
    for _ in range(3):
        sandbox_container("busybox", command=["sleep", "600"])
    (sandbox_run.state_dir / "inner-run-id").write_text(sandbox_run.run_id)


def test_second(sandbox_docker):
    assert sandbox_docker.pending_removals == 3  # handed to the engine's threads
    os.killpg(os.getpgrp(), signal.SIGKILL)  # pytest dies while they may be under way
"""


@pytest.mark.slow
def test_kill_9_while_teardown_removals_are_in_the_background_leaks_nothing(
    tmp_path: Path, sandbox_docker: Engine, sandbox_image: Any
) -> None:
    sandbox_image("busybox")
    state = tmp_path / "state"
    proc = _start_inner(tmp_path, state, source=KILLED_MID_REMOVAL)
    assert proc.wait(120) == -signal.SIGKILL
    run_id = (state / "inner-run-id").read_text()
    deadline = time.monotonic() + 30
    while _objects(sandbox_docker, run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _objects(sandbox_docker, run_id) == []  # containers and their volumes
