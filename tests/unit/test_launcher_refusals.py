"""Every refusal of the allow-list happens before anything is spawned (process table checked)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pytest_sandbox import errors
from pytest_sandbox.launcher import BackendLauncher, ServiceDefinition
from pytest_sandbox.launcher.launcher import check_binary
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.run import RunContext

MARKER_SCRIPT = """#!{python} -IS
import pathlib, sys
pathlib.Path({marker!r}).write_text("ran")
"""


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger.in_state_dir(tmp_path / "state")
    yield ledger
    ledger.close()


@pytest.fixture
def launcher(tmp_path: Path, ledger: Ledger) -> Iterator[BackendLauncher]:
    run = RunContext.for_controller(tmp_path / "state")
    with BackendLauncher(tmp_path / "root", run=run, tracker=Tracker(ledger, run)) as launcher:
        yield launcher


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "ran-marker"


def make_daemon(path: Path, marker: Path, mode: int = 0o755) -> Path:
    """An executable that leaves ``marker`` behind if it is ever run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        MARKER_SCRIPT.format(python=os.path.realpath(sys.executable), marker=str(marker))
    )
    path.chmod(mode)
    return path


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline:
            found.append(proc)
    return found


def assert_refused(
    launcher: BackendLauncher,
    ledger: Ledger,
    service: ServiceDefinition,
    error: type[errors.LaunchRefused],
    marker: Path,
    tmp_path: Path,
    **launch: object,
) -> errors.LaunchRefused:
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(errors.LaunchRefused) as info:
        launcher.launch(service, **launch)  # type: ignore[arg-type]
    assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
    # Nothing was spawned: no new child, nothing in the process table running our files,
    # no ledger row, no log, and the daemon's marker was never written.
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before
    assert processes_mentioning(str(tmp_path)) == []
    assert ledger.rows() == []
    assert not marker.exists()
    assert not list(launcher.log_dir.glob("backend-*")) if launcher.log_dir.exists() else True
    message = str(info.value)
    assert service.name in message
    return info.value


def svc(binary: object, root: object, **options: object) -> ServiceDefinition:
    return ServiceDefinition("svc", "1.0", binary, root, **options)  # type: ignore[arg-type]


def test_empty_binary_path(launcher, ledger, marker, tmp_path):
    assert_refused(
        launcher, ledger, svc("", launcher.allow_root), errors.BinaryPathEmpty, marker, tmp_path
    )


def test_empty_allow_root(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker)
    assert_refused(launcher, ledger, svc(daemon, ""), errors.AllowRootEmpty, marker, tmp_path)


def test_allow_root_missing(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker)
    assert_refused(
        launcher, ledger, svc(daemon, tmp_path / "nope"), errors.AllowRootInvalid, marker, tmp_path
    )


def test_path_outside_root(launcher, ledger, marker, tmp_path):
    outside = make_daemon(tmp_path / "elsewhere" / "d", marker)
    exc = assert_refused(
        launcher,
        ledger,
        svc(outside, launcher.allow_root),
        errors.BinaryOutsideRoot,
        marker,
        tmp_path,
    )
    assert "outside the allow root" in str(exc)


def test_system_binary_outside_root(launcher, ledger, marker, tmp_path):
    assert_refused(
        launcher,
        ledger,
        svc("/bin/true", launcher.allow_root),
        errors.BinaryOutsideRoot,
        marker,
        tmp_path,
    )


def test_dotdot_traversal(launcher, ledger, marker, tmp_path):
    make_daemon(tmp_path / "x", marker)
    root = launcher.allow_root
    assert_refused(
        launcher, ledger, svc(f"{root}/../x", root), errors.BinaryPathTraversal, marker, tmp_path
    )
    # Relative paths are taken relative to the root: '../x' is the same escape.
    assert_refused(
        launcher, ledger, svc("../x", root), errors.BinaryPathTraversal, marker, tmp_path
    )


def test_dotdot_even_when_it_lands_inside(launcher, ledger, marker, tmp_path):
    root = launcher.allow_root
    make_daemon(root / "d", marker)
    (root / "sub").mkdir()
    assert_refused(
        launcher,
        ledger,
        svc(root / "sub" / ".." / "d", root),
        errors.BinaryPathTraversal,
        marker,
        tmp_path,
    )


