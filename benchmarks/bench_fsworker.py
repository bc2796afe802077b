"""fs worker benchmarks: cold start, warm acquire, round trips, a 200-test suite under xdist.

The suite benchmark runs 200 generated tests, each a typical ``sandbox_fs`` user's test (the
kind an agent-tool suite has): write five small Python modules and a script, ``glob``,
``read`` one back, ``grep`` them, ``edit`` one, then ``exec`` one short command and check
its output. ``exec`` taints the worker, so every test's worker is discarded and the pool must
refill in the background. Two commands are measured: running the written script with the
test's own interpreter (``sys.executable src/main.py``: the headline row) and a shell
pipeline (``sh -c "cat src/*.py | grep -c return"``: the lightest real command, reported
beside it). Same suite, ``-n 0`` then ``-n 2``, interleaved, medians. No sleeps anywhere.
A full run also times the same tests without any sandbox (``tmp_path`` and ``subprocess``):
the ratio xdist reaches for this workload on this machine when isolation costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import result_row as row
from pytest_sandbox.fsworker import FsWorker, FsWorkerPool
from pytest_sandbox.fsworker.client import BOOT
from pytest_sandbox.fsworker.policy import POLICY_ENV


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.95))]


def cold_start(quick: bool) -> dict[str, Any]:
    """Spawn → ``ready`` of the real worker (Landlock applied) vs a bare interpreter start."""
    rounds = 10 if quick else 30
    ours, bare = [], []
    with tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp:
        env = {"PATH": os.environ.get("PATH", ""), POLICY_ENV: "{}"}
        for i in range(rounds):  # interleaved so machine load hits both alike
            sock = Path(tmp) / f"w{i}.sock"
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", BOOT, "--socket", str(sock), "--root", tmp],
                stdout=subprocess.PIPE, env=env, start_new_session=True,
            )  # fmt: skip
            assert proc.stdout is not None
            line = proc.stdout.readline()
            ours.append(time.perf_counter() - start)
            assert line == b"ready\n", line
            proc.kill()
            proc.wait()
            proc.stdout.close()
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - start)
    ours_ms, bare_ms = statistics.median(ours) * 1000, statistics.median(bare) * 1000
    ratio = ours_ms / bare_ms
    return row("fs worker cold spawn-to-ready (median)", ours_ms, bare_ms,
               "python -c pass", "ms", "<= 1.5x", ratio <= 1.5)  # fmt: skip


def pooled_spawn(quick: bool) -> dict[str, Any]:
    """Spawn → ``ready`` of a worker forked by the pool's fork server vs a bare interpreter."""
    from pytest_sandbox.fsworker.zygote import Zygote

    rounds = 10 if quick else 30
    ours, bare = [], []
    with (
        tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp,
        Zygote(log_path=Path(tmp) / "zygote.log") as zygote,
    ):
        env = {"PATH": os.environ.get("PATH", ""), POLICY_ENV: "{}"}
        for i in range(rounds):
            sock = Path(tmp) / f"z{i}.sock"
            start = time.perf_counter()
            handle = zygote.spawn(["--socket", str(sock), "--root", tmp], env=env,
                                  log_path=Path(tmp) / "w.log", token=None)  # fmt: skip
            assert handle.stdout is not None
            line = handle.stdout.readline()
            ours.append(time.perf_counter() - start)
            assert line == b"ready\n", line
            handle.kill()
            handle.wait(timeout=10)
            handle.close()
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - start)
    ours_ms, bare_ms = statistics.median(ours) * 1000, statistics.median(bare) * 1000
    return row("fs worker pooled spawn-to-ready, fork server (median)", ours_ms, bare_ms,
               "python -c pass", "ms", "<= 1.5x", ours_ms / bare_ms <= 1.5)  # fmt: skip


