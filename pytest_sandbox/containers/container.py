"""SandboxContainer: a labelled, ledger-tracked container with a data dir you can snapshot.

Readiness needs no shell in the image: a regex on the container's logs, Docker's health status,
or a TCP / HTTP probe from the host to a published port. A container that fails to start, to
become ready, or to receive its files is removed (with its volume) before the error is raised:
nothing is left in ``created``.

Data operations (``export_data`` / ``import_data``) go through the engine's archive API (no
exec, no shell), stop the container meanwhile and return it to its prior state afterwards under
a cross-process file lock held until the restart completed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from filelock import FileLock

from pytest_sandbox.containers import archive
from pytest_sandbox.containers.engine import L_KEPT, L_KEY, L_ROLE, Engine
from pytest_sandbox.errors import (
    AutoRemoveRefused,
    ContainerError,
    ContainerExited,
    ContainerNotReady,
    ContainerStartFailed,
    DataDirOnTmpfs,
    RestartFailed,
)
from pytest_sandbox.runtime.cleanup import CleanupStack
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked
from pytest_sandbox.runtime.waiting import Deadline

if TYPE_CHECKING:
    from pytest_sandbox.runtime.run import RunContext

L_IMAGE = "pytest-sandbox.image"
L_DATA_DIR = "pytest-sandbox.data-dir"
L_COMMAND = "pytest-sandbox.command"  # JSON argv, so recover_orphan can recreate the container


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a container returned: ``output`` is stdout, ``stderr`` beside it."""

    exit_code: int
    output: bytes
    stderr: bytes = b""


# --- readiness --------------------------------------------------------------------------


@dataclass(frozen=True)
class LogReady:
    """Ready when ``pattern`` (a regex) matches the container's stdout/stderr."""

    pattern: str

    def describe(self) -> str:
        return f"its log to match {self.pattern!r}"


@dataclass(frozen=True)
class Healthy:
    """Ready when Docker reports the container ``healthy`` (give the container a healthcheck)."""

    def describe(self) -> str:
        return "Docker to report it healthy"


@dataclass(frozen=True)
class PortReady:
    """Ready when the published ``port`` accepts TCP from the host (or, with ``http_path``,
    answers ``GET http_path`` with a status below 400)."""

    port: int
    http_path: str | None = None
    protocol: str = "tcp"

    def describe(self) -> str:
        what = f"HTTP GET {self.http_path}" if self.http_path else "TCP"
        return f"{what} on its port {self.port} from the host"


ReadySpec = LogReady | Healthy | PortReady | str | int | Callable[["SandboxContainer"], bool] | None


def _accepts_and_stays_open(host_port: int, settle: float = 0.05) -> bool:
    """Whether the published port reaches a listening server in the container.

    The engine's userland proxy accepts on the host port before anything listens inside; when
    its own connection to the container is refused it closes ours. So a connect is not enough:
    the connection must also stay open (or bring data) for ``settle`` seconds.
    """
    with socket.create_connection(("127.0.0.1", host_port), timeout=1.0) as sock:
        sock.settimeout(settle)
        try:
            return sock.recv(1, socket.MSG_PEEK) != b""
        except TimeoutError:
            return True  # open and quiet: a server waiting for its client to speak
        except ConnectionResetError:
            return False


def _as_probe(ready: ReadySpec) -> LogReady | Healthy | PortReady | Callable[..., bool] | None:
    if isinstance(ready, str):
        return LogReady(ready)
    if isinstance(ready, bool):
        raise ContainerError(f"ready={ready!r}: pass a regex, a port, a probe or None")
    if isinstance(ready, int):
        return PortReady(ready)
    return ready


# --- the container ----------------------------------------------------------------------


@dataclass
class _Parts:
    container: Any = None
    tracked: Tracked | None = None
    volume: str | None = None
    volume_tracked: Tracked | None = None
    extra: list[Tracked] = field(default_factory=list)


