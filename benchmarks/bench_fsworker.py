"""fs worker benchmarks: cold start, warm acquire, round trips, a 200-test suite under xdist."""

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
import pytest

@pytest.mark.parametrize("n", range(200))
def test_fs(sandbox_fs, n):
    sandbox_fs.write(f"src/m{n}.py", b"x = 1\\n")
    assert sandbox_fs.read(f"src/m{n}.py") == b"x = 1\\n"
    assert sandbox_fs.glob("src/*.py") == [f"src/m{n}.py"]
"""


def _suite(directory: Path, *args: str) -> float:
    env = {**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(directory / "state")}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory, env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start


def xdist_suite(quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="psb-bench-") as tmp:
        directory = Path(tmp)
        (directory / "test_suite.py").write_text(SUITE)
        serial, parallel = [], []
        for _ in range(rounds):
            serial.append(_suite(directory, "-n", "0"))
            parallel.append(_suite(directory, "-n", "2"))
    ours, peer = statistics.median(parallel), statistics.median(serial)
    ratio = ours / peer
    return row("200 tests using sandbox_fs, -n 2", ours, peer, "same suite, -n 0", "s",
               "<= 0.6x", ratio <= 0.6)  # fmt: skip


def run(quick: bool) -> list[dict[str, Any]]:
    return [cold_start(quick), *warm_acquire(quick), round_trips(quick), xdist_suite(quick)]


if __name__ == "__main__":
    for result in run("--quick" in sys.argv):
        print(result)
