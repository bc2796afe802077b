"""Deadlines, polling and readiness probes.

A probe is a callable returning True when ready. Transient errors (``OSError``, timeouts) are
retried until the deadline; a watched process that exits while being probed fails the wait at
once with its exit code and log tail.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pytest_sandbox.errors import ProcessExitedEarly, ReadinessTimeout


class Deadline:
    """A point in monotonic time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at


class Probe(Protocol):
    """Something that says whether a resource is ready. May raise a transient ``OSError``."""

    def __call__(self) -> bool: ...


@dataclass
class LogRegex:
    """Ready when ``pattern`` matches the log file's content (read incrementally)."""

    path: Path
    pattern: str
    _offset: int = field(default=0, repr=False)
    _carry: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.pattern.encode(), re.MULTILINE)

    def __call__(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return False
        self._offset += len(chunk)
        # keep a tail so a match spanning two reads is still found
        window = self._carry + chunk
        if self._regex.search(window):
            return True
        self._carry = window[-4096:]
        return False

    def describe(self) -> str:
        return f"log {self.path} to match {self.pattern!r}"


@dataclass
class TcpPort:
    """Ready when a TCP connect to ``host:port`` succeeds."""

    port: int
    host: str = "127.0.0.1"
    attempt_timeout: float = 1.0

    def __call__(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=self.attempt_timeout):
            return True

    def describe(self) -> str:
        return f"TCP {self.host}:{self.port} to accept"


@dataclass
class UnixSocket:
    """Ready when a connect to the Unix socket at ``path`` succeeds."""

    path: Path
    attempt_timeout: float = 1.0

    def __call__(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.attempt_timeout)
            sock.connect(str(self.path))
        return True

    def describe(self) -> str:
        return f"Unix socket {self.path} to accept"


@dataclass
class HttpStatus:
    """Ready when ``GET path`` on ``host:port`` answers a status in ``ok`` (default 200-399)."""

    port: int
    path: str = "/"
    host: str = "127.0.0.1"
    ok: Callable[[int], bool] = field(default=lambda status: 200 <= status < 400)
    attempt_timeout: float = 1.0
    unix_socket: Path | None = None

    def __call__(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.attempt_timeout)
        if self.unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.attempt_timeout)
            sock.connect(str(self.unix_socket))
            conn.sock = sock
        try:
            conn.request("GET", self.path)
            return bool(self.ok(conn.getresponse().status))
        finally:
            conn.close()

    def describe(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"HTTP GET {where}{self.path} to answer"


def describe(probe: Callable[[], bool]) -> str:
    described = getattr(probe, "describe", None)
    if callable(described):
        return str(described())
    return getattr(probe, "__qualname__", repr(probe))


class Exited(Protocol):
    """A process being probed: ``poll()`` returns its exit code once it has exited."""

    def poll(self) -> int | None: ...


TRANSIENT: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, TimeoutError)


def wait_for(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str = "resource",
    process: Exited | None = None,
    log_tail: Callable[[], str] = lambda: "",
    interval: float = 0.002,
    max_interval: float = 0.02,
) -> None:
    """Call ``probe`` until it returns True, backing off from ``interval`` to ``max_interval``.

    The back-off is gentle and capped low on purpose: probes here are loopback connects and
    file reads, cheap next to the tens of milliseconds a late poll adds to every start.

    Raises :class:`ReadinessTimeout` at the deadline (with the last transient error and log
    tail), or :class:`ProcessExitedEarly` as soon as ``process`` exits.
    """
    deadline = Deadline(timeout)
    last_error: BaseException | None = None
    delay = interval
    while True:
        if process is not None:
            code = process.poll()
            if code is not None:
                raise ProcessExitedEarly(what, code, log_tail())
        try:
            if probe():
                return
            last_error = None
        except TRANSIENT as exc:
            last_error = exc
        if deadline.expired():
            if process is not None and process.poll() is not None:
                raise ProcessExitedEarly(what, process.poll(), log_tail())
            detail = f" (last error: {last_error!r})" if last_error else ""
            tail = log_tail().strip()
            raise ReadinessTimeout(
                f"{what} was not ready after {timeout:g}s waiting for {describe(probe)}{detail}."
                " Raise the timeout or check the readiness probe."
                + (f"\n--- last lines of its log ---\n{tail}" if tail else "")
            )
        time.sleep(min(delay, deadline.remaining()))
        delay = min(delay * 1.25, max_interval)
