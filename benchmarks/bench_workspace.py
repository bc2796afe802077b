"""Workspace prepare/export vs the plain tools doing the same transfer, side by side.

The repo has 5,000 files and 1,000 commits (``--quick``: 1,000 files and 200 commits, fewer
rounds), built with ``git fast-import``. Rounds interleave ours and the peer; medians compared.

- prepare (clone) into a ``debian-git`` container: ours = ``prepare_workspace`` (plan, then one
  exec whose stdin is one tar stream, the history packed with its index by the host while the
  exec starts); peer = ``git bundle create`` + ``docker cp`` + ``docker exec … git clone``.
  Goal ≤ 1.2x.
- prepare (clone) into the SSH guest (real sshd on 127.0.0.1): ours = ``prepare_workspace``;
  peer = ``git clone ssh://…`` of the same repo over the same multiplexed SSH connection
  (``GIT_SSH_COMMAND`` with the guest's ControlPath), so both pay the same transport. ≤ 1.2x.
- export of a workspace with 20 changed files (10 of them new): ours =
  ``PreparedWorkspace.export()`` (one script: throwaway index, untracked files as
  intent-to-add, names + patch); peer = ``git diff --binary <base>`` run in the guest directly
  through the same guest API (it leaves the new files out). Goal ≤ 1.3x. An export costs tens
  of milliseconds, so it gets more rounds than a prepare.
"""

from __future__ import annotations

import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import result_row


def row(
    name: str, ours: float, peer: float, peer_name: str, goal: float, note: str
) -> dict[str, Any]:
    ratio = ours / peer if peer else 0.0
    return result_row(
        name, round(ours * 1000, 1), round(peer * 1000, 1), peer_name, "ms", f"<= {goal}x",
        ratio <= goal, ratio=round(ratio, 3), note=note,
    )  # fmt: skip