class SandboxContainer:
    """A running container: ``id``, ``name``, ``status``, ``exec(argv)``, ``stop()``,
    ``start()``, ``export_data(dest)``, ``import_data(src, mode)``, ``host_port(port)``,
    ``logs()``, ``close()`` (idempotent; "already gone" is success), ``keep()``.

    Build with :meth:`launch` (create + copy files + start + wait ready); a failure on the way
    removes what was made. ``data_dir`` is backed by a labelled volume unless ``volume=False``.
    """

    def __init__(
        self,
        engine: Engine,
        image: str,
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        data_dir: str = "/data",
        volume: bool = True,
        ready: ReadySpec = None,
        timeout: float = 30.0,
        ports: Sequence[int] = (),
        labels: Mapping[str, str] | None = None,
        files: Mapping[str, bytes] | None = None,
        key: str | None = None,
        network: str | None = None,
        tracker: ResourceTracker | None = None,
        nodeid: str = "",
        shared: bool = False,
        keep_label: bool = False,
        lock_dir: Path | None = None,
        grace: float = 3.0,
        init: bool = True,
        log_path: Path | None = None,
        image_name: str | None = None,
        **create_options: Any,
    ) -> None:
        if not data_dir.startswith("/") or ".." in data_dir.split("/"):
            raise ContainerError(
                f"data_dir {data_dir!r} must be an absolute path without '..' in the container"
            )
        self.engine = engine
        self.image = image
        #: the name the user gave (``busybox``, ``redis:7``) when ``image`` is the id it resolved to
        self.image_name = image_name or image
        self.command = list(command) if command is not None else None
        self.env = dict(env or {})
        self.data_dir = data_dir.rstrip("/") or "/"
        self.use_volume = volume
        self.ready = _as_probe(ready)
        self.timeout = timeout
        self.ports = list(ports)
        self.user_labels = dict(labels or {})
        self.files = dict(files or {})
        self.key = key
        self.network = network
        self.tracker = tracker
        self.nodeid = nodeid
        self.shared = shared
        self.keep_label = keep_label
        self.grace = grace
        self.init = init
        self.log_path = Path(log_path) if log_path is not None else None
        self._follower: threading.Thread | None = None
        self.create_options = create_options
        run: RunContext | None = engine.run
        self.lock_dir = Path(lock_dir) if lock_dir else _default_lock_dir(run)
        self._parts = _Parts()
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def attach(cls, engine: Engine, ident: str, **options: Any) -> SandboxContainer:
        """A handle on an existing container (a shared one made by another worker); closing
        it does not remove the container."""
        found = engine.client.containers.get(ident)
        labels = found.labels or {}
        self = cls(
            engine,
            found.image.id,
            data_dir=labels.get(L_DATA_DIR, "/data"),
            key=labels.get(L_KEY),
            **options,
        )
        self._parts.container = found
        self._closed = True  # not ours to remove
        return self

    def launch(self) -> SandboxContainer:
        """Create, copy ``files`` in, start and wait until ready; clean up on any failure."""
        undo = CleanupStack()
        try:
            self._create(undo)
            self._copy_files()
            self._start_and_wait()
        except BaseException as exc:
            try:
                undo.close()
            except Exception as cleanup_error:
                exc.add_note(f"cleaning up the failed container also failed: {cleanup_error!r}")
            if isinstance(exc, ContainerError | KeyboardInterrupt | SystemExit):
                raise
            raise ContainerStartFailed(
                f"container from image {self.shown_image} could not be started: {exc}. It was "
                "removed; check the image, command and readiness probe."
            ) from exc
        undo.pop_all()
        return self

    @property
    def shown_image(self) -> str:
        """The image as the user named it, with the id it resolved to."""
        if self.image_name == self.image:
            return repr(self.image)
        return f"{self.image_name!r} ({self.image.removeprefix('sha256:')[:12]})"

    def _labels(self, role: str) -> dict[str, str]:
        out = {L_IMAGE: self.image[:200], L_DATA_DIR: self.data_dir, L_ROLE: role}
        if self.command is not None:
            out[L_COMMAND] = json.dumps(self.command)[:4000]
        if self.key:
            out[L_KEY] = self.key
        if self.keep_label:
            out[L_KEPT] = "always"
        return out

    def _create(self, undo: CleanupStack) -> None:
        mounts: dict[str, dict[str, str]] = {}
        engine = self.engine
        if self.use_volume:
            vol, vol_tracked = engine.create_volume(
                tracker=self.tracker,
                nodeid=self.nodeid,
                shared=self.shared,
                labels=self.user_labels,
                extra_labels=self._labels("data"),
            )
            self._parts.volume, self._parts.volume_tracked = vol.name, vol_tracked
            undo.push(self._remove_volume, name="remove volume")
            mounts[vol.name] = {"bind": self.data_dir, "mode": "rw"}
        kwargs: dict[str, Any] = {
            "command": self.command,
            "environment": self.env,
            "volumes": mounts or None,
            "init": self.init,
            "ports": {f"{p}/tcp": ("127.0.0.1", None) for p in self.ports} or None,
            "network": self.network,
            **self.create_options,
        }
        container, tracked = engine.create_container(
            self.image,
            tracker=self.tracker,
            nodeid=self.nodeid,
            shared=self.shared,
            labels=self.user_labels,
            extra_labels=self._labels("container"),
            **kwargs,
        )
        self._parts.container, self._parts.tracked = container, tracked
        if self.shared:
            tracked.update(shared=True)
            if self._parts.volume_tracked is not None:
                self._parts.volume_tracked.update(shared=True)
        undo.push(self._remove_container, name="remove container")

    def _copy_files(self) -> None:
        for path, data in self.files.items():
            parent, _, base = path.rstrip("/").rpartition("/")
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo(base)
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(data))
            if not self.container.put_archive(parent or "/", buf.getvalue()):
                raise ContainerError(f"copying {path!r} into {self.name} failed")

    def _start_and_wait(self) -> None:
        self.container.start()
        self.follow_logs()
        self.wait_ready()

    def follow_logs(self) -> None:
        """Copy the container's stdout/stderr into ``log_path`` (when set) while it runs: a
        thread follows the engine's log stream; each start rewrites the file with the whole
        log (the engine replays it), so the file is the log so far even after a restart."""
        if self.log_path is None or self._parts.container is None:
            return
        if self._follower is not None:
            self._follower.join(timeout=1.0)  # the stream of the previous run ends at its stop
            if self._follower.is_alive():
                return
        path, ident, api = self.log_path, self.id, self.engine.client.api
        try:
            stream = api.logs(ident, stdout=True, stderr=True, stream=True, follow=True)
        except Exception:  # best effort: a missing log never fails the test
            return

        def copy() -> None:
            with contextlib.suppress(Exception), open(path, "wb") as out:
                for chunk in stream:
                    out.write(chunk)
                    out.flush()

        self._follower = threading.Thread(target=copy, name="psb-container-log", daemon=True)
        self._follower.start()

    @property
    def container(self) -> Any:
        if self._parts.container is None:
            raise ContainerError(f"container from image {self.shown_image} was not launched")
        return self._parts.container

    @property
    def id(self) -> str:
        return str(self.container.id)

    @property
    def name(self) -> str:
        return str(self.container.name)

    @property
    def volume_name(self) -> str | None:
        return self._parts.volume

    @property
    def status(self) -> str:
        """``created`` / ``running`` / ``exited`` / … as the engine says now (``removed`` when
        it is gone)."""
        try:
            self.container.reload()
        except Exception as exc:
            if _not_found(exc):
                return "removed"
            raise
        return str(self.container.status)

    def inspect(self) -> dict[str, Any]:
        return dict(self.engine.client.api.inspect_container(self.id))

    def logs(self) -> str:
        raw = self.engine.client.api.logs(self.id, stdout=True, stderr=True)
        return bytes(raw).decode("utf-8", "replace")

    def log_tail(self, lines: int = 30) -> str:
        try:
            raw = self.engine.client.api.logs(self.id, stdout=True, stderr=True, tail=lines)
        except Exception as exc:
            return f"(logs unavailable: {exc})"
        return bytes(raw).decode("utf-8", "replace")

    def host_port(self, port: int, protocol: str = "tcp") -> int:
        """The host port (on 127.0.0.1) published for the container's ``port``."""
        ports = self.inspect()["NetworkSettings"]["Ports"] or {}
        bound = ports.get(f"{port}/{protocol}")
        if not bound:
            raise ContainerError(
                f"port {port}/{protocol} of {self.name} is not published; pass ports=[{port}]"
            )
        return int(bound[0]["HostPort"])

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the container to run and pass its readiness check."""
        deadline = Deadline(self.timeout if timeout is None else timeout)
        probe = self.ready
        regex = (
            re.compile(probe.pattern.encode(), re.MULTILINE)
            if isinstance(probe, LogReady)
            else None
        )
        # polled like the runtime's probes: 2 ms first, x1.25, capped at 25 ms
        delay = 0.002
        last_error: BaseException | None = None
        while True:
            state = self.inspect()["State"]
            if state.get("Status") in ("exited", "dead") or (
                not state.get("Running") and state.get("Status") != "created"
            ):
                raise ContainerExited(
                    f"container {self.name} (image {self.shown_image}) exited with code "
                    f"{state.get('ExitCode')} before it was ready (waiting for "
                    f"{_describe(probe)}).\n--- last lines of its log ---\n{self.log_tail()}"
                )
            try:
                if state.get("Running") and self._probe(probe, state, regex):
                    return
                last_error = None
            except (OSError, ValueError) as exc:
                last_error = exc
            if deadline.expired():
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise ContainerNotReady(
                    f"container {self.name} (image {self.shown_image}) was not ready after "
                    f"{deadline.seconds:g}s waiting for {_describe(probe)}{detail}; state "
                    f"{state.get('Status')!r}, health "
                    f"{(state.get('Health') or {}).get('Status', '-')!r}. Raise timeout= or fix "
                    f"the readiness check.\n--- last lines of its log ---\n{self.log_tail()}"
                )
            time.sleep(min(delay, deadline.remaining()))
            delay = min(delay * 1.25, 0.025)

    def _probe(self, probe: Any, state: Mapping[str, Any], regex: re.Pattern[bytes] | None) -> bool:
        if probe is None:
            return True
        if isinstance(probe, LogReady):
            assert regex is not None
            # only this run's lines: after a restart the previous run's "ready" must not count.
            # Not StartedAt: the first lines can be stamped before it; the last run's end is safe
            finished = _epoch(state.get("FinishedAt"))
            since = None if finished is None else finished + 1e-6
            raw = self.engine.client.api.logs(self.id, stdout=True, stderr=True, since=since)
            return bool(regex.search(bytes(raw)))
        if isinstance(probe, Healthy):
            status = (state.get("Health") or {}).get("Status")
            if status is None:
                raise ContainerError(
                    f"container {self.name} has no healthcheck; ready=Healthy() needs one "
                    "(pass healthcheck={...} or use a log/port readiness check)"
                )
            return bool(status == "healthy")
        if isinstance(probe, PortReady):
            host_port = self.host_port(probe.port, probe.protocol)
            if probe.http_path is None:
                return _accepts_and_stays_open(host_port)
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", host_port, timeout=1.0)
            try:
                conn.request("GET", probe.http_path)
                return conn.getresponse().status < 400
            except http.client.HTTPException as exc:
                raise OSError(str(exc)) from exc
            finally:
                conn.close()
        return bool(probe(self))

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str = "",
    ) -> ExecResult:
        """Run ``argv`` (a list, no shell) in the running container."""
        if isinstance(argv, str):
            raise ContainerError(f"exec takes an argv list, not a string: {argv!r}")
        api = self.engine.client.api
        created = api.exec_create(
            self.id, list(argv), environment=dict(env or {}), workdir=workdir, user=user
        )
        out, err = api.exec_start(created["Id"], demux=True)
        code = api.exec_inspect(created["Id"]).get("ExitCode")
        return ExecResult(int(code if code is not None else -1), out or b"", err or b"")

    def stop(self, timeout: float | None = None) -> None:
        """Stop the container (SIGTERM, grace, SIGKILL); it keeps its data and can be started."""
        with contextlib.suppress(Exception):
            self.container.stop(timeout=int(self.grace if timeout is None else timeout))
            return
        if self.status not in ("exited", "removed", "created"):
            raise ContainerError(f"container {self.name} could not be stopped")

    def start(self, *, wait: bool = True) -> None:
        """Start a stopped container and (by default) wait for readiness again."""
        self.container.start()
        self.follow_logs()
        if wait:
            self.wait_ready()

    # --- teardown -----------------------------------------------------------------------

    def _remove_container(self) -> None:
        if self._parts.container is None:
            return
        self.engine.remove_container(self.id)
        if self._parts.tracked is not None:
            self._parts.tracked.released()

    def _remove_volume(self) -> None:
        if self._parts.volume is None:
            return
        from pytest_sandbox.containers.engine import release_docker_object

        release_docker_object(
            {"type": "volume", "name": self._parts.volume, "engine": self.engine.endpoint}
        )
        if self._parts.volume_tracked is not None:
            self._parts.volume_tracked.released()

    #: ``create_options`` that tie a container to the host or to objects the caller manages
    #: (its network, its volumes, host namespaces, a restart policy): such a container is
    #: always removed before ``close`` returns, so what the caller tears down next is free.
    SHARES_STATE = frozenset(
        {"network_mode", "pid_mode", "ipc_mode", "volumes", "mounts", "volumes_from",
         "restart_policy", "links"}
    )  # fmt: skip

    def close(self, *, wait: bool = True) -> None:
        """Remove the container and its volume; idempotent, "already gone" counts as removed.

        ``wait=False`` (what ``sandbox_container`` does at teardown) returns once the
        container's processes are gone, killed from the host through their pid namespace's
        init; the engine's own clean-up (network, filesystem, the removal and the ledger row)
        then runs on the engine's removal threads beside the next test, and ``Engine.close()``
        waits for it. Where that cannot be done (a remote engine, a container in
        :attr:`SHARES_STATE`), it waits as ``wait=True`` does.
        """
        if self._closed:
            return
        self._closed = True
        if not wait and self._halt_on_host():
            self.engine.remove_later(self._remove_all, f"container {self.name}")
            return
        self._remove_all()

    def _remove_all(self) -> None:
        steps = CleanupStack()
        follower = self._follower
        if follower is not None:  # its stream ends with the container: the file is complete
            steps.push(lambda: follower.join(timeout=1.0), name="finish the log copy")
        steps.push(self._remove_volume, name="remove volume")
        steps.push(self._remove_container, name="remove container")
        steps.close()

    def _halt_on_host(self) -> bool:
        """Kill the container's processes now, from the host; False where that is not safe
        or not possible (the caller then removes the container through the engine)."""
        if (
            self._parts.container is None
            or self.shared
            or self.network is not None
            or self.SHARES_STATE & self.create_options.keys()
        ):
            return False
        return self.engine.halt_on_host(self.id)

    def keep(self) -> str:
        """Leave the container (and its volume) in place, marked kept; returns the command that
        removes them."""
        if self._closed:
            return ""
        self._closed = True
        new_name = self.engine.mark_kept(self.id) or self.name
        for tracked in (self._parts.tracked, self._parts.volume_tracked):
            if tracked is not None:
                tracked.kept()
        volume = f" && docker volume rm {self._parts.volume}" if self._parts.volume else ""
        return f"docker rm -f {new_name}{volume}"

    def __enter__(self) -> SandboxContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- data ---------------------------------------------------------------------------

    def data_lock(self) -> FileLock:
        """The cross-process lock serialising data operations on this container."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_dir / f"{self.name.removesuffix('-kept')}.lock"))

    def _check_exportable(self) -> dict[str, Any]:
        info = self.inspect()
        host = info.get("HostConfig") or {}
        if host.get("AutoRemove"):
            raise AutoRemoveRefused(
                f"container {self.name} was created with auto-remove: stopping it to export "
                f"{self.data_dir} would delete it. Create it without auto_remove."
            )
        tmpfs = host.get("Tmpfs") or {}
        mounts = info.get("Mounts") or []
        if self.data_dir in tmpfs or any(
            m.get("Type") == "tmpfs" and m.get("Destination") == self.data_dir for m in mounts
        ):
            raise DataDirOnTmpfs(
                f"data dir {self.data_dir} of container {self.name} is a tmpfs mount: stopping "
                "the container would lose it and the export would be empty. Use a volume "
                "(volume=True) for data you want to snapshot."
            )
        return info

    @contextlib.contextmanager
    def _stopped(self, *, meanwhile: Callable[[], object] | None = None) -> Iterator[_Paused]:
        """Hold the data lock, stop the container if it runs, and put it back afterwards.

        ``meanwhile()`` runs while the engine stops the container (e.g. validating an archive:
        it writes nothing); if it raises, the container is restarted and the error propagates.
        """
        with self.data_lock():
            info = self._check_exportable()
            paused = _Paused(self, info)
            failure: BaseException | None = None
            try:
                paused.stop(meanwhile)
                yield paused
            except BaseException as exc:
                failure = exc
                raise
            finally:
                paused.finish(failure)

    def export_chunks(
        self, *, compress: bool = True, level: int = archive.GZIP_LEVEL
    ) -> Generator[bytes | memoryview, None, None]:
        """Yield a tar(.gz) of the data dir (members relative to it) while the container is
        stopped; it is put back in its prior state when the generator finishes or is closed.

        The engine's tar passes through unchanged but for the member names (``./a`` -> ``a``),
        checked header by header as it streams (a stream cut short raises
        :class:`~pytest_sandbox.errors.CorruptArchive` instead of ending a short archive);
        gzip ``level`` (0-9, default 1) on two threads, blocks that do not compress stored.
        A missing data dir gives an empty archive. Memory stays at a few MiB.
        """
        with self._data_stream(compress, level) as chunks:
            yield from chunks

    @contextlib.contextmanager
    def _data_stream(
        self, compress: bool, level: int
    ) -> Iterator[Generator[bytes | memoryview, None, None]]:
        """The data dir's archive stream, read while the container is stopped."""
        with self._stopped() as paused:
            # the restart begins as soon as the engine's stream ended, while the last
            # chunks are still compressed and written
            chunks = archive_chunks(
                self.container,
                self.data_dir,
                compress=compress,
                level=level,
                on_end=paused.restart_soon,
            )
            try:
                yield chunks
            finally:
                # the engine holds the container while an archive streams: stop reading before
                # the restart in _stopped(), also when the consumer gives up mid-stream
                chunks.close()

    def export_data(
        self,
        dest: Path | str | IO[bytes],
        *,
        compress: bool | None = None,
        level: int = archive.GZIP_LEVEL,
    ) -> int:
        """Write the data dir to ``dest`` (a path, written atomically with mode 0600, or a
        binary file object). tar.gz unless ``dest`` is a path without ``.gz``/``.tgz``;
        ``level`` is the gzip level (1 = fastest compression, 0 = stored). Returns the bytes
        written."""
        gz = archive.is_gzip_name(dest) if isinstance(dest, str | Path) else True
        gz = gz if compress is None else compress
        # the stream is held here, not taken from export_chunks: the restart, begun when the
        # engine's stream ended, runs while the tail is written and fsync'd; joined before return
        with self._data_stream(gz, level) as chunks:
            if isinstance(dest, str | Path):
                return archive.write_atomic(chunks, dest)
            written = 0
            for chunk in chunks:
                dest.write(chunk)
                written += len(chunk)
        return written

    def import_data(
        self,
        src: Path | str,
        mode: str = "replace",
        *,
        max_bytes: int = archive.MAX_BYTES,
        max_members: int = archive.MAX_MEMBERS,
    ) -> archive.Summary:
        """Load a tar(.gz) into the data dir: ``replace`` empties it first, ``merge`` overlays.

        The whole archive is validated (see ``archive.validate``) before anything is written;
        the container is stopped meanwhile and returned to its prior state.
        """
        if mode not in ("replace", "merge"):
            raise ContainerError(f"import_data mode {mode!r}: use 'replace' or 'merge'")
        src = Path(src)
        with open(src, "rb") as handle:
            summary: list[archive.Summary] = []

            def validate() -> None:
                summary.append(
                    archive.validate_stream(
                        handle, label=str(src), max_bytes=max_bytes, max_members=max_members
                    )
                )

            # the whole archive is validated (one streaming pass) while the engine stops the
            # container: nothing is written before it passed; a refusal restarts the container
            with self._stopped(meanwhile=validate) as paused:
                if mode == "replace":
                    self._empty_data_dir()
                if _volume_at(paused.info, self.data_dir) is None:
                    self._ensure_data_dir()  # a volume's mount point always exists
                handle.seek(0)
                # tar and tar.gz go to the engine as they are, from the same open file (its
                # gunzip runs beside its untar: faster than sending it decompressed); bzip2 and
                # xz, which the engine hands to external tools, are decompressed here
                if archive.compression(handle) in ("gzip", "none"):
                    tar = archive.file_chunks(handle)
                else:
                    cap = archive.expansion_cap(max_bytes, max_members)
                    tar = archive.prefetch(archive.decompressed(handle, str(src), cap))
                try:
                    if not self.container.put_archive(self.data_dir, tar):
                        raise ContainerError(f"the engine refused the archive for {self.name}")
                finally:
                    tar.close()
        return summary[0]

    def _exists(self, path: str) -> bool:
        try:
            stream, _stat = self.container.get_archive(path, chunk_size=archive.CHUNK)
        except Exception as exc:
            if not _not_found(exc) or "No such container" in str(exc):
                raise
            return False
        stream.close()  # only the path's existence was asked
        return True

    def _ensure_data_dir(self) -> None:
        """Create the data dir and its missing parents (existing ones are left as they are:
        a directory entry sent over an existing directory would reset its mode)."""
        if self._exists(self.data_dir):
            return
        parts = self.data_dir.strip("/").split("/")
        keep = len(parts) - 1
        while keep > 0 and not self._exists("/" + "/".join(parts[:keep])):
            keep -= 1
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for depth in range(keep + 1, len(parts) + 1):
                info = tarfile.TarInfo("/".join(parts[keep:depth]))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                tar.addfile(info)
        self.container.put_archive("/" + "/".join(parts[:keep]), buf.getvalue())

    def _empty_data_dir(self) -> None:
        """Empty the data dir without a shell in the image: a helper container (the plugin's
        busybox image) mounts the volume and deletes its content."""
        if self._parts.volume is None:
            vol = _volume_at(self.inspect(), self.data_dir)
            if vol is None:
                raise ContainerError(
                    f"import_data(mode='replace') into {self.name}:{self.data_dir} needs the "
                    "data dir on a volume (volume=True) to empty it without a shell; use "
                    "mode='merge' or create the container with a volume."
                )
        else:
            vol = self._parts.volume
        run_helper(
            self.engine,
            vol,
            ["find", "/v", "-mindepth", "1", "-maxdepth", "1", "-exec", "rm", "-rf", "{}", "+"],
            lock_dir=self.lock_dir,
            tracker=self.tracker,
        )


