"""The pytest face of pytest-sandbox: options, hooks and thin fixtures — nothing else."""

from __future__ import annotations

# === core (lead) ===
import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import TYPE_CHECKING, Any

import pytest

from pytest_sandbox import settings as settings_mod
from pytest_sandbox.errors import SettingsError
from pytest_sandbox.runtime import reaper as reaper_mod
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.run import RunContext
from pytest_sandbox.settings import SandboxSettings

if TYPE_CHECKING:  # processes pulls in waiting/http.client: imported when a test needs it
    from pytest_sandbox.runtime.processes import ReadySpec, TrackedProcess

#: Environment sweepers run by the reaper at session start and by ``pytest-sandbox reap``:
#: they release objects of a dead owner found by label rather than by ledger row.
SWEEPERS: tuple[str, ...] = ("pytest_sandbox.containers.engine:sweep_orphans",)


@dataclass
class _Session:
    """Per-process plugin state, kept in ``config.stash``."""

    settings: SandboxSettings
    run: RunContext
    ledger: Ledger
    reaper: Popen[bytes] | None = None
    engine_probe: _EngineProbe | None = None
    swept: reaper_mod.SweepReport = field(default_factory=reaper_mod.SweepReport)
    final: reaper_mod.SweepReport = field(default_factory=reaper_mod.SweepReport)
    #: node ids of tests with a failed phase so far (read by the keep policy at teardown)
    failed: set[str] = field(default_factory=set)
    #: logs to attach to a test's report if it fails, by node id; dropped after teardown
    logs: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)


_SESSION = pytest.StashKey[_Session]()


