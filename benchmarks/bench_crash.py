"""Crash clean-up latency: from ``kill -9`` of pytest's whole process group to the last of its
resources gone, done by the run's reaper.

Two kinds of resources: tracked processes (``sandbox_process``) and Docker objects (3 containers,
a volume and a network through ``sandbox_container`` / the engine). The peer figure is
testcontainers' Ryuk, which removes a dead session's containers only after its reconnection
timeout (``RYUK_RECONNECTION_TIMEOUT``, 10 s by default). Ryuk itself cannot run on this machine
(its image cannot be pulled: no registry), so its figure is that documented default, not a
measurement, and the row says so.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import result_row as row

RYUK_RECONNECT_TIMEOUT = 10.0
RYUK = "Ryuk default reconnection timeout (documented, not runnable here)"

PROCESS_HOLDER = """
import os, time
from pathlib import Path
def test_hold(sandbox_process):
    p = sandbox_process(["sleep", "300"])
    Path(os.environ["MARKER"]).write_text(str(p.pid))
    time.sleep(300)
"""

DOCKER_HOLDER = """
import os, time
from pathlib import Path
def test_hold(sandbox_container, sandbox_docker, _sandbox_tracker, sandbox_run):
    for _ in range(3):
        sandbox_container("busybox", command=["sleep", "600"], volume=False)
    sandbox_docker.create_volume(tracker=_sandbox_tracker)
    sandbox_docker.create_network(tracker=_sandbox_tracker)
    Path(os.environ["MARKER"]).write_text(sandbox_run.run_id)
    time.sleep(600)
"""


def _hold_and_kill(
    directory: Path, source: str, marker: Path, gone: Callable[[str], bool], *extra: str
) -> float:
    """Start an inner pytest that creates resources, ``kill -9`` its group, time until gone."""
    (directory / "test_hold.py").write_text(source)
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(directory / "state")}
    env["MARKER"] = str(marker)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    inner = subprocess.Popen(
        [*argv, "test_hold.py", *extra],
        cwd=directory,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if inner.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the inner pytest never created its resources")
        time.sleep(0.01)
    handle = marker.read_text()
    time.sleep(0.3)  # let the reaper pick up the owner
    killed = time.perf_counter()
    os.killpg(inner.pid, signal.SIGKILL)
    inner.wait()
    while not gone(handle):
        if time.perf_counter() - killed > 60:
            raise RuntimeError("resources still there 60 s after kill -9")
        time.sleep(0.002)
    return time.perf_counter() - killed


def _process_gone(pid: str) -> bool:
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _median_latency(
    what: str, rounds: int, holder: str, gone: Callable[[str], bool], *extra: str
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        marker = directory / "marker"
        latencies = [_hold_and_kill(directory, holder, marker, gone, *extra) for _ in range(rounds)]
    median = statistics.median(latencies)
    return row(
        f"crash clean-up latency, {what}, median",
        median,
        RYUK_RECONNECT_TIMEOUT,
        RYUK,
        "s",
        "<= 1 s",
        median <= 1.0,
    )


def processes(quick: bool) -> dict[str, Any]:
    return _median_latency(
        "tracked process (kill -9 to gone)", 4 if quick else 10, PROCESS_HOLDER, _process_gone
    )


def containers(quick: bool) -> dict[str, Any]:
    import docker

    client = docker.from_env()

    def gone(run_id: str) -> bool:
        labels = {"label": [f"pytest-sandbox.run={run_id}"]}
        api = client.api
        return not (
            api.containers(all=True, filters=labels)
            or (api.volumes(filters=labels).get("Volumes") or [])
            or api.networks(filters=labels)
        )

    try:
        return _median_latency(
            "3 containers + volume + network",
            2 if quick else 5,
            DOCKER_HOLDER,
            gone,
            "--sandbox-docker=require",
        )
    finally:
        client.close()


def run(quick: bool) -> list[dict[str, Any]]:
    return [processes(quick), containers(quick)]
