"""Spawning, identifying and stopping processes.

A process is spawned in its own session (so its whole group can be signalled and Ctrl-C at the
terminal does not reach it), with stdout/stderr in a log file. Its identity is pid + OS start
time + boot id (+ executable): a pid is signalled only while that identity still holds, so a
recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from pytest_sandbox.errors import IdentityMismatch, ProcessError, SpawnFailed
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track
from pytest_sandbox.runtime.waiting import LogRegex, TcpPort, wait_for

#: Environment variable carrying a resource's token into the process and its descendants, so
#: members of a group can be recognised even after the leader is gone.
TOKEN_ENV = "PYTEST_SANDBOX_RESOURCE"

DEFAULT_GRACE = 3.0


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    token: str | None = None,
    stdout: int | IO[bytes] | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    inherit_env: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session; stdout and stderr go to ``log_path``.

    ``stdout`` may redirect stdout elsewhere (e.g. ``subprocess.PIPE`` for a ready line);
    stderr still goes to the log. ``token`` is put in the child's environment as
    :data:`TOKEN_ENV` so the sweep can recognise the group's members later.
    """
    if not argv or not all(isinstance(a, str | os.PathLike) for a in argv):
        raise SpawnFailed(f"argv must be a non-empty list of strings, got {argv!r}")
    full_env = dict(os.environ) if inherit_env else {}
    if env:
        full_env.update(env)
    if token:
        full_env[TOKEN_ENV] = token
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        try:
            return subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=log,
                cwd=cwd,
                env=full_env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SpawnFailed(
                f"could not start {argv[0]!r}: {exc.strerror or exc}. "
                "Check that the program exists, is executable, and that cwd is a directory."
            ) from exc


def log_tail(path: Path | None, lines: int = 20, max_bytes: int = 8192) -> str:
    """The last ``lines`` lines of a log file (empty when there is none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _group_members(pgid: int, token: str | None) -> list[psutil.Process]:
    """Live (non-zombie) members of process group ``pgid``.

    When ``token`` is given, only processes carrying it in their environment count, so that a
    group id reused by a stranger is never signalled.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if token is not None and proc.environ().get(TOKEN_ENV) != token:
                continue
        except (ProcessLookupError, psutil.Error, OSError):
            continue
        members.append(proc)
    return members


def _signal_group(pgid: int, sig: int, members: list[psutil.Process], whole_group: bool) -> None:
    if whole_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        return
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def stop_group(
    identity: ProcessIdentity,
    *,
    grace: float = DEFAULT_GRACE,
    popen: subprocess.Popen[bytes] | None = None,
    token: str | None = None,
    kill_timeout: float = 5.0,
) -> int | None:
    """The stop ladder: SIGTERM to the group → ``grace`` → SIGKILL → wait (no zombie).

    The leader is signalled only while ``identity`` still holds (pid + start time + boot). When
    the leader is already gone, only group members carrying ``token`` are signalled. Returns the
    leader's exit code when it was our child, else None. Raises :class:`IdentityMismatch` when
    the pid now belongs to another process (nothing is signalled then).
    """
    pgid = identity.pid
    leader_done = popen is not None and popen.poll() is not None
    whole_group = False
    if not leader_done:
        reason = identity.mismatch()
        if reason is None:
            whole_group = True  # the leader is ours, so the group id is ours
        elif "belongs to another process" in reason or "cannot be inspected" in reason:
            raise IdentityMismatch(f"not signalling process group {pgid}: {reason}")
    if not whole_group and token is None:
        # Leader gone and no way to recognise members: never guess a group id.
        return popen.wait() if popen is not None and leader_done else None

    def members() -> list[psutil.Process]:
        if popen is not None:
            popen.poll()
        return _group_members(pgid, None if whole_group else token)

    live = members()
    if live or whole_group:
        _signal_group(pgid, signal.SIGTERM, live, whole_group)
        deadline = time.monotonic() + grace
        delay = 0.005
        while live and time.monotonic() < deadline:
            # never sleep past the grace: a daemon that ignores SIGTERM is killed on time
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)
            live = members()
        if live:
            _signal_group(pgid, signal.SIGKILL, live, whole_group)
            deadline = time.monotonic() + kill_timeout
            while live and time.monotonic() < deadline:
                time.sleep(0.01)
                live = members()
    if popen is not None:
        try:
            return popen.wait(timeout=kill_timeout)
        except subprocess.TimeoutExpired:
            return None
    return None