def _state(config: pytest.Config) -> _Session:
    try:
        return config.stash[_SESSION]
    except KeyError:
        raise RuntimeError("pytest-sandbox is not configured in this session") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_mod.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sandbox(**overrides): override pytest-sandbox settings for one test, "
        "e.g. keep='failed', guest='ssh', kernel='require'",
    )
    settings = settings_mod.from_config(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "sandbox_run" in workerinput:
        run = RunContext.for_worker(workerinput["sandbox_run"], workerinput["workerid"])
    else:
        run = RunContext.for_controller(settings.state_dir, settings.socket_dir)
    run.ensure_dirs()
    ledger = Ledger.in_state_dir(settings.state_dir)
    ledger.register_owner(run.run_id, run.worker_id, run.me)
    state = config.stash[_SESSION] = _Session(settings=settings, run=run, ledger=ledger)
    config.pluginmanager.register(_ReportHooks(state), "sandbox-reports")
    if run.is_controller and settings.docker != "off":
        config.stash[_SESSION].engine_probe = _EngineProbe()
    # Registered whether or not xdist is loaded yet, or under which name (``-p xdist.plugin``
    # with plugin autoload off): an optional hook is simply never called without xdist.
    config.pluginmanager.register(_XdistHooks(), "sandbox-xdist")


class _XdistHooks:
    """Hands the controller's run to every xdist worker."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["sandbox_run"] = _state(node.config).run.to_workerinput()


def pytest_sessionstart(session: pytest.Session) -> None:
    state = _state(session.config)
    if not state.run.is_controller:
        return
    state.swept = reaper_mod.sweep_ledger(state.ledger, current_run_id=state.run.run_id)
    reaper_mod.prune_old_runs(state.ledger, state.settings.state_dir)
    sweepers = SWEEPERS if state.settings.docker != "off" else ()
    if state.settings.reaper:
        state.reaper = reaper_mod.start_reaper(
            state.settings.state_dir,
            state.run.run_id,
            state.run.run_dir / "reaper.log",
            sweepers,
        )
    elif sweepers:
        state.swept.extend(
            reaper_mod.run_sweepers(state.ledger, sweepers, current_run_id=state.run.run_id)
        )


class _EngineProbe:
    """Asks the engine for its version in a thread while pytest starts up (~10 ms)."""

    def __init__(self) -> None:
        self._answer = "no answer in time"
        self._thread = threading.Thread(target=self._ask, name="sandbox-engine-probe", daemon=True)
        self._thread.start()

    def _ask(self) -> None:
        from pytest_sandbox.runtime import host

        try:
            self._answer = host.docker_engine().describe()
        except Exception as exc:
            self._answer = f"probe failed: {exc!r}"

    def result(self, timeout: float) -> str:
        self._thread.join(timeout)
        return self._answer


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_sandbox.runtime import host

    state = _state(config)
    reaper = f"pid {state.reaper.pid}" if state.reaper else "off"
    engine = state.engine_probe.result(timeout=5) if state.engine_probe else "off"
    return [
        f"sandbox: run {state.run.run_id}, {state.settings.describe()}",
        f"sandbox: engine: {engine}; landlock ABI: {host.landlock_abi()}; reaper: {reaper}",
    ]


class _ReportHooks:
    """Notes failed tests for the keep policy and attaches their logs.

    A plain ``logreport`` hook, not a ``makereport`` wrapper: it runs thrice per test, so it
    must cost next to nothing for a passing one. ``tryfirst``: the sections must be on the
    report before the terminal, junitxml and xdist (which ships it to the controller) see it.
    """

    def __init__(self, state: _Session) -> None:
        self.state = state

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        if report.failed:
            state.failed.add(report.nodeid)
            logs = state.logs.get(report.nodeid)
            if logs:
                from pytest_sandbox.runtime.processes import log_tail

                for title, path in logs:
                    tail = log_tail(path, lines=50)
                    report.sections.append((f"sandbox log: {title} ({path})", tail))
        if report.when == "teardown":
            state.logs.pop(report.nodeid, None)
            state.failed.discard(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = _state(session.config)
    if not state.run.is_controller:
        return
    # Every worker is done: what is left of this run is released now (shared resources by
    # plan, anything a crashed worker left behind as reaped).
    leftovers = state.ledger.rows(run_id=state.run.run_id, kept=False)
    shared = [r for r in leftovers if r.details.get("shared")]
    rest = [r for r in leftovers if r not in shared]
    state.final = reaper_mod.release_rows(state.ledger, shared, event="released")
    state.final.extend(reaper_mod.release_rows(state.ledger, rest, event="reaped"))
    for failure in state.final.failed:
        state.ledger.record_event(state.run.run_id, "leaked", "resource", failure)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = _state(config)
    if not state.run.is_controller:
        return
    counts = state.ledger.counts(state.run.run_id)
    terminalreporter.write_line(
        f"sandbox: {counts['created']} created, {counts['released']} released, "
        f"{counts['reaped']} reaped, {counts['kept']} kept, {counts['leaked']} leaked"
    )
    for line in state.swept.released:
        terminalreporter.write_line(f"sandbox: swept from a dead run: {line}")
    for line in state.swept.failed + state.final.failed:
        terminalreporter.write_line(f"sandbox: could not release: {line}", red=True)
    kept = state.ledger.rows(run_id=state.run.run_id, kept=True)
    if kept:
        terminalreporter.write_line(
            f"sandbox: {len(kept)} resource(s) kept; remove them with: "
            f"pytest-sandbox reap --kept --run {state.run.run_id}"
        )
        for row in kept:
            terminalreporter.write_line(f"sandbox:   kept {row.describe()}")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is None:
        return
    if state.reaper is not None:
        reaper_mod.stop_reaper(state.reaper)
    if state.run.is_controller:
        state.ledger.forget_run(state.run.run_id)
        with contextlib.suppress(OSError):
            state.run.socket_dir.rmdir()
    state.ledger.close()


# --- helpers for fixtures -------------------------------------------------------------


def _should_keep(request: pytest.FixtureRequest, settings: SandboxSettings) -> bool:
    if settings.keep == "always":
        return True
    if settings.keep == "failed":
        return request.node.nodeid in _state(request.config).failed
    return False


def _finish(
    request: pytest.FixtureRequest,
    close: Callable[[], object],
    keep: Callable[[], object] | None = None,
) -> None:
    """End a resource at fixture teardown: ``keep()`` when the keep policy says so, else
    ``close()``."""
    settings = _effective_settings(request)
    if keep is not None and _should_keep(request, settings):
        keep()
    else:
        close()


def _attach_log(request: pytest.FixtureRequest, title: str, path: Path) -> None:
    """Attach ``path``'s tail to the test's report if the test fails."""
    _state(request.config).logs.setdefault(request.node.nodeid, []).append((title, path))


def _effective_settings(request: pytest.FixtureRequest) -> SandboxSettings:
    settings = _state(request.config).settings
    marker = request.node.get_closest_marker("sandbox")
    if marker is None:
        return settings
    try:
        return settings.with_overrides(marker.kwargs, f"marker on {request.node.nodeid}")
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-sandbox: {exc}") from exc


# --- core fixtures --------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox_run(request: pytest.FixtureRequest) -> RunContext:
    """The run this test session belongs to: ``run_id`` (shared by all xdist workers),
    ``worker_id`` (``master`` or ``gwN``), ``state_dir``, ``run_dir``, ``socket_dir``."""
    return _state(request.config).run


@pytest.fixture
def sandbox_settings(request: pytest.FixtureRequest) -> SandboxSettings:
    """The effective pytest-sandbox settings for this test (``@pytest.mark.sandbox(...)``
    overrides applied): ``keep``, ``docker``, ``kernel``, ``guest``, ``state_dir``, ``reaper``."""
    return _effective_settings(request)


@pytest.fixture(scope="session")
def _sandbox_session_tracker(request: pytest.FixtureRequest) -> Tracker:
    state = _state(request.config)
    return Tracker(state.ledger, state.run)


@pytest.fixture
def _sandbox_tracker(request: pytest.FixtureRequest, _sandbox_session_tracker: Tracker) -> Tracker:
    return _sandbox_session_tracker.for_node(request.node.nodeid)


ProcessFactory = Callable[..., "TrackedProcess"]


@pytest.fixture
def sandbox_process(
    request: pytest.FixtureRequest, sandbox_run: RunContext, _sandbox_tracker: Tracker
) -> Iterator[ProcessFactory]:
    """Factory ``(argv, *, env=None, cwd=None, ready=None, timeout=10.0) -> TrackedProcess``.

    Starts ``argv`` in its own session with stdout/stderr in a log file (attached to the report
    of a failing test) and waits for ``ready``: a probe callable, a regex on the log (str) or a
    TCP port (int). Every process is stopped at teardown (SIGTERM, grace, SIGKILL to its whole
    group); if pytest dies, the run's reaper stops it.
    """
    from pytest_sandbox.runtime.processes import TrackedProcess

    started: list[TrackedProcess] = []

    def factory(
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready: ReadySpec = None,
        timeout: float = 10.0,
        grace: float = 3.0,
    ) -> TrackedProcess:
        argv_list = [os.fspath(a) for a in argv]
        name = Path(argv_list[0]).name if argv_list else "process"
        proc = TrackedProcess(
            argv_list,
            log_path=sandbox_run.new_log_path(name),
            env=env,
            cwd=cwd,
            ready=ready,
            timeout=timeout,
            grace=grace,
            tracker=_sandbox_tracker,
            name=name,
        )
        started.append(proc)
        _attach_log(request, f"{name}", proc.log_path)
        return proc.start()

    yield factory
    errors = []
    for proc in reversed(started):
        try:
            _finish(request, proc.stop, proc.keep)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise ExceptionGroup("stopping tracked processes failed", errors)


# === fsworker fixtures ===


@pytest.fixture(scope="session")
def _sandbox_fs_pool(
    request: pytest.FixtureRequest, sandbox_run: RunContext, _sandbox_session_tracker: Tracker
) -> Iterator[Any]:
    from pytest_sandbox.fsworker.pool import FsWorkerPool

    pool = FsWorkerPool(
        kernel=_state(request.config).settings.kernel,
        tracker=_sandbox_session_tracker,
        run=sandbox_run,
    )
    yield pool
    pool.close()


@pytest.fixture
def sandbox_fs(request: pytest.FixtureRequest, _sandbox_fs_pool: Any) -> Iterator[Any]:
    """A connected ``FsWorker`` on a fresh, empty writable root with the default policy.

    ``root``, ``pid``, ``socket_path``, ``enforcement`` (active layers, e.g. ``{"policy",
    "landlock"}``), ``read``/``write``/``edit``/``rename``/``glob``/``grep``/``stat``/
    ``get_env``/``exec``/``request``. Writes outside the root raise ``PolicyDenied`` (and fail
    with EACCES in the kernel where Landlock is on). Served warm from a pool; at teardown the
    worker is reset (root emptied) for reuse, or stopped if it saw an error or ran ``exec``.
    ``@pytest.mark.sandbox(kernel="require")`` fails the test where Landlock cannot apply.
    """
    worker = _sandbox_fs_pool.acquire(kernel=_effective_settings(request).kernel)
    _attach_log(request, "fs worker", worker.log_path)
    yield worker
    _finish(request, worker.close, worker.keep)


@pytest.fixture(scope="session")
def sandbox_fs_factory(_sandbox_fs_pool: Any) -> Iterator[Callable[..., Any]]:
    """Factory ``(root=None, policy=None, proxy=None, *, user=None) -> FsWorker`` (session).

    Workers come from a warm pool bucketed by the exact (root, policy, proxy); ``root=None``
    is a fresh empty root, ``policy`` a ``SandboxPolicy``, ``proxy`` an ``EgressProxy``,
    ``user`` a uid to drop to (e.g. 65534). Use ``with sandbox_fs_factory(...) as fs:`` or
    ``fs.close()`` to hand a worker back; whatever is still out is stopped at session end.
    """
    lent: list[Any] = []

    def factory(
        root: str | os.PathLike[str] | None = None,
        policy: Any = None,
        proxy: Any = None,
        *,
        user: int | None = None,
    ) -> Any:
        worker = _sandbox_fs_pool.acquire(root, policy, proxy, user=user)
        lent.append(worker)
        return worker

    yield factory
    for worker in lent:
        worker.close()


@pytest.fixture
def sandbox_egress_proxy(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An ``EgressProxy`` (HTTP CONNECT + plain HTTP) on 127.0.0.1: ``port``, ``url``, ``env()``,
    ``requests`` (method, host, port, target, status), ``allows(host)``, ``set_allow([...])``.

    Hosts not in the allow list get 403. The allow list starts empty, or as the indirect
    parameter: ``@pytest.mark.parametrize("sandbox_egress_proxy", [["127.0.0.1"]],
    indirect=True)``. Pass it to ``sandbox_fs_factory(proxy=...)`` with a policy that has
    ``net``: the worker may then connect to the proxy's port only.
    """
    from pytest_sandbox.fsworker.proxy import EgressProxy

    proxy = EgressProxy(allow=getattr(request, "param", ()))
    proxy.start()
    yield proxy
    proxy.close()


# === bundles fixtures ===


@pytest.fixture
def sandbox_bundle_server() -> Iterator[Any]:
    """A running ``BundleServer`` on loopback, fresh for this test.

    ``url``; ``tenant(api_key).publish(files_or_dir, version=..., ts=None, expires=None)``;
    ``scenario(name, **params)`` (or ``queue(...)`` for a one-shot) to make it misbehave —
    rollback, unsafe paths, endless data, stalls, TCP resets… (``faults.SCENARIOS``);
    ``requests``, ``assert_requested(path, count=)``, ``assert_no_file_requests()``. Errors
    raised in its threads fail the test at teardown (``check()``).
    """
    from pytest_sandbox.bundles.server import BundleServer

    server = BundleServer().start()
    try:
        yield server
    finally:
        server.close()
    server.check()


@pytest.fixture
def sandbox_bundle_puller(
    request: pytest.FixtureRequest, sandbox_bundle_server: Any, tmp_path: Path
) -> Callable[..., Any]:
    """Factory ``(api_key, **options) -> BundlePuller`` bound to ``sandbox_bundle_server``.

    Each call gets a fresh bundle root under ``tmp_path`` (pass ``root=`` to share one).
    ``options`` are ``BundlePuller``'s: ``version_range`` (default ``>=0.4.0,<0.5.0``),
    ``keep``, ``gap_timeout``, ``deadline``, ``max_age``, ``public_key``, ``audit``… When the
    test also uses ``sandbox_sidecar``, its socket is the default ``sidecar_socket``.
    ``tick()`` reports ``installed | up_to_date | busy | refused``; ``pull()`` raises.
    """
    import itertools

    from pytest_sandbox.bundles.puller import BundlePuller

    counter = itertools.count()

    def make(api_key: str, **options: Any) -> BundlePuller:
        options.setdefault("root", tmp_path / f"bundle-root-{next(counter)}")
        if "sandbox_sidecar" in request.fixturenames:
            stub = request.getfixturevalue("sandbox_sidecar")
            options.setdefault("sidecar_socket", stub.socket_path)
        if sandbox_bundle_server.tls:
            options.setdefault("ssl_context", sandbox_bundle_server.client_ssl_context())
        return BundlePuller(sandbox_bundle_server.url, api_key, **options)

    return make


@pytest.fixture
def sandbox_sidecar(sandbox_run: RunContext) -> Iterator[Any]:
    """A ``SidecarStub`` on a Unix socket in the run's socket dir: ``socket_path``,
    ``reply(200, 409, "hang", "close", ...)`` to program its next answers to
    ``POST /bundle/reload``, ``calls`` (the call log). Removed at teardown."""
    from pytest_sandbox.bundles.sidecar import SidecarStub

    stub = SidecarStub(sandbox_run.new_socket_path("sidecar")).start()
    try:
        yield stub
    finally:
        stub.close()


# === containers fixtures ===


@pytest.fixture(scope="session")
def sandbox_docker(request: pytest.FixtureRequest, sandbox_run: RunContext) -> Iterator[Any]:
    """The Docker ``Engine`` the docker CLI would use (DOCKER_HOST, context, default socket):
    ``endpoint``, ``version``, ``is_local``, ``client``. Skips when no engine answers, fails
    instead under ``--sandbox-docker=require``; ``--sandbox-docker=off`` skips."""
    from pytest_sandbox.containers.engine import Engine
    from pytest_sandbox.errors import DockerUnavailable

    mode = _state(request.config).settings.docker
    if mode == "off":
        pytest.skip("Docker is off (--sandbox-docker=off)")
    try:
        engine = Engine(run=sandbox_run)
    except DockerUnavailable as exc:
        if mode == "require":
            pytest.fail(f"--sandbox-docker=require: {exc}", pytrace=False)
        pytest.skip(str(exc))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def sandbox_image(
    request: pytest.FixtureRequest, sandbox_docker: Any, sandbox_run: RunContext
) -> Callable[[str], str]:
    """Factory ``(name) -> image id``. ``busybox`` (from the host's busybox-static) and
    ``debian-git`` (debootstrap from the machine's apt sources, with git and openssh-server) are
    built offline once per machine (content-addressed tag, cached across runs, built once under
    xdist); any other name is used when present locally and pulled only if missing. Builds,
    pulls and waits for another worker's build report progress on the terminal (past capture)."""
    import sys

    from pytest_sandbox.containers.images import ImageBuilder

    capman = request.config.pluginmanager.getplugin("capturemanager")

    def progress(message: str) -> None:
        # fd-level capture would hide a 5-minute debootstrap until the test failed
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            sys.stderr.write(f"pytest-sandbox: {message}\n")
            sys.stderr.flush()

    return ImageBuilder(sandbox_docker, sandbox_run.state_dir, progress=progress).get


@pytest.fixture
def sandbox_container(
    request: pytest.FixtureRequest,
    sandbox_docker: Any,
    sandbox_image: Callable[[str], str],
    sandbox_run: RunContext,
    _sandbox_tracker: Tracker,
    _sandbox_session_tracker: Tracker,
) -> Iterator[Callable[..., Any]]:
    """Factory ``(image, *, command=None, env=None, data_dir="/data", volume=True, ready=None,
    shared=False, **options) -> SandboxContainer``, started and ready.

    ``image``: ``busybox`` / ``debian-git`` (built offline) or any local image. ``ready``: a
    log regex (str), a container port (int, probed over TCP from the host; publish it with
    ``ports=[...]``), ``LogReady`` / ``Healthy`` / ``PortReady`` or a callable. Containers,
    volumes and networks are labelled and in the ledger before they exist; they are removed at
    teardown (kept under ``--sandbox-keep``), by the reaper if pytest dies, or by the next
    session's sweep. ``shared=True`` gives one container per run across xdist workers.
    Teardown returns once the container's processes are gone; the engine's clean-up finishes
    in the background (``sandbox_docker.wait_for_removals()`` waits for it).
    """
    from pytest_sandbox.containers.container import SandboxContainer
    from pytest_sandbox.runtime.shared import SharedResource

    settings = _effective_settings(request)
    made: list[Any] = []
    shared_used: list[SharedResource] = []

    def factory(image: str, *, shared: bool = False, **options: Any) -> Any:
        image_id = sandbox_image(image)
        if not shared:
            # the container's stdout/stderr, copied while it runs: attached to a failed report
            log_path = sandbox_run.new_log_path(f"container-{image}")
            container = SandboxContainer(
                sandbox_docker,
                image_id,
                tracker=_sandbox_tracker,
                nodeid=request.node.nodeid,
                keep_label=settings.keep == "always",
                log_path=log_path,
                image_name=image,
                **options,
            )
            made.append(container)
            _attach_log(request, f"container {image}", log_path)
            return container.launch()
        import hashlib
        import json

        spec = json.dumps([image, sorted((k, repr(v)) for k, v in options.items())])
        name = "container-" + hashlib.sha256(spec.encode()).hexdigest()[:16]
        resource = SharedResource(sandbox_run, name)

        def create() -> dict[str, str]:
            container = SandboxContainer(
                sandbox_docker,
                image_id,
                tracker=_sandbox_session_tracker,
                shared=True,
                image_name=image,
                **options,
            ).launch()
            return {"id": container.id}

        value = resource.acquire(create)
        shared_used.append(resource)
        return SandboxContainer.attach(sandbox_docker, value["id"])

    yield factory
    for resource in shared_used:
        # The controller removes shared containers at run end (their ledger rows are shared).
        resource.release(lambda _value: None)
    errors: list[Exception] = []

    def finish(container: Any) -> None:
        try:
            # the test waits until the container's processes are gone, not for the engine's
            # clean-up: that overlaps the next test and sandbox_docker's teardown waits for it
            _finish(request, lambda: container.close(wait=False), container.keep)
        except Exception as exc:
            errors.append(exc)

    # Several at once: those that must be removed before teardown goes on (a caller's network,
    # volumes, a restart policy) then cost about one engine removal, not one each.
    if len(made) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, len(made)), thread_name_prefix="psb-rm") as pool:
            list(pool.map(finish, reversed(made)))
    else:
        for container in made:
            finish(container)
    if errors:
        raise ExceptionGroup("removing containers failed", errors)


