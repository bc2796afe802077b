"""Shared helpers for pytest-sandbox's own tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Ledger


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state dir for an inner pytest run (in-process or subprocess)."""
    path = tmp_path / "state"
    path.mkdir()
    monkeypatch.setenv("PYTEST_SANDBOX_STATE_DIR", str(path))
    return path


@pytest.fixture
def ledger_rows(state_dir: Path) -> Callable[[], list[object]]:
    def rows() -> list[object]:
        ledger = Ledger.in_state_dir(state_dir)
        try:
            return list(ledger.rows())
        finally:
            ledger.close()

    return rows


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll ``predicate``; return the seconds it took, or fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
    return time.monotonic() - start


def dead_identity() -> ProcessIdentity:
    """The identity of a process that has exited (an owner that is provably dead)."""
    proc = subprocess.Popen(["sleep", "5"])
    ident = ProcessIdentity.of(proc.pid)
    proc.kill()
    proc.wait()
    return ident


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class InnerPytest:
    """An inner ``python -m pytest`` in its own session, for crash tests."""

    def __init__(self, directory: Path, args: list[str], env: dict[str, str]) -> None:
        self.directory = directory
        self.output = directory / "inner-output.txt"
        self._out = open(self.output, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=directory,
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for_file(self, path: Path, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"inner pytest exited early:\n{self.text()}")
            # non-empty, not just there: write_text creates the file before its one write
            return path.exists() and path.stat().st_size > 0

        wait_until(ready, timeout)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()


@pytest.fixture
def inner_pytest(tmp_path: Path, state_dir: Path) -> Iterator[Callable[..., InnerPytest]]:
    started: list[InnerPytest] = []

    def start(*args: str, env: dict[str, str] | None = None) -> InnerPytest:
        inner = InnerPytest(
            tmp_path, list(args), {"PYTEST_SANDBOX_STATE_DIR": str(state_dir), **(env or {})}
        )
        started.append(inner)
        return inner

    yield start
    for inner in started:
        if inner.proc.poll() is None:
            inner.kill_group()
        inner.wait()
