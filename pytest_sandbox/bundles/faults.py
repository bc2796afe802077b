"""Scenarios the bundle server can play, and the byte-level faults it commits at the socket.

A scenario belongs to one family:

* ``manifest`` — the manifest served is altered (rollback, bad paths, malformed, …);
* ``file`` — file bodies are altered (changed bytes, endless data, short data, mix-and-match);
* ``transport`` — the HTTP exchange itself misbehaves (delays, trickle, stall, truncation,
  TCP reset, garbage, error statuses). These write raw bytes to the socket, shut it down, or
  reset it with ``SO_LINGER`` 0: the client sees exactly what a broken network would show it;
* ``control`` — the server changes state mid-pull (the manifest changes while files are fetched).

Every scenario has a default target (``on``: ``manifest``, ``file`` or ``any``) that a caller can
override, e.g. ``server.scenario("stall", on="manifest", after=10)``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.errors import UnknownScenario


@dataclass(frozen=True)
class ScenarioSpec:
    family: str
    on: str
    params: Mapping[str, Any]
    doc: str


#: name -> spec (family, default target, parameters with defaults, what it does).
SCENARIOS: dict[str, ScenarioSpec] = {
    # --- manifest ---
    "rollback": ScenarioSpec(
        "manifest",
        "manifest",
        {"version": None},
        "serve the tenant's previous bundle (or a copy of the current files at `version`)",
    ),
    "out_of_range": ScenarioSpec(
        "manifest", "manifest", {"version": "0.5.0"}, "a valid bundle at a version outside range"
    ),
    "fast_forward": ScenarioSpec(
        "manifest", "manifest", {"version": "999999.0.0"}, "a valid bundle at a huge version"
    ),
    "frozen": ScenarioSpec(
        "manifest",
        "manifest",
        {"age": 86400.0},
        "replay the current manifest with `expires` `age` seconds in the past",
    ),
    "expired": ScenarioSpec(
        "manifest",
        "manifest",
        {"age": 3600.0},
        "a new bundle whose `expires` passed `age` seconds ago",
    ),
    "stale": ScenarioSpec(
        "manifest",
        "manifest",
        {"age": 30 * 86400.0},
        "a new bundle whose bundle_ts is `age` seconds old",
    ),
    "wrong_integrity": ScenarioSpec(
        "manifest", "manifest", {}, "the current manifest with a wrong integrity_sha256"
    ),
    "size_bytes_lie": ScenarioSpec(
        "manifest", "manifest", {"delta": 1}, "size_bytes off by `delta` from the files' sum"
    ),
    "unsafe_path": ScenarioSpec(
        "manifest",
        "manifest",
        {"kind": "dotdot"},
        "a bundle with one unsafe path; kind in UNSAFE_PATHS (integrity recomputed)",
    ),
    "malformed": ScenarioSpec(
        "manifest", "manifest", {"kind": "not_json"}, "a malformed manifest; kind in MALFORMED"
    ),
    "oversized": ScenarioSpec(
        "manifest",
        "manifest",
        {"size": 2 * 1024 * 1024, "content_length": True},
        "a manifest padded to `size` bytes (without Content-Length when content_length=False)",
    ),
    "bad_signature": ScenarioSpec(
        "manifest", "manifest", {}, "the current manifest with a signature from another key"
    ),
    # --- file ---
    "changed_bytes": ScenarioSpec(
        "file", "file", {"path": None}, "one byte flipped in file bodies (same manifest)"
    ),
    "endless_data": ScenarioSpec(
        "file",
        "file",
        {"limit": 1 << 30},
        "the body goes on past the declared size, no Content-Length (bounded by `limit`)",
    ),
    "short_data": ScenarioSpec(
        "file", "file", {"keep": 0.5}, "an honest but shorter body (fraction `keep`)"
    ),
    "mix_and_match": ScenarioSpec(
        "file",
        "file",
        {"other_ts": None},
        "file bodies from another bundle of the tenant (default: the previous one)",
    ),
    # --- transport ---
    "header_delay": ScenarioSpec(
        "transport", "any", {"seconds": 1.0}, "wait before the status line"
    ),
    "trickle": ScenarioSpec(
        "transport",
        "any",
        {"chunk": 1, "interval": 0.05},
        "send the body `chunk` bytes every `interval` seconds",
    ),
    "stall": ScenarioSpec(
        "transport",
        "any",
        {"after": 0, "seconds": 30.0},
        "send `after` body bytes, then nothing for `seconds`, then close",
    ),
    "truncate": ScenarioSpec(
        "transport",
        "any",
        {"after": None},
        "full Content-Length, `after` body bytes (default half), then FIN",
    ),
    "reset": ScenarioSpec(
        "transport",
        "any",
        {"after": None},
        "TCP RST (SO_LINGER 0); before the head when `after` is None, else after N body bytes",
    ),
    "garbage": ScenarioSpec("transport", "any", {"size": 64}, "random non-HTTP bytes, then close"),
    "status": ScenarioSpec(
        "transport", "any", {"code": 500, "retry_after": None}, "answer an error status"
    ),
    "not_found": ScenarioSpec("transport", "any", {"code": 404, "retry_after": None}, "404"),
    "server_error": ScenarioSpec("transport", "any", {"code": 500, "retry_after": None}, "500"),
    "unavailable": ScenarioSpec(
        "transport", "any", {"code": 503, "retry_after": 5}, "503 with Retry-After"
    ),
    # --- control ---
    "manifest_changes": ScenarioSpec(
        "control",
        "file",
        {},
        "at the first file request, publish a new bundle and retire the one being fetched",
    ),
}

UNSAFE_PATHS: dict[str, list[str]] = {
    "absolute": ["/etc/passwd"],
    "dotdot": ["../escape.txt"],
    "nested_dotdot": ["notes/../../escape.txt"],
    "dot": ["./notes/a.md"],
    "backslash": ["..\\escape.txt"],
    "nul": ["notes/a\x00.md"],
    "control": ["notes/a\nb.md"],
    "empty": [""],
    "empty_segment": ["notes//a.md"],
    "drive": ["C:/escape.txt"],
    "duplicate": ["dup.md", "dup.md"],
    "case_collision": ["README.md", "readme.md"],
    "unicode_collision": ["caf\u00e9.md", "cafe\u0301.md"],
    "compat_collision": ["\ufb01le.md", "file.md"],
    "overlong": ["x" * 300],
    "overlong_path": ["/".join(["d" * 200] * 6)],
    "dir_file": ["tree", "tree/leaf.md"],
}

MALFORMED = (
    "not_json",
    "truncated_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "bad_version",
    "bad_sha",
    "negative_size",
    "bad_ts",
    "bad_expires",
)


@dataclass
class Scenario:
    """One active scenario: ``name``, its parameters, its target, one-shot or persistent."""

    name: str
    params: dict[str, Any]
    on: str
    once: bool = False
    fired: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return SCENARIOS[self.name].family

    def matches(self, kind: str) -> bool:
        return self.on == "any" or self.on == kind


def make_scenario(name: str, *, on: str | None, once: bool, params: Mapping[str, Any]) -> Scenario:
    spec = SCENARIOS.get(name)
    if spec is None:
        raise UnknownScenario(
            f"bundle server: unknown scenario {name!r}. Known: {', '.join(sorted(SCENARIOS))}."
        )
    unknown = set(params) - set(spec.params)
    if unknown:
        raise UnknownScenario(
            f"bundle server: scenario {name!r} has no parameter(s) {sorted(unknown)}; "
            f"it takes {sorted(spec.params) or 'none'}."
        )
    target = on or spec.on
    if target not in ("manifest", "file", "any"):
        raise UnknownScenario(
            f"bundle server: scenario {name!r} on={target!r}; use 'manifest', 'file' or 'any'."
        )
    if name == "unsafe_path" and params.get("kind", "dotdot") not in UNSAFE_PATHS:
        raise UnknownScenario(
            f"bundle server: unsafe_path kind {params.get('kind')!r}; "
            f"known: {', '.join(UNSAFE_PATHS)}."
        )
    if name == "malformed" and params.get("kind", "not_json") not in MALFORMED:
        raise UnknownScenario(
            f"bundle server: malformed kind {params.get('kind')!r}; known: {', '.join(MALFORMED)}."
        )
    return Scenario(name, {**spec.params, **params}, target, once)


# --- raw delivery at the socket -------------------------------------------------------


class Wire:
    """Raw writes to one client connection; every fault is committed here, at the socket.

    ``stop`` is the server's shutdown event: sleeps wake up on it so ``close()`` is prompt.
    """

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.sent = 0

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; True when the sleep ran to its end."""
        return not self.stop.wait(seconds)

    def finish(self) -> None:
        """Orderly close: FIN after what was sent."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Abortive close: SO_LINGER 0 turns close() into a TCP RST."""
        raw = self._raw_socket()
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            # close the fd itself (an SSL wrapper would try to say goodbye first)
            os.close(raw.detach())

    def _raw_socket(self) -> socket.socket:
        return self.sock


