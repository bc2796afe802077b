"""Prepare a host git repository inside a guest; export the guest's changes as a binary patch.

Prepare (:func:`prepare_workspace`):

1. plan on the host (``repo.plan_workspace``): every refusal happens here, before guest I/O;
2. as soon as the base is known and every refusal has happened (the plan runs in a thread and
   is still listing the changed files), start one guest command, under the guest's workspace
   lock, whose stdin is one tar stream; meanwhile pack the history on the host (a background
   thread, a ledger-tracked staging dir): ``git pack-objects`` writes a pack *with its index*
   of the branches, tags, HEAD and base (``clone``) or of the base commit alone (``shallow``);
   ``full_copy`` waits for its whole plan and sends no pack;
3. the guest script refuses a non-empty guest path, runs ``git init`` while the host is still
   packing, then unpacks the stream straight into ``.git``: first the files that differ from
   the base (or are untracked) and the deleted paths, then the pack + index (no ``index-pack``
   re-hashing every object in the guest), ``packed-refs`` and ``HEAD``; it checks the base
   out, applies the host's working tree on top, carries the git identity over, checks HEAD.
   A failure removes what it made. ``full_copy`` unpacks ``tree/`` (with ``.git``) beside the
   guest path and moves it in.

Export (:meth:`PreparedWorkspace.export`): one guest script copies the index to a throwaway
index inside the guest's git dir (``GIT_INDEX_FILE``; the same dir is the object dir, the real
objects its alternates), adds the untracked files there as intent-to-add (no content copied),
diffs the recorded base against the working tree (``--raw -z`` names and the ``--binary``
patch in one stream) and removes the throwaway dir. The real index, refs, HEAD, object store
and ``git status`` are untouched; nothing is written to ``/tmp``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import (
    GuestClosed,
    GuestCommandFailed,
    GuestPathInUse,
    HostGitFailed,
    InvalidWorkspaceArgument,
)
from pytest_sandbox.runtime.ledger import ResourceTracker, track
from pytest_sandbox.workspace.guests import (
    Guest,
    new_marked_dir,
    remove_marked_dir,
    script_argv,
)
from pytest_sandbox.workspace.repo import RepoInfo, WorkspacePlan, git_env, plan_workspace

CHUNK = 1 << 20
_MARKER = ".psb-staging"
#: Exit codes of the prepare script: the guest path exists and is not empty; HEAD is wrong.
_IN_USE = 3
_WRONG_HEAD = 4

_PREPARE = r"""
set -eu
stage=$1 dest=$2 mode=$3 base=$4 branch=$5 identity=$6 expect=$7
made= existed=
# a failed prepare leaves neither the staging dir nor a half-made workspace behind
cleanup() {
    if [ -e "$stage" ]; then rm -rf -- "$stage"; fi
    if [ -n "$made" ]; then rm -rf -- "$dest"; [ -z "$existed" ] || mkdir -p -- "$dest"; fi
}
trap cleanup EXIT
if [ -e "$dest" ] || [ -L "$dest" ]; then
    if [ ! -d "$dest" ] || [ -n "$(ls -A -- "$dest")" ]; then
        echo "guest path $dest exists and is not empty" >&2; exit 3
    fi
    existed=1
    rmdir -- "$dest"
fi
if [ "$mode" = full_copy ]; then
    mkdir -p -- "$stage"
    tar -x -f - -C "$stage"
    mv -- "$stage/tree" "$dest"
    made=1
    cd -- "$dest"
    if [ -n "$base" ]; then
        git -c advice.detachedHead=false checkout -q -f -B "$branch" "$base"
    elif [ -n "$branch" ]; then
        git checkout -q -B "$branch"
    fi
    # the copied index holds the host's stat data: refresh it once here
    git update-index -q --refresh >/dev/null || :