class _Paused:
    """A data operation's hold on a container: stops it if it ran, restarts it once (early
    with :meth:`restart_soon`, from any thread, or in :meth:`finish`); a failed restart is a
    :class:`RestartFailed`."""

    def __init__(self, owner: SandboxContainer, info: dict[str, Any]) -> None:
        self.owner = owner
        self.info = info
        self.was_running = bool(info["State"].get("Running"))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._finished = False
        self._error: BaseException | None = None

    def _stop(self) -> None:
        self.owner.container.stop(timeout=int(self.owner.grace))

    def stop(self, meanwhile: Callable[[], object] | None) -> None:
        if not self.was_running:
            if meanwhile is not None:
                meanwhile()
            return
        if meanwhile is None:
            self._stop()
            return
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                self._stop()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=stop, name="psb-stop", daemon=True)
        thread.start()
        try:
            meanwhile()
        finally:
            thread.join()
        if errors:
            raise errors[0]

    def _restart(self) -> None:
        try:
            self.owner.container.start()
            self.owner.follow_logs()
            self.owner.wait_ready()
        except Exception as exc:
            self._error = exc

    def restart_soon(self) -> None:
        """Begin the restart now on a thread (the data has been read)."""
        with self._lock:
            if not self.was_running or self._finished or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._restart, name="psb-restart", daemon=True)
            self._thread.start()

    def finish(self, failure: BaseException | None) -> None:
        """Return the container to its prior state (wait for an early restart)."""
        with self._lock:
            self._finished = True
            thread = self._thread
        if not self.was_running:
            return
        if thread is None:
            self._restart()
        else:
            thread.join()
        if self._error is not None:
            error = RestartFailed(
                f"container {self.owner.name} was running before the data operation but "
                f"could not be restarted: {self._error}"
            )
            if failure is not None:
                failure.add_note(f"and then: {error}")
            else:
                raise error from self._error


