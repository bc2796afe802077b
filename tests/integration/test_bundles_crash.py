"""kill -9 of a puller process at each install step, and pullers racing on one root.

The puller runs as a real child process (``python -m pytest_sandbox.bundles.puller``); a
test-only environment variable makes it SIGKILL itself at a named step, or pause there until
the test kills it. After every crash ``current`` must resolve to a complete, hash-verified
bundle, and the next tick must clean up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.bundles import puller as puller_mod
from pytest_sandbox.bundles.puller import BundlePuller, verify_tree
from pytest_sandbox.bundles.server import BundleServer
from pytest_sandbox.runtime.processes import spawn

KEY = "crash-key"
ROUNDS = 20


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with BundleServer() as srv:
        yield srv
        srv.check()


def run_puller(
    server: BundleServer,
    root: Path,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "pytest_sandbox.bundles.puller",
        "--url",
        server.url,
        "--root",
        str(root),
        "--keep",
        "2",
        "--no-fsync",
        *args,
    ]
    return spawn(
        argv,
        log_path=log,
        env={puller_mod.KEY_ENV: KEY, **(env or {})},
        stdout=subprocess.PIPE,
    )


def assert_current_complete(server: BundleServer, root: Path) -> str:
    link = root / "current"
    ts = Path(os.readlink(link)).name
    manifest = server.tenant(KEY).bundles[ts].manifest
    assert verify_tree(link.resolve(strict=True), manifest) == []
    return ts


def leftovers(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.iterdir() if p.name.startswith((".staging-", ".current-", ".trash-"))
    )


def files_for(n: int) -> dict[str, bytes]:
    return {"a.md": f"a {n}\n".encode() * 100, "sub/b.bin": os.urandom(2048), "c": b"%d" % n}


@pytest.mark.parametrize("step", ["downloaded", "staged", "symlinked", "retention"])
def test_kill_9_at_each_install_step(server: BundleServer, tmp_path: Path, step: str) -> None:
    tenant = server.tenant(KEY)
    root = tmp_path / "root"
    local = BundlePuller(server.url, KEY, root, keep=2, fsync=False)
    # three installs first, so that every later install has old bundles to retire
    for n in range(3):
        tenant.publish(files_for(n), version=f"0.4.{n}")
        assert local.tick().status == "installed"
    for n in range(3, 3 + ROUNDS):
        before = local.current_ts()
        tenant.publish(files_for(n), version=f"0.4.{n}")
        proc = run_puller(
            server, root, tmp_path / f"puller-{n}.log", env={puller_mod.CRASH_ENV: step}
        )
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out)
        ts = assert_current_complete(server, root)
        swapped = step == "retention"
        assert (ts != before) if swapped else (ts == before)
        if n % 2:  # sometimes crash again on top of the previous crash's leftovers
            continue
        result = local.tick()
        assert result.status == ("up_to_date" if swapped else "installed"), result.reason
        assert leftovers(root) == []
        assert len(local.installed()) <= 2
        assert_current_complete(server, root)
    assert local.tick().status in ("installed", "up_to_date")
    assert leftovers(root) == []
    assert local.floor() == f"0.4.{2 + ROUNDS}"


def test_two_pullers_never_interleave(server: BundleServer, tmp_path: Path) -> None:
    tenant = server.tenant(KEY)
    tenant.publish(files_for(0), version="0.4.0")
    root = tmp_path / "root"
    journal = tmp_path / "journal"
    stop = threading.Event()

    def publisher() -> None:
        n = 1
        while not stop.wait(0.03):
            tenant.publish(files_for(n), version=f"0.4.{n}")
            n += 1

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        procs = [
            run_puller(
                server,
                root,
                tmp_path / f"p{i}.log",
                args=(
                    "--ticks",
                    "30",
                    "--journal",
                    str(journal),
                    "--hold",
                    "0.01",
                    "--interval",
                    "0.005",
                ),
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    finally:
        stop.set()
        thread.join()
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = journal.read_text().split()
    entries = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    # pid/enter, pid/exit, pid/enter, ... : every enter is followed by the same pid's exit
    for i in range(0, len(entries) - 1, 2):
        (pid_in, enter), (pid_out, leave) = entries[i], entries[i + 1]
        assert (enter, leave) == ("enter", "exit")
        assert pid_in == pid_out
    assert len(entries) >= 2
    assert len({pid for pid, _ in entries}) == 2  # both held the lock at some point
    statuses = [line for out in outputs for line in out.splitlines()]
    assert any('"installed"' in s for s in statuses)
    assert any('"busy"' in s for s in statuses)  # they did contend
    assert_current_complete(server, root)
    assert leftovers(root) == []


def test_a_killed_lock_holder_releases_the_lock(server: BundleServer, tmp_path: Path) -> None:
    server.tenant(KEY).publish(files_for(0), version="0.4.0")
    root = tmp_path / "root"
    marker = tmp_path / "paused"
    proc = run_puller(
        server,
        root,
        tmp_path / "holder.log",
        env={puller_mod.PAUSE_ENV: "downloaded", puller_mod.PAUSE_FILE_ENV: str(marker)},
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, "the holder exited before pausing"
            assert time.monotonic() < deadline, "the holder never reached the pause"
            time.sleep(0.01)
        local = BundlePuller(server.url, KEY, root, fsync=False)
        assert local.tick().status == "busy"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = local.tick()
    assert result.status == "installed"
    assert leftovers(root) == []
    assert_current_complete(server, root)
