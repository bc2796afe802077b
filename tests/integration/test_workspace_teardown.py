"""Teardown of guests, the sshd and staging dirs after a pass, a failure and ``kill -9``.

An inner pytest (own session, private state dir) prepares a workspace on the chosen backend and
writes down what it made; the outer test checks that all of it is gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.runtime.ledger import Ledger
from tests.conftest import InnerPytest, pids_alive, wait_until

INNER = r"""
import json, os, subprocess, time
from pathlib import Path


def git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def test_workspace(request, sandbox_guest, sandbox_workspace, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "f.txt").write_text("f\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    ws = sandbox_workspace(repo)
    record = {"kind": sandbox_guest.kind, "guest_path": ws.guest_path}
    if sandbox_guest.kind == "local":
        record["root"] = str(sandbox_guest.root)
    elif sandbox_guest.kind == "ssh":
        host = request.getfixturevalue("sandbox_ssh_host")
        record.update(scratch=sandbox_guest.scratch, sshd_pid=host.pid, sshd_dir=str(host.dir),
                      master_pid=sandbox_guest._master.pid)
    else:
        record["container"] = sandbox_guest.id
    Path(os.environ["RECORD"]).write_text(json.dumps(record))
    if os.environ["MODE"] == "hang":
        time.sleep(300)
    assert os.environ["MODE"] == "pass"
"""

BACKENDS = ["local", "ssh", "container"]


def container_exists(container_id: str) -> bool:
    import docker

    client = docker.from_env()
    try:
        client.api.inspect_container(container_id)
        return True
    except docker.errors.NotFound:
        return False
    finally:
        client.close()


def carrying(token: str) -> list[int]:
    """Live processes whose environment carries a guest's token (its commands)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PYTEST_SANDBOX_RESOURCE") == token:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def leftovers(record: dict[str, Any], state_dir: Path) -> list[str]:
    found = []
    if "root" in record and Path(record["root"]).exists():
        found.append(f"local guest dir {record['root']}")
    if "token" in record:
        found += [f"guest command pid {pid}" for pid in carrying(record["token"])]
    if "sshd_pid" in record:
        if pids_alive([record["sshd_pid"], record["master_pid"]]):
            found.append(f"sshd/master {pids_alive([record['sshd_pid'], record['master_pid']])}")
        for key in ("sshd_dir", "scratch"):
            if Path(record[key]).exists():
                found.append(f"{key} {record[key]}")
    if "container" in record and container_exists(record["container"]):
        found.append(f"container {record['container']}")
    found += [str(p) for p in state_dir.glob("runs/*/workspace-staging/psb-ws-*")]
    found += [str(p) for p in state_dir.glob("runs/*/guests/psb-guest-*")]
    ledger = Ledger.in_state_dir(state_dir)
    try:
        found += [row.describe() for row in ledger.rows()]
    finally:
        ledger.close()
    return found


def wait_clean(record: dict[str, Any], state_dir: Path, timeout: float = 30) -> None:
    """Wait until nothing of ``record`` is left; a failure names what is."""
    try:
        wait_until(lambda: leftovers(record, state_dir) == [], timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"left behind after {timeout} s: {leftovers(record, state_dir)}"
        ) from None


def start_inner(
    inner_pytest: Callable[..., InnerPytest],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    source: str,
    *options: str,
    **env: str,
) -> tuple[InnerPytest, Path]:
    """Run ``source`` as an inner pytest on ``backend``; return it and its record file."""
    if backend == "container":
        request.getfixturevalue("sandbox_image")("debian-git")  # built (or skipped) out here
    (tmp_path / "test_inner.py").write_text(source)
    record_path = tmp_path / "record.json"
    inner = inner_pytest(
        "-p", "no:xdist", "test_inner.py", f"--sandbox-guest={backend}", *options,
        env={"RECORD": str(record_path), **env},
    )  # fmt: skip
    return inner, record_path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["pass", "fail", "kill-9"])