def archive_chunks(
    container: Any,
    data_dir: str,
    *,
    compress: bool = True,
    level: int = archive.GZIP_LEVEL,
    on_end: Callable[[], object] | None = None,
) -> Generator[bytes | memoryview, None, None]:
    """The tar(.gz) of ``data_dir``'s content as the engine's ``GET archive`` gives it: read on
    a prefetch thread (socket reads overlap compression and writing), names made relative,
    checked while streaming, gzipped in independent blocks. An empty archive when the data
    dir is missing. Closing the generator closes the engine's stream."""
    try:
        stream, _stat = container.get_archive(data_dir.rstrip("/") + "/.", chunk_size=archive.CHUNK)
    except Exception as exc:
        if not _not_found(exc) or "No such container" in str(exc):
            raise
        stream = iter([b"\0" * 1024])  # no data dir: an empty archive (documented)
    tar = archive.scan(
        archive.prefetch(stream, on_end=on_end), label=f"container {container.name}:{data_dir}"
    )
    out = archive.gzip_blocks(tar, level=level) if compress else tar
    try:
        yield from out
    finally:
        out.close()
        tar.close()


def _volume_at(info: Mapping[str, Any], path: str) -> str | None:
    for mount in info.get("Mounts") or []:
        if mount.get("Type") == "volume" and mount.get("Destination") == path:
            return str(mount.get("Name"))
    return None


