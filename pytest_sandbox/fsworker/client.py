"""FsWorker: spawn a fs worker, wait for ``ready``, connect, and speak its protocol.

A plain class usable without pytest (context manager, idempotent ``close()``). Every worker is
recorded in the ledger (kind ``fsworker``) before it is spawned, so a crash of the test process
leaves the reaper what it needs: identity, token, grace, socket path, and the fresh root.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pytest_sandbox.errors import (
    FsKernelUnavailable,
    FsNetIsolationUnavailable,
    FsPolicyDenied,
    FsWorkerConnectTimeout,
    FsWorkerError,
    FsWorkerExited,
    FsWorkerProtocolError,
    FsWorkerReadyTimeout,
    FsWorkerRequestError,
    IdentityMismatch,
)
from pytest_sandbox.fsworker import protocol
from pytest_sandbox.fsworker.policy import POLICY_ENV, SandboxPolicy
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track
from pytest_sandbox.runtime.processes import (
    DEFAULT_GRACE,
    log_tail,
    release_process,
    spawn,
    stop_group,
)
from pytest_sandbox.runtime.run import default_socket_root

if TYPE_CHECKING:
    from pytest_sandbox.fsworker.zygote import ForkedProcess, Zygote

BOOT = str(Path(__file__).with_name("_boot.py"))
KIND = "fsworker"
RELEASER = f"{__name__}:release_fsworker"
#: Prefix of the fresh roots FsWorker makes; the releaser removes only directories named so.
FRESH_ROOT_PREFIX = "psb-fs-"
#: Variables passed from the test process to the worker; nothing else leaks into the sandbox.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
EXIT_KERNEL = 3
EXIT_NET = 4
#: Testing/diagnostic knob: which kernel layer limits TCP egress (``auto``, ``landlock``,
#: ``netns``); ``netns`` forces the network-namespace fallback on a kernel with Landlock ABI >= 4.
NET_LAYER_ENV = "PYTEST_SANDBOX_FS_NET_LAYER"
NET_LAYERS = ("auto", "landlock", "netns")


class ProxyLike(Protocol):
    """What a worker needs from an egress proxy (see :class:`~.proxy.EgressProxy`)."""

    @property
    def port(self) -> int: ...

    def env(self) -> dict[str, str]: ...


class PoolLike(Protocol):
    """The pool a lent worker returns to (see :class:`~.pool.FsWorkerPool`)."""

    def give_back(self, worker: FsWorker) -> None: ...

    def forget(self, worker: FsWorker) -> None: ...


@dataclass(frozen=True)
class ExecResult:
    """What ``exec`` returns: exit code (negative: killed by that signal), merged output."""

    exit_code: int
    output: bytes
    truncated: bool = False
    timed_out: bool = False


@dataclass(frozen=True)
class GrepMatch:
    path: str
    line: int
    text: str


def release_fsworker(details: Mapping[str, Any]) -> None:
    """Ledger releaser for ``kind="fsworker"``: stop the group, remove socket and fresh root."""
    release_process(details)
    socket_path = details.get("socket_path")
    if socket_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    fresh = details.get("fresh_root")
    if fresh and Path(fresh).name.startswith(FRESH_ROOT_PREFIX):
        shutil.rmtree(fresh, ignore_errors=True)


def _scratch_dir() -> Path:
    path = default_socket_root() / "fs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class FsWorker:
    """A connected fs worker confined to ``root`` by ``policy`` (and Landlock, when on).

    ``root=None`` makes a fresh directory (removed at ``close()``). ``kernel`` is ``auto``,
    ``require`` or ``off``; ``user`` a uid the worker drops to before it serves (root only).
    ``enforcement`` lists the active layers (``policy``, ``landlock``, ``landlock-net``, …).
    Requests are serialised: one in flight at a time, from any thread. Denials raise
    :class:`~pytest_sandbox.errors.PolicyDenied`; other error replies
    :class:`~pytest_sandbox.errors.FsWorkerRequestError`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        policy: SandboxPolicy | None = None,
        *,
        proxy: ProxyLike | None = None,
        kernel: str = "auto",
        user: int | None = None,
        env: Mapping[str, str] | None = None,
        tracker: ResourceTracker | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        request_timeout: float = 60.0,
        grace: float = DEFAULT_GRACE,
        allow_debug: bool = False,
        frame_timeout: float | None = None,
        argv: Sequence[str] | None = None,
        net_layer: str | None = None,
        zygote: Zygote | None = None,
    ) -> None:
        if kernel not in ("auto", "require", "off"):
            raise ValueError(f"kernel must be 'auto', 'require' or 'off', got {kernel!r}")
        if net_layer is None:
            net_layer = os.environ.get(NET_LAYER_ENV) or "auto"
        if net_layer not in NET_LAYERS:
            raise ValueError(
                f"net_layer (or ${NET_LAYER_ENV}) must be 'auto', 'landlock' or 'netns', "
                f"got {net_layer!r}"
            )
        #: Testing/diagnostic: force the layer limiting TCP egress (see docs/fsworker.md).
        self.net_layer = net_layer
        self.policy = policy if policy is not None else SandboxPolicy()
        self.proxy = proxy
        self.kernel = kernel
        self.user = user
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.grace = grace
        self.allow_debug = allow_debug
        self.frame_timeout = frame_timeout
        self._argv_override = list(argv) if argv is not None else None
        self._fresh_root = root is None
        self._root = Path(root) if root is not None else None
        scratch: Path | None = None
        if socket_path is None or log_path is None:
            scratch = _scratch_dir()
        name = secrets.token_hex(6)
        self.socket_path = (
            Path(socket_path) if socket_path is not None else scratch / f"w-{name}.sock"  # type: ignore[operator]
        )
        self.log_path = log_path if log_path is not None else scratch / f"w-{name}.log"  # type: ignore[operator]
        # a log we placed in the scratch dir is removed after a clean shutdown (not piled up)
        self._own_log = log_path is None
        self._tracker = tracker
        self._tracked: Tracked | None = None
        #: A pool's fork server: when set (and alive), the worker is forked from it.
        self.zygote = zygote
        self._popen: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.identity: ProcessIdentity | None = None
        self.enforcement: frozenset[str] = frozenset()
        #: What the worker could not apply under ``kernel="auto"`` (one line per layer).
        self.degraded: tuple[str, ...] = ()
        self.landlock_abi = 0
        self.uid: int | None = None
        #: True once the worker answered an error or ran ``exec``: a pool never reuses it.
        self.tainted = False
        self.requests = 0
        #: Set by a pool while the worker is lent out: close() hands it back, keep() forgets it.
        self._pool: PoolLike | None = None
        self._own_proxy: Any = None
        self._pool_key: Any = None
        self._reader: protocol.FrameReader | None = None

    # --- properties -------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            raise FsWorkerError("the fs worker has not been started: its root does not exist yet")
        return self._root

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise FsWorkerError("the fs worker has not been started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def alive(self) -> bool:
        return self._sock is not None and self.returncode is None

    # --- start ------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        if self._argv_override is not None:
            return self._argv_override
        return [sys.executable, "-I", "-S", BOOT, *self.worker_args()]

    def worker_args(self) -> list[str]:
        """The worker's own arguments (what follows ``python -m pytest_sandbox.fsworker``)."""
        argv = ["--socket", str(self.socket_path), "--root", str(self.root),
                "--kernel", self.kernel]  # fmt: skip
        if self.user is not None:
            argv += ["--uid", str(self.user), "--gid", str(self.user)]
        if self.proxy is not None:
            argv += ["--proxy-port", str(self.proxy.port)]
            host = getattr(self.proxy, "host", "127.0.0.1")
            if host != "127.0.0.1":
                argv += ["--proxy-host", str(host)]
        if self.net_layer != "auto":
            argv += ["--net-layer", self.net_layer]
        if self.allow_debug:
            argv.append("--allow-debug")
        if self.frame_timeout is not None:
            argv += ["--frame-timeout", str(self.frame_timeout)]
        return argv

    def env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env[POLICY_ENV] = self.policy.to_json()
        if self.proxy is not None:
            env.update(self.proxy.env())
        env.update(self.extra_env)
        return env

    def start(self) -> FsWorker:
        if self._popen is not None or self._closed:
            raise FsWorkerError(f"fs worker {self.socket_path} was already started")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix=FRESH_ROOT_PREFIX))
        if self.proxy is None and self.policy.net is not None:
            # A network policy without a proxy: this worker gets its own, filtering net.allow.
            from pytest_sandbox.fsworker.proxy import EgressProxy

            self._own_proxy = EgressProxy(allow=self.policy.net.allow).start()
            self.proxy = self._own_proxy
        self._tracked = track(
            self._tracker,
            KIND,
            str(self.socket_path),
            releaser=RELEASER,
            details={
                "socket_path": str(self.socket_path),
                "log_path": str(self.log_path),
                "root": str(self._root),
                "fresh_root": str(self._root) if self._fresh_root else None,
                "grace": self.grace,
            },
        )
        try:
            if self._fresh_root and self.user is not None:
                os.chown(self._root, self.user, self.user)
            self._popen = self._launch(self._tracked.token)
            with contextlib.suppress(Exception):
                self.identity = ProcessIdentity.of(self._popen.pid)
            if self.identity is not None:
                self._tracked.update(
                    key=f"pid {self._popen.pid}: {self._root}", identity=self.identity.to_dict()
                )
            self._wait_ready()
            self._connect()
            info = self.ping()
            self.enforcement = frozenset(info.get("enforcement", ()))
            self.landlock_abi = int(info.get("landlock_abi", 0))
            self.uid = info.get("uid")
            self.degraded = tuple(info.get("degraded", ()))
            if self.kernel == "require" and "landlock" not in self.enforcement:
                raise FsKernelUnavailable(
                    f"fs worker {self.socket_path} runs without Landlock "
                    f"(layers {sorted(self.enforcement)}) although the kernel layer is required"
                )
            if (
                self.kernel == "require"
                and self.policy.net is not None
                and not self.enforcement & {"landlock-net", "netns"}
            ):
                raise FsNetIsolationUnavailable(
                    f"fs worker {self.socket_path} has a network policy but neither "
                    f"landlock-net nor netns is active (layers {sorted(self.enforcement)})"
                )
        except BaseException:
            self.close()
            raise
        return self

    def _launch(self, token: str) -> subprocess.Popen[bytes] | ForkedProcess:
        zygote = self.zygote
        if zygote is not None and self._argv_override is None and zygote.alive:
            try:
                return zygote.spawn(
                    self.worker_args(), env=self.env(), log_path=self.log_path, token=token
                )
            except FsWorkerError:
                if zygote.alive:
                    raise
                # the zygote died under us: a plain spawn does the same job, only slower
        return spawn(
            self.argv(),
            log_path=self.log_path,
            env=self.env(),
            token=token,
            stdout=subprocess.PIPE,
            inherit_env=False,
        )

    def _wait_ready(self) -> None:
        popen = self._popen
        assert popen is not None
        assert popen.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        line = b""
        with selectors.DefaultSelector() as selector:
            selector.register(popen.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(timeout=left):
                    raise FsWorkerReadyTimeout(
                        f"fs worker {self.socket_path} (pid {popen.pid}) did not print 'ready' "
                        f"within {self.ready_timeout:g}s; raise ready_timeout or look at its "
                        f"log {self.log_path}:\n{log_tail(self.log_path)}"
                    )
                chunk = os.read(popen.stdout.fileno(), 64)
                if not chunk:
                    self._exited_before_ready()
                line += chunk
                if len(line) > 64:
                    break
        popen.stdout.close()
        if line != b"ready\n":
            raise FsWorkerProtocolError(
                f"fs worker {self.socket_path} printed {line!r} instead of 'ready'"
            )

    def _exited_before_ready(self) -> None:
        popen = self._popen
        assert popen is not None
        try:
            code: int | None = popen.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        tail = log_tail(self.log_path)
        if code == EXIT_NET:
            raise FsNetIsolationUnavailable(
                f"fs worker {self.socket_path} could not confine TCP egress to the proxy as "
                f"required (exit code {code}):\n{tail.strip()}"
            )
        if code == EXIT_KERNEL:
            raise FsKernelUnavailable(
                f"fs worker {self.socket_path} could not apply the kernel layer it was required "
                f"to use (exit code {code}):\n{tail.strip()}"
            )
        raise FsWorkerExited(str(self.socket_path), code, tail)

    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                last = exc
                if self.returncode is not None:
                    self._exited_before_ready()
                if time.monotonic() >= deadline:
                    raise FsWorkerConnectTimeout(
                        f"fs worker {self.socket_path} printed 'ready' but its socket did not "
                        f"accept within {self.connect_timeout:g}s (last error: {last!r}); raise "
                        "connect_timeout or check the socket dir"
                    ) from None
                time.sleep(0.005)
                continue
            sock.settimeout(None)
            self._sock = sock
            self._reader = protocol.FrameReader(sock)
            return

    # --- requests ---------------------------------------------------------------------------

    def request(self, message: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return the worker's reply as it is (errors included)."""
        with self._lock:
            sock, reader = self._sock, self._reader
            if sock is None or reader is None:
                raise FsWorkerError(
                    f"fs worker {self.socket_path} is not connected (closed or never started)"
                )
            self.requests += 1
            try:
                protocol.write_frame(sock, message)
                reply = reader.read(
                    wait_timeout=timeout if timeout is not None else self.request_timeout
                )
            except (OSError, protocol.ConnectionClosed, protocol.FrameError) as exc:
                self.tainted = True
                self._drop_connection()
                if isinstance(exc, TimeoutError):
                    what = "did not answer in time"
                else:
                    what = f"connection broke ({exc!r})"
                raise FsWorkerProtocolError(
                    f"fs worker {self.socket_path} (pid {self.pid}) {what} during a "
                    f"{message.get('kind')!r} request; exit code {self.returncode}.\n"
                    f"--- its log ---\n{log_tail(self.log_path)}"
                ) from exc
        if reply.get("kind") == "error":
            self.tainted = True
        return reply

    def _call(self, message: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        reply = self.request(message, timeout=timeout)
        if reply.get("kind") == "error":
            code = str(reply.get("code"))
            text = str(reply.get("message"))
            if code == "policy_denied":
                path = message.get("path") or message.get("src") or message.get("argv") or ""
                raise FsPolicyDenied(str(message["kind"]), str(path), text)
            raise FsWorkerRequestError(str(message["kind"]), code, text)
        return reply

    def ping(self) -> dict[str, Any]:
        return self._call({"kind": "ping"})

    def read(self, path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
        message: dict[str, Any] = {"kind": "read", "path": os.fspath(path)}
        if max_bytes is not None:
            message["max_bytes"] = max_bytes
        return base64.b64decode(self._call(message)["content"])

    def write(self, path: str | os.PathLike[str], data: bytes) -> Path:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"write() takes bytes, got {type(data).__name__}")
        content = base64.b64encode(data).decode("ascii")
        reply = self._call({"kind": "write", "path": os.fspath(path), "content": content})
        return Path(reply["path"])

    def edit(self, path: str | os.PathLike[str], old: str, new: str) -> None:
        self._call({"kind": "edit", "path": os.fspath(path), "old": old, "new": new})

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        self._call({"kind": "rename", "src": os.fspath(src), "dst": os.fspath(dst)})

    def glob(self, pattern: str) -> list[str]:
        return list(self._call({"kind": "glob", "pattern": pattern})["paths"])

    def grep(self, pattern: str, include: str | None = None) -> list[GrepMatch]:
        message: dict[str, Any] = {"kind": "grep", "pattern": pattern}
        if include is not None:
            message["include"] = include
        return [GrepMatch(**m) for m in self._call(message)["matches"]]

    def stat(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        reply = self._call({"kind": "stat", "path": os.fspath(path)})
        reply.pop("kind", None)
        return reply

    def get_env(self, names: Iterable[str]) -> dict[str, str | None]:
        return dict(self._call({"kind": "get_env", "names": list(names)})["env"])

    def exec(self, argv: Sequence[str], timeout: float = 30.0) -> ExecResult:
        """Run ``argv`` in the root under the worker's restrictions (the worker is then tainted)."""
        self.tainted = True
        reply = self._call(
            {"kind": "exec", "argv": [os.fspath(a) for a in argv], "timeout": timeout},
            timeout=timeout + 10.0,
        )
        return ExecResult(
            exit_code=int(reply["exit_code"]),
            output=base64.b64decode(reply["output"]),
            truncated=bool(reply.get("truncated")),
            timed_out=bool(reply.get("timed_out")),
        )

    # --- teardown ---------------------------------------------------------------------------

    def _drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Shutdown → wait → stop ladder; socket file and fresh root removed; row released.

        A worker lent by a pool goes back to it instead (reset, or stopped when it is tainted).
        """
        pool, self._pool = self._pool, None
        if pool is not None and not self._closed:
            pool.give_back(self)
            return
        self.terminate()

    def terminate(self, *, keep: bool = False) -> None:
        """Stop the worker for good (what ``close()`` does outside a pool); ``keep`` leaves the
        root and marks the ledger row kept instead of released."""
        if self._closed:
            return
        self._closed = True
        popen = self._popen
        if self._sock is not None and popen is not None and popen.poll() is None:
            with contextlib.suppress(FsWorkerError, OSError):
                self.request({"kind": "shutdown"}, timeout=1.0)
        self._drop_connection()
        if popen is not None:
            if popen.stdout is not None:
                popen.stdout.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=min(self.grace, 1.0))
            if self.identity is not None and self._group_alive(popen.pid):
                ours = popen if isinstance(popen, subprocess.Popen) else None
                with contextlib.suppress(IdentityMismatch):
                    stop_group(
                        self.identity,
                        grace=self.grace,
                        popen=ours,
                        token=self._tracked.token if self._tracked else None,
                    )
                if ours is None:  # forked by a zygote: its status pipe says when it is gone
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        popen.wait(timeout=5.0)
            elif popen.poll() is None:
                popen.kill()
                popen.wait()
            if not isinstance(popen, subprocess.Popen):
                popen.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._fresh_root and self._root is not None and not keep:
            shutil.rmtree(self._root, ignore_errors=True)
        if self._own_log and not keep and popen is not None and popen.returncode == 0:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        if self._own_proxy is not None:
            self._own_proxy.close()
        if self._tracked is not None:
            if keep:
                self._tracked.kept()
            else:
                self._tracked.released()

    def handover(self) -> FsWorker:
        """Move the live worker to a new handle; this one is closed for its holder.

        A pool does this when a worker comes back, so a test that kept a reference to its
        worker cannot reach the next test's.
        """
        fresh = object.__new__(FsWorker)
        fresh.__dict__.update(self.__dict__)
        fresh._lock = threading.Lock()
        fresh._pool = None
        self._sock = None
        self._closed = True
        self._pool = None
        return fresh

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def keep(self) -> None:
        """Keep the evidence (``--sandbox-keep``): the root and the log stay, the row is marked
        kept (``pytest-sandbox reap --kept`` removes them later).

        The process itself cannot outlive its one connection, so it is stopped as by close().
        """
        if self._closed:
            return
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.forget(self)
        self.terminate(keep=True)

    def __enter__(self) -> FsWorker:
        if self._popen is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen else None
        return (
            f"<FsWorker root={str(self._root)!r} pid={pid} enforcement={sorted(self.enforcement)}>"
        )
