"""The fs worker process end to end: requests, typed start-up errors, kernel modes, teardown."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.errors import (
    FsKernelUnavailable,
    FsPolicyDenied,
    FsWorkerConnectTimeout,
    FsWorkerExited,
    FsWorkerReadyTimeout,
    FsWorkerRequestError,
    PolicyDenied,
)
from pytest_sandbox.fsworker import FsWorker, Limits, SandboxPolicy
from pytest_sandbox.fsworker.enforce import landlock_abi
from pytest_sandbox.fsworker.policy import POLICY_ENV
from tests.conftest import pids_alive


@pytest.fixture
def fs() -> Iterator[FsWorker]:
    with FsWorker() as worker:
        yield worker


def test_requests_round_trip(fs: FsWorker) -> None:
    assert fs.ping()["pid"] == fs.pid
    fs.write("src/app.py", b"x = 1\ny = 2\n")
    fs.write("bin.dat", bytes(range(256)))
    assert fs.read("bin.dat") == bytes(range(256))
    assert fs.read("src/app.py", max_bytes=3) == b"x ="
    fs.edit("src/app.py", "y = 2", "y = 3")
    assert fs.read("src/app.py") == b"x = 1\ny = 3\n"
    assert fs.glob("**/*.py") == ["src/app.py"]
    assert fs.glob("*") == ["bin.dat", "src"]
    [match] = fs.grep(r"y = \d", include="*.py")
    assert (match.path, match.line, match.text) == ("src/app.py", 2, "y = 3")
    info = fs.stat("src/app.py")
    assert info["type"] == "file"
    assert info["size"] == 12
    assert fs.stat("missing") == {"exists": False}
    fs.rename("src/app.py", "src/main.py")
    assert fs.glob("src/*") == ["src/main.py"]
    env = fs.get_env(["PATH", "PYTEST_SANDBOX_FS_POLICY", "NOPE_NOT_SET"])
    assert env["PATH"]
    assert env["NOPE_NOT_SET"] is None
    assert (fs.root / "src" / "main.py").read_bytes() == b"x = 1\ny = 3\n"


def test_write_content_travels_as_base64(fs: FsWorker) -> None:
    reply = fs.request({"kind": "write", "path": "a", "content": [104, 105]})
    assert reply["kind"] == "error"
    assert reply["code"] == "protocol"
    assert fs.request({"kind": "write", "path": "a", "content": "aGk="})["kind"] == "ok"
    assert fs.read("a") == b"hi"


@pytest.mark.parametrize(("text", "count"), [("x", 0), ("a", 3)], ids=["missing", "three-times"])
def test_edit_needs_exactly_one_occurrence(fs: FsWorker, text: str, count: int) -> None:
    fs.write("f.txt", b"a a a")
    with pytest.raises(FsWorkerRequestError, match=f"occurs {count} times"):
        fs.edit("f.txt", text, "b")
    assert fs.read("f.txt") == b"a a a"


def test_error_codes(fs: FsWorker) -> None:
    assert fs.request({"kind": "teleport"})["code"] == "unimplemented"
    assert fs.request({"kind": "read", "path": "nope"})["code"] == "io"
    assert fs.request({"kind": "read"})["code"] == "protocol"
    assert fs.request({"kind": "write", "path": "/etc/x", "content": ""})["code"] == (
        "policy_denied"
    )
    assert fs.request({"kind": "ping", "id": 7})["id"] == 7
    assert fs.tainted


def test_denial_is_typed(fs: FsWorker) -> None:
    with pytest.raises(PolicyDenied) as info:
        fs.write("/etc/pytest-sandbox-must-not-exist", b"x")
    assert isinstance(info.value, FsPolicyDenied)
    assert info.value.op == "write"
    assert "system" in info.value.reason
    assert not Path("/etc/pytest-sandbox-must-not-exist").exists()


def test_deny_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "secrets").mkdir(parents=True)
    (root / "secrets" / "key").write_text("k")
    (root / "link").symlink_to(root / "secrets" / "key")
    (root / "open.txt").write_text("o")
    with FsWorker(root, SandboxPolicy(deny_read=("secrets",)), kernel="require") as fs:
        for path in ("secrets/key", "link"):
            with pytest.raises(PolicyDenied):
                fs.read(path)
        assert fs.glob("**") == ["open.txt"]  # denied entries (and links into them) are hidden
        assert fs.read("open.txt") == b"o"
        result = fs.exec(["cat", "secrets/key"])
        assert result.exit_code != 0
        assert b"Permission denied" in result.output


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_deny_write_within_allow(user: int | None) -> None:
    """A subtree carved out of the writable root: refused by the worker and by the kernel."""
    base = Path(tempfile.mkdtemp(prefix="psb-denywithin-"))
    base.chmod(0o755)  # reachable by uid 65534 (pytest's tmp_path is not)
    try:
        _deny_write_within_allow(base / "root", user)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _deny_write_within_allow(root: Path, user: int | None) -> None:
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "config").write_text("[core]\n")
    (root / "src").mkdir()
    for path in (root, *root.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)  # only our layers may refuse
    policy = SandboxPolicy(deny_write_within_allow=(".git",))
    with FsWorker(root, policy, kernel="require", user=user) as fs:
        for path in (".git/config", ".git/hooks/pre-commit", ".git/new"):
            with pytest.raises(PolicyDenied):
                fs.write(path, b"pwned")
        with pytest.raises(PolicyDenied):
            fs.edit(".git/config", "[core]", "[pwned]")
        with pytest.raises(PolicyDenied):
            fs.rename(".git/config", "stolen")
        assert fs.read(".git/config") == b"[core]\n"  # still readable
        fs.write("src/app.py", b"ok")  # a new file in a subdirectory
        fs.write("src/new/deep.py", b"ok")
        # the root itself holds .git: Landlock cannot let anything new be made directly in it
        # while keeping .git read-only; the refusal says so
        for path in ("new-dir/file", "top.txt"):
            with pytest.raises(PolicyDenied, match="whole subtrees"):
                fs.write(path, b"x")
        script = (
            "echo pwned > .git/config; echo pwned > .git/hooks/pre-commit; "
            "mv .git/config stolen; rm .git/config; echo ok > src/b.py"
        )
        result = fs.exec(["sh", "-c", script])
        assert result.output.count(b"Permission denied") >= 2, result
    assert (root / ".git" / "config").read_text() == "[core]\n"
    assert not (root / ".git" / "hooks" / "pre-commit").exists()
    assert not (root / "stolen").exists()
    assert (root / "src" / "b.py").read_text() == "ok\n"


def test_large_read_needs_max_bytes(fs: FsWorker) -> None:
    (fs.root / "big").write_bytes(b"x" * 800_000)
    with pytest.raises(FsWorkerRequestError, match="max_bytes"):
        fs.read("big")
    assert fs.read("big", max_bytes=10) == b"x" * 10


def test_exec_output_timeout_and_cleanup(fs: FsWorker) -> None:
    if "landlock" not in fs.enforcement:
        pytest.fail("Landlock is not active: exec is refused without it")
    result = fs.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.output) == (3, b"out\nerr\n")
    big = fs.exec(["head", "-c", "2000000", "/dev/zero"])
    assert big.truncated
    assert len(big.output) == 512 * 1024
    slow = fs.exec(["sh", "-c", "sleep 30 & echo $! > bg.pid; sleep 30"], timeout=0.5)
    assert slow.timed_out
    background = int((fs.root / "bg.pid").read_text())
    assert pids_alive([background]) == []


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_exec_kills_what_the_command_left_running(user: int | None) -> None:
    """A background job and a setsid daemon outliving the command: gone when exec returns
    (they were re-parented to the worker, a child subreaper), and reaped (no zombies)."""
    with FsWorker(kernel="require", user=user) as fs:
        script = (
            "setsid sleep 60 >/dev/null 2>&1 & echo $! > daemon.pid; "
            "sleep 60 >/dev/null 2>&1 & echo $! > job.pid"
        )
        assert fs.exec(["sh", "-c", script]).exit_code == 0
        pids = [int((fs.root / name).read_text()) for name in ("daemon.pid", "job.pid")]
        assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []
        assert fs.ping()["pid"] == fs.pid


def test_exec_limits(tmp_path: Path) -> None:
    policy = SandboxPolicy(limits=Limits(open_files=16, output_bytes=10))
    with FsWorker(policy=policy) as fs:
        result = fs.exec(["sh", "-c", "ulimit -n; echo 0123456789abcdef"])
        assert result.output == b"16\n012345678"[:10]
        assert result.truncated


def test_exec_refused_without_kernel_layer() -> None:
    with FsWorker(kernel="off") as fs:
        assert fs.enforcement == {"policy"}
        with pytest.raises(PolicyDenied, match="no kernel layer"):
            fs.exec(["true"])
    with FsWorker(policy=SandboxPolicy(exec_unconfined=True), kernel="off") as fs:
        assert fs.exec(["true"]).exit_code == 0


def test_enforcement_reports_landlock_here() -> None:
    abi = landlock_abi()
    assert abi >= 1, "this machine is expected to have Landlock (CI runs kernel=require)"
    with FsWorker(kernel="require") as fs:
        assert {"policy", "landlock"} <= fs.enforcement
        assert fs.landlock_abi == abi
        if abi >= 6:
            assert "landlock-scope" in fs.enforcement


# Runs argv[1:] after stacking 16 Landlock layers that restrict nothing: the kernel allows at
# most 16, so the worker's own landlock_restrict_self() really fails (E2BIG).
EXHAUST_LANDLOCK = """
import os, sys
from pytest_sandbox.fsworker import enforce
abi = enforce.landlock_abi()
for _ in range(16):
    enforce.apply_landlock(enforce.plan_landlock(abi=abi, allow_write=["/"]))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _exhausted(tmp_path: Path, kernel: str) -> FsWorker:
    sock = tmp_path / "w.sock"
    argv = FsWorker(tmp_path, kernel=kernel, socket_path=sock).argv()
    return FsWorker(
        tmp_path, kernel=kernel, socket_path=sock,
        argv=[sys.executable, "-c", EXHAUST_LANDLOCK, *argv],
    )  # fmt: skip


