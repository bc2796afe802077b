"""Containers vs testcontainers-python and ``docker cp`` (same engine, same local image, one run).

testcontainers' Ryuk image cannot be pulled here (no registry), so the peer runs with
TESTCONTAINERS_RYUK_DISABLED=true: its start/stop are measured without Ryuk's extra container,
which favours the peer. Crash clean-up latency (ours against Ryuk's documented default) is in
``bench_crash``.

Data snapshots: ``export_data`` / ``import_data`` against ``docker cp`` out / in, on the same
container and the same data (the issue's 1 GiB in 1,000 files; 64 MiB in 64 files with
``--quick``), alternating, repeated, medians. Each timed operation starts after ``sync`` and with
its output removed, so that none pays for the previous one's dirty pages (the engine's stop
flushes the filesystem) or for unlinking an old output. The data is random, i.e. incompressible:
the tar.gz export stores it (see docs/containers.md), the worst case for a gzip writer.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import result_row as _row
from benchmarks.peak_rss import peak_growth

LOG_CMD = ["sh", "-c", "echo ready; exec sleep 600"]


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _timed(
    action: Callable[[], object], before: Callable[[], object] | None = None
) -> tuple[float, float]:
    """Seconds until ``action`` returned, and until its data was on disk (``sync`` included).

    Both matter: ``docker cp`` returns with its writes still in the page cache, while an archive
    call on a stopped container (our import) returns only after the engine's unmount has synced
    them, so "as returned" alone compares unequal work.
    """
    if before is not None:
        before()
    os.sync()  # nobody pays for the previous step's dirty pages
    started = time.perf_counter()
    action()
    returned = time.perf_counter() - started
    os.sync()
    return returned, time.perf_counter() - started


def _start_teardown(engine: Any, image: str, state: Path, rounds: int) -> list[dict[str, Any]]:
    """Start-to-ready and teardown, one container at a time, alternating who goes first.

    Teardown is timed three ways: what a test waits for at ``sandbox_container``'s teardown
    (``close(wait=False)``: the processes killed from the host; the engine's clean-up left to the
    background and waited for, untimed, before the next step), until the engine confirmed the
    removal (``close()``), and end to end over a series of start → ready → teardown cycles with
    the background removals waited for at the end (so overlap is credited only if it is real).
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    from pytest_sandbox.containers.container import SandboxContainer

    times: dict[str, list[float]] = {}

    def timed(name: str, action: Callable[[], object]) -> Any:
        started = time.perf_counter()
        value = action()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return value

    def ours_launch() -> Any:
        container = SandboxContainer(
            engine, image, command=LOG_CMD, ready="ready", volume=False, lock_dir=state
        )
        return container.launch()

    def peer_launch() -> Any:
        container = DockerContainer(image).with_command("sh -c 'echo ready; exec sleep 600'")
        container.start()
        wait_for_logs(container, "ready", timeout=30)
        return container

    def ours() -> None:
        container = timed("ours start", ours_launch)
        timed("ours teardown", lambda: container.close(wait=False))
        engine.wait_for_removals()
        container = ours_launch()
        timed("ours teardown to gone", container.close)

    def peer() -> None:
        container = timed("peer start", peer_launch)
        timed("peer teardown", container.stop)

    for i in range(rounds):  # alternate who goes first: no order bias
        for step in (ours, peer) if i % 2 == 0 else (peer, ours):
            step()

    cycles = 10

    def ours_cycles() -> None:
        for _ in range(cycles):
            ours_launch().close(wait=False)
        engine.wait_for_removals()

    def peer_cycles() -> None:
        for _ in range(cycles):
            peer_launch().stop()

    for i in range(3 if rounds > 6 else 1):
        for name, action in (("ours", ours_cycles), ("peer", peer_cycles))[:: 1 - 2 * (i % 2)]:
            timed(f"{name} cycles", action)

    med = {name: _median(values) for name, values in times.items()}
    peer_name = "testcontainers (Ryuk off)"
    return [
        _row("container start-to-ready (log regex)", med["ours start"], med["peer start"],
             peer_name, "s", "<= 1.0x", med["ours start"] <= med["peer start"]),
        _row("container teardown (what the test waits for)", med["ours teardown"],
             med["peer teardown"], peer_name, "s", "<= 1.0x",
             med["ours teardown"] <= med["peer teardown"],
             note="processes killed from the host; the engine's clean-up in the background"),
        _row("container teardown until the engine confirmed the removal",
             med["ours teardown to gone"], med["peer teardown"], peer_name, "s", "report", True),
        _row(f"{cycles} start → ready → teardown cycles, end to end", med["ours cycles"],
             med["peer cycles"], peer_name, "s", "<= 1.0x",
             med["ours cycles"] <= med["peer cycles"],
             note="our background removals waited for at the end"),
    ]  # fmt: skip


