"""Guests: machines a workspace can be prepared in — a local dir, an SSH host, a container.

Every guest speaks the same small protocol (:class:`Guest`): ``run(argv, stdin=...)`` with
stdin streamed in and stdout/stderr collected, an exit code and a timeout; ``put_tar(stream,
path)`` to unpack a tar stream at a path; ``read_file(path)``. Each is a ledger resource with a
module-level releaser, so a guest outlives neither its test nor a ``kill -9`` of pytest.

``close()`` never waits for a workspace operation: it aborts what is in flight (kills the
command, cancels the tar stream) and tears the guest down; the operation then fails with
:class:`~pytest_sandbox.errors.GuestClosed`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from pytest_sandbox.errors import GuestClosed, GuestCommandFailed, GuestError, GuestTimeout
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track

#: Environment variable carrying a guest's ledger token into every command it runs, so the
#: releaser can find strays (same name as the runtime's, on purpose: one convention).
TOKEN_ENV = "PYTEST_SANDBOX_RESOURCE"
DEFAULT_TIMEOUT = 120.0
#: What ``put_tar`` accepts: raw bytes, a binary file object, or an iterable of chunks.
TarSource = bytes | IO[bytes] | Iterable[bytes]
StdinSource = bytes | IO[bytes] | Iterable[bytes] | None
CHUNK = 1 << 20
#: How long a command whose stdin stream failed on the host may take to stop by itself.
_ABORT_GRACE = 5.0


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a guest command: ``exit_code``, ``output`` (stdout bytes), ``stderr``."""

    exit_code: int
    output: bytes
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self, what: str) -> ExecResult:
        """Return self, or raise :class:`GuestCommandFailed` when the exit code is not 0."""
        if self.exit_code != 0:
            raise GuestCommandFailed(
                f"{what} failed with exit code {self.exit_code}: "
                f"{self.stderr.decode(errors='replace').strip()[-2000:] or '(no stderr)'}",
                self.exit_code,
                self.output,
                self.stderr,
            )
        return self


