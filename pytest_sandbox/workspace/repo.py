"""Inspecting a host git repository before anything reaches a guest.

``plan_workspace(...)`` reads the repository with the host's ``git`` and either returns a
:class:`WorkspacePlan` (mode, base commit, exact file list) or raises one of the
:class:`~pytest_sandbox.errors.WorkspaceRefused` subclasses. It never touches a guest, so every
refusal happens before any guest I/O, and ``dry_run=True`` is just this plan.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_sandbox.errors import (
    BareRepositoryRefused,
    EmptyRepositoryRefused,
    FromRefWithoutBranch,
    HostGitFailed,
    InvalidWorkspaceArgument,
    NotAGitRepository,
    SubmodulesRefused,
    UnresolvedRef,
)

MODES = ("clone", "shallow", "full_copy")

#: Environment variables that would make the host's git look at another repository/index.
_GIT_LOCATION_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
)


def git_env() -> dict[str, str]:
    """The environment for host git: inherited, minus anything that redirects the repository."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_OPTIONAL_LOCKS"] = "0"  # never rewrite the host's index while reading it
    return env


def git(root: Path | str, *args: str, check: bool = True, input: bytes | None = None) -> bytes:
    """Run ``git -C root args`` on the host and return stdout (bytes, untouched)."""
    argv = ["git", "-C", os.fspath(root), *args]
    try:
        done = subprocess.run(argv, input=input, capture_output=True, env=git_env(), check=False)
    except OSError as exc:
        raise HostGitFailed(
            f"cannot run git on the host for {root}: {exc}. Install git (apt-get install git)."
        ) from exc
    if check and done.returncode != 0:
        raise HostGitFailed(
            f"host git failed in {root}: `git {' '.join(args)}` exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}. Check the repository with git fsck."
        )
    return done.stdout


def _z(data: bytes) -> list[str]:
    """Split ``-z`` output into paths (decoded with surrogateescape so any byte survives)."""
    return [os.fsdecode(p) for p in data.split(b"\0") if p]


@dataclass(frozen=True)
class RepoInfo:
    """What the host repository looks like: root, name, HEAD, branch, identity, submodules."""

    root: Path
    name: str
    git_dir: Path
    head_commit: str
    current_branch: str | None
    submodules: tuple[str, ...]
    user_name: str | None
    user_email: str | None
    #: Paths in the index (gitlinks excluded), in index order.
    tracked: tuple[str, ...] = ()

    @property
    def objects_dir(self) -> Path:
        """The object store: ``objects`` in the common git dir (a linked worktree's git dir
        names it in its ``commondir`` file, as git itself resolves it)."""
        common = self.git_dir
        try:
            named = (self.git_dir / "commondir").read_text().strip()
        except OSError:
            named = ""
        if named:
            common = self.git_dir / named  # relative to the git dir, or absolute
        return common / "objects"


@dataclass(frozen=True)
class WorkspacePlan:
    """What a prepare will do, computed on the host only (``dry_run=True`` returns this).

    ``files`` are the repo-relative paths that will be copied into the guest (for ``full_copy``
    they include ``.git/...``); with ``from_ref`` the guest checks that commit out and ``files``
    lists its tree instead (the host's working tree is not overlaid on another commit).
    """

    mode: str
    repo: RepoInfo
    base_commit: str
    branch: str | None
    from_ref: str | None
    include_untracked: bool
    files: tuple[str, ...]
    overlay: bool
    untracked: tuple[str, ...] = field(default=())
    #: For clone/shallow: the files whose working-tree content differs from the base (or are
    #: untracked) — the only ones sent besides the history — and tracked files deleted in the
    #: working tree. Clean files are checked out by git in the guest.
    dirty: tuple[str, ...] = field(default=())
    deleted: tuple[str, ...] = field(default=())

    @property
    def dry_run(self) -> bool:
        return True


