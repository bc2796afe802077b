"""Data snapshots against the real engine: round trip fidelity, prior state, refusals, DataStore."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import errors
from pytest_sandbox.containers import archive
from pytest_sandbox.containers.container import SandboxContainer
from pytest_sandbox.containers.snapshot import DataStore

Factory = Callable[..., SandboxContainer]
SLEEP = ["sleep", "600"]

# sha256 and mode of every regular file, type of everything (busybox has sha256sum and stat)
MANIFEST = [
    "sh",
    "-c",
    "cd /data && find . -mindepth 1 | sort | while read -r p; do "
    'if [ -L "$p" ]; then echo "$p link $(readlink "$p")"; '
    'elif [ -d "$p" ]; then echo "$p dir $(stat -c %a "$p")"; '
    'else echo "$p file $(stat -c %a "$p") $(sha256sum < "$p" | cut -c1-64)"; fi; done',
]


def _sample(root: Path, big: int) -> None:
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "private").mkdir()
    (root / "private").chmod(0o700)
    (root / "zero").write_bytes(b"")
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_bytes(b"s3cr3t")
    (root / "secret").chmod(0o600)
    (root / "shared").write_bytes(b"w")
    (root / "shared").chmod(0o666)  # group/other write survives the engine round trip
    (root / "nested" / "ünïcödé ✓ 名前.txt").write_text("non-ascii ✓")
    (root / "nested" / "link").symlink_to("deeper/deepest")
    (root / "nested" / "deeper" / "deepest" / "leaf").write_text("leaf")
    with open(root / "big.bin", "wb") as out:
        for i in range(big >> 20):
            out.write(hashlib.sha256(str(i).encode()).digest() * (1 << 15))


def _manifest(c: SandboxContainer) -> str:
    result = c.exec(MANIFEST)
    assert result.exit_code == 0, result.stderr
    return result.output.decode()


def test_round_trip_export_import_into_a_fresh_container(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sample(src, big=50 << 20)
    first = sandbox_container("busybox", command=SLEEP)
    archive.create(src, tmp_path / "seed.tar")
    first.import_data(tmp_path / "seed.tar")
    expected = _manifest(first)
    assert "big.bin file 644" in expected
    assert "名前" in expected
    assert "shared file 666" in expected

    first.export_data(tmp_path / "snap.tar.gz")
    assert stat.S_IMODE((tmp_path / "snap.tar.gz").stat().st_mode) == 0o600
    second = sandbox_container("busybox", command=SLEEP)
    second.import_data(tmp_path / "snap.tar.gz")
    assert _manifest(second) == expected


def test_export_returns_the_container_to_its_prior_state(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    c = sandbox_container("busybox", command=["sh", "-c", "echo up; exec sleep 600"], ready="up")
    c.exec(["sh", "-c", "echo x > /data/x"])
    c.export_data(tmp_path / "a.tar.gz")
    assert c.status == "running"
    c.stop(timeout=0)
    c.export_data(tmp_path / "b.tar.gz")
    assert c.status == "exited"  # a stopped one stays stopped
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert "x" in tar.getnames()


def test_consumer_abort_mid_stream_restarts_the_container(
    sandbox_container: Factory,
) -> None:
    c = sandbox_container("busybox", command=SLEEP)
    c.exec(["sh", "-c", "head -c 8000000 /dev/urandom > /data/blob"])
    chunks = c.export_chunks(compress=False)
    next(chunks)  # stopped while exporting (the engine locks it: no inspect until closed)
    chunks.close()  # the consumer gives up
    assert c.status == "running"

    class Broken(io.RawIOBase):
        def write(self, b: Any) -> int:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        c.export_data(Broken())  # type: ignore[arg-type]
    assert c.status == "running"


def test_missing_data_dir_gives_an_empty_archive(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    c = sandbox_container("busybox", command=SLEEP, volume=False, data_dir="/nowhere")
    c.export_data(tmp_path / "empty.tar.gz")
    with tarfile.open(tmp_path / "empty.tar.gz") as tar:
        assert tar.getnames() == []


def test_tmpfs_data_dir_and_auto_remove_are_refused(sandbox_container: Factory) -> None:
    tmp = sandbox_container("busybox", command=SLEEP, volume=False, tmpfs={"/data": ""})
    with pytest.raises(errors.DataDirOnTmpfs, match="tmpfs"):
        tmp.export_data(io.BytesIO())  # type: ignore[arg-type]
    assert tmp.status == "running"
    auto = sandbox_container("busybox", command=SLEEP, auto_remove=True)
    with pytest.raises(errors.AutoRemoveRefused, match="auto-remove"):
        auto.export_data(io.BytesIO())  # type: ignore[arg-type]
    assert auto.status == "running"


def test_malicious_import_is_refused_before_anything_is_written(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    c = sandbox_container("busybox", command=SLEEP)
    c.exec(["sh", "-c", "echo precious > /data/keep"])
    before = _manifest(c)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("good", b"fine"), ("../../etc/evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    with pytest.raises(errors.ParentTraversal):
        c.import_data(tmp_path / "evil.tar")
    assert _manifest(c) == before
    assert c.status == "running"


def test_merge_keeps_existing_files(sandbox_container: Factory, tmp_path: Path) -> None:
    c = sandbox_container("busybox", command=SLEEP)
    c.exec(["sh", "-c", "echo old > /data/old"])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new").write_text("new")
    archive.create(tmp_path / "src", tmp_path / "n.tar.gz")
    c.import_data(tmp_path / "n.tar.gz", mode="merge")
    assert c.exec(["cat", "/data/old", "/data/new"]).output == b"old\nnew"
    c.import_data(tmp_path / "n.tar.gz", mode="replace")
    assert c.exec(["ls", "/data"]).output == b"new\n"


def test_data_store_preserve_restore(
    sandbox_container: Factory, sandbox_data_store: DataStore
) -> None:
    store = sandbox_data_store
    a = sandbox_container("busybox", command=SLEEP)
    a.exec(["sh", "-c", "mkdir -p /data/d && echo v1 > /data/d/f"])
    assert not store.has_preserved("bot-1")
    path = store.preserve(a, "bot-1")
    assert store.has_preserved("bot-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]
    b = sandbox_container("busybox", command=SLEEP)
    store.restore(b, "bot-1")
    assert b.exec(["cat", "/data/d/f"]).output == b"v1\n"
    assert not store.has_preserved("bot-1")  # deleted after the successful import
    with pytest.raises(errors.SnapshotError, match="no preserved data"):
        store.restore(b, "bot-1")
    with pytest.raises(errors.SnapshotError, match="not a safe file name"):
        store.preserve(a, "../escape")


def test_failed_restore_keeps_the_backup(
    sandbox_container: Factory, sandbox_data_store: DataStore
) -> None:
    store = sandbox_data_store
    store.backup_path("k").write_bytes(b"not a tar at all" * 100)
    c = sandbox_container("busybox", command=SLEEP)
    with pytest.raises(errors.CorruptArchive):
        store.restore(c, "k")
    assert store.has_preserved("k")


def test_migrate_legacy_once_even_when_rename_fails(
    sandbox_container: Factory, sandbox_data_store: DataStore
) -> None:
    store = sandbox_data_store
    legacy = store.legacy / "bot-9"
    (legacy / "memory").mkdir(parents=True)
    (legacy / "memory" / "notes.md").write_text("remember")
    c = sandbox_container("busybox", command=SLEEP)
    # a directory already named like the rename target makes the rename fail
    (store.legacy / "bot-9.migrated").mkdir()
    (store.legacy / "bot-9.migrated" / "occupied").write_text("x")
    assert store.migrate_legacy(c, "bot-9") is True
    assert c.exec(["cat", "/data/memory/notes.md"]).output == b"remember"
    assert legacy.exists()  # rename failed...
    c.exec(["rm", "/data/memory/notes.md"])
    assert store.migrate_legacy(c, "bot-9") is False  # ...but it is marked done
    assert c.exec(["ls", "/data/memory"]).output == b""
    assert store.migrate_legacy(c, "no-such-bot") is False


def test_recover_orphan(
    sandbox_docker: Any, sandbox_container: Factory, sandbox_data_store: DataStore
) -> None:
    store = sandbox_data_store
    c = sandbox_container("busybox", command=SLEEP, key="bot-orphan")
    c.exec(["sh", "-c", "echo survived > /data/state"])
    volume = c.volume_name
    sandbox_docker.client.api.remove_container(c.id, force=True)  # container lost, volume not
    assert store.recover_orphan("missing-key") is None
    recovery = store.recover_orphan("bot-orphan")
    assert recovery is not None
    assert recovery.old_volume == volume
    assert recovery.container.exec(["cat", "/data/state"]).output == b"survived\n"
    assert recovery.removed_old_volume
    assert not store.has_preserved("bot-orphan")
    assert store.recover_orphan("bot-orphan") is None  # its container exists again
    assert "bot-orphan" in recovery.describe()


def test_data_lock_serialises_operations(sandbox_container: Factory, tmp_path: Path) -> None:
    c = sandbox_container("busybox", command=SLEEP)
    lock = c.data_lock()
    with lock:
        other = c.data_lock()
        with pytest.raises(Exception, match=r"could not be acquired|Timeout"):
            other.acquire(timeout=0.2)


def _peak_growth(c: SandboxContainer, dest: Path, what: str) -> dict[str, int]:
    from benchmarks.peak_rss import peak_growth

    return peak_growth(c.id, dest, c.lock_dir, what)


@pytest.mark.slow
def test_export_and_import_stream_with_bounded_memory(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    # 320 MiB of incompressible data in 80 files: a buffering implementation grows by all of it
    c = sandbox_container("busybox", command=SLEEP)
    fill = "for i in $(seq 80); do head -c 4194304 /dev/urandom > /data/f$i; done"
    assert c.exec(["sh", "-c", fill]).exit_code == 0
    size = 80 << 22
    exported = _peak_growth(c, tmp_path / "big.tar.gz", "export")
    assert exported["bytes"] > size  # stored, not shrunk: every byte went through the process
    assert exported["growth_kib"] < 100 * 1024, exported
    imported = _peak_growth(c, tmp_path / "big.tar.gz", "import")
    assert imported["bytes"] == size
    assert imported["growth_kib"] < 100 * 1024, imported
    assert c.status == "running"


def test_failed_restart_is_an_error_not_a_log_line(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    # an app that refuses to start a second time
    once = "if [ -e /data/started ]; then echo refusing; exit 3; fi; touch /data/started"
    c = sandbox_container(
        "busybox", command=["sh", "-c", f"{once}; echo up; exec sleep 600"], ready="up"
    )
    with pytest.raises(errors.RestartFailed, match=r"(?s)could not be restarted.*code 3"):
        c.export_data(tmp_path / "s.tar.gz")
    with tarfile.open(tmp_path / "s.tar.gz") as tar:  # the snapshot itself is complete
        assert "started" in tar.getnames()
    assert c.status == "exited"
    c.import_data(tmp_path / "s.tar.gz", mode="merge")  # now a stopped one: it stays stopped
    assert c.status == "exited"


def test_import_into_a_missing_data_dir_without_a_volume_creates_it(
    sandbox_container: Factory, tmp_path: Path
) -> None:
    c = sandbox_container("busybox", command=SLEEP, volume=False, data_dir="/srv/app")
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f").write_text("in")
    archive.create(tmp_path / "src", tmp_path / "a.tar.gz")
    c.import_data(tmp_path / "a.tar.gz", mode="merge")
    assert c.exec(["cat", "/srv/app/sub/f"]).output == b"in"
    c.export_data(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert sorted(tar.getnames()) == [".", "sub", "sub/f"]


@pytest.mark.parametrize("kind", ["bz2", "xz"])
def test_import_of_bzip2_and_xz_archives(
    sandbox_container: Factory, tmp_path: Path, kind: str
) -> None:
    import bz2
    import lzma

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text(kind)
    archive.create(tmp_path / "src", tmp_path / "a.tar")
    compress = bz2.compress if kind == "bz2" else lzma.compress
    (tmp_path / f"a.tar.{kind}").write_bytes(compress((tmp_path / "a.tar").read_bytes()))
    c = sandbox_container("busybox", command=SLEEP)
    c.import_data(tmp_path / f"a.tar.{kind}", mode="merge")
    assert c.exec(["cat", "/data/f"]).output == kind.encode()