def make_repo(root: Path, files: int, commits: int) -> Path:
    """A repo with ``files`` files and ``commits`` commits, via git fast-import."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    parts: list[bytes] = []

    def data(payload: bytes) -> None:
        parts.append(b"data %d\n" % len(payload) + payload + b"\n")

    per_commit = max(1, files // 200)
    for n in range(commits):
        parts.append(b"commit refs/heads/main\n")
        parts.append(b"committer Bench <bench@example.invalid> %d +0000\n" % (1700000000 + n))
        data(b"commit %d" % n)
        if n == 0:
            touched = range(files)
        else:
            touched = range((n * per_commit) % files, (n * per_commit) % files + per_commit)
        for i in touched:
            path = b"src/d%03d/file_%05d.txt" % (i % 100, i % files)
            parts.append(b"M 100644 inline " + path + b"\n")
            data(b"file %d revision %d\n" % (i, n) * 8)
    subprocess.run(
        ["git", "-C", str(root), "fast-import", "--quiet"], input=b"".join(parts), check=True
    )
    subprocess.run(["git", "-C", str(root), "checkout", "-q", "-f", "main"], check=True)
    for key, value in (("user.name", "Bench"), ("user.email", "bench@example.invalid")):
        subprocess.run(["git", "-C", str(root), "config", key, value], check=True)
    return root


def interleaved(
    rounds: int, ours: Callable[[int], None], peer: Callable[[int], None]
) -> tuple[float, float]:
    mine: list[float] = []
    theirs: list[float] = []
    for i in range(rounds):
        for fn, sink in (
            ((ours, mine), (peer, theirs)) if i % 2 == 0 else ((peer, theirs), (ours, mine))
        ):
            start = time.perf_counter()
            fn(i)
            sink.append(time.perf_counter() - start)
    return statistics.median(mine), statistics.median(theirs)


def bench_container(
    repo: Path, rounds: int, export_rounds: int, note: str, tmp: Path
) -> list[dict[str, Any]]:
    from pytest_sandbox.containers.engine import Engine
    from pytest_sandbox.containers.images import ImageBuilder
    from pytest_sandbox.workspace.guests import ContainerGuest
    from pytest_sandbox.workspace.workspace import (
        PreparedWorkspace,
        direct_diff_argv,
        prepare_workspace,
    )

    engine = Engine()
    image = ImageBuilder(engine, tmp / "state", progress=None).get("debian-git")
    rows = []
    with ContainerGuest(engine, image) as guest:
        guest.run(["git", "config", "--global", "advice.detachedHead", "false"])

        def ours(i: int) -> None:
            prepare_workspace(repo, guest, guest_path=f"/root/ours{i}", staging_dir=tmp)

        def peer(i: int) -> None:
            bundle = tmp / f"peer{i}.bundle"
            subprocess.run(["git", "-C", str(repo), "bundle", "create", "-q", str(bundle), "--all"],
                           check=True, capture_output=True)  # fmt: skip
            subprocess.run(["docker", "cp", str(bundle), f"{guest.id}:/root/peer{i}.bundle"],
                           check=True, capture_output=True)  # fmt: skip
            subprocess.run(["docker", "exec", guest.id, "git", "clone", "-q",
                            f"/root/peer{i}.bundle", f"/root/peer{i}"],
                           check=True, capture_output=True)  # fmt: skip
            bundle.unlink()

        mine, theirs = interleaved(rounds, ours, peer)
        rows.append(row("workspace prepare clone → container", mine, theirs,
                        "git bundle + docker cp + git clone", 1.2, note))  # fmt: skip

        ws = prepare_workspace(repo, guest, guest_path="/root/export", staging_dir=tmp)
        assert isinstance(ws, PreparedWorkspace)
        edits = (
            "for i in $(seq 0 9); do echo edit >> src/d0${i}0/file_000${i}0.txt; done; "
            "for i in $(seq 0 9); do echo new > new_$i.txt; done"
        )
        ws.run(["sh", "-c", edits]).check("edits")

        def export(_i: int) -> None:
            ws.export()

        def diff(_i: int) -> None:
            guest.run(direct_diff_argv(ws.guest_path, ws.base_commit)).check("git diff")

        mine, theirs = interleaved(export_rounds, export, diff)
        rows.append(row("workspace export (container)", mine, theirs,
                        "git diff --binary in the guest", 1.3, note))  # fmt: skip
    engine.close()
    return rows


def bench_ssh(repo: Path, rounds: int, note: str, tmp: Path) -> list[dict[str, Any]]:
    from pytest_sandbox.workspace.sshd import SSHHost
    from pytest_sandbox.workspace.workspace import prepare_workspace

    with SSHHost(base_dir=tmp) as host:
        guest = host.guest()
        ssh = ["ssh", *host.target.options(), "-o", f"ControlPath={guest.control_path}",
               "-o", "ControlMaster=no"]  # fmt: skip
        env = {"GIT_SSH_COMMAND": shlex.join(ssh), "PATH": "/usr/bin:/bin"}
        url = f"ssh://{host.user}@{host.host}:{host.port}{repo}"

        def ours(i: int) -> None:
            prepare_workspace(repo, guest, guest_path=f"{guest.scratch}/ours{i}", staging_dir=tmp)

        def peer(i: int) -> None:
            subprocess.run(["git", "clone", "-q", url, f"{guest.scratch}/peer{i}"],
                           env=env, check=True, capture_output=True)  # fmt: skip

        mine, theirs = interleaved(rounds, ours, peer)
        guest.close()
    return [row("workspace prepare clone → ssh", mine, theirs,
                "git clone over the same ssh connection", 1.2, note)]  # fmt: skip


def run(quick: bool) -> list[dict[str, Any]]:
    # odd counts: the median is one measured round
    files, commits, rounds, export_rounds = (1000, 200, 5, 21) if quick else (5000, 1000, 9, 31)
    note = f"repo: {files} files, {commits} commits" + (" (--quick: smaller repo)" if quick else "")
    tmp = Path(tempfile.mkdtemp(prefix="psb-bench-ws-", dir="/var/tmp"))
    rows: list[dict[str, Any]] = []
    try:
        repo = make_repo(tmp / "repo", files, commits)
        try:
            rows += bench_container(repo, rounds, export_rounds, note, tmp)
        except Exception as exc:  # no engine here: say so rather than fail the whole table
            rows.append({"name": "workspace container rows", "ours": 0.0, "peer": 0.0,
                         "peer_name": "-", "unit": "-", "ratio": 0.0, "goal": "-",
                         "met": False, "note": f"not run: {exc}"})  # fmt: skip
        rows += bench_ssh(repo, rounds, note, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
