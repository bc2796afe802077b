"""Verified backend launcher vs pytest-xprocess and mirakuru's HTTPExecutor.

All three start the same tiny HTTP daemon (``pytest_sandbox/launcher/_httpd.py`` installed as a
shebang script in a private allow root) on a loopback TCP port, in interleaved rounds:

- launch-to-ready: ours = ``BackendLauncher.launch`` with the ``http:/health`` probe, the allow-list
  checks, exe hashing, the identity record and a real ledger row included; xprocess = ``ensure``
  with a log pattern (its usual set-up); mirakuru = ``HTTPExecutor.start`` on ``/health``.
  Goal: <= 1.0x the faster peer.
- stop of a SIGTERM-ignoring daemon: ours with a 1 s grace (goal ≤ 1.1 s), mirakuru with a 1 s
  timeout (the like-for-like setting); the peers' defaults are reported beside them (mirakuru
  waits its 3600 s ``timeout``, not measured; xprocess waits its ``terminate(timeout=20)``,
  measured outside ``--quick``).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

from benchmarks.common import result_row as row
from pytest_sandbox.launcher import BackendLauncher
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.run import RunContext

XPROCESS_TERMINATE_DEFAULT = 20.0  # xprocess XProcessInfo.terminate(timeout=20)
MIRAKURU_TIMEOUT_DEFAULT = 3600.0  # mirakuru SimpleExecutor(timeout=3600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Peers:
    def __init__(self, workdir: Path, daemon: Path) -> None:
        import py  # pytest's py.path shim: xprocess wants a py.path.local root
        from xprocess import XProcess

        self.daemon = daemon
        self.xprocess = XProcess(
            types.SimpleNamespace(), py.path.local(workdir / "xprocess"), log=_Quiet()
        )

    def xprocess_start(self, name: str, extra: tuple[str, ...] = ()) -> tuple[float, int]:
        from xprocess import ProcessStarter

        port = _free_port()
        daemon = self.daemon

        class Starter(ProcessStarter):  # type: ignore[misc]
            pattern = "listening on"
            args = (str(daemon), "--endpoint", f"tcp:127.0.0.1:{port}", *extra)
            timeout = 10

        start = time.perf_counter()
        pid, _log = self.xprocess.ensure(name, Starter)
        return time.perf_counter() - start, pid

    def xprocess_stop(self, name: str, timeout: float | None = None) -> float:
        info = self.xprocess.getinfo(name)
        start = time.perf_counter()
        if timeout is None:
            info.terminate()
        else:
            info.terminate(timeout=timeout)
        return time.perf_counter() - start

    def mirakuru(self, extra: tuple[str, ...] = (), timeout: float = 3600) -> Any:
        from mirakuru import HTTPExecutor

        port = _free_port()
        return HTTPExecutor(
            [str(self.daemon), "--endpoint", f"tcp:127.0.0.1:{port}", *extra],
            url=f"http://127.0.0.1:{port}/health",
            timeout=timeout,
            stderr=subprocess.DEVNULL,
        )


class _Quiet:
    def debug(self, msg: str, *args: object) -> None:
        pass


def run(quick: bool) -> list[dict[str, Any]]:
    rounds = 5 if quick else 20
    with tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp:
        work = Path(tmp)
        run_ctx = RunContext.for_controller(work / "state")
        ledger = Ledger.in_state_dir(work / "state")
        launcher = BackendLauncher(work / "root", run=run_ctx, tracker=Tracker(ledger, run_ctx))
        try:
            daemon = launcher.install_demo_daemon()
            peers = _Peers(work, daemon)
            ours: list[float] = []
            xproc: list[float] = []
            mira: list[float] = []
            for i in range(rounds + 1):  # round 0 warms the page cache and hash cache
                start = time.perf_counter()
                handle = launcher.launch(
                    launcher.service("web", daemon, endpoint="tcp", probe="http:/health")
                )
                took = time.perf_counter() - start
                handle.stop()

                x_took, _pid = peers.xprocess_start(f"web{i}")
                peers.xprocess_stop(f"web{i}")

                executor = peers.mirakuru()
                start = time.perf_counter()
                executor.start()
                m_took = time.perf_counter() - start
                executor.stop()
                if i:
                    ours.append(took)
                    xproc.append(x_took)
                    mira.append(m_took)

            ours_ready = statistics.median(ours)
            rows = [
                row(
                    "launcher: launch-to-ready (HTTP daemon)",
                    ours_ready,
                    statistics.median(xproc),
                    "pytest-xprocess ensure (log pattern)",
                    "s",
                    "<= 1.0x",
                    ours_ready <= statistics.median(xproc),
                ),
                row(
                    "launcher: launch-to-ready (HTTP daemon)",
                    ours_ready,
                    statistics.median(mira),
                    "mirakuru HTTPExecutor.start",
                    "s",
                    "<= 1.0x",
                    ours_ready <= statistics.median(mira),
                ),
            ]

            # Stop of a daemon that ignores SIGTERM.
            stubborn = ("--ignore-sigterm",)
            handle = launcher.launch(
                launcher.service(
                    "stubborn",
                    daemon,
                    endpoint="tcp",
                    args=stubborn,
                    grace=1.0,
                    expected_exit_codes=(-9,),
                )
            )
            start = time.perf_counter()
            handle.stop()
            ours_stop = time.perf_counter() - start

            # like-for-like: a 1 s timeout (mirakuru's one timeout covers start and stop)
            executor = peers.mirakuru(stubborn, timeout=1.0)
            executor.start()
            start = time.perf_counter()
            executor.stop()
            mira_stop = time.perf_counter() - start
            rows.append(
                row(
                    "launcher: stop SIGTERM-ignoring daemon, 1 s grace",
                    ours_stop,
                    mira_stop,
                    "mirakuru stop, timeout=1",
                    "s",
                    "ours <= 1.1 s",
                    ours_stop <= 1.1,
                )
            )
            if quick:
                x_default = XPROCESS_TERMINATE_DEFAULT
                x_note = "xprocess default terminate(timeout=20); not measured under --quick"
            else:
                peers.xprocess_start("stubborn", stubborn)
                x_default = _measure_capped(lambda: peers.xprocess_stop("stubborn"), 60.0)
                x_note = "measured with xprocess defaults"
            rows.append(
                row(
                    "launcher: stop SIGTERM-ignoring daemon, peer defaults",
                    ours_stop,
                    x_default,
                    "pytest-xprocess terminate() default",
                    "s",
                    "report",
                    True,
                    note=x_note,
                )
            )
            rows.append(
                row(
                    "launcher: stop SIGTERM-ignoring daemon, peer defaults",
                    ours_stop,
                    MIRAKURU_TIMEOUT_DEFAULT,
                    "mirakuru stop() default",
                    "s",
                    "report",
                    True,
                    note="mirakuru waits its timeout (default 3600 s) before SIGKILL; not measured",
                )
            )
            return rows
        finally:
            launcher.close()
            ledger.close()


def _measure_capped(func: Any, cap: float) -> float:
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(func()), daemon=True)
    thread.start()
    thread.join(cap)
    return result[0] if result else cap


if __name__ == "__main__":
    import sys

    for found in run("--quick" in sys.argv):
        print(found)
