"""The escape corpus: every attempt is denied and nothing outside the root changes.

Run with Landlock on and off (the worker's own checks alone), as root and as uid 65534. The
outside directory is world-writable on purpose: a denial must come from our layers, never from
file permissions, so root and 65534 must give the same results.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_sandbox.errors import PolicyDenied
from pytest_sandbox.fsworker import FsWorker

USERS = [None, 65534]
SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by uid 65534, unlike a python under /root


@dataclass
class Arena:
    base: Path
    root: Path
    outside: Path
    secret: Path
    user: int | None

    def snapshot(self) -> dict[str, str]:
        """Every path under ``outside`` with a digest of its content (or its link target)."""
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.outside):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if path.is_symlink():
                    found[str(path)] = "-> " + os.readlink(path)
                elif path.is_file():
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    found[str(path)] = "dir"
        return found


@pytest.fixture(params=USERS, ids=["root", "uid65534"])
def arena(request: pytest.FixtureRequest) -> Iterator[Arena]:
    user = request.param
    base = Path(tempfile.mkdtemp(prefix="psb-escape-"))
    base.chmod(0o755)
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    outside.chmod(0o777)  # only our layers may stop a write here
    (outside / "sub").mkdir(mode=0o777)
    (outside / "sub").chmod(0o777)
    secret = outside / "secret.txt"
    secret.write_text("original")
    secret.chmod(0o666)
    if user is not None:
        os.chown(root, user, user)
    yield Arena(base, root, outside, secret, user)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["landlock", "policy-only"])
def layer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fs(arena: Arena, layer: str) -> Iterator[FsWorker]:
    kernel = "require" if layer == "landlock" else "off"
    with FsWorker(arena.root, kernel=kernel, user=arena.user, allow_debug=True) as worker:
        assert ("landlock" in worker.enforcement) is (layer == "landlock")
        yield worker


@pytest.fixture
def unchanged(arena: Arena) -> Iterator[None]:
    before = arena.snapshot()
    yield
    assert arena.snapshot() == before
    assert arena.secret.read_text() == "original"


def _denied(fs: FsWorker, op: str, *args: object) -> None:
    with pytest.raises(PolicyDenied):
        getattr(fs, op)(*args)


# --- through the worker's requests (both layers) --------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_dotdot(fs: FsWorker) -> None:
    _denied(fs, "write", "../outside/x", b"x")
    _denied(fs, "write", "a/../../outside/secret.txt", b"x")


@pytest.mark.usefixtures("unchanged")
def test_absolute_path(fs: FsWorker, arena: Arena) -> None:
    _denied(fs, "write", str(arena.outside / "x"), b"x")
    _denied(fs, "write", str(arena.secret), b"x")
    _denied(fs, "edit", str(arena.secret), "original", "pwned")


@pytest.mark.usefixtures("unchanged")
def test_symlink_dir_to_outside(fs: FsWorker, arena: Arena) -> None:
    (arena.root / "link").symlink_to(arena.outside)
    _denied(fs, "write", "link/x", b"x")
    _denied(fs, "write", "link/secret.txt", b"x")
    _denied(fs, "write", "link/sub/deep/new", b"x")


@pytest.mark.usefixtures("unchanged")
def test_symlink_file_to_outside(fs: FsWorker, arena: Arena) -> None:
    (arena.root / "lf").symlink_to(arena.secret)
    _denied(fs, "write", "lf", b"x")
    _denied(fs, "edit", "lf", "original", "pwned")


@pytest.mark.usefixtures("unchanged")
def test_symlink_chain(fs: FsWorker, arena: Arena) -> None:
    (arena.root / "c2").symlink_to(arena.secret)
    (arena.root / "c1").symlink_to("c2")
    (arena.root / "d2").symlink_to(arena.outside)
    (arena.root / "d1").symlink_to("d2")
    _denied(fs, "write", "c1", b"x")
    _denied(fs, "write", "d1/new", b"x")


@pytest.mark.usefixtures("unchanged")
def test_dangling_symlink_dir(fs: FsWorker, arena: Arena) -> None:
    (arena.root / "dd").symlink_to(arena.outside / "not-yet")
    _denied(fs, "write", "dd/x", b"x")
    _denied(fs, "write", "dd", b"x")
    assert not (arena.outside / "not-yet").exists()


@pytest.mark.usefixtures("unchanged")
def test_hardlink_to_outside_file(fs: FsWorker, arena: Arena) -> None:
    os.link(arena.secret, arena.root / "hl")  # made before/around the worker, by the test
    _denied(fs, "write", "hl", b"x")
    _denied(fs, "edit", "hl", "original", "pwned")


@pytest.mark.usefixtures("unchanged")
def test_proc_self_root(fs: FsWorker, arena: Arena) -> None:
    _denied(fs, "write", f"/proc/self/root{arena.secret}", b"x")
    _denied(fs, "write", f"/proc/self/root{arena.outside}/new", b"x")
    _denied(fs, "write", f"/proc/{fs.pid}/cwd/../outside/new", b"x")


@pytest.mark.usefixtures("unchanged")
def test_rename_inside_to_outside(fs: FsWorker, arena: Arena) -> None:
    fs.write("inside.txt", b"in")
    _denied(fs, "rename", "inside.txt", str(arena.outside / "moved"))
    _denied(fs, "rename", "inside.txt", "../outside/moved")
    _denied(fs, "rename", str(arena.secret), "stolen")
    (arena.root / "link").symlink_to(arena.outside)
    _denied(fs, "rename", "inside.txt", "link/moved")
    assert (arena.root / "inside.txt").read_bytes() == b"in"


@pytest.mark.usefixtures("unchanged")
def test_symlink_swapped_in_during_writes(fs: FsWorker, arena: Arena) -> None:
    """A thread flips ``sub`` between a real dir and a symlink to outside while we write."""
    sub, parked = arena.root / "sub", arena.root / "parked"
    sub.mkdir()
    if arena.user is not None:
        os.chown(sub, arena.user, arena.user)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            try:
                sub.rename(parked)
                sub.symlink_to(arena.outside)
                sub.unlink()
                parked.rename(sub)
            except OSError:
                pass

    flipper = threading.Thread(target=flip)
    flipper.start()
    outcomes = {"ok": 0, "denied": 0, "io": 0}
    try:
        for i in range(300):
            reply = fs.request(
                {"kind": "write", "path": f"sub/f{i}", "content": base64.b64encode(b"x").decode()}
            )
            outcomes["ok" if reply["kind"] == "ok" else reply["code"].replace("policy_", "")] += 1
    finally:
        stop.set()
        flipper.join()
    assert outcomes["ok"] + outcomes["denied"] + outcomes["io"] == 300
    assert list(arena.outside.glob("f*")) == []


# --- from inside the worker process and what it starts (the kernel layer) --------------------


@pytest.fixture
def confined(arena: Arena) -> Iterator[FsWorker]:
    with FsWorker(arena.root, kernel="require", user=arena.user, allow_debug=True) as worker:
        yield worker


@pytest.mark.usefixtures("unchanged")
def test_raw_open_inside_the_worker_fails_eacces(confined: FsWorker, arena: Arena) -> None:
    for target in (arena.outside / "raw", arena.secret, Path(f"/proc/self/root{arena.secret}")):
        reply = confined.request(
            {"kind": "debug_raw_write", "path": str(target), "content": "eA=="}
        )
        assert reply["kind"] == "error"
        assert "Permission denied" in reply["message"]
    assert confined.request({"kind": "debug_raw_write", "path": str(arena.root / "ok"),
                             "content": "eA=="})["kind"] == "ok"  # fmt: skip


ESCAPES = {
    "absolute": "open({secret!r}, 'w').write('pwned')",
    "new-file": "open({outside!r} + '/new', 'w').write('pwned')",
    "dotdot": "open('../outside/new', 'w').write('pwned')",
    "proc-root": "open('/proc/self/root' + {secret!r}, 'w').write('pwned')",
    "symlink": "import os; os.symlink({outside!r}, 'l'); open('l/new', 'w').write('pwned')",
    "rename-out": "open('f', 'w').write('x'); import os; os.rename('f', {outside!r} + '/moved')",
    "rename-in": "import os; os.rename({secret!r}, 'stolen')",
    "hardlink": "import os; os.link({secret!r}, 'hl'); open('hl', 'w').write('pwned')",
    "unlink": "import os; os.unlink({secret!r})",
    "mkdir": "import os; os.mkdir({outside!r} + '/d')",
    "truncate": "import os; os.truncate({secret!r}, 0)",
    "grandchild": ("import subprocess; subprocess.run(['sh', '-c', 'echo pwned > {outside}/gc'])"),
    "double-fork": (
        "import subprocess; subprocess.run(['sh', '-c', "
        "'(sh -c \"echo pwned > {outside}/df\" &) ; sleep 0.2'])"
    ),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
@pytest.mark.usefixtures("unchanged")
def test_exec_escapes_fail(confined: FsWorker, arena: Arena, name: str) -> None:
    code = ESCAPES[name].format(secret=str(arena.secret), outside=str(arena.outside))
    result = confined.exec([SYSTEM_PYTHON, "-c", code], timeout=20)
    assert result.exit_code != 0 or name in ("grandchild", "double-fork"), result
    if result.exit_code != 0:
        assert b"PermissionError" in result.output or b"Invalid cross-device" in result.output, (
            result
        )


def test_exec_grandchild_can_write_inside(confined: FsWorker, arena: Arena) -> None:
    result = confined.exec(["sh", "-c", "sh -c 'echo ok > inside.txt'; cat inside.txt"])
    assert result.output == b"ok\n"


def test_exec_refused_when_only_the_policy_layer_is_on(arena: Arena) -> None:
    with (
        FsWorker(arena.root, kernel="off", user=arena.user) as fs,
        pytest.raises(PolicyDenied, match="no kernel layer"),
    ):
        fs.exec(["sh", "-c", f"echo pwned > {arena.outside}/x"])
    assert not (arena.outside / "x").exists()