def inspect_repo(path: Path | str) -> RepoInfo:
    """Read the repository containing ``path``; refuse a missing path, a bare or empty repo."""
    path = Path(path)
    if not path.exists():
        raise NotAGitRepository(
            f"repo path {path} does not exist. Pass the path of a git working tree."
        )
    if not path.is_dir():
        path = path.parent
    # the common case in one git call; the slow path below only explains a failure
    fast = git(
        path,
        "rev-parse",
        "--is-bare-repository",
        "--is-inside-git-dir",
        "--show-toplevel",
        "--absolute-git-dir",
        "HEAD",
        "--symbolic-full-name",
        "HEAD",
        check=False,
    ).decode(errors="surrogateescape")
    lines = fast.splitlines()
    if len(lines) == 6 and lines[:2] == ["false", "false"] and len(lines[4]) >= 40:
        root, git_dir, head, symbolic = Path(lines[2]), Path(lines[3]), lines[4], lines[5]
    else:
        root, git_dir, symbolic, head = _inspect_slowly(path)
    branch = symbolic.removeprefix("refs/heads/") if symbolic.startswith("refs/heads/") else ""
    submodules: list[str] = []
    tracked: list[str] = []
    for entry in git(root, "ls-files", "-z", "--stage").split(b"\0"):
        if not entry:
            continue
        path = os.fsdecode(entry.split(b"\t", 1)[1])
        (submodules if entry.startswith(b"160000 ") else tracked).append(path)
    identity = dict.fromkeys(("user.name", "user.email"), "")
    found = git(root, "config", "-z", "--get-regexp", r"^user\.(name|email)$", check=False)
    for item in found.split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("\n")
        if key in identity:
            identity[key] = value
    return RepoInfo(
        root=root,
        name=root.name,
        git_dir=git_dir,
        head_commit=head,
        current_branch=branch or None,
        submodules=tuple(sorted(set(submodules))),
        user_name=identity["user.name"] or None,
        user_email=identity["user.email"] or None,
        tracked=tuple(dict.fromkeys(tracked)),
    )


def _inspect_slowly(path: Path) -> tuple[Path, Path, str, str]:
    """One question at a time, to say precisely why the fast inspection failed."""
    out = git(path, "rev-parse", "--is-bare-repository", "--is-inside-git-dir", check=False)
    flags = out.decode().split()
    if len(flags) != 2:
        raise NotAGitRepository(
            f"repo path {path} is not inside a git repository. Run `git init` there or pass "
            "the path of a git working tree."
        )
    if flags[0] == "true" or flags[1] == "true":
        raise BareRepositoryRefused(
            f"repo path {path} is a bare repository or a .git directory: it has no working "
            "tree to copy. Pass the path of a non-bare clone (git clone <bare> <dir>)."
        )
    lines = git(path, "rev-parse", "--show-toplevel", "--absolute-git-dir").decode().splitlines()
    root, git_dir = Path(lines[0]), Path(lines[1])
    head = git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).decode().strip()
    if not head:
        raise EmptyRepositoryRefused(
            f"repository {root} has no commit yet, so there is no base commit. Commit once "
            "(git commit --allow-empty -m init) before preparing a workspace."
        )
    symbolic = git(root, "symbolic-ref", "-q", "HEAD", check=False).decode().strip()
    return root, git_dir, symbolic, head


def _check_arguments(mode: str, branch: str | None, from_ref: str | None) -> None:
    if mode not in MODES:
        raise InvalidWorkspaceArgument(
            f"workspace mode {mode!r} is not one of {', '.join(MODES)}. Use mode='clone' "
            "(history + working tree), 'shallow' (base commit only) or 'full_copy' (.git too)."
        )
    if from_ref is not None and branch is None:
        raise FromRefWithoutBranch(
            f"from_ref={from_ref!r} was given without branch: the guest needs a branch to "
            f"create at that ref. Pass branch='...' as well."
        )
    if branch is not None:
        done = subprocess.run(
            ["git", "check-ref-format", "--branch", branch],
            capture_output=True,
            env=git_env(),
            check=False,
        )
        if done.returncode != 0 or branch.startswith("-"):
            raise InvalidWorkspaceArgument(
                f"branch={branch!r} is not a valid git branch name. Pick a name that "
                "`git check-ref-format --branch` accepts."
            )


def _resolve(repo: RepoInfo, from_ref: str) -> str:
    if from_ref.startswith("-") or not from_ref.strip():
        raise UnresolvedRef(
            f"from_ref={from_ref!r} does not name a ref or commit in {repo.root}. Pass a "
            "branch, tag or commit id."
        )
    commit = (
        git(
            repo.root,
            "rev-parse",
            "--verify",
            "-q",
            "--end-of-options",
            f"{from_ref}^{{commit}}",
            check=False,
        )
        .decode()
        .strip()
    )
    if not commit:
        raise UnresolvedRef(
            f"from_ref={from_ref!r} does not resolve to a commit in {repo.root}. Check the "
            "name with `git rev-parse --verify <ref>` (fetch it first if it is remote)."
        )
    return commit