def test_symlink_in_root_pointing_out(launcher, ledger, marker, tmp_path):
    outside = make_daemon(tmp_path / "elsewhere" / "d", marker)
    root = launcher.allow_root
    (root / "link").symlink_to(outside)
    assert_refused(
        launcher, ledger, svc(root / "link", root), errors.BinarySymlinkEscape, marker, tmp_path
    )
    (root / "dirlink").symlink_to(outside.parent, target_is_directory=True)
    assert_refused(
        launcher,
        ledger,
        svc(root / "dirlink" / "d", root),
        errors.BinarySymlinkEscape,
        marker,
        tmp_path,
    )


def test_sibling_sharing_the_prefix(launcher, ledger, marker, tmp_path):
    root = launcher.allow_root
    evil = make_daemon(root.parent / f"{root.name}-evil" / "d", marker)
    assert_refused(launcher, ledger, svc(evil, root), errors.BinarySiblingPrefix, marker, tmp_path)


def test_missing_file(launcher, ledger, marker, tmp_path):
    assert_refused(
        launcher,
        ledger,
        svc(launcher.allow_root / "nope", launcher.allow_root),
        errors.BinaryMissing,
        marker,
        tmp_path,
    )


def test_not_executable(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker, mode=0o644)
    assert_refused(
        launcher,
        ledger,
        svc(daemon, launcher.allow_root),
        errors.BinaryNotExecutable,
        marker,
        tmp_path,
    )


def test_directory_is_not_executable(launcher, ledger, marker, tmp_path):
    (launcher.allow_root / "dir").mkdir()
    assert_refused(
        launcher,
        ledger,
        svc(launcher.allow_root / "dir", launcher.allow_root),
        errors.BinaryNotExecutable,
        marker,
        tmp_path,
    )


def test_world_writable_binary(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker, mode=0o777)
    assert_refused(
        launcher,
        ledger,
        svc(daemon, launcher.allow_root),
        errors.BinaryWorldWritable,
        marker,
        tmp_path,
    )


def test_world_writable_root(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker)
    launcher.allow_root.chmod(0o777)
    assert_refused(
        launcher,
        ledger,
        svc(daemon, launcher.allow_root),
        errors.AllowRootWorldWritable,
        marker,
        tmp_path,
    )


def test_world_writable_dir_between_root_and_binary(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "open" / "d", marker)
    daemon.parent.chmod(0o777)
    assert_refused(
        launcher,
        ledger,
        svc(daemon, launcher.allow_root),
        errors.AllowRootWorldWritable,
        marker,
        tmp_path,
    )


def test_invalid_traceparent_refused_before_spawn(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker)
    exc = assert_refused(
        launcher,
        ledger,
        svc(daemon, launcher.allow_root),
        errors.InvalidTraceContext,
        marker,
        tmp_path,
        trace="00-ABCDEF0123456789abcdef0123456789-0123456789abcdef-01",
    )
    assert isinstance(exc, ValueError)


def test_reserved_environment(launcher, ledger, marker, tmp_path):
    daemon = make_daemon(launcher.allow_root / "d", marker)
    for key in ("PYTEST_SANDBOX_ENDPOINT", "TRACEPARENT"):
        assert_refused(
            launcher,
            ledger,
            svc(daemon, launcher.allow_root, env={key: "x"}),
            errors.ReservedEnvironment,
            marker,
            tmp_path,
        )


def test_symlinks_that_stay_inside_are_fine(tmp_path, marker):
    real_root = tmp_path / "real-root"
    daemon = make_daemon(real_root / "bin" / "d", marker)
    (real_root / "alias").symlink_to(daemon)
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(real_root, target_is_directory=True)
    checked = check_binary(svc(linked_root / "alias", linked_root))
    assert checked.binary == daemon.resolve()
    assert checked.root == real_root.resolve()
    relative = check_binary(svc("bin/d", real_root))
    assert relative.binary == daemon.resolve()


def test_root_slash_is_too_broad(tmp_path, marker):
    with pytest.raises(errors.AllowRootInvalid):
        check_binary(svc("/bin/true", "/"))