@runtime_checkable
class Guest(Protocol):
    """A machine a workspace can live in.

    ``kind`` is ``local``, ``ssh`` or ``container``; ``default_workspace_path`` the path a
    workspace goes to when none is given; ``workspace_lock`` serialises workspace operations
    on this guest (never taken by ``close()``).
    """

    kind: str
    workspace_lock: threading.Lock

    @property
    def default_workspace_path(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult: ...

    def run_script(
        self,
        script: str,
        *args: str,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult: ...

    def put_tar(self, stream: TarSource, path: str, *, timeout: float = 600.0) -> None: ...

    def read_file(self, path: str) -> bytes: ...

    def close(self) -> None: ...


def script_argv(script: str, *args: str) -> list[str]:
    """argv running a fixed POSIX sh script with ``args`` as ``$1..$n`` (never interpolated)."""
    return ["sh", "-c", script, "psb", *args]


def iter_chunks(source: TarSource | None, coalesce: int = 256 << 10) -> Iterator[bytes]:
    """Turn bytes, a file object or an iterable of chunks into chunks of about ``coalesce``
    bytes (a tar stream is mostly 512-byte headers: one write each would be slow)."""
    pending: list[bytes] = []
    size = 0
    for chunk in _raw_chunks(source):
        pending.append(chunk)
        size += len(chunk)
        if size >= coalesce:
            yield b"".join(pending)
            pending.clear()
            size = 0
    if pending:
        yield b"".join(pending)


def _raw_chunks(source: TarSource | None) -> Iterator[bytes]:
    if source is None:
        return
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source)
        return
    read = getattr(source, "read", None)
    if callable(read):
        while True:
            data = read(CHUNK)
            if not data:
                return
            yield data
    else:
        yield from source


_PUT_TAR = 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"'


# --- what every backend builds on its own ``run`` ------------------------------------------


class _ShellGuest:
    """``run_script``, ``put_tar`` and ``read_file`` in terms of the backend's ``run``.

    ``put_tar`` streams into the guest's own ``tar -x``, on containers too: the engine's
    ``put_archive`` refuses a relative symlink pointing outside the target dir, which a
    repository may legitimately hold (it is copied as a link).
    """

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        raise NotImplementedError

    def run_script(
        self,
        script: str,
        *args: str,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run a POSIX ``sh`` script in the guest; ``args`` are ``$1..$n`` (never spliced in)."""
        return self.run(script_argv(script, *args), stdin=stdin, timeout=timeout, env=env)

    def put_tar(self, stream: TarSource, path: str, *, timeout: float = 600.0) -> None:
        """Unpack a tar stream at ``path`` (created if missing) with the guest's own ``tar``."""
        self.run(script_argv(_PUT_TAR, path), stdin=stream, timeout=timeout).check(
            f"{self!r}: unpacking a tar stream into {path}"
        )

    def read_file(self, path: str) -> bytes:
        return self.run(["cat", "--", path]).check(f"{self!r}: reading {path}").output


# --- guests that run commands as local processes (LocalGuest, SSHGuest) -------------------


class _ProcessGuest(_ShellGuest):
    """Shared machinery: run an argv as a local child process, abort everything on close."""

    kind = "process"

    def __init__(self) -> None:
        self.workspace_lock = threading.Lock()
        self._active: dict[subprocess.Popen[bytes], str] = {}
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        self._tracked: Tracked = Tracked.untracked()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise GuestClosed(f"{self!r} was closed; create a new guest to run commands")

    def _command(
        self, argv: Sequence[str], env: Mapping[str, str] | None, tag: str | None
    ) -> list[str]:
        raise NotImplementedError

    def _on_timeout(self, tag: str) -> None:
        """Called after a timed-out command's local process was killed."""

    def _popen_env(self) -> dict[str, str] | None:
        return None

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest; stdin streamed from bytes/file/chunks; never raises on a
        non-zero exit (use ``.check()``), raises :class:`GuestTimeout` / :class:`GuestClosed`."""
        _check_argv(argv)
        self._check_open()
        tag = secrets.token_hex(6)
        command = self._command(argv, env, tag)
        with self._state_lock:
            self._check_open()
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=self._popen_env(),
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise GuestError(
                    f"{self!r}: cannot start {command[0]!r}: {exc}. Check that it is installed."
                ) from exc
            self._active[proc] = tag
        try:
            return self._communicate(proc, stdin, timeout, argv, tag)
        finally:
            with self._state_lock:
                self._active.pop(proc, None)

    def _communicate(
        self,
        proc: subprocess.Popen[bytes],
        stdin: StdinSource,
        timeout: float,
        argv: Sequence[str],
        tag: str,
    ) -> ExecResult:
        out: list[bytes] = []
        err: list[bytes] = []
        writer_error: list[BaseException] = []

        def drain(pipe: IO[bytes], sink: list[bytes]) -> None:
            with contextlib.suppress(OSError, ValueError):
                while data := pipe.read1(CHUNK):  # type: ignore[attr-defined]
                    sink.append(data)

        def feed() -> None:
            assert proc.stdin is not None
            try:
                for chunk in iter_chunks(stdin):
                    self._check_open()
                    proc.stdin.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the command stopped reading; its exit code tells the story
            except BaseException as exc:
                writer_error.append(exc)
                # end of input first: the command sees a cut stream and cleans up after itself
                # (a prepare removes its half-made workspace); killed if it does not stop
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                try:
                    proc.wait(_ABORT_GRACE)
                except subprocess.TimeoutExpired:
                    _kill(proc)
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

        assert proc.stdout is not None
        assert proc.stderr is not None
        threads = [
            threading.Thread(target=drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=drain, args=(proc.stderr, err), daemon=True),
        ]
        if stdin is not None:
            threads.append(threading.Thread(target=feed, daemon=True))
        # a blocking wait in a thread: Popen.wait(timeout=) polls with sleeps growing to 50 ms,
        # which would add up to that much to every command's end
        exited = threading.Event()

        def reap() -> None:
            proc.wait()
            exited.set()

        threads.append(threading.Thread(target=reap, daemon=True))
        for thread in threads:
            thread.start()
        try:
            if not exited.wait(timeout):
                raise subprocess.TimeoutExpired(proc.args, timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill(proc)
            exited.wait()
            self._on_timeout(tag)
            raise GuestTimeout(
                f"{self!r}: `{shlex.join(argv)[:200]}` ran past its {timeout:g}s timeout and "
                "was killed. Raise timeout= or check what the command waits for."
            ) from None
        finally:
            for thread in threads:
                thread.join(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
        if self._closed.is_set():
            raise GuestClosed(f"{self!r} was closed while `{shlex.join(argv)[:120]}` was running")
        if writer_error:
            raise writer_error[0]
        return ExecResult(code, b"".join(out), b"".join(err))

    def _abort_active(self) -> list[str]:
        """Mark closed, kill local processes in flight; return the tags of those commands."""
        with self._state_lock:
            self._closed.set()
            active = dict(self._active)
        for proc in active:
            _kill(proc)
        return list(active.values())

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # type: ignore[attr-defined]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child's session. Safe: an unreaped child's pid cannot have been recycled."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _kill_by_token(token: str) -> None:
    import psutil

    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TOKEN_ENV) == token:
                proc.kill()


# --- directories owned through a marker file ----------------------------------------------


def new_marked_dir(prefix: str, base_dir: Path | str | None, marker: str, tracked: Tracked) -> Path:
    """A fresh temp dir holding ``marker`` = the ledger row's token; the row records its path.

    Only a dir whose marker still holds that token is ever removed (:func:`remove_marked_dir`).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    (path / marker).write_text(tracked.token)
    return path


def remove_marked_dir(
    details: Mapping[str, Any], marker: str, before: Callable[[Path], None] | None = None
) -> None:
    """Remove the dir at ``details["path"]`` if its marker holds ``details["token"]`` (a path
    reused by someone else is never touched); ``before`` runs first on an owned dir."""
    path = details.get("path")
    if not path:
        return
    root = Path(str(path))
    try:
        if (root / marker).read_text() != str(details.get("token") or ""):
            return
    except OSError:
        return
    if before is not None:
        before(root)
    shutil.rmtree(root, ignore_errors=True)


# --- LocalGuest ---------------------------------------------------------------------------

_MARKER = ".psb-guest"
_NS_WRAP = (
    'if [ "$PSB_TMPFS" = 1 ]; then mount -t tmpfs -o mode=1777,size=256m psb-tmp /tmp; '
    'else mount --bind "$PSB_ROOT/tmp" /tmp; fi || exit 125; exec "$@"'
)
_ns_prefix: dict[str, list[str] | None] = {}


def _unshare_prefix() -> list[str] | None:
    """The ``unshare`` argv prefix that works here: user + mount namespace, else (root) mount
    namespace alone, else None. Probed once per process."""
    if "prefix" not in _ns_prefix:
        found = None
        mount = ["unshare", "--mount", "--propagation", "private"]
        candidates = [["unshare", "--user", "--map-root-user", *mount[1:]]]
        if os.geteuid() == 0:
            candidates.append(mount)
        for prefix in candidates:
            try:
                done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                found = prefix
                break
        _ns_prefix["prefix"] = found
    return _ns_prefix["prefix"]


def namespaces_available() -> bool:
    """Whether ``unshare`` can give a command fresh namespaces here (cached)."""
    return _unshare_prefix() is not None


class LocalGuest(_ProcessGuest):
    """A private directory on this machine, commands run in their own session.

    Where ``unshare`` works, every command also runs in a fresh user + mount namespace (mount
    alone when only that works) whose ``/tmp`` is the guest's own ``<root>/tmp`` — or a fresh
    tmpfs with ``tmpfs_tmp=True``. Commands get a small environment: ``PATH``, ``HOME`` (the
    guest's ``<root>/home``), ``LANG``. The workspace path defaults to ``<root>/repo``.
    """

    kind = "local"

    def __init__(
        self,
        *,
        base_dir: Path | str | None = None,
        tracker: ResourceTracker | None = None,
        namespaces: bool | None = None,
        tmpfs_tmp: bool = False,
    ) -> None:
        super().__init__()
        self.tmpfs_tmp = tmpfs_tmp
        self._tracked = track(
            tracker, "guest", "local guest (creating)", releaser=LOCAL_RELEASER, details={}
        )
        try:
            use_ns = namespaces is not False and namespaces_available()
            self.namespaces = use_ns
            # /tmp is replaced inside the namespace, so the guest root must live elsewhere
            base = Path(base_dir) if base_dir is not None else Path("/var/tmp")
            if use_ns and _under(base.resolve(), Path("/tmp").resolve()):
                base = Path("/var/tmp")
            base.mkdir(parents=True, exist_ok=True)
            self.root = new_marked_dir("psb-guest-", base, _MARKER, self._tracked)
            self._tracked.update(key=f"local guest {self.root}", path=str(self.root))
            for sub in ("home", "tmp"):
                (self.root / sub).mkdir()
            (self.root / "tmp").chmod(0o1777)
        except BaseException:
            self.close()
            raise

    @property
    def default_workspace_path(self) -> str:
        return str(self.root / "repo")

    def _popen_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
            "PSB_ROOT": str(self.root),
            "PSB_TMPFS": "1" if self.tmpfs_tmp else "0",
            TOKEN_ENV: self._tracked.token,
        }

    def _command(
        self, argv: Sequence[str], env: Mapping[str, str] | None, tag: str | None
    ) -> list[str]:
        command = list(argv)
        if env:
            command = ["env", *(f"{k}={v}" for k, v in env.items()), *command]
        prefix = _unshare_prefix() if self.namespaces else None
        if prefix is not None:
            command = [*prefix, "sh", "-c", _NS_WRAP, "psb-guest", *command]
        return command

    def close(self) -> None:
        """Abort commands in flight, kill strays, remove the directory. Idempotent."""
        self._abort_active()
        release_local_guest({"path": str(getattr(self, "root", "")), "token": self._tracked.token})
        self._tracked.released()

    def keep(self) -> None:
        self._tracked.kept()

    def __repr__(self) -> str:
        return f"<LocalGuest {getattr(self, 'root', '?')}>"


def _under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def release_local_guest(details: Mapping[str, Any]) -> None:
    """Ledger releaser for local guests: kill commands carrying the token, remove the dir.

    The directory is removed only when its marker file holds this guest's token, so a path
    reused by someone else is never touched.
    """
    token = str(details.get("token") or "")
    if token:
        _kill_by_token(token)
    remove_marked_dir(details, _MARKER)


LOCAL_RELEASER = f"{__name__}:release_local_guest"


# --- SSHGuest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHTarget:
    """How to reach an SSH host: address, user, key and the known_hosts that pins its key."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts: Path
    extra_options: tuple[str, ...] = field(default=())

    def options(self) -> list[str]:
        return [
            "-F", "none",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=6",
            "-o", "LogLevel=ERROR",
            "-i", str(self.key_path),
            "-p", str(self.port),
            "-l", self.user,
            *self.extra_options,
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_path": str(self.key_path),
            "known_hosts": str(self.known_hosts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SSHTarget:
        return cls(
            host=str(data["host"]),
            port=int(data["port"]),
            user=str(data["user"]),
            key_path=Path(str(data["key_path"])),
            known_hosts=Path(str(data["known_hosts"])),
        )


_SSH_SCRATCH = (
    'd="$1"; [ -n "$d" ] || d="$HOME/.cache/pytest-sandbox/guests"; d="$d/$2"; '
    'mkdir -p -- "$d/.pids" && printf %s "$d" > "$d/.psb-guest" && printf %s "$d"'
)
_SSH_WRAP = 'printf %s "$$" > "$1"; PSB_TAG=$1; export PSB_TAG; shift; exec "$@"'
# kill the remote groups named in the pid files, after checking (where /proc exists) that the
# pid still carries its tag: a recycled pid is never signalled
_SSH_KILL = r"""
for f in "$@"; do
    p=$(cat "$f" 2>/dev/null) || continue
    [ -n "$p" ] || continue
    if [ -d /proc/self ]; then
        tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qxF "PSB_TAG=$f" || continue
    fi
    kill -s KILL -- "-$p" 2>/dev/null
done
:
"""
# remove a guest's scratch dir (only when its marker names it), killing its commands first
_SSH_CLEAN = (
    '[ -f "$1/.psb-guest" ] && [ "$(cat "$1/.psb-guest")" = "$1" ] || exit 0\n'
    'd=$1; set -- "$d"/.pids/*\n' + _SSH_KILL + 'rm -rf -- "$d"\n'
)


class SSHGuest(_ProcessGuest):
    """A host reached with OpenSSH (``ssh`` client, BatchMode, its own known_hosts).

    One master connection (``ControlMaster``, socket in ``socket_dir``) is opened at start and
    every command reuses it. The guest owns a scratch dir on the host (under ``scratch_root``,
    default ``$HOME/.cache/pytest-sandbox/guests``), removed at close; the workspace path
    defaults to ``<scratch>/repo`` because an SSH host may be a shared machine.
    """

    kind = "ssh"

    def __init__(
        self,
        target: SSHTarget,
        *,
        socket_dir: Path | str | None = None,
        scratch_root: str | None = None,
        tracker: ResourceTracker | None = None,
        log_dir: Path | None = None,
    ) -> None:
        super().__init__()
        from pytest_sandbox.runtime.processes import TrackedProcess

        self.target = target
        self._own_dir: Path | None = None
        if socket_dir is None or log_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="psb-ssh-"))
        socket_dir = socket_dir or self._own_dir
        assert socket_dir is not None
        self.control_path = Path(socket_dir) / f"ssh-{os.urandom(6).hex()}.sock"
        self._tracked = track(
            tracker,
            "guest",
            f"ssh guest {target.user}@{target.host}:{target.port} (creating)",
            releaser=SSH_RELEASER,
            details=target.to_dict(),
        )
        self.scratch = ""
        log_path = (log_dir or self._own_dir or Path(".")) / f"ssh-master-{os.urandom(4).hex()}.log"
        self._master = TrackedProcess(
            [
                "ssh", *target.options(), "-M", "-N",
                "-o", f"ControlPath={self.control_path}", "-o", "ControlPersist=no",
                target.host,
            ],
            log_path=log_path,
            ready=lambda: self.control_path.exists(),
            timeout=30.0,
            grace=1.0,
            tracker=tracker,
            name="ssh-master",
        )  # fmt: skip
        try:
            self._master.start()
            result = self.run(script_argv(_SSH_SCRATCH, scratch_root or "", self._tracked.token))
            self.scratch = result.check(f"{self!r}: creating the scratch dir").output.decode()
            self._tracked.update(
                key=f"ssh guest {target.user}@{target.host}:{target.port} {self.scratch}",
                scratch=self.scratch,
            )
        except BaseException:
            self.close()
            raise

    @property
    def default_workspace_path(self) -> str:
        return f"{self.scratch}/repo"

    def _command(
        self, argv: Sequence[str], env: Mapping[str, str] | None, tag: str | None
    ) -> list[str]:
        command = list(argv)
        if env:
            command = ["env", *(f"{k}={v}" for k, v in env.items()), *command]
        if self.scratch and tag is not None:
            # the remote shell is its session's leader: its pid names the group to kill
            command = script_argv(_SSH_WRAP, f"{self.scratch}/.pids/{tag}", *command)
        return [
            "ssh", *self.target.options(),
            "-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no",
            "-T", self.target.host, "--", shlex.join(command),
        ]  # fmt: skip

    def _on_timeout(self, tag: str) -> None:
        # killing the local ssh client does not reach the remote command (the master holds
        # its pipes): kill the remote process group by the pid it wrote at start
        self._kill_remote([tag])

    def _kill_remote(self, tags: Iterable[str]) -> None:
        pidfiles = [f"{self.scratch}/.pids/{tag}" for tag in tags]
        if not pidfiles or not self.scratch:
            return
        argv = self._command(script_argv(_SSH_KILL, *pidfiles), None, None)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    def close(self) -> None:
        """Abort commands in flight, remove the scratch dir, stop the master. Idempotent."""
        self._kill_remote(self._abort_active())
        if self.scratch and not self._released:
            details = {**self.target.to_dict(), "scratch": self.scratch}
            release_ssh_guest({**details, "control": str(self.control_path)})
        self._released = True
        if hasattr(self, "_master"):
            self._master.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        self._tracked.released()

    _released = False

    def keep(self) -> None:
        self._tracked.kept()
        self._master.keep()

    def __repr__(self) -> str:
        t = self.target
        return f"<SSHGuest {t.user}@{t.host}:{t.port} {self.scratch or '(no scratch)'}>"


def release_ssh_guest(details: Mapping[str, Any]) -> None:
    """Ledger releaser for SSH guests: remove the scratch dir (only if its marker names it).

    A host that no longer answers counts as released (its own teardown removes its files).
    """
    scratch = details.get("scratch")
    if not scratch:
        return
    target = SSHTarget.from_dict(details)
    control = details.get("control")
    argv = ["ssh", *target.options(), "-o", "ConnectTimeout=3"]
    if control and Path(str(control)).exists():
        argv += ["-o", f"ControlPath={control}", "-o", "ControlMaster=no"]
    argv += ["-T", target.host, "--", shlex.join(script_argv(_SSH_CLEAN, str(scratch)))]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False)


SSH_RELEASER = f"{__name__}:release_ssh_guest"


# --- ContainerGuest -----------------------------------------------------------------------


class ContainerGuest(_ShellGuest):
    """A container of the ``debian-git`` image (or ``image``), driven through the engine API.

    Created through :meth:`Engine.create_container` (labelled, ledger row first), started
    with ``sleep infinity`` under ``--init``; networking is off unless ``network=True``;
    ``tmpfs_tmp=True`` mounts a tmpfs on ``/tmp``. Commands are ``exec``s with stdin streamed
    over the hijacked connection; ``put_tar`` streams into the container's ``tar -x``.
    ``close()`` removes the container (force), which aborts anything in flight.
    """

    kind = "container"

    def __init__(
        self,
        engine: Any,
        image: str,
        *,
        tracker: ResourceTracker | None = None,
        nodeid: str = "",
        network: bool = False,
        tmpfs_tmp: bool = False,
        workspace_path: str = "/root/repo",
    ) -> None:
        self.engine = engine
        self.image = image
        self.workspace_lock = threading.Lock()
        self._closed = threading.Event()
        self._workspace_path = workspace_path
        self._sockets: set[Any] = set()
        self._state_lock = threading.Lock()
        options: dict[str, Any] = {
            "command": ["sleep", "infinity"],
            "init": True,
            "network_disabled": not network,
            "working_dir": "/root",
            "environment": {"LANG": "C.UTF-8", "HOME": "/root"},
        }
        if tmpfs_tmp:
            options["tmpfs"] = {"/tmp": "rw,mode=1777,size=256m"}
        container, self._tracked = engine.create_container(
            image, tracker=tracker, nodeid=nodeid, **options
        )
        self.id: str = container.id
        self.name: str = container.name
        try:
            engine.client.api.start(self.id)
        except BaseException:
            self.close()
            raise

    @property
    def default_workspace_path(self) -> str:
        return self._workspace_path

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _api_error(self, exc: BaseException, what: str) -> GuestError:
        if self._closed.is_set():
            return GuestClosed(f"{self!r} was removed while {what}")
        return GuestError(f"{self!r}: {what} failed: {exc}. Check `docker logs {self.name}`.")

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: StdinSource = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """``docker exec`` of ``argv``; stdin streamed; never raises on a non-zero exit."""
        _check_argv(argv)
        if self._closed.is_set():
            raise GuestClosed(f"{self!r} was closed")
        api = self.engine.client.api
        what = f"running `{shlex.join(argv)[:120]}`"
        try:
            exec_id = api.exec_create(
                self.id,
                list(argv),
                stdin=stdin is not None,
                stdout=True,
                stderr=True,
                environment=dict(env) if env else None,
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
        except Exception as exc:
            raise self._api_error(exc, what) from exc
        raw = getattr(sock, "_sock", sock)
        read_exactly = _stream_reader(sock, raw)
        with self._state_lock:
            self._sockets.add(raw)
        out: list[bytes] = []
        err: list[bytes] = []
        failure: list[BaseException] = []

        def feed() -> None:
            try:
                for chunk in iter_chunks(stdin):
                    if self._closed.is_set():
                        raise GuestClosed(f"{self!r} was closed while {what}")
                    raw.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BaseException as exc:
                failure.append(exc)
                with contextlib.suppress(OSError):
                    raw.shutdown(2)  # SHUT_RDWR: abort the exec's streams
                return
            with contextlib.suppress(OSError):
                raw.shutdown(1)  # SHUT_WR: the command sees end of input

        def read() -> None:
            with contextlib.suppress(OSError, ValueError):
                while True:
                    header = read_exactly(8)
                    if len(header) < 8:
                        return
                    size = int.from_bytes(header[4:8], "big")
                    data = read_exactly(size)
                    (err if header[0] == 2 else out).append(data)

        threads = [threading.Thread(target=read, daemon=True)]
        if stdin is not None:
            threads.append(threading.Thread(target=feed, daemon=True))
        for thread in threads:
            thread.start()
        try:
            threads[0].join(timeout)
            if threads[0].is_alive():
                killed = self._kill_exec(exec_id)
                with contextlib.suppress(OSError):
                    raw.shutdown(2)
                raise GuestTimeout(
                    f"{self!r}: {what} ran past its {timeout:g}s timeout and "
                    + (
                        "was killed"
                        if killed
                        else "had its streams closed (a remote engine: "
                        "the process ends with the container)"
                    )
                    + ". Raise timeout= or check what the command waits for."
                )
            for thread in threads[1:]:
                thread.join(10)
        finally:
            with self._state_lock:
                self._sockets.discard(raw)
            with contextlib.suppress(OSError):
                sock.close()
        if self._closed.is_set():
            raise GuestClosed(f"{self!r} was removed while {what}")
        if failure:
            raise failure[0]
        try:
            code = api.exec_inspect(exec_id).get("ExitCode")
        except Exception as exc:
            raise self._api_error(exc, what) from exc
        return ExecResult(-1 if code is None else int(code), b"".join(out), b"".join(err))

    def _kill_exec(self, exec_id: str) -> bool:
        """Kill a still-running exec and its descendants (engine on this host only).

        The engine has no exec-kill; ``exec_inspect`` gives the host pid while ``Running`` is
        true, which is the identity check: that pid is the exec's process right now.
        """
        if not getattr(self.engine, "is_local", False):
            return False
        import psutil

        try:
            info = self.engine.client.api.exec_inspect(exec_id)
            if not info.get("Running") or not info.get("Pid"):
                return False
            leader = psutil.Process(int(info["Pid"]))
            victims = [leader, *leader.children(recursive=True)]
        except Exception:
            return False
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return True

    def close(self, *, wait: bool = True) -> None:
        """Remove the container (force): in-flight execs and tar streams fail. Idempotent.

        ``wait=False`` (``sandbox_guest``'s teardown) returns once nothing of the container
        runs and leaves the engine's clean-up to its removal threads, as
        ``SandboxContainer.close(wait=False)`` does.
        """
        first = not self._closed.is_set()
        self._closed.set()
        with self._state_lock:
            sockets = list(self._sockets)
        for raw in sockets:
            with contextlib.suppress(OSError):
                raw.shutdown(2)
        if not wait and first and self.engine.halt_on_host(self.id):
            self.engine.remove_later(self._remove, f"guest container {self.name}")
            return
        self._remove()

    def _remove(self) -> None:
        self.engine.remove_container(self.id)
        self._tracked.released()

    def keep(self) -> None:
        self.engine.mark_kept(self.id)
        self._tracked.kept()

    def __enter__(self) -> ContainerGuest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ContainerGuest {getattr(self, 'name', '?')} image={self.image}>"


def _check_argv(argv: Sequence[str]) -> None:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise GuestError(f"argv must be a non-empty list of str, got {argv!r}")


def _stream_reader(sock: Any, raw: Any) -> Callable[[int], bytes]:
    """``read(n)`` of a hijacked exec stream: n bytes, fewer only at its end.

    The HTTP parser read the response's headers through a buffered reader, which may already
    hold the first frames (a command that answered before this thread parsed the headers,
    e.g. under CPU load): read through that reader, not the bare socket, or they are lost.
    """
    response = getattr(sock, "_response", None)  # docker SDK: kept on the socket it returns
    http = getattr(getattr(response, "raw", None), "_fp", None)
    buffered = getattr(http, "fp", None)
    if buffered is not None and getattr(buffered, "raw", None) is sock:
        return buffered.read  # type: ignore[no-any-return]
    return lambda size: _recv_exact(raw, size)


def _recv_exact(sock: Any, size: int) -> bytes:
    parts = []
    while size > 0:
        data = sock.recv(min(size, CHUNK))
        if not data:
            break
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def stop_quietly(close: Callable[[], None]) -> None:
    """Call ``close`` and swallow GuestError (for teardown paths that must not mask errors)."""
    with contextlib.suppress(GuestError):
        close()
