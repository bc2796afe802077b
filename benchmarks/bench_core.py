"""Foundation benchmarks: plugin overhead and process start-to-ready (crash clean-up latency is
in ``bench_crash``)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import result_row as row
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.processes import TrackedProcess
from pytest_sandbox.runtime.run import RunContext


def _pytest(directory: Path, *args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def plugin_overhead(quick: bool) -> list[dict[str, Any]]:
    """2,000 trivial tests with the plugin against without it, measured two ways:

    - as the issue defines it: this environment's pytest with everything installed, against
      the same with ``-p no:sandbox`` (the goal is judged on this one);
    - strictly: plugin autoload off on both sides, bare pytest against pytest with only this
      plugin, so no other plugin's start-up pads the denominator (reported beside it).
    """
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        body = "\n".join(f"def test_{i}():\n    pass\n" for i in range(2000))
        (directory / "test_many.py").write_text(body)
        env = {**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(directory / "state")}
        bare_env = {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        rounds = 3 if quick else 11
        times: dict[str, list[float]] = {}
        runs = {
            "ours": (env, ()),
            "no:sandbox": (env, ("-p", "no:sandbox")),
            "only ours": (bare_env, ("-p", "pytest_sandbox.plugin")),
            "bare": (bare_env, ()),
        }
        for _ in range(rounds):  # interleaved so drift hits every side alike
            for name, (run_env, args) in runs.items():
                times.setdefault(name, []).append(_pytest(directory, *args, env=run_env))
    med = {name: statistics.median(values) for name, values in times.items()}
    return [
        row(
            "plugin overhead, 2000 trivial tests",
            med["ours"],
            med["no:sandbox"],
            "pytest -p no:sandbox (other plugins as installed)",
            "s",
            "<= 1.05x",
            med["ours"] / med["no:sandbox"] <= 1.05,
        ),
        row(
            "plugin overhead, 2000 trivial tests, no other plugins",
            med["only ours"],
            med["bare"],
            "bare pytest (plugin autoload off)",
            "s",
            "report",
            True,
        ),
    ]


SERVER = (
    "import socket,sys,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
    "socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',int(sys.argv[1])));s.listen();time.sleep(60)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_to_ready(quick: bool) -> dict[str, Any]:
    rounds = 10 if quick else 30
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        run = RunContext.for_controller(state, state / "s")
        run.ensure_dirs()
        tracker = Tracker(Ledger.in_state_dir(state), run, "bench")
        for _ in range(rounds):
            port = _free_port()
            t0 = time.perf_counter()
            proc = TrackedProcess(
                [sys.executable, "-c", SERVER, str(port)],
                log_path=run.new_log_path("srv"),
                ready=port,
                tracker=tracker,
            )
            proc.start()
            ours.append(time.perf_counter() - t0)
            proc.stop()

            port = _free_port()
            t0 = time.perf_counter()
            popen = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
            while True:  # the hand-written loop a test would otherwise carry
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.005)
            bare.append(time.perf_counter() - t0)
            popen.kill()
            popen.wait()
    ratio = statistics.median(ours) / statistics.median(bare)
    return row(
        "sandbox_process start-to-ready, TCP server",
        statistics.median(ours),
        statistics.median(bare),
        "subprocess.Popen + port poll",
        "s",
        "<= 1.2x",
        ratio <= 1.2,
    )


def run(quick: bool) -> list[dict[str, Any]]:
    return [*plugin_overhead(quick), start_to_ready(quick)]