else
    # made while host git is still packing the history: the tar below waits for it
    made=1
    git init -q -- "$dest"
    cd -- "$dest"
    # straight into .git: the pack with its index, packed-refs, HEAD (and shallow), plus the
    # host's changed files and deletions under .git/psb-prepare
    tar -x -f - -C .git
    git reset -q --hard
    # the host's working tree on top: deletions, then the files that differ from the base
    if [ -s .git/psb-prepare/deleted ]; then xargs -0 rm -f -- <.git/psb-prepare/deleted; fi
    if [ -d .git/psb-prepare/tree ]; then cp -a -- .git/psb-prepare/tree/. .; fi
    if [ -e .git/psb-prepare ]; then rm -rf -- .git/psb-prepare; fi
fi
if [ -n "$identity" ]; then printf '%s' "$identity" >>.git/config; fi
# checked here, reported only on a mismatch: a command that writes nothing to stdout ends its
# SSH session without the delayed-ACK stall that trailing output costs (~40 ms)
head=$(git rev-parse --verify -q HEAD) || head=
if [ "$head" != "$expect" ]; then
    echo "HEAD is '$head' instead of the base $expect" >&2; exit 4
fi
made=
"""

_EXPORT = r"""
set -eu
cd -- "$1"
base=$2
tmp="$1/.git/psb-export-$3"
trap 'rm -rf -- "$tmp"' EXIT
if [ -f .git/index ]; then
    # one process makes the dir and copies the index (mkdir + cp where install lacks -D)
    install -D -m 600 -- .git/index "$tmp/index" 2>/dev/null ||
        { mkdir -p -- "$tmp"; cp -- .git/index "$tmp/index"; }
else
    mkdir -- "$tmp"
fi
# the throwaway dir is also the object dir (the real objects as alternates): the empty blob
# that intent-to-add entries name lands there, never in the real object store
GIT_INDEX_FILE="$tmp/index"
GIT_OBJECT_DIRECTORY=$tmp
GIT_ALTERNATE_OBJECT_DIRECTORIES="$1/.git/objects"
export GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
# untracked files enter the throwaway index as intent-to-add (no content is copied), and the
# diff of the base against the working tree reads every new content from the files; only the
# untracked paths are named, so add does not walk every tracked file a second time
git ls-files -z -o --exclude-standard |
    xargs -0 -r git -c gc.auto=0 -c core.fsmonitor=false add -N --
git --no-optional-locks diff -M --raw -z -p --binary --full-index --no-color --no-ext-diff \
    --no-textconv "$base" --
"""

_DIFF_ONLY = ["git", "diff", "--binary", "--full-index"]


@dataclass(frozen=True)
class WorkspaceExport:
    """The guest's changes against the base: ``patch`` (``git apply --index``-able, binary
    included), ``changed_files`` (sorted paths touched, both sides of a rename), ``statuses``
    (``(status, path)`` as ``git diff --name-status``), ``base_commit``, ``has_changes``."""

    patch: bytes
    changed_files: tuple[str, ...]
    base_commit: str
    statuses: tuple[tuple[str, str], ...] = ()

    @property
    def has_changes(self) -> bool:
        return bool(self.patch)


@dataclass
class PreparedWorkspace:
    """A repository prepared in a guest; ``export()`` returns its changes as a patch.

    Records the host repo (``repo_root``, ``repo_name``, ``head_commit``, ``current_branch``),
    what was asked (``mode``, ``branch``, ``from_ref``), the result (``base_commit``,
    ``guest_path``, ``files``) and when (``prepared_at``, seconds since the epoch).
    """

    guest: Guest
    guest_path: str
    base_commit: str
    mode: str
    repo_root: Path
    repo_name: str
    head_commit: str
    current_branch: str | None
    branch: str | None
    from_ref: str | None
    files: tuple[str, ...]
    prepared_at: float = field(default_factory=time.time)

    def run(self, argv: list[str], **kwargs: Any) -> Any:
        """Run ``argv`` in the guest with the workspace as working directory."""
        return self.guest.run(
            script_argv('cd -- "$1" && shift && exec "$@"', self.guest_path, *argv), **kwargs
        )

    def export(self, *, timeout: float = 300.0) -> WorkspaceExport:
        """Diff the guest's working tree (commits included) against ``base_commit``."""
        with workspace_lock(self.guest):
            result = self.guest.run(
                script_argv(_EXPORT, self.guest_path, self.base_commit, secrets.token_hex(6)),
                timeout=timeout,
            ).check(f"exporting the workspace {self.guest_path} from {self.guest!r}")
        return _parse_export(result.output, self.base_commit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "guest": getattr(self.guest, "kind", "?"),
            "guest_path": self.guest_path,
            "base_commit": self.base_commit,
            "mode": self.mode,
            "repo_root": str(self.repo_root),
            "repo_name": self.repo_name,
            "head_commit": self.head_commit,
            "current_branch": self.current_branch,
            "branch": self.branch,
            "from_ref": self.from_ref,
            "prepared_at": self.prepared_at,
        }


