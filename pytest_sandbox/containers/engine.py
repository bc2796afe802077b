"""The Docker engine: where it is, labels on everything, ledger rows, release and sweep.

The docker SDK is imported only when an :class:`Engine` connects, and by the releaser and the
sweeper when they run: importing this module is cheap.

Every container, volume and network the plugin creates carries the labels of DESIGN.md plus a
``pytest-sandbox.token`` matching its ledger row, and gets that row *before* the engine call that
creates it (the row is keyed by the name chosen up front, then re-keyed by id). A crash between
the row and the call leaves a row whose releaser finds nothing and counts that as success.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, Unpack
from urllib.parse import urlparse

from filelock import FileLock

from pytest_sandbox.errors import DockerUnavailable, EngineError, LabelRefused
from pytest_sandbox.runtime.identity import BOOT_ID, HOST, ProcessIdentity
from pytest_sandbox.runtime.ledger import ResourceTracker, Tracked, track

if TYPE_CHECKING:
    from pytest_sandbox.runtime.run import RunContext

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
RELEASER = "pytest_sandbox.containers.engine:release_docker_object"
SWEEPER = "pytest_sandbox.containers.engine:sweep_orphans"

LABEL = "pytest-sandbox"
L_RUN = "pytest-sandbox.run"
L_WORKER = "pytest-sandbox.worker"
L_HOST = "pytest-sandbox.owner-host"
L_PID = "pytest-sandbox.owner-pid"
L_START = "pytest-sandbox.owner-start"
L_BOOT = "pytest-sandbox.owner-boot"
L_NODEID = "pytest-sandbox.nodeid"
L_KEPT = "pytest-sandbox.kept"
L_TOKEN = "pytest-sandbox.token"
L_KEY = "pytest-sandbox.key"  # DataStore key of a data volume
L_ROLE = "pytest-sandbox.role"

KEPT_SUFFIX = "-kept"

#: Docker's own limit is 255; the nodeid label is cut to keep `docker inspect` readable.
NODEID_MAX = 200


def resolve_endpoint() -> tuple[str, str]:
    """The endpoint the docker CLI would use and where that came from.

    ``DOCKER_HOST``, else the context named by ``DOCKER_CONTEXT`` or the CLI config's current
    context, else the default socket.
    """
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"], "DOCKER_HOST"
    context_name = os.environ.get("DOCKER_CONTEXT")
    try:
        from docker.context import ContextAPI

        context = (
            ContextAPI.get_context(context_name)
            if context_name
            else ContextAPI.get_current_context()
        )
        host = getattr(context, "Host", None) if context is not None else None
        if host:
            where = f"context {context.Name}"
            return str(host), where
    except Exception:  # a broken CLI config must not hide the default socket
        pass
    return DEFAULT_SOCKET, "default socket"


def endpoint_is_local(endpoint: str) -> bool:
    """True for a Unix socket or a TCP endpoint on the loopback interface."""
    parsed = urlparse(endpoint)
    if parsed.scheme in ("unix", "npipe", ""):
        return True
    if parsed.scheme in ("tcp", "http", "https"):
        return parsed.hostname in ("localhost", "127.0.0.1", "::1")
    return False


def owner_labels(owner: ProcessIdentity) -> dict[str, str]:
    return {
        L_HOST: owner.host,
        L_PID: str(owner.pid),
        L_START: f"{owner.start_time:.2f}",
        L_BOOT: owner.boot_id,
    }


def labels_for(
    run: RunContext | None,
    *,
    nodeid: str = "",
    shared: bool = False,
    token: str = "",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The labels of DESIGN.md for a new object; user ``extra`` labels may not use our prefix."""
    for key in extra or {}:
        if key == LABEL or key.startswith(LABEL + "."):
            raise LabelRefused(
                f"label {key!r} uses the reserved prefix 'pytest-sandbox.'; the plugin sets "
                "those itself. Rename the label."
            )
    owner = (run.run_owner if shared else run.me) if run else ProcessIdentity.current()
    labels = {
        LABEL: "1",
        L_RUN: run.run_id if run else "none",
        L_WORKER: run.worker_id if run else "none",
        L_NODEID: nodeid[:NODEID_MAX],
        **owner_labels(owner),
    }
    if token:
        labels[L_TOKEN] = token
    labels.update(extra or {})
    return labels