@pytest.fixture
def sandbox_data_store(
    tmp_path_factory: pytest.TempPathFactory,
    sandbox_docker: Any,
    sandbox_container: Callable[..., Any],
) -> Any:
    """``DataStore`` on a fresh backups root: ``preserve(container, key)``,
    ``restore(container, key)``, ``has_preserved(key)``, ``migrate_legacy(container, key)``,
    ``recover_orphan(key)`` (recreates containers with ``sandbox_container``)."""
    from pytest_sandbox.containers.snapshot import DataStore

    return DataStore(
        tmp_path_factory.mktemp("data-store"), engine=sandbox_docker, factory=sandbox_container
    )


# === workspace fixtures ===


@pytest.fixture(scope="session")
def sandbox_ssh_host(sandbox_run: RunContext, _sandbox_session_tracker: Tracker) -> Iterator[Any]:
    """``SSHHost``: a real ``sshd`` on 127.0.0.1 with generated host and user keys, for this
    session: ``host``, ``port``, ``user``, ``key_path``, ``known_hosts``, ``ssh_argv(...)``,
    ``guest()``. Stopped (and its keys removed) at session end, or by the reaper."""
    from pytest_sandbox.workspace.sshd import SSHHost

    host = SSHHost(
        tracker=_sandbox_session_tracker,
        log_dir=sandbox_run.log_dir,
        socket_dir=sandbox_run.socket_dir,
    )
    yield host
    host.close()


