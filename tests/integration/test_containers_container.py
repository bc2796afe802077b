"""SandboxContainer against the real engine: readiness, failures leave nothing, exec, keep."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import errors
from pytest_sandbox.containers.container import Healthy, LogReady, PortReady, SandboxContainer
from pytest_sandbox.containers.engine import Engine

Factory = Callable[..., SandboxContainer]

HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
]


def _this_worker(engine: Engine) -> list[str]:
    assert engine.run is not None
    return [
        f"pytest-sandbox.run={engine.run.run_id}",
        f"pytest-sandbox.worker={engine.run.worker_id}",
    ]


def _ours(engine: Engine) -> set[str]:
    """This worker's containers (other workers of the run, and other suites, may use the
    same engine concurrently), once the earlier tests' background removals have ended."""
    assert engine.run is not None
    engine.wait_for_removals()
    flt = {"label": _this_worker(engine)}
    return {c["Id"] for c in engine.client.api.containers(all=True, filters=flt)}


def _our_volumes(engine: Engine) -> set[str]:
    assert engine.run is not None
    engine.wait_for_removals()
    flt = {"label": _this_worker(engine)}
    found = engine.client.api.volumes(filters=flt).get("Volumes")
    return {v["Name"] for v in found or []}


def test_log_regex_readiness_and_exec(sandbox_container: Factory) -> None:
    c = sandbox_container(
        "busybox",
        command=["sh", "-c", "echo 'server ready on 42'; exec sleep 600"],
        ready=r"ready on \d+",
    )
    assert c.status == "running"
    result = c.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.output, result.stderr) == (3, b"out\n", b"err\n")
    assert c.exec(["ls", "/data"]).exit_code == 0  # the data volume is mounted


def test_tcp_and_http_readiness_from_the_host(sandbox_container: Factory) -> None:
    tcp = sandbox_container("busybox", command=HTTPD, ports=[8080], ready=8080)
    http = sandbox_container(
        "busybox", command=HTTPD, ports=[8080], ready=PortReady(8080, http_path="/index.html")
    )
    import urllib.request

    for c in (tcp, http):
        with urllib.request.urlopen(f"http://127.0.0.1:{c.host_port(8080)}/index.html") as r:
            assert r.read() == b"hello\n"


