"""The verified backend launcher: allow-listed binaries, verified identity, trace context.

``BackendLauncher.launch(ServiceDefinition(...))`` checks the binary against its allow root
(canonical paths, component-wise containment, no world-writable file or directory on the way),
gives it a fresh endpoint (a Unix socket in the run's short socket dir, or a reserved loopback TCP
port), spawns it detached in its own session with its output in a log file, records its identity
(pid, start time, canonical exe, exe SHA-256, boot id, argv, endpoint, …) in the run dir and in
the ledger, and waits for its readiness probe. Every signal it later sends — ``stop()``, a failed
probe, the run's reaper, the next session's sweep — is preceded by a check of that identity.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from pytest_sandbox import errors
from pytest_sandbox.launcher.identity import BackendIdentity, file_sha256
from pytest_sandbox.launcher.trace import TraceContext
from pytest_sandbox.runtime.cleanup import CleanupStack
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track
from pytest_sandbox.runtime.processes import TOKEN_ENV, log_tail, spawn, stop_group
from pytest_sandbox.runtime.run import SUN_PATH_MAX, RunContext
from pytest_sandbox.runtime.waiting import HttpStatus, LogRegex, TcpPort, UnixSocket, wait_for

KIND = "backend"
RELEASER = f"{__name__}:release_backend"

#: Variables the launcher gives every backend (DESIGN.md); definitions may not set them.
ENV_PREFIX = "PYTEST_SANDBOX_"
TRACE_VARS = ("TRACEPARENT", "TRACESTATE")
#: Variables a backend inherits from the test process unless ``inherit_env=True``.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")

DEFAULT_GRACE = 3.0
#: Grace used by the reaper and the sweep: the owner is dead, nobody waits for a clean stop.
REAP_GRACE = 0.5

Probe = Callable[[], bool]
ProbeSpec = str | Callable[["Endpoint"], Probe] | None


@dataclass(frozen=True)
class Endpoint:
    """Where a backend listens: ``unix`` (``path``) or ``tcp`` (``host``, ``port``).

    ``str(endpoint)`` — ``unix:/path`` or ``tcp:127.0.0.1:PORT`` — is what the backend receives as
    ``PYTEST_SANDBOX_ENDPOINT``.
    """

    kind: Literal["unix", "tcp"]
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:{self.host}:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A connected stream socket to the endpoint."""
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def http(
        self, method: str, path: str = "/", body: bytes | None = None, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        """One HTTP request over the endpoint; returns (status, body)."""
        conn = http.client.HTTPConnection(self.host, self.port or 80, timeout=timeout)
        conn.sock = self.connect(timeout)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@dataclass(frozen=True)
class ServiceDefinition:
    """What to launch and how to know it is ready.

    ``binary_path`` must lie under ``allow_root`` once both are canonical (a relative
    ``binary_path`` is taken relative to the root). ``args`` may contain the placeholders
    ``{endpoint}``, ``{socket}``, ``{port}`` and ``{idle_timeout}``. ``probe`` is ``"connect"``
    (the endpoint accepts), ``"http"`` / ``"http:/path"`` (GET answers 2xx/3xx), ``"log:REGEX"``
    (the log matches), a callable ``(Endpoint) -> probe`` or None (no probe).
    ``idle_timeout`` is passed to the backend (``{idle_timeout}``, ``PYTEST_SANDBOX_IDLE_TIMEOUT``);
    a backend that then exits by itself with a code in ``idle_exit_codes`` reports
    ``"exited: idle"``. ``stop()`` raises unless the exit code is in ``expected_exit_codes``.
    """

    name: str
    version: str
    binary_path: str | os.PathLike[str]
    allow_root: str | os.PathLike[str]
    args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    probe: ProbeSpec = "connect"
    idle_timeout: float | None = None
    endpoint: Literal["unix", "tcp"] = "unix"
    ready_timeout: float = 10.0
    probe_attempt_timeout: float = 1.0
    grace: float = DEFAULT_GRACE
    expected_exit_codes: tuple[int, ...] = (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    idle_exit_codes: tuple[int, ...] = (0,)
    inherit_env: bool = False
    cwd: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class CheckedBinary:
    """A binary that passed the allow-list checks: canonical paths and the file's SHA-256."""

    binary: Path
    root: Path
    sha256: str


def _under(path: str, root: str) -> bool:
    """Component-wise containment: ``path`` is strictly below ``root``."""
    root = root.rstrip("/") or "/"
    return path != root and path.startswith(root if root == "/" else root + "/")


def check_binary(service: ServiceDefinition) -> CheckedBinary:
    """Apply the allow-list rules to ``service``; raise a :class:`LaunchRefused` subclass.

    Nothing is spawned and nothing is written.
    """
    name = service.name

    def refuse(cls: type[errors.LaunchRefusal], value: object, problem: str, fix: str) -> None:
        raise cls(name, value, problem, fix)

    raw_bin = "" if service.binary_path is None else os.fspath(service.binary_path)
    raw_root = "" if service.allow_root is None else os.fspath(service.allow_root)
    if not str(raw_bin).strip():
        refuse(errors.BinaryPathEmpty, raw_bin, "binary_path is empty", "Name the daemon to run.")
    if not str(raw_root).strip():
        refuse(
            errors.AllowRootEmpty,
            raw_root,
            "allow_root is empty",
            "Name the directory the daemon must live under.",
        )
    root_abs = os.path.abspath(raw_root)
    if not os.path.isdir(root_abs):
        refuse(
            errors.AllowRootInvalid,
            raw_root,
            "allow_root is not an existing directory",
            "Create it, or point allow_root at the directory holding the daemon.",
        )
    root = os.path.realpath(root_abs)
    if root == "/":
        refuse(
            errors.AllowRootInvalid,
            raw_root,
            "allow_root resolves to '/', which allows every file",
            "Use the narrowest directory that holds the daemon.",
        )
    joined = raw_bin if os.path.isabs(raw_bin) else os.path.join(root_abs, raw_bin)
    if ".." in joined.split("/"):
        refuse(
            errors.BinaryPathTraversal,
            raw_bin,
            "binary_path contains a '..' component",
            "Give the path without '..' (the canonical path must lie under allow_root).",
        )
    bin_abs = os.path.normpath(joined)
    canonical = os.path.realpath(bin_abs)
    if not _under(canonical, root):
        where = f"resolves to {canonical}, not under {root}"
        if _under(bin_abs, root_abs) or _under(bin_abs, root):
            refuse(
                errors.BinarySymlinkEscape,
                raw_bin,
                f"a symlink on the path leads out of the allow root ({where})",
                "Copy the daemon into the allow root instead of linking to it.",
            )
        if canonical.startswith(root) or bin_abs.startswith(root_abs.rstrip("/")):
            refuse(
                errors.BinarySiblingPrefix,
                raw_bin,
                f"the path only shares the allow root's prefix ({where})",
                "Put the daemon inside the allow root itself.",
            )
        refuse(
            errors.BinaryOutsideRoot,
            raw_bin,
            f"the binary is outside the allow root ({where})",
            "Put the daemon under allow_root, or use the allow root that holds it.",
        )
    try:
        st = os.stat(canonical)
    except FileNotFoundError:
        refuse(
            errors.BinaryMissing,
            raw_bin,
            f"{canonical} does not exist",
            "Build or install the daemon first.",
        )
        raise  # unreachable: refuse() raised
    if not stat.S_ISREG(st.st_mode):
        refuse(
            errors.BinaryNotExecutable,
            raw_bin,
            f"{canonical} is not a regular file",
            "Point binary_path at the daemon's executable file.",
        )
    if not st.st_mode & 0o111 or not os.access(canonical, os.X_OK):
        refuse(
            errors.BinaryNotExecutable,
            raw_bin,
            f"{canonical} is not executable (mode {stat.filemode(st.st_mode)})",
            "chmod +x it (0755).",
        )
    if st.st_mode & stat.S_IWOTH:
        refuse(
            errors.BinaryWorldWritable,
            raw_bin,
            f"{canonical} is world-writable (mode {stat.filemode(st.st_mode)}): "
            "anyone could replace the code that runs",
            "chmod o-w it.",
        )
    directory = os.path.dirname(canonical)
    while True:
        dst = os.stat(directory)
        if dst.st_mode & stat.S_IWOTH:
            refuse(
                errors.AllowRootWorldWritable,
                raw_root,
                f"{directory} is world-writable (mode {stat.filemode(dst.st_mode)}): "
                "anyone could swap the daemon",
                f"chmod o-w {directory}, or use a private allow root.",
            )
        if directory == root:
            break
        directory = os.path.dirname(directory)
    return CheckedBinary(Path(canonical), Path(root), file_sha256(canonical))


def check_env(service: ServiceDefinition) -> dict[str, str]:
    """The definition's own env, refusing the variables the launcher owns."""
    env = dict(service.env or {})
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) or key.upper() in TRACE_VARS:
            raise errors.ReservedEnvironment(
                service.name,
                key,
                f"env sets {key}, which the launcher provides",
                "Drop it; pass trace context with launch(trace=...).",
            )
        if not isinstance(value, str):
            raise errors.ReservedEnvironment(
                service.name, key, f"env value for {key} is not a string", "Pass strings only."
            )
    return env


# --- endpoints ----------------------------------------------------------------------------


def reserve_tcp_port(lock_dir: Path, host: str = "127.0.0.1") -> tuple[int, Path]:
    """A free loopback port, reserved for this run by an ``O_EXCL`` lock file in ``lock_dir``.

    The kernel picks the port; the lock file makes two workers of one run never hand out the
    same one even if the kernel offers it twice before either backend binds it.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        lock = lock_dir / f"port-{port}"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue
        return port, lock
    raise errors.BackendError(
        f"could not reserve a free TCP port on {host} in 100 tries (lock dir {lock_dir}). "
        "Remove stale port-* files there or free some ports."
    )


def new_socket_path(socket_dir: Path) -> Path:
    """A fresh Unix socket path (random, collision-checked, within the 108-byte limit)."""
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(100):
        path = socket_dir / f"be-{secrets.token_hex(8)}.sock"
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise errors.BackendError(
                f"Unix socket path {path} is {len(os.fsencode(path))} bytes, over the "
                f"{SUN_PATH_MAX}-byte limit. Use a shorter socket dir (--sandbox-state-dir / "
                "TMPDIR)."
            )
        if not os.path.lexists(path):
            return path
    raise errors.BackendError(f"no free socket name in {socket_dir} after 100 tries")


def _remove_files(*paths: str | Path | None) -> None:
    for path in paths:
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


# --- the handle ---------------------------------------------------------------------------


class BackendHandle:
    """A launched backend: ``identity``, ``endpoint``, ``log_path``, ``status``, ``verify()``,
    ``stop()``.

    ``status`` is ``running``, ``stopped`` (by ``stop()``), ``killed after grace`` (it ignored
    SIGTERM), ``exited: idle`` (it exited by itself after its idle timeout) or ``crashed: exit
    code N`` / ``crashed: signal NAME``.
    """

    def __init__(
        self,
        service: ServiceDefinition,
        *,
        popen: subprocess.Popen[bytes],
        identity: BackendIdentity,
        endpoint: Endpoint,
        log_path: Path,
        record_path: Path,
        tracked: Tracked,
        trace: TraceContext | None,
        files: Sequence[Path],
        spawned_at: float,
    ) -> None:
        self.service = service
        self.identity = identity
        self.endpoint = endpoint
        self.log_path = log_path
        self.record_path = record_path
        self.trace = trace
        self._popen = popen
        self._tracked = tracked
        self._files = list(files)
        self._spawned_at = spawned_at
        self._exited_at: float | None = None
        self._stopping = False
        self._stopped = False
        self._killed = False
        self._lock = threading.Lock()
        # Reap the backend the moment it exits (no zombie) and note when and why it exited.
        self._watcher = threading.Thread(
            target=self._watch, name=f"backend-{service.name}-{popen.pid}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        with contextlib.suppress(Exception):
            self._popen.wait()
        if not self._stopping:
            self._exited_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def instance(self) -> str:
        return self.identity.instance

    @property
    def token(self) -> str:
        return self._tracked.token

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen.returncode is not None else self._poll()

    def _poll(self) -> int | None:
        code = self._popen.poll()
        if code is not None and self._exited_at is None and not self._stopping:
            self._exited_at = time.monotonic()
        return code

    @property
    def status(self) -> str:
        code = self.returncode
        if code is None:
            return "stopping" if self._stopping else "running"
        if self._exited_at is not None:  # exited by itself
            idle = self.service.idle_timeout
            if (
                idle is not None
                and code in self.service.idle_exit_codes
                and self._exited_at - self._spawned_at >= idle - 0.05
            ):
                return "exited: idle"
            return _crash_status(code)
        if self._killed:
            return "killed after grace"
        return "stopped"

    def verify(self) -> BackendIdentity:
        """Re-check pid + start time + exe path + exe SHA-256 against the live process.

        Raises :class:`BackendIdentityMismatch` when the record no longer names the process,
        :class:`BackendUnexpectedExit` when it has exited.
        """
        verdict = self.identity.check()
        if verdict.verdict == "mismatch":
            raise errors.BackendIdentityMismatch(
                f"backend {self.name!r} (pid {self.identity.pid}) failed verification: "
                f"{verdict.reason}. Nothing was signalled; the record is {self.record_path}."
            )
        if verdict.verdict == "gone" or self.returncode is not None:
            self._poll()
            raise errors.BackendUnexpectedExit(
                f"backend {self.name!r} (pid {self.identity.pid}) is no longer running: "
                f"{self.status}.\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
            )
        return self.identity

    def stop(self, grace: float | None = None, *, check: bool = True) -> int | None:
        """Stop the backend's process group (identity verified first) and release its row.

        SIGTERM → ``grace`` (default the definition's) → SIGKILL → wait. Idempotent: only the
        first call reports. With ``check`` (default), raises :class:`BackendUnexpectedExit`
        when the backend had crashed or ended with an exit code outside
        ``expected_exit_codes``. Raises
        :class:`BackendIdentityMismatch` — and signals nothing — when the identity no longer
        holds.
        """
        with self._lock:
            if self._stopped:
                return self.returncode  # the first stop() reported; later calls are quiet
            self._stop_locked(self.service.grace if grace is None else grace)
        code = self.returncode
        if check:
            self._check_exit(code)
        return code

    def _stop_locked(self, grace: float) -> None:
        self._poll()
        self._stopping = True
        verdict = self.identity.check()
        if verdict.verdict == "mismatch" and self._popen.returncode is None:
            self._stopping = False
            raise errors.BackendIdentityMismatch(
                f"not signalling backend {self.name!r} (pid {self.identity.pid}): "
                f"{verdict.reason}. Nothing was signalled; check {self.record_path}."
            )
        try:
            stop_group(self.identity.process, grace=grace, popen=self._popen, token=self.token)
        except errors.IdentityMismatch as exc:
            raise errors.BackendIdentityMismatch(
                f"not signalling backend {self.name!r}: {exc}"
            ) from exc
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5.0)
        if self._exited_at is None and self._popen.returncode == -signal.SIGKILL:
            self._killed = True
        _remove_files(*self._files, self.record_path)
        self._tracked.released()
        self._stopped = True

    def _check_exit(self, code: int | None) -> None:
        status = self.status
        expected = self.service.expected_exit_codes
        bad = status.startswith("crashed") or (
            status in ("stopped", "killed after grace") and code not in expected
        )
        if bad:
            why = status if status != "stopped" else f"stopped with exit code {code}"
            raise errors.BackendUnexpectedExit(
                f"backend {self.name!r} (pid {self.pid}) {why}; expected exit codes "
                f"{expected}. Set expected_exit_codes on the ServiceDefinition if this is "
                f"normal.\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
            )

    def keep(self) -> None:
        """Leave the backend running and mark its ledger row kept (``--sandbox-keep``)."""
        with self._lock:
            if not self._stopped:
                self._tracked.kept()
                self._stopped = True

    def http(self, method: str = "GET", path: str = "/", **kwargs: Any) -> tuple[int, bytes]:
        """One HTTP request to the backend's endpoint; returns (status, body)."""
        return self.endpoint.http(method, path, **kwargs)

    def __repr__(self) -> str:
        return f"<BackendHandle {self.name!r} pid={self.pid} {self.endpoint} {self.status}>"


def _crash_status(code: int) -> str:
    if code < 0:
        try:
            return f"crashed: signal {signal.Signals(-code).name}"
        except ValueError:
            return f"crashed: signal {-code}"
    return f"crashed: exit code {code}"


# --- the launcher ---------------------------------------------------------------------------


class BackendLauncher:
    """Launches backends from allow-listed roots; every one is stopped by ``close()``.

    ``allow_root`` is a directory the launcher offers for daemons (``install()`` copies one in,
    ``service()`` builds a definition over it); definitions may name their own root.
    ``log_hook(title, path)`` is told of every backend log file (the fixture attaches them to
    a failing test's report). Without a
    ``run`` (outside pytest) the launcher makes a private short directory for sockets, logs and
    records and removes it on ``close()``.
    """

    def __init__(
        self,
        allow_root: str | os.PathLike[str] | None = None,
        *,
        run: RunContext | None = None,
        tracker: ResourceTracker | None = None,
        namespace: str | None = None,
        log_hook: Callable[[str, Path], object] | None = None,
    ) -> None:
        self._own_dir: Path | None = None
        self._log_hook = log_hook
        if run is None:
            import tempfile

            self._own_dir = Path(tempfile.mkdtemp(prefix="psb-be-"))
            self.run_id = secrets.token_hex(6)
            self.socket_dir = self._own_dir
            self.log_dir = self._own_dir / "logs"
            self.record_dir = self._own_dir / "backends"
            worker = "local"
        else:
            run.ensure_dirs()
            self.run_id = run.run_id
            self.socket_dir = run.socket_dir
            self.log_dir = run.log_dir
            self.record_dir = run.run_dir / "backends"
            worker = run.worker_id
        self.namespace = namespace or f"{self.run_id}.{worker}"
        self.allow_root = Path(allow_root) if allow_root is not None else None
        if self.allow_root is not None:
            self.allow_root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._tracker = tracker
        self._handles: list[BackendHandle] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- conveniences over the launcher's own allow root --

    def _root(self) -> Path:
        if self.allow_root is None:
            raise errors.BackendError(
                "this BackendLauncher has no allow_root; pass one to BackendLauncher(...)"
            )
        return self.allow_root

    def install(self, source: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy an executable into the allow root (mode 0755) and return its path there."""
        import shutil

        dest = self._root() / (name or Path(source).name)
        shutil.copyfile(source, dest)
        dest.chmod(0o755)
        return dest

    def install_demo_daemon(self, name: str = "httpd") -> Path:
        """Put the tiny HTTP demo daemon (see ``demo_daemon``) into the allow root."""
        from pytest_sandbox.launcher.demo_daemon import write_demo_daemon

        return write_demo_daemon(self._root() / name)

    def service(
        self, name: str, binary: str | os.PathLike[str], *, version: str = "0", **options: Any
    ) -> ServiceDefinition:
        """A :class:`ServiceDefinition` over this launcher's allow root."""
        return ServiceDefinition(name, version, binary, self._root(), **options)

    @property
    def handles(self) -> list[BackendHandle]:
        return list(self._handles)

    # -- launching --

    def launch(
        self,
        service: ServiceDefinition,
        *,
        trace: TraceContext | str | Mapping[str, str] | None = None,
    ) -> BackendHandle:
        """Check, spawn, record and probe ``service``; return its running handle.

        Refusals raise :class:`LaunchRefused` subclasses before anything is spawned. A backend
        that exits while probed, or fails its probe by ``ready_timeout``, is stopped (identity
        checked, group killed, socket removed) and :class:`BackendNotReady` is raised.
        """
        if self._closed:
            raise errors.BackendError("this BackendLauncher is closed; make a new one")
        try:
            context = TraceContext.coerce(trace)
        except errors.InvalidTraceContext as exc:  # name the service, not just "trace"
            raise errors.InvalidTraceContext(
                service.name, exc.value, exc.problem, exc.fix
            ) from None
        checked = check_binary(service)
        own_env = check_env(service)
        if service.endpoint not in ("unix", "tcp"):
            raise errors.LaunchRefusal(
                service.name, service.endpoint, "endpoint must be 'unix' or 'tcp'", "Pick one."
            )
        undo = CleanupStack()
        try:
            return self._launch(service, checked, own_env, context, undo)
        except BaseException:
            undo.close()
            raise

    def _launch(
        self,
        service: ServiceDefinition,
        checked: CheckedBinary,
        own_env: dict[str, str],
        context: TraceContext | None,
        undo: CleanupStack,
    ) -> BackendHandle:
        files: list[Path] = []
        if service.endpoint == "unix":
            sock_path = new_socket_path(self.socket_dir)
            endpoint = Endpoint("unix", path=sock_path)
            files.append(sock_path)
        else:
            port, lock = reserve_tcp_port(self.socket_dir)
            endpoint = Endpoint("tcp", port=port)
            files.append(lock)
        undo.push(_remove_files, *files, name="remove endpoint files")
        instance = secrets.token_hex(8)
        log_path = self.log_dir / f"backend-{_safe(service.name)}-{instance}.log"
        record_path = self.record_dir / f"{_safe(service.name)}-{instance}.json"
        if self._log_hook is not None:
            self._log_hook(f"backend {service.name} log", log_path)
        argv = [str(checked.binary), *(_fill(a, endpoint, service) for a in service.args)]
        env = self._env(service, own_env, endpoint, instance, context)

        # The row exists before the process can: a crash right after spawn is still reaped.
        tracked = track(
            self._tracker,
            KIND,
            f"{service.name} {endpoint}",
            releaser=RELEASER,
            details={
                "service": service.name,
                "binary": str(checked.binary),
                "binary_sha256": checked.sha256,
                "endpoint": str(endpoint),
                "files": [str(f) for f in files],
                "log_path": str(log_path),
                "record_path": str(record_path),
                "grace": service.grace,
                "reap_grace": REAP_GRACE,
            },
        )
        undo.push(tracked.released, name="release ledger row")
        spawned_at = time.monotonic()
        popen = spawn(
            argv,
            log_path=log_path,
            env=env,
            cwd=service.cwd,
            token=tracked.token,
            inherit_env=False,
        )
        try:
            identity = BackendIdentity.capture(
                popen.pid,
                service=service.name,
                binary=str(checked.binary),
                binary_sha256=checked.sha256,
                argv=tuple(argv),
                endpoint=str(endpoint),
                idle_timeout=service.idle_timeout,
                run_id=self.run_id,
                instance=instance,
                token=tracked.token,
            )
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            code = popen.wait()
            stop_group_by_token(tracked.token)
            raise errors.BackendNotReady(
                f"backend {service.name!r} exited with code {code} right after it started."
                f"\n--- last lines of {log_path} ---\n{log_tail(log_path)}",
                code,
                log_tail(log_path),
            ) from None
        if identity.exe == str(checked.binary) and identity.exe_sha256 != checked.sha256:
            # The file changed between the check and exec: never run unverified code.
            stop_group(identity.process, grace=0.0, popen=popen, token=tracked.token)
            raise errors.BackendIdentityMismatch(
                f"backend {service.name!r}: {checked.binary} changed between the allow-list "
                "check and exec (SHA-256 differs); it was killed. Make the allow root "
                "writable only by you."
            )
        identity.write(record_path)
        tracked.update(
            key=f"{service.name} pid {popen.pid} {endpoint}",
            identity=identity.to_dict(),
        )
        handle = BackendHandle(
            service,
            popen=popen,
            identity=identity,
            endpoint=endpoint,
            log_path=log_path,
            record_path=record_path,
            tracked=tracked,
            trace=context,
            files=files,
            spawned_at=spawned_at,
        )
        undo.pop_all()  # the handle owns the files and the row now
        try:
            self._wait_ready(handle)
        except BaseException:
            with contextlib.suppress(errors.BackendError):
                handle.stop(grace=min(service.grace, 1.0), check=False)
            raise
        with self._lock:
            self._handles.append(handle)
        return handle

    def _env(
        self,
        service: ServiceDefinition,
        own_env: dict[str, str],
        endpoint: Endpoint,
        instance: str,
        context: TraceContext | None,
    ) -> dict[str, str]:
        if service.inherit_env:
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(ENV_PREFIX) and k.upper() not in TRACE_VARS
            }
        else:
            env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        env.update(own_env)
        env.update(
            {
                "PYTEST_SANDBOX_SERVICE_NAME": service.name,
                "PYTEST_SANDBOX_SERVICE_VERSION": service.version,
                "PYTEST_SANDBOX_ENDPOINT": str(endpoint),
                "PYTEST_SANDBOX_NAMESPACE": self.namespace,
                "PYTEST_SANDBOX_INSTANCE": instance,
                "PYTEST_SANDBOX_RUN_ID": self.run_id,
            }
        )
        if service.idle_timeout is not None:
            env["PYTEST_SANDBOX_IDLE_TIMEOUT"] = f"{service.idle_timeout:g}"
        if context is not None:
            env.update(context.env())
        return env

    def _wait_ready(self, handle: BackendHandle) -> None:
        service = handle.service
        probe = make_probe(service, handle.endpoint, handle.log_path)
        if probe is None:
            return
        what = f"backend {service.name!r} (pid {handle.pid}, {handle.endpoint})"
        try:
            wait_for(
                probe,
                timeout=service.ready_timeout,
                what=what,
                process=handle._popen,
                log_tail=lambda: log_tail(handle.log_path),
                interval=0.002,
                max_interval=0.05,
            )
        except errors.ProcessExitedEarly as exc:
            raise errors.BackendNotReady(
                f"{what} exited with code {exc.returncode} while its readiness probe ran; it was"
                f" cleaned up.\n--- last lines of {handle.log_path} ---\n{exc.log_tail}",
                exc.returncode,
                exc.log_tail,
            ) from exc
        except errors.ReadinessTimeout as exc:
            raise errors.BackendNotReady(
                f"{exc}\nThe backend was stopped (identity checked) and its endpoint removed.",
                None,
                log_tail(handle.log_path),
            ) from exc

    # -- teardown --

    def close(self) -> None:
        """Stop every backend still running (newest first). Idempotent.

        Failures (a crash during the test, an unexpected exit code, an identity mismatch) are
        raised together after every backend was handled.
        """
        with self._lock:
            handles, self._handles = self._handles, []
            self._closed = True
        stack = CleanupStack()
        for handle in handles:
            stack.push(handle.stop, name=f"stop backend {handle.name!r} (pid {handle.pid})")
        try:
            stack.close()
        finally:
            if self._own_dir is not None:
                import shutil

                shutil.rmtree(self._own_dir, ignore_errors=True)
                self._own_dir = None

    def keep(self) -> None:
        """Leave every backend running and mark it kept in the ledger."""
        with self._lock:
            handles, self._handles = self._handles, []
            self._closed = True
        for handle in handles:
            handle.keep()

    def __enter__(self) -> BackendLauncher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_probe(service: ServiceDefinition, endpoint: Endpoint, log_path: Path) -> Probe | None:
    """Turn the definition's probe spec into a foundation probe bound to ``endpoint``."""
    spec = service.probe
    attempt = service.probe_attempt_timeout
    if spec is None:
        return None
    if callable(spec):
        return spec(endpoint)
    if spec == "connect":
        if endpoint.kind == "unix":
            assert endpoint.path is not None
            return UnixSocket(endpoint.path, attempt_timeout=attempt)
        return TcpPort(endpoint.port, endpoint.host, attempt_timeout=attempt)
    if spec == "http" or spec.startswith("http:"):
        path = spec[5:] or "/"
        return HttpStatus(
            endpoint.port,
            path,
            host=endpoint.host,
            attempt_timeout=attempt,
            unix_socket=endpoint.path if endpoint.kind == "unix" else None,
        )
    if spec.startswith("log:"):
        return LogRegex(log_path, spec[4:])
    raise errors.LaunchRefusal(
        service.name,
        spec,
        "unknown probe",
        "Use 'connect', 'http', 'http:/path', 'log:REGEX', a callable "
        "(endpoint) -> probe, or None.",
    )


def _fill(arg: str, endpoint: Endpoint, service: ServiceDefinition) -> str:
    idle = "" if service.idle_timeout is None else f"{service.idle_timeout:g}"
    return (
        str(arg)
        .replace("{endpoint}", str(endpoint))
        .replace("{socket}", str(endpoint.path or ""))
        .replace("{port}", str(endpoint.port))
        .replace("{idle_timeout}", idle)
    )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "backend"


# --- the releaser (reaper and sweep) ---------------------------------------------------------


def _token_members(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
    return found


def stop_group_by_token(token: str, grace: float = 0.0) -> None:
    """Kill the processes carrying ``token`` (spawned by us; used before an identity exists)."""
    members = _token_members(token)
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.terminate() if grace > 0 else proc.kill()
    if members:
        _gone, alive = psutil.wait_procs(members, timeout=max(grace, 0.5))
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def release_backend(details: Mapping[str, Any]) -> None:
    """Ledger releaser for ``kind="backend"`` rows (used by the reaper and the sweep).

    Verifies the recorded identity (pid, start time, exe path, exe SHA-256) — and that the JSON
    record in the run dir agrees with the ledger's copy — before signalling anything. "Already
    gone" is success. A record that names a live process which is not the backend raises
    :class:`BackendIdentityMismatch` and signals nothing.
    """
    token = str(details.get("token") or "")
    files = [str(f) for f in details.get("files", ())]
    record_path = details.get("record_path")
    if "identity" not in details:
        # Spawn did not get as far as recording: only our token can name its processes.
        if token:
            stop_group_by_token(token)
        _remove_files(*files, record_path)
        return
    identity = BackendIdentity.from_dict(details["identity"])
    if record_path and os.path.exists(record_path):
        try:
            on_disk = BackendIdentity.load(Path(record_path))
        except (OSError, ValueError, KeyError) as exc:
            raise errors.BackendIdentityMismatch(
                f"backend {identity.service!r} (pid {identity.pid}): record {record_path} is "
                f"unreadable ({exc}); nothing was signalled."
            ) from exc
        if on_disk != identity:
            raise errors.BackendIdentityMismatch(
                f"backend {identity.service!r} (pid {identity.pid}): the record {record_path} "
                "disagrees with the ledger's copy; nothing was signalled. Inspect both, then "
                "stop the process by hand."
            )
    verdict = identity.check()
    if verdict.verdict == "mismatch":
        if token and _token_members(token):
            raise errors.BackendIdentityMismatch(
                f"backend {identity.service!r}: {verdict.reason}; processes carrying its token "
                "are alive but do not match the record, so nothing was signalled."
            )
        # The backend and everything it started are gone; the pid now names a stranger.
        _remove_files(*files, record_path)
        return
    grace = min(float(details.get("grace", DEFAULT_GRACE)), float(details.get("reap_grace", 1.0)))
    stop_group(identity.process, grace=grace, token=token or None)
    _remove_files(*files, record_path)