def _parse_export(output: bytes, base: str) -> WorkspaceExport:
    """Split ``git diff --raw -z -p`` output: raw records (``:modes shas STATUS\\0path\\0``,
    two paths for renames/copies), a NUL, then the patch."""
    statuses: list[tuple[str, str]] = []
    changed: set[str] = set()
    pos = 0
    while output.startswith(b":", pos):
        end = output.index(b"\0", pos)
        status = output[pos:end].split()[-1].decode()
        pos = end + 1
        for _ in range(2 if status[:1] in ("R", "C") else 1):
            end = output.index(b"\0", pos)
            path = os.fsdecode(output[pos:end])
            statuses.append((status, path))
            changed.add(path)
            pos = end + 1
    if output.startswith(b"\0", pos):
        pos += 1
    return WorkspaceExport(output[pos:], tuple(sorted(changed)), base, tuple(statuses))


@contextlib.contextmanager
def workspace_lock(guest: Guest) -> Iterator[None]:
    """Hold the guest's workspace lock; give up with GuestClosed when the guest closes."""
    while not guest.workspace_lock.acquire(timeout=0.05):
        if guest.closed:
            raise GuestClosed(f"{guest!r} was closed while waiting for its workspace lock")
    try:
        if guest.closed:
            raise GuestClosed(f"{guest!r} is closed")
        yield
    finally:
        guest.workspace_lock.release()


# --- the tar stream -----------------------------------------------------------------------


def _info(arcname: str, st: os.stat_result | None, path: Path | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if st is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = int(time.time())
        return info
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        assert path is not None
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)  # the link itself, never what it points to
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    else:
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    return info


def tar_entries(
    entries: Iterable[tuple[str, Path | bytes | None]],
    *,
    check: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """A tar stream of ``(member name, host path)`` entries (``None`` = an empty directory,
    ``bytes`` = a file with that content).

    Symlinks are stored as links; regular files are read in 1 MiB chunks, so memory stays
    flat whatever the file sizes. ``check`` runs before every chunk (it raises to abort);
    ``progress`` gets the size of every chunk produced.
    """

    def emit(data: bytes) -> bytes:
        if check is not None:
            check()
        if progress is not None:
            progress(len(data))
        return data

    for arcname, path in entries:
        if isinstance(path, bytes):
            info = _info(arcname, None, None)
            info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, len(path)
            yield emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            yield emit(path + b"\0" * (-len(path) % tarfile.BLOCKSIZE))
            continue
        st = os.lstat(path) if path is not None else None
        if st is not None and not (
            stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode)
        ):
            continue  # sockets, FIFOs, devices never go into a workspace
        info = _info(arcname, st, path)
        yield emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if info.isreg() and info.size:
            assert path is not None
            remaining = info.size
            with open(path, "rb") as handle:
                while remaining > 0:
                    data = handle.read(min(CHUNK, remaining)) or b"\0" * min(CHUNK, remaining)
                    remaining -= len(data)
                    yield emit(data)
            rest = info.size % tarfile.BLOCKSIZE
            if rest:
                yield emit(b"\0" * (tarfile.BLOCKSIZE - rest))
    yield emit(b"\0" * (2 * tarfile.BLOCKSIZE))