def run_helper(
    engine: Engine,
    volume: str,
    argv: Sequence[str],
    *,
    lock_dir: Path | None = None,
    timeout: float = 120.0,
    tracker: ResourceTracker | None = None,
) -> bytes:
    """Run ``argv`` in a throw-away busybox container with ``volume`` at ``/v``; labelled like
    everything else, removed afterwards. Returns its output; raises on a non-zero exit."""
    from pytest_sandbox.containers.images import ImageBuilder

    state_dir = (
        engine.run.state_dir if engine.run else (lock_dir.parent if lock_dir else Path("/tmp"))
    )
    image = ImageBuilder(engine, state_dir, progress=None).get("busybox")
    container, tracked = engine.create_container(
        image,
        tracker=tracker,
        command=list(argv),
        volumes={volume: {"bind": "/v", "mode": "rw"}},
        extra_labels={L_ROLE: "helper"},
    )
    try:
        container.start()
        result = container.wait(timeout=timeout)
        output = bytes(container.logs())
        if result.get("StatusCode") != 0:
            raise ContainerError(
                f"helper {list(argv)} on volume {volume} exited with "
                f"{result.get('StatusCode')}: {output[-2000:].decode(errors='replace')}"
            )
        return output
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
            tracked.released()


def _epoch(stamp: object) -> float | None:
    """``2026-11-29T06:28:49.005484639Z`` (the engine's clock) as seconds since the epoch."""
    if not isinstance(stamp, str) or not stamp.endswith("Z") or stamp.startswith("0001"):
        return None
    from datetime import UTC, datetime

    whole, _, frac = stamp[:-1].partition(".")
    try:
        base = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return base.timestamp() + (float(f"0.{frac}") if frac.isdigit() else 0.0)


def _describe(probe: Any) -> str:
    if probe is None:
        return "it to run"
    described = getattr(probe, "describe", None)
    return str(described()) if callable(described) else getattr(probe, "__name__", repr(probe))


def _not_found(exc: BaseException) -> bool:
    try:
        import docker
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, docker.errors.NotFound)


def _default_lock_dir(run: RunContext | None) -> Path:
    if run is not None:
        return run.state_dir / "locks"
    base = os.environ.get("PYTEST_SANDBOX_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "pytest-sandbox"
    )
    return Path(base) / "locks"


def new_key() -> str:
    return secrets.token_hex(6)
