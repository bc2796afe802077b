"""The sidecar reload call (client) and a programmable sidecar stub (server) on a Unix socket.

After an install the puller sends ``POST /bundle/reload`` (JSON body: ``bundle_ts``,
``bundle_version``, ``path``) to the sidecar's Unix socket. A 409 means "busy, try again": the
puller retries once. Everything is bounded by a timeout; a sidecar that is missing, refuses,
or never answers is reported, never waited on forever.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pytest_sandbox.runtime.waiting import Deadline

RELOAD_PATH = "/bundle/reload"


# --- client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarOutcome:
    """What the reload call achieved: ``status`` is ``ok``, ``conflict`` (409 after the
    retry), ``unavailable`` (no socket / refused), ``timeout`` or ``error`` (other status or
    broken reply); ``http_status`` is the last status seen; ``attempts`` the calls made."""

    status: str
    http_status: int | None = None
    attempts: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("sidecar", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def notify(
    socket_path: str | os.PathLike[str],
    payload: Mapping[str, Any],
    *,
    timeout: float = 2.0,
    retry_delay: float = 0.1,
) -> SidecarOutcome:
    """``POST /bundle/reload`` to the sidecar; one retry after a 409; bounded by ``timeout``."""
    body = json.dumps(dict(payload)).encode()
    deadline = Deadline(timeout)
    attempts = 0
    last: int | None = None
    while True:
        attempts += 1
        remaining = deadline.remaining()
        if remaining <= 0:
            return SidecarOutcome("timeout", last, attempts - 1, f"no answer within {timeout}s")
        conn = _UnixConnection(os.fspath(socket_path), timeout=remaining)
        try:
            conn.request(
                "POST", RELOAD_PATH, body=body, headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            response.read()
            last = response.status
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            return SidecarOutcome("unavailable", None, attempts, f"{socket_path}: {exc}")
        except TimeoutError:
            return SidecarOutcome("timeout", last, attempts, f"no answer within {timeout}s")
        except (OSError, http.client.HTTPException) as exc:
            return SidecarOutcome("error", last, attempts, f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if 200 <= last < 300:
            return SidecarOutcome("ok", last, attempts)
        if last == 409 and attempts == 1:
            time.sleep(min(retry_delay, deadline.remaining()))
            continue
        if last == 409:
            return SidecarOutcome("conflict", last, attempts, "409 twice")
        return SidecarOutcome("error", last, attempts, f"status {last}")


# --- the stub -------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarCall:
    """One call the stub received: method, path, JSON body (or None), reply given."""

    method: str
    path: str
    body: Any
    reply: str
    at: float = field(default_factory=time.time)


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        stub = self.server.stub
        reply = stub._next_reply() if self.path == RELOAD_PATH else 404
        stub._record(SidecarCall(self.command, self.path, body, str(reply)))
        if reply == "hang":
            # accept and never answer: hold the connection until the stub closes
            stub._stop.wait()
            self.close_connection = True
            return
        if reply == "close":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        code = int(reply)
        data = json.dumps({"status": code}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST


class _StubServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, stub: SidecarStub, path: str) -> None:
        self.stub = stub
        super().__init__(path, _StubHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.stub._lock:
            self.stub._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.stub._lock:
            self.stub._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up is not the stub's error


class SidecarStub:
    """A sidecar on a Unix socket answering ``POST /bundle/reload`` as programmed.

    ``reply(*replies)`` queues replies, used in order: an HTTP status (``200``, ``409``, …),
    ``"hang"`` (accept, never answer) or ``"close"`` (hang up without a reply); after the queue
    it answers ``default``. ``calls`` is the call log. ``close()`` stops it and removes the
    socket file; idempotent.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, default: int | str = 200) -> None:
        self.socket_path = Path(socket_path)
        self.default = default
        self._replies: list[int | str] = []
        self._calls: list[SidecarCall] = []
        self._connections: set[Any] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: _StubServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> SidecarStub:
        if self._server is not None:
            return self
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._server = _StubServer(self, os.fspath(self.socket_path))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sidecar-stub",
            daemon=True,
        )
        self._thread.start()
        return self

    def reply(self, *replies: int | str) -> None:
        for item in replies:
            if item not in ("hang", "close") and not isinstance(item, int):
                raise ValueError(f"sidecar reply {item!r}: use an HTTP status, 'hang' or 'close'")
        with self._lock:
            self._replies.extend(replies)

    @property
    def calls(self) -> list[SidecarCall]:
        with self._lock:
            return list(self._calls)

    def _next_reply(self) -> int | str:
        with self._lock:
            return self._replies.pop(0) if self._replies else self.default

    def _record(self, call: SidecarCall) -> None:
        with self._lock:
            self._calls.append(call)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> SidecarStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