# --- host staging -------------------------------------------------------------------------


class _Staging:
    """A host temp dir for the pack and its index, recorded in the ledger until removed."""

    def __init__(self, base_dir: Path | None, tracker: ResourceTracker | None) -> None:
        self._tracked = track(tracker, "workspace-staging", "staging (creating)", releaser=RELEASER)
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        self.path = new_marked_dir("psb-ws-", base_dir, _MARKER, self._tracked)
        self._tracked.update(key=f"workspace staging {self.path}", path=str(self.path))

    def close(self) -> None:
        release_staging({"path": str(self.path), "token": self._tracked.token})
        self._tracked.released()


def release_staging(details: Mapping[str, Any]) -> None:
    """Ledger releaser for host staging dirs: remove the dir if its marker holds the token."""
    remove_marked_dir(details, _MARKER)


RELEASER = f"{__name__}:release_staging"


class _Payload:
    """The history sent with a clone/shallow prepare, built on the host in the background.

    ``git pack-objects`` writes a pack *and its index* of what ``git bundle create --branches
    --tags HEAD <base>`` would carry (``clone``; the base commit's objects alone for
    ``shallow``) into the staging dir, while the guest command starts (an SSH session or an
    exec costs about as much). The guest only drops the two files into ``.git/objects/pack``:
    no ``index-pack`` re-hashing every object there. ``packed-refs`` (branches and tags as on
    the host, the branch asked for at the base) and ``HEAD`` are written here too.
    :meth:`entries` waits for it when the tar stream gets there; ``cancel()`` kills host git.
    """

    def __init__(self, info: RepoInfo, mode: str, base: str, branch: str, staging: Path) -> None:
        self._info = info
        self._mode = mode
        self._base = base
        self._staging = staging
        self._branch = branch
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._cancelled = False
        self._result: list[tuple[str, Path | bytes | None]] = []
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._build, name="psb-ws-payload", daemon=True).start()

    def _git(self, *args: str, stdin: bytes | None = None, odb: Path | None = None) -> bytes:
        argv = ["git", "-C", str(self._info.root), *args]
        env = git_env()
        if odb is not None:
            # pack-objects writes its temp files into the object dir and renames them to the
            # output: a staging object dir (the repo's objects as alternates) keeps the host
            # repo untouched and the rename on one filesystem
            odb.joinpath("pack").mkdir(parents=True, exist_ok=True)
            env["GIT_OBJECT_DIRECTORY"] = str(odb)
            env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(self._info.objects_dir)
        with self._lock:
            if self._cancelled:
                raise GuestClosed("the prepare was aborted")
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            self._procs.append(proc)
        out, err = proc.communicate(stdin)
        if proc.returncode != 0 and not self._cancelled:
            raise HostGitFailed(
                f"host git failed in {self._info.root}: `git {' '.join(args)}` exited "
                f"{proc.returncode}: {err.decode(errors='replace').strip()}. Check the "
                "repository with git fsck."
            )
        return out

    def _build(self) -> None:
        base = self._base.encode()
        branch = self._branch.encode()
        try:
            refs: list[bytes] = []
            if self._mode == "clone":
                listed = self._git(
                    "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads", "refs/tags"
                )
                refs = [
                    r
                    for r in listed.splitlines()
                    if r.split(b" ", 1)[1:] != [b"refs/heads/" + branch]
                ]
                tips = {r.split(b" ", 1)[0] for r in refs} | {self._info.head_commit.encode(), base}
                name = self._git(
                    "pack-objects", "--revs", "--delta-base-offset", "-q",
                    str(self._staging / "pack"), stdin=b"".join(t + b"\n" for t in sorted(tips)),
                    odb=self._staging / "odb",
                )  # fmt: skip
            else:
                objects = self._git("rev-list", "--objects", "-n", "1", self._base)
                name = self._git(
                    "pack-objects", "--delta-base-offset", "-q", str(self._staging / "pack"),
                    stdin=objects, odb=self._staging / "odb",
                )  # fmt: skip
                self._result.append(("shallow", base + b"\n"))
            pack = f"pack-{name.decode().strip()}"
            if branch:
                refs.append(base + b" refs/heads/" + branch)
                head = b"ref: refs/heads/" + branch + b"\n"
            else:
                head = base + b"\n"
            refs.sort(key=lambda r: r.split(b" ", 1)[1])
            self._result += [
                (f"objects/pack/{pack}.pack", self._staging / f"{pack}.pack"),
                (f"objects/pack/{pack}.idx", self._staging / f"{pack}.idx"),
                ("packed-refs", b"".join(r + b"\n" for r in refs)),
                ("HEAD", head),
            ]
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def entries(self, check: Callable[[], None]) -> Iterator[tuple[str, Path | bytes | None]]:
        """Yield the payload's tar entries once host git is done (``check`` raises to abort)."""
        while not self._done.wait(0.05):
            check()
        if self._error is not None:
            raise self._error
        yield from self._result

    def cancel(self) -> None:
        """Kill host git still running and wait for the builder to finish. Idempotent."""
        with self._lock:
            self._cancelled = True
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        self._done.wait(30)


