"""The fs worker's wire format: 4-byte big-endian length + a UTF-8 JSON object with a ``kind``.

Stdlib only (the worker imports this module at start-up and must start fast). Frames over
:data:`MAX_FRAME` are refused from their header, before any of the body is read, so a peer
cannot make either side allocate more than that. EOF before a frame is a clean close; EOF
inside a frame is an error.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

#: Largest frame body either side accepts (1 MiB).
MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")

#: Error codes carried by ``{"kind": "error", "code": ..., "message": ...}`` replies.
ERROR_CODES = ("unimplemented", "policy_denied", "io", "protocol", "internal")

#: Request kinds the worker serves.
REQUEST_KINDS = (
    "ping",
    "shutdown",
    "read",
    "write",
    "edit",
    "rename",
    "glob",
    "grep",
    "stat",
    "get_env",
    "exec",
)


#: One encoder for every frame (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class FrameError(Exception):
    """A frame could not be read or decoded.

    ``fatal`` is True when the stream can no longer be trusted to be in sync (oversized
    header, EOF or timeout inside a frame): the reader must close the connection.
    """

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between frames."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame for ``message`` (raises ``ValueError`` when it is over :data:`MAX_FRAME`)."""
    body = _ENCODER.encode(message).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse a frame body into a message; raises a non-fatal :class:`FrameError` when bad."""
    try:
        message = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FrameError(f"frame body is not UTF-8: {exc}", fatal=False) from None
    except ValueError as exc:
        raise FrameError(f"frame body is not JSON: {exc}", fatal=False) from None
    except RecursionError:
        raise FrameError("frame body nests too deeply", fatal=False) from None
    if not isinstance(message, dict):
        raise FrameError(
            f"frame body must be a JSON object, got {type(message).__name__}", fatal=False
        )
    if not isinstance(message.get("kind"), str):
        raise FrameError("frame has no string 'kind' field", fatal=False)
    return message


def _recv_exact(sock: socket.socket, size: int, deadline: float | None, what: str) -> bytes:
    """Read exactly ``size`` bytes of a frame already begun, before ``deadline``."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameError(f"timed out inside a frame ({what})", fatal=True)
            sock.settimeout(left)
        try:
            chunk = sock.recv(min(remaining, 65536))
        except TimeoutError:
            raise FrameError(f"timed out inside a frame ({what})", fatal=True) from None
        if not chunk:
            raise FrameError(
                f"connection closed inside a frame ({what}: {size - remaining} of {size} bytes)",
                fatal=True,
            )
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(
    sock: socket.socket,
    *,
    frame_timeout: float | None = 10.0,
    wait_timeout: float | None = None,
) -> dict[str, Any]:
    """Read one message: wait ``wait_timeout`` (None: forever) for the first byte, then
    ``frame_timeout`` for the rest of the frame.

    Raises :class:`ConnectionClosed` on EOF between frames, ``TimeoutError`` when no frame
    began in time, a fatal :class:`FrameError` when the stream is out of sync, a non-fatal one
    when the body was read but is not a message.
    """
    sock.settimeout(wait_timeout)
    first = sock.recv(HEADER.size)
    if not first:
        raise ConnectionClosed()
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    header = first
    if len(first) < HEADER.size:
        header += _recv_exact(sock, HEADER.size - len(first), deadline, "header")
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(
            f"frame of {size} bytes refused: over the {MAX_FRAME}-byte limit", fatal=True
        )
    body = _recv_exact(sock, size, deadline, "body") if size else b""
    sock.settimeout(None)
    return decode_body(body)


class FrameReader:
    """Buffered frame reader for one connection: a small request usually costs one ``recv``.

    Same contract as :func:`read_frame`; bytes after a frame stay buffered for the next one.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._timeout: float | None = sock.gettimeout()

    def _settimeout(self, value: float | None) -> None:
        if value != self._timeout:
            self.sock.settimeout(value)
            self._timeout = value

    def _fill(self, deadline: float | None, what: str) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameError(f"timed out inside a frame ({what})", fatal=True)
            self._settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise FrameError(f"timed out inside a frame ({what})", fatal=True) from None
        if not chunk:
            raise FrameError(
                f"connection closed inside a frame ({what}: {len(self._buf)} bytes read)",
                fatal=True,
            )
        self._buf += chunk

    def read(
        self, *, frame_timeout: float | None = 10.0, wait_timeout: float | None = None
    ) -> dict[str, Any]:
        buf = self._buf
        if not buf:
            self._settimeout(wait_timeout)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed()
            buf += chunk
        deadline: float | None = None
        if len(buf) < HEADER.size:
            deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
            while len(buf) < HEADER.size:
                self._fill(deadline, "header")
        (size,) = HEADER.unpack_from(buf)
        if size > MAX_FRAME:
            raise FrameError(
                f"frame of {size} bytes refused: over the {MAX_FRAME}-byte limit", fatal=True
            )
        end = HEADER.size + size
        if len(buf) < end and deadline is None and frame_timeout is not None:
            deadline = time.monotonic() + frame_timeout
        while len(buf) < end:
            self._fill(deadline, "body")
        body = bytes(buf[HEADER.size : end])
        del buf[:end]
        return decode_body(body)


def write_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def error(code: str, message: str) -> dict[str, Any]:
    """An error reply."""
    return {"kind": "error", "code": code, "message": message}
