"""Prepare and export on all three guests: a LocalGuest, the real test sshd, a real container.

Each test runs once per backend (``@pytest.mark.sandbox(guest=...)`` on the parameter), through
the public fixtures ``sandbox_guest`` and ``sandbox_workspace``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import errors

BACKENDS = [
    pytest.param(name, marks=pytest.mark.sandbox(guest=name), id=name)
    for name in ("local", "ssh", "container")
]

# --- helpers ----------------------------------------------------------------------------

NAME = 'Grace "Amazing" Hopper \\ Jr ü'  # quotes and a backslash survive the config write
HOSTILE_NAMES = [
    "plain.txt",
    "with space/file name.txt",
    "new\nline.txt",
    "ünïcødé/ファイル.txt",
    "-leading-dash.txt",
    "--",
    " leading space",
    "tab\tname",
]


def git(cwd: Path, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, input=input
    ).stdout


def init_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", NAME)
    git(root, "config", "user.email", "grace@example.invalid")
    return root


def hostile_repo(root: Path) -> Path:
    """Odd names, a binary, an executable, symlinks leaving the repo, ignored/untracked files,
    two commits, and uncommitted edits (modified, deleted) in the working tree."""
    init_repo(root)
    for name in HOSTILE_NAMES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content of {name!r}\n".encode())
    (root / "bin.dat").write_bytes(bytes(range(256)) * 40)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("/etc/hostname", root / "outside-abs")
    os.symlink("../../../outside-rel", root / "outside-rel")
    (root / ".gitignore").write_text("*.log\n")
    (root / "doomed.txt").write_text("will be deleted in the working tree\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    (root / "second.txt").write_text("second commit\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "second")
    (root / "plain.txt").write_text("edited, not committed\n")
    (root / "doomed.txt").unlink()
    (root / "untracked.txt").write_text("untracked\n")
    (root / "noise.log").write_text("ignored\n")
    return root


Manifest = dict[str, tuple[str, int, str]]


def manifest_of_tar(data: bytes) -> Manifest:
    """{path: (type, exec bit, sha256 or link target)} of a tar, ``.git`` excluded."""
    found: Manifest = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not name or name == "." or name == ".git" or name.startswith(".git/"):
                continue
            if member.issym():
                found[name] = ("link", 0, member.linkname)
            elif member.isfile():
                content = tar.extractfile(member).read()  # type: ignore[union-attr]
                found[name] = ("file", member.mode & 0o100, hashlib.sha256(content).hexdigest())
    return found


def host_manifest(root: Path, files: list[str] | tuple[str, ...]) -> Manifest:
    found: Manifest = {}
    for rel in files:
        path = root / rel
        if path.is_symlink():
            found[rel] = ("link", 0, os.readlink(path))
        else:
            found[rel] = (
                "file",
                path.stat().st_mode & 0o100,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return found


def guest_manifest(ws: Any) -> Manifest:
    out = ws.run(["tar", "-c", "-f", "-", "--exclude=./.git", "."]).check("tar of the workspace")
    return manifest_of_tar(out.output)


def guest_git(ws: Any, *args: str) -> bytes:
    return ws.run(["git", *args]).check(f"git {' '.join(args)}").output  # type: ignore[no-any-return]


def git_state(ws: Any) -> dict[str, bytes]:
    """What export must leave alone: index bytes, refs, HEAD, status, the .git file list."""
    listing = ws.run(["sh", "-c", "cd .git && find . -print | LC_ALL=C sort"]).check("ls .git")
    return {
        "index": ws.guest.read_file(f"{ws.guest_path}/.git/index"),
        "refs": guest_git(ws, "for-each-ref", "--format=%(refname) %(objectname)"),
        "head": ws.guest.read_file(f"{ws.guest_path}/.git/HEAD"),
        "status": guest_git(ws, "--no-optional-locks", "status", "--porcelain=v2", "-z"),
        "git-dir": listing.output,
    }


# --- fidelity ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_clone_is_byte_identical_with_history_branch_identity(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    repo = hostile_repo(tmp_path / "repo")
    ws = sandbox_workspace(repo)
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    assert ws.base_commit == head
    assert ws.head_commit == head
    assert ws.mode == "clone"
    assert ws.repo_root == repo
    assert ws.repo_name == "repo"
    assert ws.current_branch == "main"
    assert ws.prepared_at <= time.time()
    if backend == "container":
        assert ws.guest_path == "/root/repo"
    assert guest_git(ws, "rev-parse", "HEAD").decode().strip() == head
    assert guest_git(ws, "symbolic-ref", "HEAD").strip() == b"refs/heads/main"
    assert guest_git(ws, "rev-list", "--count", "HEAD").strip() == b"2"
    assert guest_git(ws, "config", "user.name").decode().strip() == NAME
    assert guest_git(ws, "config", "user.email").strip() == b"grace@example.invalid"
    expected = host_manifest(repo, ws.files)
    assert guest_manifest(ws) == expected
    assert expected["outside-abs"] == ("link", 0, "/etc/hostname")  # a link, never followed
    assert "untracked.txt" not in expected
    assert "noise.log" not in expected
    assert "doomed.txt" not in expected
    # the guest sees what the host sees: same modifications, no staging noise
    host_status = git(repo, "status", "--porcelain", "-uno", "-z")
    assert guest_git(ws, "status", "--porcelain", "-uno", "-z") == host_status
    assert b".psb-prepare" not in ws.run(["ls", "-a", os.path.dirname(ws.guest_path)]).output


@pytest.mark.parametrize("backend", BACKENDS)
def test_shallow_untracked_and_branch(backend: str, tmp_path: Path, sandbox_workspace: Any) -> None:
    repo = hostile_repo(tmp_path / "repo")
    ws = sandbox_workspace(repo, mode="shallow", include_untracked=True, branch="work")
    assert guest_git(ws, "rev-list", "--count", "HEAD").strip() == b"1"
    assert guest_git(ws, "symbolic-ref", "HEAD").strip() == b"refs/heads/work"
    assert ws.branch == "work"
    files = guest_manifest(ws)
    assert "untracked.txt" in files
    assert "noise.log" not in files
    assert files == host_manifest(repo, ws.files)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_ref_checks_out_that_commit_on_a_new_branch(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    repo = hostile_repo(tmp_path / "repo")
    first = git(repo, "rev-parse", "HEAD~1").decode().strip()
    ws = sandbox_workspace(repo, branch="from-first", from_ref="HEAD~1")
    assert ws.base_commit == first
    assert guest_git(ws, "rev-parse", "HEAD").decode().strip() == first
    assert guest_git(ws, "symbolic-ref", "HEAD").strip() == b"refs/heads/from-first"
    files = guest_manifest(ws)
    assert "second.txt" not in files
    assert "doomed.txt" in files  # that commit's tree, clean
    assert guest_git(ws, "status", "--porcelain") == b""


@pytest.mark.parametrize("backend", BACKENDS)
def test_refs_branches_and_tags_as_on_the_host_with_the_branch_moved_to_from_ref(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    repo = hostile_repo(tmp_path / "repo")
    first = git(repo, "rev-parse", "HEAD~1").decode().strip()
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    git(repo, "tag", "light", "HEAD~1")
    git(repo, "tag", "-a", "-m", "annotated", "v1.0")
    git(repo, "branch", "side", "HEAD~1")
    # the branch asked for exists on the host at another commit: the guest has it at from_ref
    ws = sandbox_workspace(repo, branch="main", from_ref="HEAD~1")
    refs = guest_git(ws, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)")
    assert refs.decode().splitlines() == [
        f"refs/heads/main {first} ",
        f"refs/heads/side {first} ",
        f"refs/tags/light {first} ",
        f"refs/tags/v1.0 {git(repo, 'rev-parse', 'v1.0').decode().strip()} {head}",
    ]
    assert guest_git(ws, "symbolic-ref", "HEAD").strip() == b"refs/heads/main"
    assert guest_git(ws, "describe", "--tags", "v1.0").strip() == b"v1.0"
    assert guest_git(ws, "status", "--porcelain").strip() == b""
    guest_git(ws, "fsck", "--no-dangling", "--strict")  # the pack and its index are sound


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_git_failing_mid_stream_leaves_nothing_in_the_guest(
    backend: str,
    tmp_path: Path,
    sandbox_workspace: Any,
    sandbox_guest: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_sandbox.workspace import workspace

    repo = hostile_repo(tmp_path / "repo")
    real_git = workspace._Payload._git

    def failing_git(self: Any, *args: str, **kwargs: Any) -> bytes:
        if args[0] == "pack-objects":
            time.sleep(0.3)  # the guest has started and made its git init by now
            return real_git(self, "pack-objects", "--no-such-option", **kwargs)
        return real_git(self, *args, **kwargs)

    monkeypatch.setattr(workspace._Payload, "_git", failing_git)
    with pytest.raises(errors.HostGitFailed, match="pack-objects"):
        sandbox_workspace(repo)
    path = sandbox_guest.default_workspace_path
    listing = sandbox_guest.run(["ls", "-A", os.path.dirname(path)]).output.split()
    assert os.path.basename(path).encode() not in listing
    assert not [n for n in listing if n.startswith(b".psb-prepare")]
    # the guest works on: the same path prepares fine afterwards
    monkeypatch.undo()
    assert sandbox_workspace(repo).base_commit == git(repo, "rev-parse", "HEAD").decode().strip()


@pytest.mark.sandbox(guest="local")
def test_clone_from_a_linked_worktree(tmp_path: Path, sandbox_workspace: Any) -> None:
    repo = hostile_repo(tmp_path / "repo")
    git(repo, "worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"), "HEAD~1")
    (tmp_path / "wt" / "wt-only.txt").write_text("edited in the worktree\n")
    git(tmp_path / "wt", "add", "wt-only.txt")
    ws = sandbox_workspace(tmp_path / "wt")  # the pack reads the main repo's object store
    assert ws.base_commit == git(repo, "rev-parse", "HEAD~1").decode().strip()
    assert guest_git(ws, "symbolic-ref", "HEAD").strip() == b"refs/heads/side"
    assert guest_manifest(ws) == host_manifest(tmp_path / "wt", ws.files)
    assert "wt-only.txt" in ws.files


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_copy_carries_git_dir_and_submodules(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    sub = init_repo(tmp_path / "sub")
    (sub / "lib.txt").write_text("library\n")
    git(sub, "add", "-A")
    git(sub, "commit", "-qm", "lib")
    repo = hostile_repo(tmp_path / "repo")
    subprocess.run(
        ["git", "-C", str(repo), "-c", "protocol.file.allow=always", "submodule", "add", "-q",
         str(sub), "vendor/sub"],
        check=True, capture_output=True,
    )  # fmt: skip
    git(repo, "commit", "-qm", "submodule")
    ws = sandbox_workspace(repo, mode="full_copy")
    assert ws.guest.read_file(f"{ws.guest_path}/vendor/sub/lib.txt") == b"library\n"
    assert guest_git(ws, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    sub_head = ws.run(["git", "-C", "vendor/sub", "rev-parse", "HEAD"]).check("sub").output
    assert sub_head == git(sub, "rev-parse", "HEAD")
    status = ("status", "--porcelain", "-uno", "-z")
    assert guest_git(ws, *status) == git(repo, *status)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_touch_no_guest(backend: str, tmp_path: Path, sandbox_workspace: Any) -> None:
    repo = hostile_repo(tmp_path / "repo")
    with pytest.raises(errors.FromRefWithoutBranch):
        sandbox_workspace(repo, from_ref="HEAD~1")
    with pytest.raises(errors.UnresolvedRef):
        sandbox_workspace(repo, branch="x", from_ref="nope")
    with pytest.raises(errors.NotAGitRepository):
        sandbox_workspace(tmp_path)
    plan = sandbox_workspace(repo, dry_run=True)
    assert plan.mode == "clone"
    assert "plain.txt" in plan.files


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_empty_guest_path_is_refused_and_left_alone(
    backend: str, tmp_path: Path, sandbox_workspace: Any, sandbox_guest: Any
) -> None:
    repo = hostile_repo(tmp_path / "repo")
    path = sandbox_guest.default_workspace_path
    sandbox_guest.run(["sh", "-c", 'mkdir -p "$1" && echo keep > "$1/mine"', "sh", path])
    with pytest.raises(errors.GuestPathInUse, match="not empty"):
        sandbox_workspace(repo)
    assert sandbox_guest.read_file(f"{path}/mine") == b"keep\n"
    listing = sandbox_guest.run(["ls", "-a", os.path.dirname(path)]).output
    assert b".psb-prepare" not in listing


# --- export -----------------------------------------------------------------------------

EDIT_SCRIPT = r"""
set -e
echo "committed in the guest" > committed.txt
git add committed.txt
git commit -qm "guest commit"
echo "uncommitted edit" >> "with space/file name.txt"
printf 'new text\n' > "brand new.txt"
head -c 3000 /dev/urandom > new.bin
rm -- -leading-dash.txt
git mv -- "ünïcødé/ファイル.txt" "ünïcødé/renamed.txt"
chmod +x plain.txt
printf 'x' > "$(printf 'nl\nname.txt')"
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_reproduces_every_change_and_leaves_git_alone(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    repo = hostile_repo(tmp_path / "repo")
    ws = sandbox_workspace(repo)
    # the host's uncommitted edits are already changes against the base
    assert ws.export().changed_files == ("doomed.txt", "plain.txt")
    ws.run(["sh", "-c", EDIT_SCRIPT]).check("edits")
    before = git_state(ws)
    export = ws.export()
    assert git_state(ws) == before  # index, refs, HEAD, status, no temp file in .git
    assert export.has_changes
    assert export.base_commit == ws.base_commit
    changed = ["committed.txt", "brand new.txt", "new.bin", "-leading-dash.txt", "plain.txt"]
    changed += ["ünïcødé/renamed.txt", "ünïcødé/ファイル.txt", "nl\nname.txt"]
    for name in changed:
        assert name in export.changed_files, name
    assert b"GIT binary patch" in export.patch
    # a clean checkout of the base + git apply --index == the guest's working tree
    check = tmp_path / "check"
    subprocess.run(["git", "clone", "-q", str(repo), str(check)], check=True)
    git(check, "checkout", "-q", ws.base_commit)
    git(check, "apply", "--index", "--binary", "-", input=export.patch)
    tracked = git(check, "ls-files", "-z").decode().split("\0")
    assert host_manifest(check, [p for p in tracked if p]) == guest_manifest(ws)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_without_changes_is_empty(
    backend: str, tmp_path: Path, sandbox_workspace: Any
) -> None:
    repo = init_repo(tmp_path / "repo")
    (repo / "a").write_text("a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a")
    ws = sandbox_workspace(repo)
    export = ws.export()
    assert not export.has_changes
    assert export.changed_files == ()


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("local", marks=pytest.mark.sandbox(guest="local"), id="local"),
        pytest.param("container", marks=pytest.mark.sandbox(guest="container"), id="container"),
    ],
)
def test_export_works_with_tmp_on_its_own_tmpfs(
    backend: str, tmp_path: Path, sandbox_workspace: Any, request: pytest.FixtureRequest
) -> None:
    from pytest_sandbox.workspace.guests import ContainerGuest, LocalGuest

    guest: Any
    if backend == "local":
        guest = LocalGuest(tmpfs_tmp=True, namespaces=True)
    else:
        engine = request.getfixturevalue("sandbox_docker")
        image = request.getfixturevalue("sandbox_image")("debian-git")
        guest = ContainerGuest(engine, image, tmpfs_tmp=True)
    with guest:
        fs = guest.run(["sh", "-c", "stat -f -c %T /tmp; stat -f -c %T \"$1\"", "sh",
                        os.path.dirname(guest.default_workspace_path)]).output.split()  # fmt: skip
        assert fs[0] == b"tmpfs"
        assert fs[1] != b"tmpfs"
        repo = hostile_repo(tmp_path / "repo")
        ws = sandbox_workspace(repo, guest=guest)
        ws.run(["sh", "-c", EDIT_SCRIPT]).check("edits")
        before = git_state(ws)
        export = ws.export()
        assert "committed.txt" in export.changed_files
        assert git_state(ws) == before
        assert guest.run(["sh", "-c", "ls -A /tmp"]).output == b""