def warm_acquire(quick: bool) -> list[dict[str, Any]]:
    rounds = 200 if quick else 1000
    acquire: list[float] = []
    with FsWorkerPool(size=2) as pool:
        pool.prewarm(wait=True)
        for _ in range(rounds):
            start = time.perf_counter()
            worker = pool.acquire()
            acquire.append(time.perf_counter() - start)
            worker.write("f.txt", b"x")
            worker.close()
    mkdirs: list[float] = []
    base = Path(tempfile.mkdtemp(prefix="psb-bench-"))
    try:
        for i in range(rounds):
            start = time.perf_counter()
            (base / f"test_{i}0").mkdir()  # what tmp_path does for one test
            mkdirs.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(base)
    ours, peer = p95(acquire) * 1000, p95(mkdirs) * 1000
    return [row("fs pool warm acquire (p95)", ours, peer, "tmp_path-style mkdir (p95)", "ms",
                "p95 <= 5 ms", ours <= 5.0)]  # fmt: skip


def _echo_server(path: str) -> subprocess.Popen[bytes]:
    code = (
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept()\n"
        "def exact(n):\n"
        "    b = b''\n"
        "    while len(b) < n:\n"
        "        d = c.recv(n - len(b))\n"
        "        if not d: sys.exit(0)\n"
        "        b += d\n"
        "    return b\n"
        "while True:\n"
        "    h = exact(4); c.sendall(h + exact(struct.unpack('>I', h)[0]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


def round_trips(quick: bool) -> dict[str, Any]:
    n = 2000 if quick else 10000
    with FsWorker() as fs:
        fs.ping()
        start = time.perf_counter()
        for _ in range(n):
            fs.request({"kind": "ping"})
        ours = n / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp:
        path = os.path.join(tmp, "echo.sock")
        server = _echo_server(path)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                sock.settimeout(60.0)  # a client needs a deadline too, as ours has
                start = time.perf_counter()
                for _ in range(n):  # the plainest client: encode, send, read back, decode
                    body = json.dumps({"kind": "ping"}).encode()
                    sock.sendall(struct.pack(">I", len(body)) + body)
                    data = sock.recv(65536)
                    while len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                        data += sock.recv(65536)
                    json.loads(data[4:])
                peer = n / (time.perf_counter() - start)
        finally:
            server.kill()
            server.wait()
    ratio = ours / peer
    peer_name = "plain Unix-socket echo, same framing"
    return row("small-request round trips (ping)", ours, peer, peer_name, "req/s", ">= 0.7x",
               ratio >= 0.7)  # fmt: skip


SUITE = """
import sys

import pytest

MAIN = b"import m0, m1, m2, m3, m4\\nprint(sum(m.f() for m in (m0, m1, m2, m3, m4)))\\n"
COMMAND = {command!r}


@pytest.mark.parametrize("n", range(200))
def test_agent_edits_and_runs(sandbox_fs, n):
    for i in range(5):
        sandbox_fs.write(f"src/m{{i}}.py", f"def f():\\n    return {{n + i}}\\n".encode())
    sandbox_fs.write("src/main.py", MAIN)
    assert sandbox_fs.glob("src/m[0-9].py") == [f"src/m{{i}}.py" for i in range(5)]
    assert sandbox_fs.read("src/m0.py") == f"def f():\\n    return {{n}}\\n".encode()
    assert len(sandbox_fs.grep(r"return \\d+", include="*.py")) == 5
    sandbox_fs.edit("src/m1.py", f"return {{n + 1}}", f"return -{{n + 1}}")
    if COMMAND == "script":
        result = sandbox_fs.exec([sys.executable, "src/main.py"])
        assert result.output == f"{{5 * n + 10 - 2 * (n + 1)}}\\n".encode(), result
    else:
        result = sandbox_fs.exec(["sh", "-c", "cat src/*.py | grep -c return"])
        assert result.output == b"5\\n", result
"""


#: Only pytest, xdist and this plugin: whatever else this environment has installed (hypothesis,
#: pytest-benchmark, ...) would add its own start-up to every xdist process, and that is not
#: what this benchmark is about.
ONLY_OUR_PLUGINS = ["-p", "xdist.plugin", "-p", "pytest_sandbox.plugin"]


def _suite(directory: Path, *args: str) -> float:
    env = {**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(directory / "state")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ONLY_OUR_PLUGINS, *args],
        cwd=directory, env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start


EMPTY = """
import pytest


@pytest.mark.parametrize("n", range(200))
def test_nothing(n):
    pass
"""

#: The same test without a sandbox (``tmp_path``, ``pathlib``, ``subprocess``): what xdist makes
#: of this workload on this machine when isolation costs nothing. It bounds the ratio a
#: sandboxed suite can reach here.
UNSANDBOXED = """
import re
import subprocess
import sys

import pytest

MAIN = b"import m0, m1, m2, m3, m4\\nprint(sum(m.f() for m in (m0, m1, m2, m3, m4)))\\n"


@pytest.mark.parametrize("n", range(200))
def test_agent_edits_and_runs(tmp_path, n):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_bytes(f"def f():\\n    return {n + i}\\n".encode())
    (src / "main.py").write_bytes(MAIN)
    assert sorted(p.name for p in src.glob("m[0-9].py")) == [f"m{i}.py" for i in range(5)]
    assert (src / "m0.py").read_bytes() == f"def f():\\n    return {n}\\n".encode()
    lines = [line for p in src.glob("*.py") for line in p.read_text().splitlines()]
    assert len([line for line in lines if re.search(r"return \\d+", line)]) == 5
    m1 = src / "m1.py"
    m1.write_text(m1.read_text().replace(f"return {n + 1}", f"return -{n + 1}"))
    result = subprocess.run([sys.executable, "src/main.py"], cwd=tmp_path, capture_output=True)
    assert result.stdout == f"{5 * n + 10 - 2 * (n + 1)}\\n".encode(), result
"""

SUITES = {"script": "runs its script", "pipeline": "runs a sh pipeline"}


def xdist_suites(quick: bool) -> list[dict[str, Any]]:
    """The suite under ``-n 0`` and ``-n 2``, interleaved; in a full run also the lighter
    command and the same 200 tests with empty bodies (xdist's own start-up cost)."""
    rounds = 1 if quick else 3
    kinds = ["script"] if quick else ["script", "pipeline", "empty", "unsandboxed"]
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp:
        for kind in kinds:
            directory = Path(tmp) / kind
            directory.mkdir()
            text = {"empty": EMPTY, "unsandboxed": UNSANDBOXED}.get(kind) or SUITE.format(
                command=kind
            )
            (directory / "test_suite.py").write_text(text)
        for _ in range(rounds):
            for kind in kinds:
                for workers in ("0", "2"):
                    elapsed = _suite(Path(tmp) / kind, "-n", workers)
                    times.setdefault((kind, workers), []).append(elapsed)
    med = {key: statistics.median(values) for key, values in times.items()}
    rows = []
    for kind in kinds:
        if kind not in SUITES:
            continue
        ours, peer = med[(kind, "2")], med[(kind, "0")]
        rows.append(row(f"200 tests using sandbox_fs ({SUITES[kind]}), -n 2", ours, peer,
                        "same suite, -n 0", "s", "<= 0.6x", ours / peer <= 0.6))  # fmt: skip
    if "empty" in kinds:
        # what the tests themselves cost, xdist's start-up (empty-body run) taken out
        ours = med[("script", "2")] - med[("empty", "2")]
        peer = med[("script", "0")] - med[("empty", "0")]
        rows.append(row("same, net of xdist start-up (empty-suite run subtracted)", ours, peer,
                        "same, -n 0", "s", "<= 0.6x", ours / peer <= 0.6,
                        note=f"empty suite: -n 0 {med[('empty', '0')]:.2f} s, "
                        f"-n 2 {med[('empty', '2')]:.2f} s"))  # fmt: skip
    if "unsandboxed" in kinds:
        ours, peer = med[("unsandboxed", "2")], med[("unsandboxed", "0")]
        rows.append(row("reference: the same 200 tests without a sandbox (tmp_path, subprocess)",
                        ours, peer, "same, -n 0", "s", "report", True,
                        note="xdist's ceiling for this workload on this machine"))  # fmt: skip
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    rows = [cold_start(quick), pooled_spawn(quick), *warm_acquire(quick), round_trips(quick)]
    rows.extend(xdist_suites(quick))
    return rows


if __name__ == "__main__":
    for result in run("--quick" in sys.argv):
        print(result)
