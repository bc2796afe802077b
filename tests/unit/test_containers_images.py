"""Image builds say what they are doing: waiting for another builder, long steps ticking."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from filelock import FileLock

from pytest_sandbox.containers.images import _Ticker, build_lock


def test_waiting_for_another_builder_is_reported_until_the_lock_is_free(tmp_path: Path) -> None:
    lock_file = str(tmp_path / "busybox.lock")
    holder = FileLock(lock_file)
    holder.acquire()
    messages: list[str] = []
    got = threading.Event()

    def builder() -> None:
        with build_lock(FileLock(lock_file), messages.append, "image busybox", every=0.05):
            got.set()

    thread = threading.Thread(target=builder)
    thread.start()
    time.sleep(0.4)
    assert not got.is_set()  # still waiting...
    holder.release()
    thread.join(timeout=10)
    assert got.is_set()
    assert messages[0].startswith("waiting for another process building image busybox")
    assert lock_file in messages[0]
    assert any("still running after" in m for m in messages[1:])  # ...and saying so


def test_free_lock_is_taken_silently(tmp_path: Path) -> None:
    messages: list[str] = []
    with build_lock(FileLock(str(tmp_path / "x.lock")), messages.append, "image x"):
        pass
    assert messages == []


def test_ticker_reports_elapsed_time_and_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("I: Retrieving Packages\nI: Unpacking git\n")
    messages: list[str] = []
    with _Ticker(messages.append, "debootstrap debian-git", log, every=0.05):
        time.sleep(0.3)
    assert messages
    assert all(m.startswith("debootstrap debian-git: still running after") for m in messages)
    assert messages[-1].endswith("I: Unpacking git")