def _docker_cp(src: object, dest: object) -> None:
    subprocess.run(["docker", "cp", str(src), str(dest)], check=True)


def _memory(container: Any, state: Path) -> float:
    """MB the process grows by while exporting the container's data dir."""
    dest = state / "mem.tar.gz"
    growth = peak_growth(container.id, dest, state, "export")["growth"]
    dest.unlink(missing_ok=True)
    return float(growth) / 1e6


def _data(engine: Any, image: str, state: Path, quick: bool) -> list[dict[str, Any]]:
    from pytest_sandbox.containers.container import SandboxContainer

    files, total_bytes = (64, 64 << 20) if quick else (1000, 1 << 30)
    rounds = 2 if quick else 3
    size = total_bytes // files
    src = state / "src"
    src.mkdir()
    block = os.urandom(size)
    for i in range(files):
        (src / f"f{i:04d}").write_bytes(block[i % 7 :] + block[: i % 7])
    mib = files * size / (1 << 20)
    formats = ["tar.gz"] if quick else ["tar.gz", "tar"]
    times: dict[str, list[float]] = {}
    c = SandboxContainer(engine, image, command=["sleep", "600"], lock_dir=state).launch()
    cp_out = state / "cp-out"
    try:
        _docker_cp(f"{src}/.", f"{c.id}:/data")

        def rm_out() -> None:
            shutil.rmtree(cp_out, ignore_errors=True)

        Step = tuple[str, Callable[[], object], Callable[[], object] | None]
        for i in range(rounds):
            for fmt in formats:
                snap = state / f"snap.{fmt}"
                exports: list[Step] = [
                    (
                        f"export {fmt}",
                        lambda s=snap: c.export_data(s),  # type: ignore[misc]
                        lambda s=snap: s.unlink(missing_ok=True),  # type: ignore[misc]
                    ),
                    ("cp out", lambda: _docker_cp(f"{c.id}:/data", cp_out), rm_out),
                ]
                imports: list[Step] = [
                    (
                        f"import {fmt}",
                        lambda s=snap: c.import_data(s, mode="merge"),  # type: ignore[misc]
                        None,
                    ),
                    ("cp in", lambda: _docker_cp(f"{src}/.", f"{c.id}:/data"), None),
                ]
                for steps in (exports, imports):  # export before import: it makes the snapshot
                    for name, action, before in steps if i % 2 == 0 else steps[::-1]:
                        returned, durable = _timed(action, before)
                        times.setdefault(name, []).append(returned)
                        times.setdefault(f"{name}, on disk", []).append(durable)
        growth = _memory(c, state)
    finally:
        c.close()
    label = f"{mib:.0f} MiB in {files} files"
    rows = []
    for fmt in formats:
        for verb, peer in (("export", "cp out"), ("import", "cp in")):
            for when, suffix in ((", on disk", " (data on disk)"), ("", " (as returned)")):
                ours_rate = mib / _median(times[f"{verb} {fmt}{when}"])
                peer_rate = mib / _median(times[f"{peer}{when}"])
                # the goal is set for 1 GiB: at the quick size the stop/restart (~0.3 s),
                # which docker cp does not do, weighs several times more
                goal = ">= 0.9x @1GiB" if quick else ">= 0.9x"
                rows.append(
                    _row(
                        f"{verb}_data ({label}, {fmt}){suffix}",
                        ours_rate,
                        peer_rate,
                        f"docker {peer}",
                        "MiB/s",
                        goal if when else "report",
                        ours_rate >= 0.9 * peer_rate if when else True,
                    )
                )
    rows.append(
        _row(
            f"export_data process growth ({label})",
            growth,
            100.0,
            "budget of issue #5",
            "MB",
            "< 100 MB",
            growth < 100.0,
        )
    )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from pytest_sandbox.containers.engine import Engine
    from pytest_sandbox.containers.images import ImageBuilder

    state = Path(tempfile.mkdtemp(prefix="psb-bench-"))
    engine = Engine()
    try:
        image = ImageBuilder(engine, state, progress=None).get("busybox")
        rows = _start_teardown(engine, image, state, 6 if quick else 12)
        rows += _data(engine, image, state, quick)
    finally:
        engine.close()
        shutil.rmtree(state, ignore_errors=True)
    return rows  # crash clean-up latency of containers: see bench_crash


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
