"""Downstream-style demo: let a "coding agent" edit a repo inside a guest, take its work back.

Uses only the public fixtures ``sandbox_workspace``, ``sandbox_guest`` and ``sandbox_ssh_host``.
The guest is whatever ``--sandbox-guest`` chose (a container where Docker answers, else a local
directory); the last test always uses a real SSH host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.errors import FromRefWithoutBranch, GuestPathInUse


def git(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, input=input
    ).stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project with history, a local edit and an untracked note."""
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Demo Dev")
    git(repo, "config", "user.email", "dev@example.invalid")
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (repo / "README.md").write_text("# calc\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "calc with a bug")
    (repo / "README.md").write_text("# calc\n\nWork in progress.\n")  # uncommitted
    (repo / "notes.txt").write_text("remember the tests\n")  # untracked
    return repo


AGENT = r"""
set -e
sed -i 's/a - b/a + b/' calc.py
git commit -qam "fix add"
printf 'from calc import add\n\n\ndef test_add():\n    assert add(2, 2) == 4\n' > test_calc.py
git mv README.md README.rst
"""


def test_agent_fix_comes_back_as_a_patch(project: Path, sandbox_workspace: Any) -> None:
    ws = sandbox_workspace(project, branch="agent/fix-add", include_untracked=True)
    # the guest has the history, the branch, the local edit and the untracked note
    assert ws.run(["git", "symbolic-ref", "--short", "HEAD"]).output == b"agent/fix-add\n"
    assert ws.guest.read_file(f"{ws.guest_path}/notes.txt") == b"remember the tests\n"

    ws.run(["sh", "-c", AGENT]).check("the agent's edits")
    before = ws.run(["git", "status", "--porcelain"]).output

    export = ws.export()
    assert set(export.changed_files) >= {"calc.py", "test_calc.py", "README.md", "README.rst"}
    # exporting did not disturb the guest's git state
    assert ws.run(["git", "status", "--porcelain"]).output == before

    # apply the agent's work on a clean checkout of the base, as a reviewer would
    review = project.parent / "review"
    git(project.parent, "clone", "-q", str(project), str(review))
    git(review, "checkout", "-q", ws.base_commit)
    git(review, "apply", "--index", "-", input=export.patch)
    assert "a + b" in (review / "calc.py").read_text()
    assert (review / "README.rst").read_text() == "# calc\n\nWork in progress.\n"


def test_dry_run_shows_what_would_be_copied(project: Path, sandbox_workspace: Any) -> None:
    plan = sandbox_workspace(project, mode="shallow", dry_run=True)
    assert plan.mode == "shallow"
    assert plan.files == ("README.md", "calc.py")  # tracked only; notes.txt needs opting in


def test_refusals_come_before_any_guest_io(project: Path, sandbox_workspace: Any) -> None:
    with pytest.raises(FromRefWithoutBranch):
        sandbox_workspace(project, from_ref="HEAD")


def test_a_used_guest_path_is_refused(
    project: Path, sandbox_workspace: Any, sandbox_guest: Any
) -> None:
    sandbox_workspace(project)
    with pytest.raises(GuestPathInUse):
        sandbox_workspace(project)  # same default path, now taken
    second = sandbox_workspace(project, guest_path=f"{sandbox_guest.default_workspace_path}-2")
    assert second.base_commit == git(project, "rev-parse", "HEAD").decode().strip()


@pytest.mark.sandbox(guest="ssh")
def test_over_ssh(project: Path, sandbox_workspace: Any, sandbox_ssh_host: Any) -> None:
    ws = sandbox_workspace(project)
    assert ws.guest.kind == "ssh"
    assert ws.guest_path.startswith(str(sandbox_ssh_host.dir))
    ws.run(["sh", "-c", "echo '# more' >> README.md"]).check("edit")
    assert ws.export().changed_files == ("README.md",)