def head_bytes(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def deliver(
    wire: Wire,
    head: bytes,
    body: bytes | Iterator[bytes],
    fault: Scenario | None,
) -> bool:
    """Send one response, committing ``fault`` (a transport scenario) on the way.

    Returns True when the connection may be kept alive afterwards.
    """
    name = fault.name if fault is not None else None
    params = fault.params if fault is not None else {}
    if name == "header_delay" and not wire.sleep(float(params["seconds"])):
        return False
    if name == "garbage":
        wire.send(os.urandom(int(params["size"])).replace(b"HTTP", b"PTTH"))
        wire.finish()
        return False
    if name == "reset" and params["after"] is None:
        wire.reset()
        return False
    if not isinstance(body, bytes):
        wire.send(head)
        # streamed (endless) body: delimited by close
        for chunk in body:
            if wire.stop.is_set():
                break
            wire.send(chunk)
        wire.finish()
        return False
    view = memoryview(body)
    if name is None or name == "header_delay":
        wire.send(head + body if len(body) <= 65536 else head)
        if len(body) > 65536:
            wire.send(view)
        return True
    wire.send(head)
    if name == "trickle":
        step, interval = max(1, int(params["chunk"])), float(params["interval"])
        for start in range(0, len(view), step):
            wire.send(view[start : start + step])
            if start + step < len(view) and not wire.sleep(interval):
                return False
        return True
    if name == "stall":
        after = min(int(params["after"]), len(view))
        wire.send(view[:after])
        wire.sleep(float(params["seconds"]))
        wire.finish()
        return False
    if name == "truncate":
        after = params["after"]
        cut = len(view) // 2 if after is None else min(int(after), max(0, len(view) - 1))
        wire.send(view[:cut])
        wire.finish()
        return False
    if name == "reset":
        wire.send(view[: min(int(params["after"]), len(view))])
        wire.reset()
        return False
    wire.send(view)
    return True


def endless(prefix: bytes, limit: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """``prefix`` then filler bytes, up to ``limit`` bytes in all (the server stays bounded)."""
    yield prefix
    sent = len(prefix)
    filler = b"\xa5" * chunk
    while sent < limit:
        piece = filler[: min(chunk, limit - sent)]
        sent += len(piece)
        yield piece