def _guest_backend(request: pytest.FixtureRequest, settings: SandboxSettings) -> str:
    if settings.guest:
        return settings.guest
    if settings.docker == "off":
        return "local"
    try:  # the default is a container where an engine answers
        request.getfixturevalue("sandbox_docker")
    except pytest.skip.Exception:
        return "local"
    return "container"


@pytest.fixture
def sandbox_guest(
    request: pytest.FixtureRequest,
    sandbox_settings: SandboxSettings,
    sandbox_run: RunContext,
    _sandbox_tracker: Tracker,
) -> Iterator[Any]:
    """A ``Guest`` of the backend chosen by ``--sandbox-guest`` (``local``, ``container``,
    ``ssh``; default: ``container`` where an engine answers, else ``local``):
    ``run(argv, stdin=..., timeout=...) -> ExecResult``, ``put_tar(stream, path)``,
    ``read_file(path)``, ``default_workspace_path``. Torn down with the test (kept under
    ``--sandbox-keep``)."""
    from pytest_sandbox.workspace import guests

    backend = _guest_backend(request, sandbox_settings)
    guest: Any
    if backend == "container":
        image = request.getfixturevalue("sandbox_image")("debian-git")
        guest = guests.ContainerGuest(
            request.getfixturevalue("sandbox_docker"),
            image,
            tracker=_sandbox_tracker,
            nodeid=request.node.nodeid,
        )
    elif backend == "ssh":
        host = request.getfixturevalue("sandbox_ssh_host")
        guest = host.guest(tracker=_sandbox_tracker)
        if host.log_path is not None:
            _attach_log(request, "sshd", host.log_path)
    else:
        guest = guests.LocalGuest(base_dir=sandbox_run.run_dir / "guests", tracker=_sandbox_tracker)
    yield guest
    if backend == "container":  # the engine's clean-up overlaps the next test, as containers'
        _finish(request, lambda: guest.close(wait=False), guest.keep)
    else:
        _finish(request, guest.close, guest.keep)