def _config_value(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _identity_config(name: str | None, email: str | None) -> str:
    """A ``[user]`` section carrying the host's git identity (appended to ``.git/config``:
    one write instead of two ``git config`` processes)."""
    lines = [f"\tname = {_config_value(name)}\n" if name else ""]
    lines.append(f"\temail = {_config_value(email)}\n" if email else "")
    body = "".join(lines)
    return f"[user]\n{body}" if body else ""


def _check_guest_path(guest_path: str) -> str:
    if not guest_path.startswith("/") or "\n" in guest_path or "\0" in guest_path:
        raise InvalidWorkspaceArgument(
            f"guest_path={guest_path!r} must be an absolute path without newlines. "
            "Pass e.g. '/root/repo'."
        )
    stripped = guest_path.rstrip("/")
    if not stripped or os.path.dirname(stripped) == stripped:
        raise InvalidWorkspaceArgument(
            f"guest_path={guest_path!r} cannot be the root directory. Pass e.g. '/root/repo'."
        )
    return stripped


def prepare_workspace(
    repo: Path | str,
    guest: Guest | None = None,
    *,
    mode: str = "clone",
    branch: str | None = None,
    from_ref: str | None = None,
    include_untracked: bool = False,
    guest_path: str | None = None,
    dry_run: bool = False,
    tracker: ResourceTracker | None = None,
    staging_dir: Path | None = None,
    timeout: float = 600.0,
    progress: Callable[[int], None] | None = None,
    plan: WorkspacePlan | None = None,
) -> PreparedWorkspace | WorkspacePlan:
    """Prepare ``repo`` in ``guest``; with ``dry_run=True`` return the plan, touching no guest.

    Refusals (:class:`~pytest_sandbox.errors.WorkspaceRefused` subclasses) come before any
    guest I/O, except :class:`~pytest_sandbox.errors.GuestPathInUse` (the guest path exists
    and is not empty; nothing in it is changed). ``plan`` reuses a plan computed before.
    ``progress`` is called with the size of every chunk of the tar stream.
    """
    if dry_run:
        return plan or plan_workspace(
            repo, mode=mode, branch=branch, from_ref=from_ref, include_untracked=include_untracked
        )
    if guest is None:
        raise InvalidWorkspaceArgument("prepare_workspace needs a guest unless dry_run=True")
    dest = _check_guest_path(guest_path or guest.default_workspace_path)
    staging: _Staging | None = None
    payload: _Payload | None = None
    pending = _PendingPlan(plan)

    def on_base(info: RepoInfo, base: str) -> None:
        # every refusal of a clone/shallow plan has happened: host git packs the history from
        # here on, and the guest command may start while the plan lists the changed files
        nonlocal staging, payload
        head = _Head(info, *fields, base)
        if head.mode != "full_copy":
            staging = _Staging(staging_dir, tracker)
            target = _target_branch(info, head.branch, head.from_ref)
            payload = _Payload(info, head.mode, base, target, staging.path)
        pending.head_known(head)

    fields: tuple[str, str | None, str | None] = (
        (mode, branch, from_ref) if plan is None else (plan.mode, plan.branch, plan.from_ref)
    )
    try:
        if plan is None:
            pending.start(
                lambda: plan_workspace(
                    repo, mode=mode, branch=branch, from_ref=from_ref,
                    include_untracked=include_untracked, on_base=on_base,
                )
            )  # fmt: skip
        else:
            on_base(plan.repo, plan.base_commit)
        return _prepare(pending.head(), pending, guest, dest, payload, timeout, progress)
    finally:
        pending.wait()
        if payload is not None:
            payload.cancel()
        if staging is not None:
            staging.close()


@dataclass(frozen=True)
class _Head:
    """What the guest command needs from a plan, known once the base commit is."""

    repo: RepoInfo
    mode: str
    branch: str | None
    from_ref: str | None
    base_commit: str


class _PendingPlan:
    """A plan computed in a thread: the head (base, branch, mode) comes first, the file lists
    after; a clone/shallow prepare starts the guest command in between."""

    def __init__(self, plan: WorkspacePlan | None) -> None:
        self._plan = plan
        self._head: _Head | None = None
        self._error: BaseException | None = None
        self._head_ready = threading.Event()
        self._done = threading.Event()
        if plan is not None:
            self._done.set()

    def start(self, compute: Callable[[], WorkspacePlan]) -> None:
        def run() -> None:
            try:
                self._plan = compute()
            except BaseException as exc:
                self._error = exc
            finally:
                self._done.set()
                self._head_ready.set()

        threading.Thread(target=run, name="psb-ws-plan", daemon=True).start()

    def head_known(self, head: _Head) -> None:
        self._head = head
        if head.mode != "full_copy" or self._done.is_set():
            # full_copy can still refuse after the base is known: it waits for the whole plan
            self._head_ready.set()

    def head(self) -> _Head:
        """The head once every refusal has happened; raises the plan's refusal."""
        self._head_ready.wait()
        if self._error is not None:
            raise self._error
        assert self._head is not None
        return self._head

    def result(self, check: Callable[[], None] = lambda: None) -> WorkspacePlan:
        """The whole plan (``check`` runs while waiting and raises to abort)."""
        while not self._done.wait(0.05):
            check()
        if self._error is not None:
            raise self._error
        assert self._plan is not None
        return self._plan

    def wait(self) -> None:
        self._done.wait()


def _target_branch(info: RepoInfo, branch: str | None, from_ref: str | None) -> str:
    """The branch the guest ends on: the one asked for, else the host's (unless from_ref)."""
    return branch or (info.current_branch if from_ref is None else None) or ""


def _entries(plan: WorkspacePlan) -> Iterator[tuple[str, Path | bytes | None]]:
    """The working-tree part of the tar stream."""
    info = plan.repo
    if plan.mode == "full_copy":
        yield ("tree", None)
        yield from ((f"tree/{rel}", info.root / rel) for rel in plan.files)
        return
    # extracted inside the guest's .git (see _PREPARE); only what there is to apply
    if plan.dirty:
        yield ("psb-prepare/tree", None)
        yield from ((f"psb-prepare/tree/{rel}", info.root / rel) for rel in plan.dirty)
    if plan.deleted:
        yield ("psb-prepare/deleted", b"".join(os.fsencode(p) + b"\0" for p in plan.deleted))


def _prepare(
    head: _Head,
    pending: _PendingPlan,
    guest: Guest,
    dest: str,
    payload: _Payload | None,
    timeout: float,
    progress: Callable[[int], None] | None,
) -> PreparedWorkspace:
    info = head.repo
    target_branch = _target_branch(info, head.branch, head.from_ref)
    stage = f"{os.path.dirname(dest)}/.psb-prepare-{secrets.token_hex(6)}"

    def check() -> None:
        if guest.closed:
            raise GuestClosed(f"{guest!r} was closed while a workspace was being prepared")

    def stream() -> Iterator[tuple[str, Path | bytes | None]]:
        # the changed files first (the plan lists them while the command starts), then the
        # pack once host git is done
        yield from _entries(pending.result(check))
        if payload is not None:
            yield from payload.entries(check)

    with workspace_lock(guest):
        # one round trip: the tar stream is the script's stdin
        result = guest.run(
            script_argv(
                _PREPARE,
                stage,
                dest,
                head.mode,
                # full_copy already has HEAD at the base unless from_ref asks for another
                "" if head.mode == "full_copy" and head.from_ref is None else head.base_commit,
                target_branch,
                _identity_config(info.user_name, info.user_email),
                head.base_commit,
            ),
            stdin=tar_entries(stream(), check=check, progress=progress),
            timeout=timeout,
        )
        if result.exit_code == _IN_USE:
            raise GuestPathInUse(
                f"guest path {dest} in {guest!r} exists and is not empty; it was left as "
                "it was. Pass another guest_path= or empty it first."
            )
        if result.exit_code == _WRONG_HEAD:
            raise GuestCommandFailed(
                f"after preparing {dest} in {guest!r}: "
                f"{result.stderr.decode(errors='replace').strip()}. Check the guest's git "
                "version (>= 2.20 needed).",
                result.exit_code,
                result.output,
                result.stderr,
            )
        result.check(f"preparing {info.root} as {dest} in {guest!r}")
    plan = pending.result()
    return PreparedWorkspace(
        guest=guest,
        guest_path=dest,
        base_commit=plan.base_commit,
        mode=plan.mode,
        repo_root=info.root,
        repo_name=info.name,
        head_commit=info.head_commit,
        current_branch=info.current_branch,
        branch=target_branch or None,
        from_ref=plan.from_ref,
        files=plan.files,
    )


def direct_diff_argv(guest_path: str, base: str) -> list[str]:
    """``git diff --binary <base>`` in the workspace: the baseline the export is measured by."""
    return script_argv('cd -- "$1" && shift && exec "$@"', guest_path, *_DIFF_ONLY, base)


class Workspaces:
    """The ``sandbox_workspace`` factory: ``(repo, *, guest=None, mode="clone", branch=None,
    from_ref=None, include_untracked=False, dry_run=False, guest_path=None)``.

    ``guest=None`` uses ``default_guest()`` (called only once a plan exists, so a refusal or a
    dry run never creates a guest). Host staging dirs go to ``staging_dir`` and are ledger rows.
    """

    def __init__(
        self,
        default_guest: Callable[[], Guest],
        *,
        tracker: ResourceTracker | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        self._default_guest = default_guest
        self._tracker = tracker
        self.staging_dir = staging_dir
        self.prepared: list[PreparedWorkspace] = []

    def __call__(
        self,
        repo: Path | str,
        *,
        guest: Guest | None = None,
        mode: str = "clone",
        branch: str | None = None,
        from_ref: str | None = None,
        include_untracked: bool = False,
        dry_run: bool = False,
        guest_path: str | None = None,
        timeout: float = 600.0,
    ) -> Any:
        plan = plan_workspace(
            repo, mode=mode, branch=branch, from_ref=from_ref, include_untracked=include_untracked
        )
        if dry_run:
            return plan
        prepared = prepare_workspace(
            repo,
            guest if guest is not None else self._default_guest(),
            guest_path=guest_path,
            tracker=self._tracker,
            staging_dir=self.staging_dir,
            timeout=timeout,
            plan=plan,
        )
        assert isinstance(prepared, PreparedWorkspace)
        self.prepared.append(prepared)
        return prepared

    def close(self) -> None:
        """Nothing to undo: workspaces live in their guests, which are torn down separately."""
        self.prepared.clear()