def _docker() -> Any:
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a dependency
        raise DockerUnavailable("the docker SDK is not installed: pip install 'docker>=7'") from exc
    return docker


def connect(endpoint: str, timeout: float = 120.0) -> Any:
    """A ``docker.DockerClient`` for ``endpoint`` (no network call yet)."""
    docker = _docker()
    client = docker.DockerClient(base_url=endpoint, timeout=int(timeout), version="auto")
    if endpoint.startswith("unix://"):
        # No proxy applies to a socket, and requests' look-up iterates os.environ, which pytest
        # changes (PYTEST_CURRENT_TEST) while the removal threads and log followers call the
        # engine: the look-up would race it (KeyError) for nothing.
        client.api.trust_env = False
    return client


@dataclass(frozen=True)
class EngineFacts:
    endpoint: str
    source: str
    version: str
    api_version: str
    is_local: bool
    storage_driver: str


class CreateOptions(TypedDict, total=False):
    """Who owns an engine object and what it is called: the keyword arguments every
    ``Engine.create_*`` takes."""

    tracker: ResourceTracker | None
    nodeid: str
    shared: bool
    labels: Mapping[str, str] | None
    name: str | None
    extra_labels: Mapping[str, str] | None


class Engine:
    """A connection to the Docker engine the docker CLI would use.

    ``endpoint``, ``source`` (``DOCKER_HOST`` / ``context NAME`` / ``default socket``),
    ``version``, ``api_version``, ``is_local``; ``client`` is the ``docker.DockerClient``.
    Create objects with :meth:`create_container`, :meth:`create_volume`, :meth:`create_network`:
    they are labelled and recorded in the ledger before the engine call. Removals handed to
    :meth:`remove_later` run on the engine's removal threads; :meth:`wait_for_removals` and
    :meth:`close` wait for them.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        run: RunContext | None = None,
        timeout: float = 120.0,
    ) -> None:
        if endpoint is None:
            endpoint, source = resolve_endpoint()
        else:
            source = "argument"
        self.endpoint = endpoint
        self.source = source
        self.run = run
        self.is_local = endpoint_is_local(endpoint)
        try:
            self.client = connect(endpoint, timeout)
            info = self.client.version()
            storage = self.client.info().get("Driver", "")
        except DockerUnavailable:
            raise
        except Exception as exc:
            raise DockerUnavailable(
                f"no Docker engine answered at {endpoint} (from {source}): {exc}. Start dockerd, "
                "set DOCKER_HOST, or run with --sandbox-docker=off to skip container tests."
            ) from exc
        self.version = str(info.get("Version", "unknown"))
        self.api_version = str(info.get("ApiVersion", "unknown"))
        self.storage_driver = str(storage)
        self._removals_lock = threading.Lock()
        self._removal_threads: ThreadPoolExecutor | None = None
        self._removals: list[tuple[str, Future[None]]] = []

    def facts(self) -> EngineFacts:
        return EngineFacts(
            self.endpoint,
            self.source,
            self.version,
            self.api_version,
            self.is_local,
            self.storage_driver,
        )

    def describe(self) -> str:
        where = "local" if self.is_local else "remote"
        return f"docker {self.version} (API {self.api_version}) at {self.endpoint} [{where}]"

    def close(self) -> None:
        """Wait for the removals still under way (raising what failed), then disconnect."""
        try:
            self.wait_for_removals()
        finally:
            with self._removals_lock:
                threads, self._removal_threads = self._removal_threads, None
            if threads is not None:
                threads.shutdown(wait=True)
            self.client.close()

    def remove_container(self, ident: str) -> None:
        """Force-remove a container; "not found" is success, and a removal already under way
        (the engine's own, for an ``auto_remove`` container) is waited out."""
        _remove_container(self.client, ident)

    def halt_on_host(self, ident: str) -> bool:
        """Make sure nothing of container ``ident`` runs any more, without the engine's
        clean-up: True when it is not running, or once the init of its pid namespace, killed
        from the host, has exited (which takes every process of the namespace with it).

        False, with nothing done, where that cannot be done here: a remote engine, a paused
        container (its frozen init cannot act on the signal), a pid this process cannot see or
        signal, or an engine that did not answer.
        """
        if not self.is_local:
            return False
        try:
            info = self.client.api.inspect_container(ident)
        except Exception:  # gone already, or the engine hiccuped: the removal says which
            return False
        state = info.get("State") or {}
        if state.get("Paused"):
            return False
        if not state.get("Running"):
            return True  # created or exited: nothing of it runs
        pid = int(state.get("Pid") or 0)
        return pid > 0 and _kill_init(pid, str(info.get("Id") or ident))

    # --- removals in the background -----------------------------------------------------

    def remove_later(self, remove: Callable[[], None], what: str) -> None:
        """Run ``remove`` on the engine's removal threads (the engine removes concurrently, so
        a few threads let several containers go at once)."""
        with self._removals_lock:
            if self._removal_threads is None:
                self._removal_threads = ThreadPoolExecutor(4, thread_name_prefix="psb-remove")
            self._removals.append((what, self._removal_threads.submit(remove)))

    @property
    def pending_removals(self) -> int:
        """Removals handed to :meth:`remove_later` and not yet waited for."""
        with self._removals_lock:
            return len(self._removals)

    def wait_for_removals(self) -> None:
        """Block until every removal handed to :meth:`remove_later` has ended; raise an
        ``ExceptionGroup`` naming each one that failed (its ledger row stays, so the run's end
        or the reaper tries again)."""
        with self._removals_lock:
            pending, self._removals = self._removals, []
        errors: list[Exception] = []
        for what, future in pending:
            try:
                future.result()
            except Exception as exc:
                exc.add_note(f"while removing {what} in the background")
                errors.append(exc)
        if errors:
            raise ExceptionGroup("background removals failed", errors)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- creating labelled, tracked objects -------------------------------------------

    def new_name(self, kind: str) -> str:
        run = self.run.run_id if self.run else "norun"
        return f"psb-{run}-{kind[:3]}-{secrets.token_hex(4)}"

    def _track(
        self,
        tracker: ResourceTracker | None,
        kind: str,
        name: str,
        *,
        shared: bool,
        details: Mapping[str, Any] | None = None,
    ) -> Tracked:
        return track(
            tracker,
            kind,
            name,
            releaser=RELEASER,
            details={"type": kind, "name": name, "engine": self.endpoint, **(details or {})},
            shared=shared,
        )

    def _labelled(
        self,
        kind: str,
        tracker: ResourceTracker | None,
        *,
        nodeid: str,
        shared: bool,
        labels: Mapping[str, str] | None,
        name: str | None,
        details: Mapping[str, Any] | None = None,
        extra_labels: Mapping[str, str] | None = None,
    ) -> tuple[str, Tracked, dict[str, str]]:
        name = name or self.new_name(kind)
        full = labels_for(self.run, nodeid=nodeid, shared=shared, extra=labels)  # may refuse
        full.update(extra_labels or {})  # the plugin's own pytest-sandbox.* labels
        tracked = self._track(tracker, kind, name, shared=shared, details=details)
        full[L_TOKEN] = tracked.token
        return name, tracked, full

    def create_container(
        self,
        image: str,
        *,
        tracker: ResourceTracker | None = None,
        nodeid: str = "",
        shared: bool = False,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        extra_labels: Mapping[str, str] | None = None,
        **kwargs: Any,  # passed to the SDK's containers.create
    ) -> tuple[Any, Tracked]:
        """``client.containers.create(image, ...)`` with labels and a ledger row first.

        On an engine error the row is released (nothing was made) and :class:`EngineError`
        names the image. Returns (container, tracked).
        """
        return self._create(
            "container",
            lambda name, full: self.client.containers.create(
                image, name=name, labels=full, **kwargs
            ),
            lambda name, exc: (
                f"creating a container from image {image!r} failed: {exc}. Check the image "
                "exists locally (sandbox_image builds busybox/debian-git offline)."
            ),
            tracker=tracker,
            nodeid=nodeid,
            shared=shared,
            labels=labels,
            name=name,
            extra_labels=extra_labels,
        )

    def create_volume(self, **options: Unpack[CreateOptions]) -> tuple[Any, Tracked]:
        return self._create(
            "volume",
            lambda name, full: self.client.volumes.create(name=name, labels=full),
            lambda name, exc: f"creating volume {name!r} failed: {exc}",
            **options,
        )

    def create_network(self, **options: Unpack[CreateOptions]) -> tuple[Any, Tracked]:
        return self._create(
            "network",
            lambda name, full: self.client.networks.create(name, labels=full, driver="bridge"),
            lambda name, exc: f"creating network {name!r} failed: {exc}",
            **options,
        )

    def _create(
        self,
        kind: str,
        make: Callable[[str, dict[str, str]], Any],
        failure: Callable[[str, Exception], str],
        **options: Unpack[CreateOptions],
    ) -> tuple[Any, Tracked]:
        """Label, record, then create; on an engine error release the row (and whatever the
        engine half-made: a container or network can exist although the call failed)."""
        name, tracked, full = self._labelled(
            kind,
            options.get("tracker"),
            nodeid=options.get("nodeid", ""),
            shared=options.get("shared", False),
            labels=options.get("labels"),
            name=options.get("name"),
            extra_labels=options.get("extra_labels"),
        )
        try:
            made = make(name, full)
        except Exception as exc:
            if kind != "volume":  # creating a volume by name never half-makes one
                release_docker_object({"type": kind, "name": name, "engine": self.endpoint})
            tracked.released()
            raise EngineError(failure(name, exc)) from exc
        if kind != "volume":  # a volume's key is its name already
            tracked.update(key=made.id, id=made.id)
        return made, tracked

    def mark_kept(self, container_id: str) -> str | None:
        """Mark a container kept: Docker labels are immutable after creation, so a container
        kept after the fact is renamed ``<name>-kept`` (the sweep honours the suffix, and the
        volumes and networks it uses). Returns the new name, None when it is gone."""
        try:
            container = self.client.containers.get(container_id)
            if not container.name.endswith(KEPT_SUFFIX):
                container.rename(container.name + KEPT_SUFFIX)
            return f"{container.name}{'' if container.name.endswith(KEPT_SUFFIX) else KEPT_SUFFIX}"
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise


def _kill_init(pid: int, container_id: str, timeout: float = 5.0) -> bool:
    """SIGKILL the container's init (host ``pid``) and wait until it has exited.

    The init of a pid namespace takes every process of the namespace with it, so on True
    nothing of the container runs any more. False (nothing done, or not confirmed in time)
    when the pid is not visible here, is not in the container's cgroup, or cannot be signalled.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone, or another pid namespace (a rootless or remote engine)
        return False
    try:
        # checked after opening: the pidfd now surely names this process, not a recycled pid
        try:
            with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
                if container_id not in handle.read():
                    return False
        except OSError:
            return False
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return True
        except OSError:  # not ours to signal (a non-root user of a root engine)
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))  # readable once the init has exited
    finally:
        os.close(fd)


# --- release (the ledger releaser) ------------------------------------------------------


def _is_not_found(exc: BaseException) -> bool:
    docker = _docker()
    return isinstance(exc, docker.errors.NotFound)


def _retry(action: Callable[[], None], *, attempts: int = 20, delay: float = 0.1) -> None:
    """Run ``action``; 'not found' is success; a conflict (in use, removal in progress) is
    retried for ~2 s."""
    docker = _docker()
    for attempt in range(attempts):
        try:
            action()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if attempt == attempts - 1 or exc.status_code not in (409, 500):
                raise
            time.sleep(delay)


def _remove_container(client: Any, ident: str) -> None:
    def action() -> None:
        client.api.remove_container(ident, force=True, v=False)

    _retry(action)


def _remove_volume(client: Any, name: str, token: str | None) -> None:
    # A container of the same run may still hold the volume (rows are released concurrently):
    # containers labelled by this plugin that use it are removed first; others are left alone.
    def action() -> None:
        try:
            users = client.api.containers(all=True, filters={"volume": name})
        except Exception:
            users = []
        for user in users:
            if (user.get("Labels") or {}).get(LABEL) == "1":
                _remove_container(client, user["Id"])
        client.api.remove_volume(name, force=True)

    _retry(action, attempts=30)


def _remove_network(client: Any, ident: str) -> None:
    def action() -> None:
        try:
            attached = client.api.inspect_network(ident).get("Containers") or {}
        except Exception as exc:
            if _is_not_found(exc):
                return
            attached = {}
        for cid in attached:
            # gone meanwhile, or being removed: the retry handles it
            with contextlib.suppress(Exception):
                client.api.disconnect_container_from_network(cid, ident, force=True)
        client.api.remove_network(ident)

    _retry(action, attempts=30)


def _find_by_token(client: Any, obj_type: str, token: str) -> list[str]:
    flt = {"label": [f"{L_TOKEN}={token}"]}
    if obj_type == "container":
        return [c["Id"] for c in client.api.containers(all=True, filters=flt)]
    if obj_type == "volume":
        return [v["Name"] for v in (client.api.volumes(filters=flt).get("Volumes") or [])]
    if obj_type == "network":
        return [n["Id"] for n in client.api.networks(filters=flt)]
    return []


def release_docker_object(details: Mapping[str, Any]) -> None:
    """Ledger releaser for containers, volumes and networks (idempotent: gone = success).

    ``details``: ``type`` (container|volume|network), ``name``, optional ``id``, ``engine``
    endpoint, ``token``. When the create call never returned, the object is found by its
    token label (and its name).
    """
    obj_type = str(details.get("type", "container"))
    endpoint = str(details.get("engine") or resolve_endpoint()[0])
    client = connect(endpoint, timeout=30)
    try:
        idents = [str(details[k]) for k in ("id", "name") if details.get(k)]
        token = details.get("token")
        if token:
            idents += _find_by_token(client, obj_type, str(token))
        for ident in dict.fromkeys(idents):
            if obj_type == "container":
                _remove_container(client, ident)
            elif obj_type == "volume":
                _remove_volume(client, ident, str(token) if token else None)
            elif obj_type == "network":
                _remove_network(client, ident)
            else:
                raise ValueError(f"unknown docker object type {obj_type!r} in a ledger row")
    finally:
        client.close()


# --- the sweep --------------------------------------------------------------------------


def owner_from_labels(labels: Mapping[str, str]) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(
            pid=int(labels[L_PID]),
            start_time=float(labels[L_START]),
            exe="",
            boot_id=labels.get(L_BOOT, BOOT_ID),
            host=labels[L_HOST],
        )
    except (KeyError, ValueError):
        return None


def owner_is_dead(labels: Mapping[str, str]) -> bool:
    """True only when the labelled owner ran on this host and is provably gone."""
    owner = owner_from_labels(labels)
    if owner is None or owner.host != HOST:
        return False
    reason = owner.mismatch()
    return reason is not None and "cannot be inspected" not in reason


def sweep_lock() -> FileLock:
    """The host-wide lock held around a label sweep (re-entrant in one process), so that two
    sessions never sweep at once, and a test that plants orphans can hold sweeps off."""
    path = os.path.join(tempfile.gettempdir(), f"psb-{os.getuid()}-docker-sweep.lock")
    return FileLock(path, is_singleton=True, timeout=300)


def sweep_orphans(
    current_run_id: str | Mapping[str, Any] | None = None,
    *,
    dry_run: bool = False,
    only_run: str | None = None,
    include_kept: bool = False,
    endpoint: str | None = None,
) -> list[str]:
    """Remove plugin-labelled containers, networks and volumes whose owner on this host is dead.

    Objects of ``current_run_id``, kept objects (unless ``include_kept``), objects of another
    host and anything without the ``pytest-sandbox=1`` label are never touched. Also accepts
    the reaper's options dict (``{"current_run_id", "dry_run", "only_run"}``) as first
    argument. Returns a description of each object removed (or that would be, with dry_run).
    No engine answering is not an error: there is nothing to sweep.
    """
    if isinstance(current_run_id, Mapping):
        options = current_run_id
        current_run_id = options.get("current_run_id")
        dry_run = bool(options.get("dry_run", dry_run))
        only_run = options.get("only_run", only_run)
        include_kept = bool(options.get("include_kept", include_kept))
    flt = {"label": [f"{LABEL}=1"]}
    removed: list[str] = []

    def wanted(labels: Mapping[str, str]) -> bool:
        if not labels.get(L_TOKEN):
            return False  # not made by Engine.create_*: e.g. inheriting our image's label
        run = labels.get(L_RUN)
        if current_run_id and run == current_run_id:
            return False
        if only_run and run != only_run:
            return False
        if labels.get(L_KEPT) and not include_kept:
            return False
        return owner_is_dead(labels)

    def describe(obj_type: str, name: str, labels: Mapping[str, str]) -> str:
        return (
            f"docker {obj_type} {name} (run {labels.get(L_RUN)}, owner pid "
            f"{labels.get(L_PID)} is gone)"
        )

    def kept_container(c: Mapping[str, Any]) -> bool:
        names = [str(n) for n in c.get("Names") or []]
        return bool((c.get("Labels") or {}).get(L_KEPT)) or any(
            n.endswith(KEPT_SUFFIX) for n in names
        )

    if endpoint is None:
        # Most sweeps find nothing: tell that over the raw socket before paying for the SDK.
        from pytest_sandbox.runtime.host import docker_labels

        found = docker_labels(f"{LABEL}=1")
        if found is not None and not any(wanted(labels) for labels in found):
            return []
    try:
        client = connect(endpoint or resolve_endpoint()[0], timeout=30)
        client.ping()
    except Exception:
        return []
    try:
        with sweep_lock():  # sweeps of concurrent sessions do not interleave
            kept_ids = {
                c["Id"] for c in client.api.containers(all=True, filters=flt) if kept_container(c)
            }
            for c in client.api.containers(all=True, filters=flt):
                labels = c.get("Labels") or {}
                if c["Id"] in kept_ids and not include_kept:
                    continue
                if wanted(labels):
                    name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
                    if not dry_run:
                        _remove_container(client, c["Id"])
                    removed.append(describe("container", name, labels))
            for n in client.api.networks(filters=flt):
                labels = n.get("Labels") or {}
                attached = set(client.api.inspect_network(n["Id"]).get("Containers") or {})
                if attached & kept_ids and not include_kept:
                    continue
                if wanted(labels):
                    if not dry_run:
                        _remove_network(client, n["Id"])
                    removed.append(describe("network", n["Name"], labels))
            for v in client.api.volumes(filters=flt).get("Volumes") or []:
                labels = v.get("Labels") or {}
                users = {
                    u["Id"] for u in client.api.containers(all=True, filters={"volume": v["Name"]})
                }
                if users & kept_ids and not include_kept:
                    continue
                if wanted(labels):
                    if not dry_run:
                        _remove_volume(client, v["Name"], labels.get(L_TOKEN))
                    removed.append(describe("volume", v["Name"], labels))
    finally:
        client.close()
    return removed
