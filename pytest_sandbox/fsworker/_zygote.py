"""The fs worker fork server: ``python -I -S .../fsworker/_zygote.py`` (see :mod:`.zygote`).

Imports the worker and everything its requests import, once; then forks a worker per request
received on fd 0 (a ``SOCK_SEQPACKET`` socket): a JSON object ``{"argv", "env", "log"}`` plus
two descriptors, the worker's stdout (the ``ready`` line) and its status pipe (its exit code is
written there when it ends). Replies ``{"pid": N}`` or ``{"error": "..."}``. Exits on EOF.

Children are reaped by the kernel (SIGCHLD ignored here, reset in each child). Each child starts
its own session, gets a fresh environment and file table, and runs ``worker.main`` — so what it
runs is the same code, with the same kernel layers, as a worker started by ``_boot.py``.
"""

import contextlib
import fcntl
import gc
import json
import os
import signal
import socket
import sys
import types
from typing import Any

_pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "pytest_sandbox" not in sys.modules:
    _pkg = types.ModuleType("pytest_sandbox")
    _pkg.__path__ = [_pkg_dir]
    sys.modules["pytest_sandbox"] = _pkg

# What a worker imports on its way to ``ready`` and in its request handlers: paid once here,
# not by every worker (a fresh interpreter spends most of its start-up on these).
import base64  # noqa: E402, F401
import encodings.idna  # noqa: E402, F401
import fnmatch  # noqa: E402, F401
import glob  # noqa: E402, F401
import re  # noqa: E402, F401
import selectors  # noqa: E402, F401
import subprocess  # noqa: E402, F401

from pytest_sandbox.fsworker import egress, enforce, worker  # noqa: E402, F401

STATUS_FD = 3
MAX_REQUEST = 1 << 20


def _child(request: dict[str, Any], ready_fd: int, status_fd: int) -> None:
    """In the forked child: become a fresh worker process, run it, report its exit code."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # out of the way of 0-3 first, so no dup2 below clobbers a descriptor still needed
        ready, status, log, null = (
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (ready_fd, status_fd, log, null)
        )
        os.dup2(null, 0)
        os.dup2(ready, 1)
        os.dup2(log, 2)
        os.dup2(status, STATUS_FD, inheritable=False)
        os.closerange(STATUS_FD + 1, 1 << 20)  # the server's socket, the received copies
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [worker.__file__, *request["argv"]]
        code = worker.main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a worker bug: say so in its log, never return into the server
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
            os.write(STATUS_FD, f"{code}\n".encode())
        finally:
            os._exit(code)


def serve(control: socket.socket) -> None:
    control.sendall(b'{"ready": true}')
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 2)
        except InterruptedError:
            continue
        if not message:
            return
        try:
            request = json.loads(message)
            if len(fds) != 2:
                raise ValueError(f"expected 2 descriptors, got {len(fds)}")
            pid = os.fork()
            if pid == 0:
                control.detach()  # fd 0 is replaced in the child; never close it twice
                _child(request, fds[0], fds[1])
            reply: dict[str, Any] = {"pid": pid}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        control.sendall(json.dumps(reply).encode())


def main() -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    enforce._lib()  # the libc handle, loaded once
    # what is loaded now is shared with every child: keep the children's collector off it,
    # so it does not touch (and copy) those pages
    gc.collect()
    gc.freeze()
    control = socket.socket(fileno=0)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
