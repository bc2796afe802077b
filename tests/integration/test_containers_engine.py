"""Engine, labels, ledger rows, the releaser and the orphan sweep against the real engine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from pytest_sandbox import errors
from pytest_sandbox.containers import engine as engine_mod
from pytest_sandbox.containers.engine import Engine, release_docker_object, sweep_orphans
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Tracked
from pytest_sandbox.runtime.run import RunContext


class SpyTracker:
    """Records, at the moment a row is written, whether the engine already had the object."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[tuple[str, str, bool]] = []

    def track(
        self,
        kind: str,
        key: str,
        *,
        releaser: str,
        details: Mapping[str, Any] | None = None,
        shared: bool = False,
    ) -> Tracked:
        exists = bool(
            self.engine.client.api.containers(all=True, filters={"name": key})
            or self.engine.client.api.volumes(filters={"name": key}).get("Volumes")
            or self.engine.client.api.networks(names=[key])
        )
        self.rows.append((kind, key, exists))
        assert releaser == engine_mod.RELEASER
        return Tracked.untracked()


def _dead_identity() -> ProcessIdentity:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = ProcessIdentity.of(proc.pid)
    proc.wait()
    return ident


@pytest.fixture
def engine(sandbox_docker: Engine) -> Engine:
    return sandbox_docker


@pytest.fixture
def busybox(sandbox_image: Any) -> str:
    return str(sandbox_image("busybox"))


@pytest.fixture
def cleanup(engine: Engine) -> Iterator[list[tuple[str, str]]]:
    made: list[tuple[str, str]] = []
    yield made
    for kind, ident in made:
        release_docker_object({"type": kind, "id": ident, "name": ident, "engine": engine.endpoint})


def test_engine_reports_where_and_what(engine: Engine) -> None:
    assert engine.version
    assert engine.endpoint.startswith(("unix://", "tcp://", "ssh://"))
    assert engine.is_local
    assert engine.source in ("DOCKER_HOST", "default socket") or engine.source.startswith("context")


def test_no_engine_is_a_typed_error() -> None:
    with pytest.raises(errors.DockerUnavailable, match="no Docker engine answered"):
        Engine("unix:///nonexistent/docker.sock")


def test_every_object_is_labelled_and_tracked_before_it_exists(
    engine: Engine, busybox: str, sandbox_run: RunContext, cleanup: list[tuple[str, str]]
) -> None:
    spy = SpyTracker(engine)
    net, _ = engine.create_network(tracker=spy, nodeid="t::net")
    cleanup.append(("network", net.id))
    vol, _ = engine.create_volume(tracker=spy, nodeid="t::vol")
    cleanup.append(("volume", vol.name))
    container, _ = engine.create_container(busybox, tracker=spy, nodeid="t::c", command=["true"])
    cleanup.append(("container", container.id))
    assert [(k, exists) for k, _, exists in spy.rows] == [
        ("network", False),
        ("volume", False),
        ("container", False),
    ]
    me = sandbox_run.me
    for labels in (net.attrs["Labels"], vol.attrs["Labels"], container.labels):
        assert labels["pytest-sandbox"] == "1"
        assert labels["pytest-sandbox.run"] == sandbox_run.run_id
        assert labels["pytest-sandbox.worker"] == sandbox_run.worker_id
        assert labels["pytest-sandbox.owner-pid"] == str(me.pid)
        assert labels["pytest-sandbox.owner-start"] == f"{me.start_time:.2f}"
        assert labels["pytest-sandbox.owner-host"] == me.host
        assert labels["pytest-sandbox.nodeid"].startswith("t::")


def test_user_labels_under_our_prefix_are_refused(engine: Engine, busybox: str) -> None:
    with pytest.raises(errors.LabelRefused, match="reserved prefix"):
        engine.create_container(busybox, labels={"pytest-sandbox.run": "mine"})
    flt = {"label": ["pytest-sandbox.run=mine"]}
    assert engine.client.api.containers(all=True, filters=flt) == []


def test_failed_create_releases_its_row(engine: Engine, sandbox_run: RunContext) -> None:
    from pytest_sandbox.runtime.ledger import Ledger, Tracker

    ledger = Ledger.in_state_dir(sandbox_run.state_dir)
    tracker = Tracker(ledger, sandbox_run, "t::failed-create")
    with pytest.raises(errors.EngineError, match="no-such-image"):
        engine.create_container("no-such-image:never", tracker=tracker)
    assert [
        r for r in ledger.rows(run_id=sandbox_run.run_id) if r.nodeid == "t::failed-create"
    ] == []


