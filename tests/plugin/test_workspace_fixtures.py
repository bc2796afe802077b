"""sandbox_ssh_host / sandbox_guest / sandbox_workspace driven black-box with pytester."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO_HELPER = """
import json, os, subprocess
from pathlib import Path


def make_repo(root):
    root.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.name", "T"],
                 ["config", "user.email", "t@t"]):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    (root / "f.txt").write_text("f\\n")
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "init"], check=True)
    return root


def record(**values):
    with open(os.environ["RECORD"], "a") as out:
        out.write(json.dumps(values) + "\\n")
"""


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("RECORD", str(path))
    return path


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("backend", ["local", "ssh", "container"])
def test_sandbox_guest_option_chooses_the_backend(
    pytester: pytest.Pytester,
    state_dir: Path,
    record_file: Path,
    ledger_rows: Callable[[], list[object]],
    backend: str,
) -> None:
    pytester.makepyfile(
        REPO_HELPER
        + """
def test_round_trip(sandbox_guest, sandbox_workspace, tmp_path):
    ws = sandbox_workspace(make_repo(tmp_path / "repo"))
    assert ws.guest is sandbox_guest
    ws.run(["sh", "-c", "echo changed > f.txt"]).check("edit")
    assert ws.export().changed_files == ("f.txt",)
    record(kind=sandbox_guest.kind)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", f"--sandbox-guest={backend}")
    result.assert_outcomes(passed=1)
    assert records(record_file) == [{"kind": backend}]
    assert ledger_rows() == []


def test_marker_overrides_the_backend_and_default_follows_docker(
    pytester: pytest.Pytester, state_dir: Path, record_file: Path
) -> None:
    pytester.makepyfile(
        REPO_HELPER
        + """
import pytest

@pytest.mark.sandbox(guest="ssh")
def test_marked(sandbox_guest):
    record(test="marked", kind=sandbox_guest.kind)

def test_default(sandbox_guest):
    record(test="default", kind=sandbox_guest.kind)
"""
    )
    pytester.runpytest_subprocess("-p", "no:xdist").assert_outcomes(passed=2)
    pytester.runpytest_subprocess("-p", "no:xdist", "--sandbox-docker=off").assert_outcomes(
        passed=2
    )
    got = [(r["test"], r["kind"]) for r in records(record_file)]
    assert got == [
        ("marked", "ssh"),
        ("default", "container"),  # an engine answers on this machine
        ("marked", "ssh"),
        ("default", "local"),
    ]


def test_dry_run_and_refusals_create_no_guest(
    pytester: pytest.Pytester, state_dir: Path, record_file: Path
) -> None:
    # the guest would be a container, and Docker is off: creating one would skip the test
    pytester.makepyfile(
        REPO_HELPER
        + """
import pytest
from pytest_sandbox.errors import FromRefWithoutBranch, WorkspaceRefused

def test_no_guest(sandbox_workspace, tmp_path):
    repo = make_repo(tmp_path / "repo")
    plan = sandbox_workspace(repo, mode="shallow", dry_run=True)
    assert (plan.mode, plan.files) == ("shallow", ("f.txt",))
    with pytest.raises(FromRefWithoutBranch):
        sandbox_workspace(repo, from_ref="HEAD")
    with pytest.raises(WorkspaceRefused):
        sandbox_workspace(tmp_path / "missing")
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--sandbox-guest=container", "--sandbox-docker=off"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["sandbox: 0 created, 0 released, 0 reaped, 0 kept, 0 leaked"])


def test_keep_failed_keeps_the_guest(
    pytester: pytest.Pytester,
    state_dir: Path,
    record_file: Path,
    ledger_rows: Callable[[], list[object]],
) -> None:
    pytester.makepyfile(
        REPO_HELPER
        + """
def test_fails(sandbox_workspace, sandbox_guest, tmp_path):
    sandbox_workspace(make_repo(tmp_path / "repo"))
    record(root=str(sandbox_guest.root))
    assert False, "deliberate"
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--sandbox-guest=local", "--sandbox-keep=failed"
    )
    result.assert_outcomes(failed=1)
    root = Path(str(records(record_file)[0]["root"]))
    assert (root / "repo" / "f.txt").read_text() == "f\n"
    rows = ledger_rows()
    assert [getattr(r, "kept", None) for r in rows] == [True]
    from pytest_sandbox.workspace.guests import release_local_guest

    release_local_guest(rows[0].details)  # type: ignore[attr-defined]
    assert not root.exists()


def test_xdist_workers_each_get_ssh_guests(
    pytester: pytest.Pytester,
    state_dir: Path,
    record_file: Path,
    ledger_rows: Callable[[], list[object]],
) -> None:
    pytester.makepyfile(
        REPO_HELPER
        + """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_ws(n, sandbox_workspace, tmp_path):
    ws = sandbox_workspace(make_repo(tmp_path / "repo"))
    record(path=ws.guest_path)
"""
    )
    result = pytester.runpytest_subprocess("-n", "2", "--sandbox-guest=ssh")
    result.assert_outcomes(passed=4)
    paths = [r["path"] for r in records(record_file)]
    assert len(set(paths)) == 4
    assert not any(Path(str(p)).exists() for p in paths)
    assert ledger_rows() == []
