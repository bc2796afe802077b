"""Repository inspection and planning: every refusal comes before any guest is touched."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_sandbox import errors
from pytest_sandbox.workspace.repo import inspect_repo, plan_workspace
from pytest_sandbox.workspace.workspace import Workspaces, _parse_export, tar_entries


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True
    ).stdout


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Ada Lovelace")
    git(root, "config", "user.email", "ada@example.invalid")
    (root / "a.txt").write_text("a\n")
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    (root / "gone.txt").write_text("bye\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def never_called() -> object:
    raise AssertionError("the guest was requested although the call must not touch one")


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.NotAGitRepository, match="does not exist"):
        plan_workspace(tmp_path / "nope")


def test_path_outside_any_repo_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(errors.NotAGitRepository, match="not inside a git repository"):
        Workspaces(never_called)(plain)  # type: ignore[arg-type]


def test_bare_repo_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    with pytest.raises(errors.BareRepositoryRefused, match="bare"):
        Workspaces(never_called)(bare)  # type: ignore[arg-type]


def test_git_dir_itself_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    with pytest.raises(errors.BareRepositoryRefused):
        plan_workspace(repo / ".git")


def test_empty_repo_is_refused(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    with pytest.raises(errors.EmptyRepositoryRefused, match="no commit"):
        plan_workspace(tmp_path)


def test_submodules_refused_unless_full_copy(tmp_path: Path) -> None:
    sub = make_repo(tmp_path / "sub")
    repo = make_repo(tmp_path / "super")
    subprocess.run(
        ["git", "-C", str(repo), "-c", "protocol.file.allow=always", "submodule", "add", "-q",
         str(sub), "vendor/sub"],
        check=True, capture_output=True,
    )  # fmt: skip
    git(repo, "commit", "-qm", "add submodule")
    for mode in ("clone", "shallow"):
        with pytest.raises(errors.SubmodulesRefused, match="vendor/sub"):
            Workspaces(never_called)(repo, mode=mode)  # type: ignore[arg-type]
    plan = plan_workspace(repo, mode="full_copy")
    assert "vendor/sub/a.txt" in plan.files
    assert "vendor/sub/.git" in plan.files
    assert ".git/HEAD" in plan.files


def test_from_ref_without_branch_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    with pytest.raises(errors.FromRefWithoutBranch, match="branch"):
        Workspaces(never_called)(repo, from_ref="HEAD")  # type: ignore[arg-type]


@pytest.mark.parametrize("ref", ["no-such-ref", "-x", "HEAD~5", "  "])
def test_unresolved_from_ref_is_refused(tmp_path: Path, ref: str) -> None:
    repo = make_repo(tmp_path / "r")
    with pytest.raises(errors.UnresolvedRef):
        Workspaces(never_called)(repo, branch="b", from_ref=ref)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "copy"}, "mode"),
    ({"branch": "bad..name"}, "branch"),
    ({"branch": "-dash"}, "branch"),
])  # fmt: skip
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, str], match: str) -> None:
    repo = make_repo(tmp_path / "r")
    with pytest.raises(errors.InvalidWorkspaceArgument, match=match):
        Workspaces(never_called)(repo, **kwargs)  # type: ignore[arg-type]


def test_refusals_are_workspace_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.WorkspaceRefused):
        plan_workspace(tmp_path / "missing")


def test_inspect_records_head_branch_identity(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "my-repo")
    info = inspect_repo(repo / ".")
    assert info.root == repo
    assert info.name == "my-repo"
    assert info.head_commit == git(repo, "rev-parse", "HEAD").strip()
    assert info.current_branch == "main"
    assert (info.user_name, info.user_email) == ("Ada Lovelace", "ada@example.invalid")
    git(repo, "checkout", "-q", "--detach")
    assert inspect_repo(repo).current_branch is None


def test_plan_lists_tracked_then_untracked_never_ignored(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    (repo / "new.txt").write_text("untracked\n")
    (repo / "debug.log").write_text("ignored\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_bytes(b"\0")
    (repo / "gone.txt").unlink()
    plan = plan_workspace(repo)
    assert plan.files == (".gitignore", "a.txt")
    assert plan.mode == "clone"
    plan = plan_workspace(repo, include_untracked=True)
    assert plan.files == (".gitignore", "a.txt", "new.txt")
    assert plan.untracked == ("new.txt",)


def test_plan_with_from_ref_lists_that_commit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "later.txt").write_text("later\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "later")
    plan = plan_workspace(repo, branch="topic", from_ref=first[:10])
    assert plan.base_commit == first
    assert "later.txt" not in plan.files
    assert plan.overlay is False


def test_dry_run_returns_plan_and_touches_no_guest(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    plan = Workspaces(never_called)(repo, mode="shallow", dry_run=True)  # type: ignore[arg-type]
    assert plan.mode == "shallow"
    assert plan.files == (".gitignore", "a.txt", "gone.txt")


def test_tar_entries_keeps_symlinks_and_odd_names(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1000)
    os.symlink("/etc/passwd", tmp_path / "link")
    names = ["f", "line\nbreak", "-dash", "ünï ç"]
    for name in names[1:]:
        (tmp_path / name).write_bytes(name.encode())
    stream = b"".join(
        tar_entries([("top", None), *((f"top/{n}", tmp_path / n) for n in [*names, "link"])])
    )
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["top/link"].issym()
        assert members["top/link"].linkname == "/etc/passwd"
        for name in names:
            assert tar.extractfile(members[f"top/{name}"]).read() == (  # type: ignore[union-attr]
                b"x" * 1000 if name == "f" else name.encode()
            )


def test_parse_export_frames_names_and_patch() -> None:
    sha = b"0" * 40
    raw = b"".join(
        b":100644 100644 %s %s %s\0%s" % (sha, sha, status, paths)
        for status, paths in ((b"M", b"a b.txt\0"), (b"R100", b"old\nname\0new\0"), (b"D", b"-x\0"))
    )
    patch = b"diff --git a/x b/x\n"
    out = _parse_export(raw + b"\0" + patch, "abc")
    assert out.patch == patch
    assert out.changed_files == ("-x", "a b.txt", "new", "old\nname")
    assert ("R100", "old\nname") in out.statuses
    assert out.has_changes
    assert not _parse_export(b"", "abc").has_changes


def test_objects_dir_of_a_linked_worktree_is_the_main_repos(tmp_path: Path) -> None:
    main = make_repo(tmp_path / "main")
    git(main, "worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"))
    assert inspect_repo(main).objects_dir.resolve() == (main / ".git" / "objects").resolve()
    linked = inspect_repo(tmp_path / "wt")
    assert linked.git_dir != main / ".git"
    assert linked.objects_dir.resolve() == (main / ".git" / "objects").resolve()
