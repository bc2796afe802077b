"""Cheap facts about this machine, for the report header and ``pytest-sandbox doctor``.

Nothing here imports the docker SDK (or ``http.client``): the engine is asked with a one-shot
HTTP/1.0 request over its Unix socket, which costs a few milliseconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SYS_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is unavailable."""
    try:
        # CDLL(None) is the running program's symbol table, libc included; find_library("c")
        # would spawn ldconfig.
        libc = ctypes.CDLL(None, use_errno=True)
        version = libc.syscall(
            _SYS_LANDLOCK_CREATE_RULESET,
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
        )
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


class EngineHTTPError(Exception):
    """The engine answered with something other than ``200`` and JSON."""


def _engine_get(socket_path: str, resource: str, timeout: float) -> Any:
    """``GET resource`` over the engine's Unix socket and the decoded JSON body.

    A one-shot HTTP/1.0 request rather than ``http.client``: this runs in every session (report
    header, start-up sweep), and ``http.client`` would pull ``ssl`` and ``email`` into pytest's
    start-up for a request this small.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(f"GET {resource} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or parts[1] != "200":
        raise EngineHTTPError(status_line or "no answer")
    if b"transfer-encoding: chunked" in head.lower():
        raise EngineHTTPError("chunked answer to an HTTP/1.0 request")
    return json.loads(body or b"null")


@dataclass(frozen=True)
class EngineInfo:
    """What the Docker engine said about itself (``version`` is None when none answered)."""

    endpoint: str
    version: str | None
    error: str = ""

    def describe(self) -> str:
        if self.version:
            return f"docker {self.version} at {self.endpoint}"
        return f"no engine at {self.endpoint} ({self.error})"


def docker_endpoint() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_engine(timeout: float = 1.0) -> EngineInfo:
    """Ask a local Docker engine for its version (Unix socket endpoints only; others are
    reported as 'not probed' and left to the docker SDK)."""
    endpoint = docker_endpoint()
    if not endpoint.startswith("unix://"):
        return EngineInfo(endpoint, None, "not probed here (non-Unix endpoint)")
    path = endpoint[len("unix://") :]
    if not os.path.exists(path):
        return EngineInfo(endpoint, None, "socket does not exist")
    try:
        body = _engine_get(path, "/version", timeout)
        return EngineInfo(endpoint, str((body or {}).get("Version", "unknown")))
    except (OSError, ValueError, AttributeError, EngineHTTPError) as exc:
        return EngineInfo(endpoint, None, str(exc) or type(exc).__name__)


def _endpoint_without_contexts() -> str | None:
    """``DOCKER_HOST`` or the default socket; None when a docker CLI context may say otherwise
    (resolving contexts needs the SDK, which is what the callers avoid)."""
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    if os.environ.get("DOCKER_CONTEXT", "default") != "default":
        return None
    config_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        current = json.loads((config_dir / "config.json").read_text()).get("currentContext")
    except FileNotFoundError:
        current = None
    except (OSError, ValueError, AttributeError):
        return None
    return docker_endpoint() if current in (None, "", "default") else None


def docker_labels(label: str, timeout: float = 2.0) -> list[dict[str, str]] | None:
    """The labels of every container (running or not), network and volume carrying ``label``
    (``key`` or ``key=value``), asked over the engine's Unix socket without the docker SDK.

    None means "cannot tell" (no local Unix endpoint, no answer, an error): the caller must then
    do its full, SDK-based work. Lets the start-up sweep skip importing the SDK when there is
    nothing of ours on the engine, the common case.
    """
    endpoint = _endpoint_without_contexts()
    if endpoint is None or not endpoint.startswith("unix://"):
        return None
    path = endpoint[len("unix://") :]
    query = urllib.parse.quote(json.dumps({"label": [label]}))
    found: list[dict[str, str]] = []
    try:
        for resource, listed in (
            (f"/containers/json?all=1&filters={query}", None),
            (f"/networks?filters={query}", None),
            (f"/volumes?filters={query}", "Volumes"),
        ):
            body = _engine_get(path, resource, timeout)
            items = (body or {}).get(listed) if listed else body
            found.extend(dict(item.get("Labels") or {}) for item in items or [])
    except (OSError, ValueError, AttributeError, EngineHTTPError):
        return None
    return found


def tool_version(name: str, argv: list[str]) -> str | None:
    """First line of a tool's version output, or None when the tool is not installed."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, *argv], capture_output=True, timeout=5, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return path
    text = (done.stdout or done.stderr).decode("utf-8", "replace").strip().splitlines()
    return text[0] if text else path