def _present(root: Path, rel: str) -> bool:
    """Tracked path still present in the working tree as a file or symlink."""
    try:
        st = os.lstat(root / rel)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)


def _git_dir_files(repo: RepoInfo) -> list[str]:
    """Every file under ``.git`` as repo-relative paths (for ``full_copy``)."""
    found = []
    git_dir = repo.git_dir
    if git_dir.parent != repo.root:
        raise InvalidWorkspaceArgument(
            f"repository {repo.root} keeps its git dir elsewhere ({git_dir}: a worktree or "
            "--separate-git-dir); full_copy copies only a .git inside the root. Use mode='clone'."
        )
    for dirpath, dirnames, filenames in os.walk(git_dir):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(repo.root)
        for name in sorted(filenames):
            found.append((rel_dir / name).as_posix())
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                found.append((rel_dir / name).as_posix())
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return found


def _submodule_git_files(repo: RepoInfo) -> list[str]:
    """The ``.git`` files (gitdir pointers into ``.git/modules``) of checked-out submodules."""
    found = []
    for sub in repo.submodules:
        marker = repo.root / sub / ".git"
        if marker.is_file():
            found.append(f"{sub}/.git")
    return found


def plan_workspace(
    repo: Path | str,
    *,
    mode: str = "clone",
    branch: str | None = None,
    from_ref: str | None = None,
    include_untracked: bool = False,
    on_base: Callable[[RepoInfo, str], None] | None = None,
) -> WorkspacePlan:
    """Inspect ``repo`` and compute what a prepare would copy; refuse bad input first.

    ``on_base(info, base_commit)`` is called as soon as the base commit is known, before the
    file lists are computed (a prepare starts packing the history there); every refusal of a
    ``clone`` or ``shallow`` plan has happened by then.
    """
    _check_arguments(mode, branch, from_ref)
    info = inspect_repo(repo)
    if info.submodules and mode != "full_copy":
        raise SubmodulesRefused(
            f"repository {info.root} has submodules ({', '.join(info.submodules[:5])}); mode "
            f"{mode!r} would leave them empty. Use mode='full_copy' to copy them with the tree."
        )
    base = _resolve(info, from_ref) if from_ref is not None else info.head_commit
    if on_base is not None:
        on_base(info, base)
    untracked: list[str] = []
    if include_untracked:
        untracked = [
            p
            for p in _z(git(info.root, "ls-files", "-z", "--others", "--exclude-standard"))
            if not p.endswith("/") and _present(info.root, p)
        ]
    if from_ref is not None and mode != "full_copy":
        files = _z(git(info.root, "ls-tree", "-r", "-z", "--name-only", base))
        return WorkspacePlan(
            mode, info, base, branch, from_ref, include_untracked, tuple(files), False
        )
    dirty: list[str] = []
    deleted: list[str] = []
    if mode == "full_copy":
        tracked = _z(git(info.root, "ls-files", "-z", "--cached", "--recurse-submodules"))
        present = [p for p in dict.fromkeys(tracked) if _present(info.root, p)]
        files = _git_dir_files(info) + _submodule_git_files(info) + present + untracked
    else:
        # porcelain diff compares content (not just stat data) and, with GIT_OPTIONAL_LOCKS=0,
        # never rewrites the host's index
        fields = _z(git(info.root, "diff", "--name-status", "-z", "--no-renames", base, "--"))
        for status, path in zip(fields[::2], fields[1::2], strict=True):
            if status == "D" or not _present(info.root, path):
                deleted.append(path)
            else:
                dirty.append(path)
        gone = set(deleted)
        files = [p for p in info.tracked if p not in gone] + untracked
        dirty += untracked
    return WorkspacePlan(
        mode,
        info,
        base,
        branch,
        from_ref,
        include_untracked,
        tuple(dict.fromkeys(files)),
        True,
        tuple(untracked),
        tuple(dict.fromkeys(dirty)),
        tuple(deleted),
    )
