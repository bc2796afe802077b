"""runtime.host against the real engine: the SDK-free label query the start-up sweep relies on
to skip its work when there is nothing of ours on the engine."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox.runtime import host


@pytest.fixture
def labelled_objects(sandbox_image: Callable[[str], str]) -> Iterator[str]:
    """A stopped container, a network and a volume carrying a label unique to this test."""
    label = f"psb-host-test-{uuid.uuid4().hex[:8]}"
    image = sandbox_image("busybox")
    names = [f"{label}-c", f"{label}-n", f"{label}-v"]
    subprocess.run(
        ["docker", "create", "--name", names[0], "--label", f"{label}=c", image, "true"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["docker", "network", "create", "--label", f"{label}=n", names[1]],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["docker", "volume", "create", "--label", f"{label}=v", names[2]],
        check=True,
        capture_output=True,
    )
    yield label
    for argv in (["rm", "-f"], ["network", "rm"], ["volume", "rm", "-f"]):
        name = names.pop(0)
        subprocess.run(["docker", *argv, name], check=False, capture_output=True)


def test_docker_labels_lists_containers_networks_and_volumes(labelled_objects: str) -> None:
    found = host.docker_labels(labelled_objects)
    assert found is not None
    assert sorted(labels[labelled_objects] for labels in found) == ["c", "n", "v"]
    only_c = host.docker_labels(f"{labelled_objects}=c")
    assert only_c is not None
    assert [labels[labelled_objects] for labels in only_c] == ["c"]
    # the container also carries the labels of its image (ours): the sweep must not mistake
    # it for one of its own objects, which is why it checks for a token label
    assert "pytest-sandbox.token" not in only_c[0]


def test_docker_labels_is_empty_for_a_label_nobody_carries(sandbox_docker: object) -> None:
    assert host.docker_labels(f"psb-nobody-{uuid.uuid4().hex}") == []


def test_docker_labels_cannot_tell_without_a_local_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    assert host.docker_labels("anything") is None
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    assert host.docker_labels("anything") is None


def test_docker_labels_defers_to_the_sdk_when_a_cli_context_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setenv("DOCKER_CONTEXT", "remote")
    assert host.docker_labels("anything") is None
    monkeypatch.delenv("DOCKER_CONTEXT")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text('{"currentContext": "remote"}')
    assert host.docker_labels("anything") is None
    (tmp_path / "config.json").write_text('{"currentContext": "default"}')
    assert host.docker_labels("anything") is not None
