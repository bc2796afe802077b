"""Zygote: a fork server for fs workers, so a pool pays an interpreter start-up once.

A fresh ``python -I -S _boot.py`` spends most of its ~30 ms of CPU importing what the worker and
its request handlers need. The zygote (``_zygote.py``) imports all of it once and forks a worker
per request; the child becomes its own session, takes a fresh environment and file table and
runs the very same ``worker.main`` (policy, uid drop, Landlock, netns: all applied in the child,
never in the zygote). A pooled spawn then costs a fork: a few milliseconds of CPU.

The worker is the zygote's child, not ours, so :class:`ForkedProcess` stands in for ``Popen``:
its ``stdout`` is the worker's ``ready`` pipe, and its exit code arrives on a status pipe only
the worker holds (EOF without a code: it was killed). Teardown is unchanged: every worker has
its ledger row with its identity; the zygote has its own row (kind ``process``) and exits when
its control socket closes — when the pool closes or the test process dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from pytest_sandbox.errors import FsWorkerError
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track
from pytest_sandbox.runtime.processes import TOKEN_ENV, log_tail, spawn, stop_group

SERVER = str(Path(__file__).with_name("_zygote.py"))
RELEASER = "pytest_sandbox.runtime.processes:release_process"
START_TIMEOUT = 10.0


class ForkedProcess:
    """What :class:`~.client.FsWorker` needs of a ``Popen``, for a worker forked by a zygote."""

    def __init__(self, pid: int, stdout: IO[bytes], status_fd: int) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._status_fd: int | None = status_fd
        self._status = b""
        self._lock = threading.Lock()

    def _collect(self, timeout: float) -> None:
        """Read the status pipe for up to ``timeout`` s; EOF means the worker is gone."""
        with self._lock:
            fd = self._status_fd
            if fd is None:
                return
            deadline = time.monotonic() + timeout
            while True:
                readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not readable:
                    return
                chunk = os.read(fd, 64)
                if chunk:
                    self._status += chunk
                    continue
                os.close(fd)
                self._status_fd = None
                text = self._status.decode("ascii", "replace").strip()
                # no code written: killed before it could say (by the stop ladder, kill -9…)
                self.returncode = int(text) if text.lstrip("-").isdigit() else -signal.SIGKILL
                return

    def poll(self) -> int | None:
        if self.returncode is None:
            self._collect(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"fs worker {self.pid}", timeout or 0.0)
            self._collect(min(left, 1.0))
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            if self._status_fd is not None:
                os.close(self._status_fd)
                self._status_fd = None
        if self.stdout is not None:
            self.stdout.close()


class Zygote:
    """A fork server for fs workers (one per pool). ``spawn()`` is thread-safe; ``close()``
    is idempotent. Usable without pytest."""

    def __init__(
        self,
        *,
        log_path: Path,
        tracker: ResourceTracker | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.log_path = log_path
        self._tracker = tracker
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._tracked: Tracked | None = None
        self.identity: ProcessIdentity | None = None
        self.spawned = 0

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    def start(self) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._tracked = track(self._tracker, "process", f"fs worker zygote {self.log_path.name}",
                              releaser=RELEASER, details={"log_path": str(self.log_path),
                                                          "grace": 1.0})  # fmt: skip
        try:
            env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
            with theirs:
                self._popen = spawn(
                    [sys.executable, "-I", "-S", SERVER],
                    log_path=self.log_path,
                    env=env,
                    token=self._tracked.token,
                    stdin=theirs.fileno(),
                    inherit_env=False,
                )
            self._sock = ours
            with contextlib.suppress(Exception):
                self.identity = ProcessIdentity.of(self._popen.pid)
            if self.identity is not None:
                self._tracked.update(identity=self.identity.to_dict())
            ours.settimeout(self.start_timeout)
            try:
                hello = ours.recv(4096)
            except OSError as exc:
                raise FsWorkerError(
                    f"the fs worker zygote (pid {self._popen.pid}) did not start within "
                    f"{self.start_timeout:g}s ({exc!r}); its log {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                ) from None
            if hello != b'{"ready": true}':
                raise FsWorkerError(
                    f"the fs worker zygote (pid {self._popen.pid}) exited or answered {hello!r} "
                    f"at start; its log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            ours.settimeout(self.start_timeout)
        except BaseException:
            self._sock = ours
            self.close()
            raise
        return self

    def spawn(
        self, args: Sequence[str], *, env: Mapping[str, str], log_path: Path, token: str | None
    ) -> ForkedProcess:
        """Fork a worker running ``worker.main(args)`` with exactly ``env`` (plus ``token``)."""
        full_env = dict(env)
        if token:
            full_env[TOKEN_ENV] = token
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ready_r, ready_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            message = json.dumps({"argv": list(args), "env": full_env, "log": str(log_path)})
            with self._lock:
                sock = self._sock
                if sock is None:
                    raise FsWorkerError("the fs worker zygote is closed")
                try:
                    socket.send_fds(sock, [message.encode()], [ready_w, status_w])
                    os.close(ready_w)
                    os.close(status_w)
                    ready_w = status_w = -1
                    reply = json.loads(sock.recv(65536) or b"{}")
                except (OSError, ValueError) as exc:
                    raise FsWorkerError(
                        f"the fs worker zygote (pid {self.pid}) broke: {exc!r}; its log "
                        f"{self.log_path}:\n{log_tail(self.log_path)}"
                    ) from None
            if "pid" not in reply:
                raise FsWorkerError(
                    f"the fs worker zygote could not fork a worker: {reply.get('error', reply)}"
                )
            self.spawned += 1
            handle = ForkedProcess(int(reply["pid"]), os.fdopen(ready_r, "rb", 0), status_r)
            ready_r = status_r = -1
            return handle
        finally:
            for fd in (ready_r, ready_w, status_r, status_w):
                if fd >= 0:
                    os.close(fd)

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._popen is not None and self._popen.poll() is None

    def close(self) -> None:
        """Close the control socket (the zygote exits on EOF), wait, stop ladder if need be."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        popen = self._popen
        if popen is not None and popen.returncode is None:
            try:
                popen.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                if self.identity is not None:
                    stop_group(self.identity, grace=1.0, popen=popen)
                else:
                    popen.kill()
                    popen.wait()
        if self._tracked is not None:
            self._tracked.released()
            self._tracked = None

    def __enter__(self) -> Zygote:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