# --- big repos --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_file_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = init_repo(tmp_path_factory.mktemp("big") / "repo")
    with open(repo / "big.bin", "wb") as out:
        block = os.urandom(1 << 20)
        for i in range(100):
            out.write(block[i:] + block[:i])
    (repo / "small.txt").write_text("small\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "100 MB")
    return repo


@pytest.fixture(scope="module")
def many_files_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = init_repo(tmp_path_factory.mktemp("many") / "repo")
    for d in range(100):
        sub = repo / f"dir {d:03d}"
        sub.mkdir()
        for f in range(100):
            (sub / f"file-{f:03d}.txt").write_text(f"{d}/{f}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "10,000 files")
    return repo


@pytest.mark.parametrize("backend", BACKENDS)
def test_100_mb_file(backend: str, big_file_repo: Path, sandbox_workspace: Any) -> None:
    ws = sandbox_workspace(big_file_repo)
    digest = hashlib.sha256((big_file_repo / "big.bin").read_bytes()).hexdigest()
    out = ws.run(["sha256sum", "big.bin"]).check("sha256sum").output
    assert out.split()[0].decode() == digest
    ws.run(["sh", "-c", "echo changed > small.txt"]).check("edit")
    export = ws.export()
    assert export.changed_files == ("small.txt",)


@pytest.mark.parametrize("backend", BACKENDS)
def test_10000_files(backend: str, many_files_repo: Path, sandbox_workspace: Any) -> None:
    ws = sandbox_workspace(many_files_repo)
    count = ws.run(["sh", "-c", "git ls-files | wc -l; find . -path ./.git -prune -o -type f "
                    "-print | wc -l"]).check("count").output.split()  # fmt: skip
    assert count == [b"10000", b"10000"]
    assert ws.guest.read_file(f"{ws.guest_path}/dir 042/file-007.txt") == b"42/7\n"
    assert guest_git(ws, "status", "--porcelain") == b""
    ws.run(["sh", "-c", "rm -r 'dir 013'; echo x > 'dir 099/file-000.txt'"]).check("edit")
    export = ws.export()
    assert len(export.changed_files) == 101


# --- concurrency ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_waits_for_an_in_flight_prepare(
    backend: str, tmp_path: Path, sandbox_guest: Any
) -> None:
    from pytest_sandbox.workspace.workspace import prepare_workspace

    repo = hostile_repo(tmp_path / "repo")
    first = prepare_workspace(
        repo, sandbox_guest, guest_path=f"{sandbox_guest.default_workspace_path}1"
    )
    started = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def slow(_n: int) -> None:
        started.set()
        release.wait(30)

    def second() -> None:
        path = f"{sandbox_guest.default_workspace_path}2"
        prepare_workspace(repo, sandbox_guest, guest_path=path, progress=slow)
        seen.append("prepare")

    thread = threading.Thread(target=second)
    thread.start()
    assert started.wait(30)

    def export() -> None:
        first.export()
        seen.append("export")

    exporter = threading.Thread(target=export)
    exporter.start()
    time.sleep(0.3)
    assert seen == []  # the export waits for the lock held by the stuck prepare
    release.set()
    thread.join(60)
    exporter.join(60)
    assert seen == ["prepare", "export"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_the_guest_aborts_a_stuck_prepare(
    backend: str, sandbox_guest: Any, big_file_repo: Path, tmp_path: Path
) -> None:
    from pytest_sandbox.workspace.workspace import prepare_workspace

    staging_dir = tmp_path / "staging"
    stuck = threading.Event()
    outcome: list[BaseException | None] = []
    produced = [0]

    def progress(n: int) -> None:
        produced[0] += n
        if produced[0] > (8 << 20):
            stuck.set()
            while not sandbox_guest.closed:  # stuck in I/O until the guest goes away
                time.sleep(0.05)

    def prepare() -> None:
        try:
            prepare_workspace(
                big_file_repo,
                sandbox_guest,
                progress=progress,
                staging_dir=staging_dir,
            )
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=prepare, daemon=True)
    thread.start()
    assert stuck.wait(60)
    started = time.monotonic()
    sandbox_guest.close()  # must not wait for the workspace lock
    assert time.monotonic() - started < 30
    assert sandbox_guest.closed
    with pytest.raises(errors.GuestClosed):
        sandbox_guest.run(["true"])
    thread.join(30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.GuestError), outcome  # failed cleanly, typed
    assert list(staging_dir.iterdir()) == []  # the host staging dir went too


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("local", marks=pytest.mark.sandbox(guest="local"), id="local"),
        pytest.param("ssh", marks=pytest.mark.sandbox(guest="ssh"), id="ssh"),
    ],
)
def test_closing_the_guest_while_its_tar_is_frozen(
    backend: str, sandbox_guest: Any, tmp_path: Path
) -> None:
    """Real stuck I/O: the guest's tar is SIGSTOPped, so our writes block on a full pipe."""
    import signal

    import psutil

    from pytest_sandbox.workspace.workspace import prepare_workspace

    repo = init_repo(tmp_path / "repo")
    (repo / "tracked.txt").write_text("t\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    with open(repo / "dirty.bin", "wb") as out:  # untracked + included: goes through the tar
        out.write(os.urandom(32 << 20))
    marker = (
        ("PYTEST_SANDBOX_RESOURCE", sandbox_guest._tracked.token)
        if backend == "local"
        else ("PSB_TAG", f"{sandbox_guest.scratch}/")
    )

    def guest_tar() -> psutil.Process | None:
        for proc in psutil.process_iter(["name"]):
            try:
                value = proc.environ().get(marker[0], "")
            except psutil.Error:
                continue
            if proc.info["name"] == "tar" and value.startswith(marker[1]):
                return proc
        return None

    outcome: list[BaseException | None] = []

    def prepare() -> None:
        try:
            prepare_workspace(repo, sandbox_guest, include_untracked=True)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=prepare, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    stopped = None
    while stopped is None and time.monotonic() < deadline:
        tar = guest_tar()
        try:
            if tar is not None:
                tar.send_signal(signal.SIGSTOP)
                stopped = tar
        except psutil.NoSuchProcess:  # found as it went: look again
            pass
        time.sleep(0.01)
    assert stopped is not None, "the guest's tar never started"
    tar = stopped
    time.sleep(1.0)
    assert thread.is_alive()  # stuck: the pipe is full and nobody reads it
    started = time.monotonic()
    sandbox_guest.close()
    assert time.monotonic() - started < 30
    thread.join(30)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.GuestClosed), outcome
    assert not tar.is_running() or tar.status() == psutil.STATUS_ZOMBIE