@pytest.fixture
def sandbox_workspace(
    request: pytest.FixtureRequest, sandbox_run: RunContext, _sandbox_tracker: Tracker
) -> Iterator[Callable[..., Any]]:
    """Factory ``(repo, *, guest=None, mode="clone", branch=None, from_ref=None,
    include_untracked=False, dry_run=False, guest_path=None) -> PreparedWorkspace``.

    Prepares the host repo in ``guest`` (default: ``sandbox_guest``); ``.export()`` returns
    the guest's changes as a binary patch. ``dry_run=True`` returns the plan (``mode``,
    ``files``) and touches no guest; refusals raise ``WorkspaceRefused`` subclasses first."""
    from pytest_sandbox.workspace.workspace import Workspaces

    workspaces = Workspaces(
        lambda: request.getfixturevalue("sandbox_guest"),
        tracker=_sandbox_tracker,
        staging_dir=sandbox_run.run_dir / "workspace-staging",
    )
    yield workspaces
    workspaces.close()


# === launcher fixtures ===


@pytest.fixture
def sandbox_backend(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sandbox_run: RunContext,
    _sandbox_tracker: Tracker,
) -> Iterator[Any]:
    """``BackendLauncher`` over a fresh per-test allow root (``allow_root``).

    ``launch(ServiceDefinition(...), *, trace=None) -> BackendHandle`` runs a daemon only from
    an allow-listed root, with a verified identity (pid, start time, exe, exe SHA-256), W3C trace
    context and a readiness probe; refusals raise ``LaunchRefused`` subclasses before anything is
    spawned. ``install(path)`` copies a daemon into the allow root, ``install_demo_daemon()``
    writes a tiny HTTP daemon there, ``service(name, binary, **options)`` builds a definition
    over it. Every backend is stopped (identity checked) at teardown and its log attached to a
    failing test's report; if pytest dies, the run's reaper stops it.
    """
    from pytest_sandbox.launcher import BackendLauncher

    launcher = BackendLauncher(
        tmp_path_factory.mktemp("backend-root"),
        run=sandbox_run,
        tracker=_sandbox_tracker,
        log_hook=lambda title, path: _attach_log(request, title, path),
    )
    yield launcher
    _finish(request, launcher.close, launcher.keep)