def release_process(details: Mapping[str, Any]) -> None:
    """Ledger releaser for ``kind="process"`` rows: identity-checked stop of the group."""
    token = details.get("token")
    grace = min(float(details.get("grace", DEFAULT_GRACE)), float(details.get("reap_grace", 1.0)))
    if "identity" not in details:
        # Spawn did not finish recording: find members by token alone.
        if token:
            for proc in _group_members_by_token(str(token)):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        return
    identity = ProcessIdentity.from_dict(details["identity"])
    if not identity.is_local:
        return
    with contextlib.suppress(IdentityMismatch):
        stop_group(identity, grace=grace, token=str(token) if token else None)


def _group_members_by_token(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
    return found


ReadySpec = Callable[[], bool] | str | int | None


def as_probe(ready: ReadySpec, log_path: Path) -> Callable[[], bool] | None:
    """Turn a readiness spec into a probe: a str is a regex on the log, an int a TCP port."""
    if ready is None or callable(ready):
        return ready
    if isinstance(ready, bool):
        raise TypeError("ready must be a probe, a log regex (str) or a TCP port (int), not bool")
    if isinstance(ready, int):
        return TcpPort(ready)
    if isinstance(ready, str):
        return LogRegex(log_path, ready)
    raise TypeError(
        f"ready={ready!r}: expected a callable probe, a log regex (str) or a TCP port (int)"
    )


class TrackedProcess:
    """A child process recorded in the ledger, started in its own session, logs to a file.

    ``start()`` spawns it and waits for ``ready`` (a probe, a log regex or a TCP port) for at
    most ``timeout`` seconds; a failed start stops what it spawned. ``stop()`` runs the stop
    ladder on the whole group (identity checked) and is idempotent. Usable as a context manager.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready: ReadySpec = None,
        timeout: float = 10.0,
        grace: float = DEFAULT_GRACE,
        tracker: ResourceTracker | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env else None
        self.cwd = cwd
        self.ready = ready
        self.timeout = timeout
        self.grace = grace
        self.name = name or (Path(self.argv[0]).name if self.argv else "process")
        self._tracker = tracker
        self._popen: subprocess.Popen[bytes] | None = None
        self._tracked: Tracked | None = None
        self.identity: ProcessIdentity | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ProcessError(f"{self.name} has not been started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self._popen

    def start(self) -> TrackedProcess:
        if self._popen is not None:
            raise ProcessError(f"{self.name} was already started (pid {self._popen.pid})")
        probe = as_probe(self.ready, self.log_path)
        self._tracked = track(
            self._tracker,
            "process",
            " ".join(self.argv)[:200],
            releaser=RELEASER,
            details={"argv": self.argv, "log_path": str(self.log_path), "grace": self.grace},
        )
        try:
            self._popen = spawn(
                self.argv,
                log_path=self.log_path,
                env=self.env,
                cwd=self.cwd,
                token=self._tracked.token,
            )
            try:
                self.identity = ProcessIdentity.of(self._popen.pid)
            except psutil.NoSuchProcess:
                self.identity = None
            if self.identity is not None:
                self._tracked.update(
                    key=f"pid {self._popen.pid}: {' '.join(self.argv)}"[:200],
                    identity=self.identity.to_dict(),
                )
            if probe is not None:
                wait_for(
                    probe,
                    timeout=self.timeout,
                    what=f"process {self.name!r} (pid {self._popen.pid})",
                    process=self._popen,
                    log_tail=lambda: log_tail(self.log_path),
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float | None = None) -> int | None:
        """Stop the process group (SIGTERM → grace → SIGKILL) and forget the ledger row."""
        with self._lock:
            if self._popen is not None:
                if self.identity is not None:
                    stop_group(
                        self.identity,
                        grace=self.grace if grace is None else grace,
                        popen=self._popen,
                        token=self._tracked.token if self._tracked else None,
                    )
                else:
                    self._popen.wait()
            if self._tracked is not None:
                self._tracked.released()
            return self.returncode

    def keep(self) -> None:
        """Leave the process running and mark its ledger row kept (``--sandbox-keep``)."""
        if self._tracked is not None:
            self._tracked.kept()

    def __enter__(self) -> TrackedProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen else None
        return f"<TrackedProcess {self.name!r} pid={pid} returncode={self.returncode}>"


RELEASER = f"{__name__}:release_process"