def test_releaser_is_idempotent_and_finds_by_token(
    engine: Engine, busybox: str, cleanup: list[tuple[str, str]]
) -> None:
    container, tracked = engine.create_container(busybox, command=["sleep", "60"])
    cleanup.append(("container", container.id))
    container.start()
    # a row whose create call never returned knows only the token
    release_docker_object({"type": "container", "token": tracked.token, "engine": engine.endpoint})
    release_docker_object({"type": "container", "token": tracked.token, "engine": engine.endpoint})
    release_docker_object({"type": "container", "id": container.id})
    assert engine.client.api.containers(all=True, filters={"id": container.id}) == []


def _labels_of(owner: ProcessIdentity, run_id: str) -> dict[str, str]:
    return {
        "pytest-sandbox": "1",
        "pytest-sandbox.run": run_id,
        "pytest-sandbox.worker": "master",
        "pytest-sandbox.nodeid": "",
        "pytest-sandbox.token": "t0k3n",
        **engine_mod.owner_labels(owner),
    }


def test_sweep_removes_only_dead_owners_objects(
    engine: Engine, busybox: str, cleanup: list[tuple[str, str]]
) -> None:
    # Other sessions on this host sweep at their start: hold them off while orphans are
    # planted and swept here, or they would rightly remove them first.
    with engine_mod.sweep_lock():
        api = engine.client.api
        dead = _dead_identity()
        alive = ProcessIdentity.current()
        orphan_net = api.create_network("psb-test-orphan-net", labels=_labels_of(dead, "deadrun"))
        cleanup.append(("network", orphan_net["Id"]))
        orphan_vol = api.create_volume("psb-test-orphan-vol", labels=_labels_of(dead, "deadrun"))
        cleanup.append(("volume", orphan_vol["Name"]))
        made = {}
        for name, labels in {
            "orphan": _labels_of(dead, "deadrun"),
            "live-other-run": _labels_of(alive, "liverun"),
            "decoy-unlabelled": {"app": "not-ours"},
            "decoy-fake-prefix": {"pytest-sandboxx": "1", **engine_mod.owner_labels(dead)},
            "decoy-no-token": {
                "pytest-sandbox": "1",
                "pytest-sandbox.run": "x",
                **engine_mod.owner_labels(dead),
            },
            "current-run": _labels_of(dead, "thisrun"),
        }.items():
            created = api.create_container(
                busybox, ["sleep", "60"], name=f"psb-test-{name}", labels=labels
            )
            made[name] = created["Id"]
            cleanup.append(("container", created["Id"]))
        kept = api.create_container(
            busybox, ["true"], name="psb-test-orphan-kept", labels=_labels_of(dead, "deadrun")
        )
        cleanup.append(("container", kept["Id"]))
        engine.mark_kept(kept["Id"])

        dry = sweep_orphans({"current_run_id": "thisrun", "dry_run": True})
        assert api.containers(all=True, filters={"id": made["orphan"]})
        removed = sweep_orphans("thisrun")
    assert sorted(dry) == sorted(removed)
    assert any(
        "psb-test-orphan " in r or r.startswith("docker container psb-test-orphan (")
        for r in removed
    )
    assert any("psb-test-orphan-net" in r for r in removed)
    assert any("psb-test-orphan-vol" in r for r in removed)
    assert api.containers(all=True, filters={"id": made["orphan"]}) == []
    survivors = (
        "live-other-run",
        "decoy-unlabelled",
        "decoy-fake-prefix",
        "decoy-no-token",
        "current-run",
    )
    for survivor in survivors:
        assert api.containers(all=True, filters={"id": made[survivor]}), survivor
    assert api.containers(all=True, filters={"id": kept["Id"]})
    assert not any("kept" in r for r in removed)


def test_engine_calls_from_threads_do_not_race_pytests_environment_changes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest sets and deletes PYTEST_CURRENT_TEST while the removal threads and log followers
    # call the engine; requests' proxy look-up iterated os.environ and raised KeyError.
    import os
    import sys
    import threading

    for i in range(3000):  # a long environment: a long iteration to interrupt
        monkeypatch.setenv(f"PSB_PAD_{i}", "y")
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["PSB_CHURN"] = "x"
            del os.environ["PSB_CHURN"]

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        for _ in range(300):
            assert engine.client.api.ping()
    finally:
        stop.set()
        churner.join()
        sys.setswitchinterval(previous)