def test_tcp_readiness_waits_for_the_server_not_the_engines_proxy(
    sandbox_container: Factory,
) -> None:
    # The engine's proxy accepts on the host port at once; the server listens 1.5 s later.
    web = sandbox_container(
        "busybox",
        command=["sh", "-c", "sleep 1.5; echo late > /index.html; exec httpd -f -p 80 -h /"],
        ports=[80],
        ready=80,
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{web.host_port(80)}/index.html") as response:
        assert response.read() == b"late\n"


def test_health_readiness(sandbox_container: Factory) -> None:
    c = sandbox_container(
        "busybox",
        command=["sh", "-c", "sleep 0.3; touch /tmp/ok; exec sleep 600"],
        ready=Healthy(),
        healthcheck={
            "test": ["CMD", "test", "-f", "/tmp/ok"],
            "interval": 100_000_000,
            "start_period": 100_000_000,
        },
    )
    assert c.inspect()["State"]["Health"]["Status"] == "healthy"


def test_timeout_carries_state_and_log_tail_and_leaves_nothing(
    sandbox_docker: Engine, sandbox_container: Factory
) -> None:
    before, vols = _ours(sandbox_docker), _our_volumes(sandbox_docker)
    with pytest.raises(errors.ContainerNotReady) as info:
        sandbox_container(
            "busybox",
            command=["sh", "-c", "echo still-booting; exec sleep 600"],
            ready=LogReady("never-printed"),
            timeout=1.0,
        )
    message = str(info.value)
    assert "still-booting" in message
    assert "'running'" in message
    assert "never-printed" in message
    assert _ours(sandbox_docker) == before
    assert _our_volumes(sandbox_docker) == vols


def test_exit_before_ready_is_reported_with_code_and_log(
    sandbox_docker: Engine, sandbox_container: Factory
) -> None:
    before = _ours(sandbox_docker)
    with pytest.raises(errors.ContainerExited, match=r"(?s)exited with code 7.*boom"):
        sandbox_container("busybox", command=["sh", "-c", "echo boom; exit 7"], ready="ready")
    assert _ours(sandbox_docker) == before


def test_failed_start_and_failed_copy_in_leave_nothing_created(
    sandbox_docker: Engine, sandbox_container: Factory
) -> None:
    before = _ours(sandbox_docker)
    with pytest.raises(errors.ContainerError, match="no/such/binary"):
        sandbox_container("busybox", command=["/no/such/binary"], ready="never")
    with pytest.raises(errors.ContainerError):
        sandbox_container("busybox", command=["sleep", "600"], files={"/no/such/dir/f": b"x"})
    assert _ours(sandbox_docker) == before


def test_files_are_copied_in_before_start(sandbox_container: Factory) -> None:
    c = sandbox_container(
        "busybox",
        command=["sh", "-c", "cat /etc/app.conf; exec sleep 600"],
        files={"/etc/app.conf": b"mode=test\n"},
        ready="mode=test",
    )
    assert c.exec(["cat", "/etc/app.conf"]).output == b"mode=test\n"


def test_stop_start_keeps_data_and_close_is_idempotent(
    sandbox_docker: Engine, sandbox_image: Any, sandbox_run: Any
) -> None:
    with SandboxContainer(sandbox_docker, sandbox_image("busybox"), command=["sleep", "600"]) as c:
        c.launch()
        c.exec(["sh", "-c", "echo kept > /data/f"])
        c.stop(timeout=0)
        assert c.status == "exited"
        c.start()
        assert c.exec(["cat", "/data/f"]).output == b"kept\n"
        sandbox_docker.client.api.remove_container(c.id, force=True)  # gone behind our back
        assert c.status == "removed"
    c.close()  # already gone, already closed: fine


def test_keep_marks_and_survives_the_sweep(sandbox_docker: Engine, sandbox_image: Any) -> None:
    from pytest_sandbox.containers.engine import release_docker_object, sweep_orphans

    c = SandboxContainer(sandbox_docker, sandbox_image("busybox"), command=["sleep", "600"])
    c.launch()
    command = c.keep()
    try:
        assert command.startswith("docker rm -f ")
        assert "-kept" in command
        assert sandbox_docker.client.containers.get(c.id).name.endswith("-kept")
        assert not [
            r for r in sweep_orphans({"current_run_id": "other", "dry_run": True}) if c.name in r
        ]
    finally:
        release_docker_object({"type": "container", "id": c.id})
        release_docker_object({"type": "volume", "name": c.volume_name})


def test_user_image_missing_names_the_image(sandbox_image: Any) -> None:
    with pytest.raises(errors.ImageUnavailable, match="no-such-image-psb"):
        sandbox_image("no-such-image-psb:1")


def test_debian_git_image_has_git_and_sshd(sandbox_container: Factory) -> None:
    c = sandbox_container("debian-git", command=["sleep", "600"])
    assert c.exec(["git", "--version"]).output.startswith(b"git version")
    assert c.exec(["test", "-x", "/usr/sbin/sshd"]).exit_code == 0


def test_restart_waits_for_this_runs_ready_line_not_the_last_ones(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    c = sandbox_container(
        "busybox", command=["sh", "-c", "sleep 0.5; echo ready; exec sleep 600"], ready="ready"
    )
    assert c.logs().count("ready") == 1
    c.stop(timeout=0)
    c.start()  # the first run's "ready" is in the log already: it must not count
    assert c.logs().count("ready") == 2
    c.export_data(tmp_path / "snap.tar.gz")  # the data operation's restart waits too
    assert c.logs().count("ready") == 3
    instant = sandbox_container(
        "busybox", command=["sh", "-c", "echo ready; exec sleep 600"], ready="ready", timeout=10
    )
    instant.stop(timeout=0)
    instant.start()  # this run's line, printed at once, is found (not filtered out)
    assert instant.logs().count("ready") == 2


def _processes_of(init_pid: int) -> list[int]:
    import psutil

    init = psutil.Process(init_pid)
    return [init_pid, *(p.pid for p in init.children(recursive=True))]


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_close_without_waiting_kills_at_once_and_removes_in_the_background(
    sandbox_docker: Engine, sandbox_image: Any, sandbox_run: Any
) -> None:
    from pytest_sandbox.runtime.ledger import Ledger, Tracker

    ledger = Ledger.in_state_dir(sandbox_run.state_dir)
    nodeid = "t::close-without-waiting"
    sandbox_docker.wait_for_removals()  # earlier tests' teardowns
    c = SandboxContainer(
        sandbox_docker,
        sandbox_image("busybox"),
        command=["sh", "-c", "sleep 600 & sleep 601 & echo up; wait"],
        ready="up",
        tracker=Tracker(ledger, sandbox_run, nodeid),
    ).launch()
    assert len([r for r in ledger.rows(run_id=sandbox_run.run_id) if r.nodeid == nodeid]) == 2
    pids = _processes_of(c.inspect()["State"]["Pid"])
    assert len(pids) >= 4  # docker-init, sh, two sleeps
    volume = c.volume_name
    c.close(wait=False)
    assert sandbox_docker.pending_removals == 1
    # when close returns nothing of the container runs any more...
    assert [pid for pid in pids if not _gone(pid)] == []
    # ...and the engine's clean-up ends with the container, its volume and its row gone
    sandbox_docker.wait_for_removals()
    assert sandbox_docker.client.api.containers(all=True, filters={"id": c.id}) == []
    assert sandbox_docker.client.api.volumes(filters={"name": volume}).get("Volumes") in ([], None)
    assert [r for r in ledger.rows(run_id=sandbox_run.run_id) if r.nodeid == nodeid] == []


def test_close_without_waiting_waits_for_containers_tied_to_what_the_caller_manages(
    sandbox_docker: Engine, sandbox_image: Any
) -> None:
    # a restart policy would bring a container killed from the host back: removed first
    sandbox_docker.wait_for_removals()  # earlier tests' teardowns
    c = SandboxContainer(
        sandbox_docker,
        sandbox_image("busybox"),
        command=["sleep", "600"],
        restart_policy={"Name": "always"},
    ).launch()
    c.close(wait=False)
    assert sandbox_docker.pending_removals == 0
    assert sandbox_docker.client.api.containers(all=True, filters={"id": c.id}) == []


def test_close_without_waiting_of_stopped_and_paused_containers(
    sandbox_docker: Engine, sandbox_image: Any
) -> None:
    sandbox_docker.wait_for_removals()  # earlier tests' teardowns
    image = sandbox_image("busybox")
    stopped = SandboxContainer(sandbox_docker, image, command=["sleep", "600"]).launch()
    stopped.stop(timeout=0)
    stopped.close(wait=False)  # nothing runs: all of it can go in the background
    assert sandbox_docker.pending_removals == 1
    paused = SandboxContainer(sandbox_docker, image, command=["sleep", "600"]).launch()
    paused.container.pause()
    paused.close(wait=False)  # a frozen init cannot die of a signal: removed before returning
    assert sandbox_docker.pending_removals == 1
    assert sandbox_docker.client.api.containers(all=True, filters={"id": paused.id}) == []
    sandbox_docker.wait_for_removals()
    assert sandbox_docker.client.api.containers(all=True, filters={"id": stopped.id}) == []


def test_close_without_waiting_of_a_container_already_gone_is_fine(
    sandbox_docker: Engine, sandbox_image: Any
) -> None:
    sandbox_docker.wait_for_removals()  # earlier tests' teardowns
    c = SandboxContainer(sandbox_docker, sandbox_image("busybox"), command=["sleep", "600"])
    c.launch()
    sandbox_docker.client.api.remove_container(c.id, force=True)
    c.close(wait=False)
    assert sandbox_docker.pending_removals == 0  # nothing left to kill: removed at once


def test_a_failed_background_removal_is_raised_naming_what_failed(sandbox_docker: Engine) -> None:
    def fails() -> None:
        raise RuntimeError("engine said no")

    sandbox_docker.remove_later(fails, "container psb-example")
    with pytest.raises(ExceptionGroup) as info:
        sandbox_docker.wait_for_removals()
    (error,) = info.value.exceptions
    assert "engine said no" in str(error)
    assert "while removing container psb-example in the background" in error.__notes__
    sandbox_docker.wait_for_removals()  # reported once, not again