def test_nothing_is_left(
    inner_pytest: Callable[..., InnerPytest],
    tmp_path: Path,
    state_dir: Path,
    backend: str,
    mode: str,
    request: pytest.FixtureRequest,
) -> None:
    inner, record_path = start_inner(
        inner_pytest, request, tmp_path, backend, INNER,
        MODE="hang" if mode == "kill-9" else mode,
    )  # fmt: skip
    if mode == "kill-9":
        inner.wait_for_file(record_path, timeout=120)
        os.kill(inner.proc.pid, signal.SIGKILL)
        inner.wait(60)
    else:
        code = inner.wait(180)
        assert code == (0 if mode == "pass" else 1), inner.text()
    record = json.loads(record_path.read_text())
    assert record["kind"] == backend
    wait_clean(record, state_dir)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_without_reaper_is_swept_by_the_next_session(
    inner_pytest: Callable[..., InnerPytest],
    tmp_path: Path,
    state_dir: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    inner, record_path = start_inner(
        inner_pytest, request, tmp_path, backend, INNER, "--sandbox-no-reaper", MODE="hang"
    )
    inner.wait_for_file(record_path, timeout=120)
    inner.kill_group(signal.SIGKILL)  # pytest and everything in its session
    inner.wait(60)
    record = json.loads(record_path.read_text())
    assert leftovers(record, state_dir) != []  # nobody cleaned up yet: the check can fail
    (tmp_path / "test_next.py").write_text("def test_nothing():\n    pass\n")
    nxt = inner_pytest("-p", "no:xdist", "test_next.py")
    assert nxt.wait(120) == 0, nxt.text()
    wait_clean(record, state_dir)


MID_PREPARE = r"""
import json, os, subprocess, time
from pathlib import Path

from pytest_sandbox.workspace.workspace import prepare_workspace


def git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def test_killed_mid_prepare(request, sandbox_run, sandbox_guest, _sandbox_tracker, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "big.bin").write_bytes(os.urandom(4 << 20))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (repo / "big.bin").write_bytes(os.urandom(4 << 20))  # dirty: sent in the tar as well
    staging = sandbox_run.run_dir / "workspace-staging"
    sent = [0]

    def progress(n):
        sent[0] += n
        if sent[0] > (5 << 20):  # past the dirty 4 MiB file: the pack is in flight
            record = {"kind": sandbox_guest.kind, "staging": [str(p) for p in staging.iterdir()]}
            if sandbox_guest.kind == "local":
                record.update(root=str(sandbox_guest.root), token=sandbox_guest._tracked.token)
            elif sandbox_guest.kind == "ssh":
                host = request.getfixturevalue("sandbox_ssh_host")
                record.update(scratch=sandbox_guest.scratch, sshd_pid=host.pid,
                              sshd_dir=str(host.dir), master_pid=sandbox_guest._master.pid)
            else:
                record["container"] = sandbox_guest.id
            Path(os.environ["RECORD"]).write_text(json.dumps(record))
            time.sleep(300)

    prepare_workspace(repo, sandbox_guest, tracker=_sandbox_tracker, staging_dir=staging,
                      progress=progress)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_in_the_middle_of_a_prepare_leaves_no_pack(
    inner_pytest: Callable[..., InnerPytest],
    tmp_path: Path,
    state_dir: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    inner, record_path = start_inner(inner_pytest, request, tmp_path, backend, MID_PREPARE)
    inner.wait_for_file(record_path, timeout=120)
    record = json.loads(record_path.read_text())
    assert len(record["staging"]) == 1  # the host pack exists while the stream is in flight
    assert list(Path(record["staging"][0]).glob("pack-*.pack"))
    os.kill(inner.proc.pid, signal.SIGKILL)
    inner.wait(60)
    wait_clean(record, state_dir)
    assert not Path(record["staging"][0]).exists()