def test_require_fails_loudly_when_landlock_cannot_apply(tmp_path: Path) -> None:
    worker = _exhausted(tmp_path, "require")
    with pytest.raises(FsKernelUnavailable, match="landlock_restrict_self failed"):
        worker.start()
    assert worker.returncode == 3


def test_auto_runs_without_landlock_and_says_so(tmp_path: Path) -> None:
    with _exhausted(tmp_path, "auto") as fs:
        assert fs.enforcement == {"policy"}
        with pytest.raises(PolicyDenied):
            fs.write("/tmp/outside-of-root", b"x")


def test_bad_policy_exits_before_ready(tmp_path: Path) -> None:
    worker = FsWorker(env={POLICY_ENV: '{"allow_write": ["/etc"]}'})
    with pytest.raises(FsWorkerExited) as info:
        worker.start()
    assert info.value.returncode == 2
    assert "system" in info.value.stderr_tail
    assert not worker.socket_path.exists()


def test_worker_cli_bad_policy_reason_on_stderr(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox.fsworker", "--socket", str(tmp_path / "s"),
         "--root", str(tmp_path)],
        env={**os.environ, POLICY_ENV: "{broken"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert "not valid JSON" in result.stderr


def test_worker_cli_prints_exactly_ready(tmp_path: Path) -> None:
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_sandbox.fsworker", "--socket", str(sock),
         "--root", str(tmp_path)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        import socket as socketmod

        from pytest_sandbox.fsworker import protocol

        with socketmod.socket(socketmod.AF_UNIX) as conn:
            conn.connect(str(sock))
            protocol.write_frame(conn, {"kind": "shutdown"})
            assert protocol.read_frame(conn, wait_timeout=10)["kind"] == "ok"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_worker_nobody_connects_to_exits_by_itself(tmp_path: Path) -> None:
    """A worker whose client vanished before connecting (pytest killed between start and
    connect) does not wait forever."""
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_sandbox.fsworker", "--socket", str(sock),
         "--root", str(tmp_path), "--accept-timeout", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert proc.wait(timeout=10) == 1
        assert proc.stderr is not None
        assert b"nobody connected after ready" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_ready_timeout_is_typed() -> None:
    worker = FsWorker(ready_timeout=0.3, argv=[sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(FsWorkerReadyTimeout, match="ready"):
        worker.start()
    assert worker.returncode is not None  # stopped after the failed start


def test_connect_timeout_is_typed() -> None:
    worker = FsWorker(
        connect_timeout=0.3,
        argv=[sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
    )
    with pytest.raises(FsWorkerConnectTimeout, match="did not accept"):
        worker.start()
    assert worker.returncode is not None


def test_exited_before_ready_has_code_and_stderr() -> None:
    worker = FsWorker(
        argv=[sys.executable, "-c", "import sys; sys.stderr.write('boom here'); sys.exit(5)"]
    )
    with pytest.raises(FsWorkerExited, match="boom here") as info:
        worker.start()
    assert info.value.returncode == 5


def test_close_is_idempotent_and_cleans_up() -> None:
    worker = FsWorker().start()
    pid, sock, root = worker.pid, worker.socket_path, worker.root
    worker.close()
    worker.close()
    assert worker.returncode == 0  # shut down by request, not killed
    assert pids_alive([pid]) == []
    assert not sock.exists()
    assert not root.exists()


def test_requests_from_many_threads_are_serialised(fs: FsWorker) -> None:
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(50):
                fs.write(f"t{n}/f{i}", f"{n}:{i}".encode())
                assert fs.read(f"t{n}/f{i}") == f"{n}:{i}".encode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(fs.glob("t*/f*")) == 300


def test_worker_dies_mid_session_is_reported(fs: FsWorker) -> None:
    os.kill(fs.pid, 9)
    with pytest.raises(Exception, match=r"connection broke|did not answer"):
        fs.ping()


def test_as_uid_65534(tmp_path: Path) -> None:
    with FsWorker(user=65534) as fs:
        assert fs.uid == 65534
        assert "uid:65534" in fs.enforcement
        fs.write("a.txt", b"x")
        assert (fs.root / "a.txt").stat().st_uid == 65534
        assert fs.exec(["id", "-u"]).output == b"65534\n"


def test_descendant_walk_matches_the_full_proc_scan() -> None:
    """The fast walk (``/proc/PID/task/*/children``) finds what the fallback scan finds."""
    from pytest_sandbox.fsworker.worker import _descendants, _descendants_by_scan

    tree = subprocess.Popen(["sh", "-c", "sleep 30 & (sleep 30 & sleep 30) & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(_descendants_by_scan(tree.pid, frozenset())) < 3:
            assert time.monotonic() < deadline, "the process tree did not appear"
            time.sleep(0.01)
        by_scan = sorted(_descendants_by_scan(tree.pid, frozenset()))
        assert sorted(_descendants(tree.pid)) == by_scan
        spared = by_scan[0]
        assert spared not in _descendants(tree.pid, frozenset([spared]))
    finally:
        for pid in [tree.pid, *_descendants(tree.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        tree.wait()
