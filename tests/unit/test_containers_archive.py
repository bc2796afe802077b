"""Safe tar: a corpus of malicious archives, each refused with the target unchanged; round trips."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox import errors
from pytest_sandbox.containers import archive

Member = tuple[tarfile.TarInfo, bytes]


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _dir(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, b""


def _sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, b""


def _hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, b""


def _special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info, b""


def _tar(members: list[Member], *, gz: bool = False, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def _big_header(name: str, size: int) -> bytes:
    """A tar whose header claims ``size`` bytes (data truncated): a cheap bomb."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024


Case = tuple[str, Callable[[], bytes], type[errors.UnsafeArchive], dict[str, int]]

CORPUS: list[Case] = [
    ("absolute", lambda: _tar([_file("/etc/evil")]), errors.AbsoluteMemberName, {}),
    ("absolute-dir", lambda: _tar([_dir("/tmp/x")]), errors.AbsoluteMemberName, {}),
    ("dotdot-lead", lambda: _tar([_file("../evil")]), errors.ParentTraversal, {}),
    ("dotdot-middle", lambda: _tar([_file("a/../../evil")]), errors.ParentTraversal, {}),
    ("dotdot-inner", lambda: _tar([_file("a/../b")]), errors.ParentTraversal, {}),
    ("dotdot-dir", lambda: _tar([_dir("ok/..")]), errors.ParentTraversal, {}),
    ("dotdot-gz", lambda: _tar([_file("x/../../y")], gz=True), errors.ParentTraversal, {}),
    ("sym-absolute", lambda: _tar([_sym("l", "/etc/passwd")]), errors.SymlinkEscape, {}),
    ("sym-up", lambda: _tar([_sym("l", "../outside")]), errors.SymlinkEscape, {}),
    ("sym-deep-up", lambda: _tar([_dir("a"), _sym("a/l", "../../x")]), errors.SymlinkEscape, {}),
    (
        "sym-chain-escape",
        # a/b -> .. (= root, fine); l -> a/b (= root); s -> l/.. is lexically '.', really above
        lambda: _tar([_dir("a"), _sym("a/b", ".."), _sym("l", "a/b"), _sym("s", "l/..")]),
        errors.SymlinkEscape,
        {},
    ),
    (
        "sym-loop",
        lambda: _tar([_sym("a", "b"), _sym("b", "a"), _sym("c", "a/x")]),
        errors.SymlinkEscape,
        {},
    ),
    (
        "sym-to-root-then-up",
        lambda: _tar([_sym("r", "."), _sym("e", "r/../x")]),
        errors.SymlinkEscape,
        {},
    ),
    (
        "write-through-sym",
        lambda: _tar([_sym("l", "sub"), _dir("sub"), _file("l/x")]),
        errors.MemberThroughSymlink,
        {},
    ),
    (
        "write-through-sym-dir",
        lambda: _tar([_sym("l", "."), _dir("l/d")]),
        errors.MemberThroughSymlink,
        {},
    ),
    ("hard-absolute", lambda: _tar([_hard("h", "/etc/shadow")]), errors.HardlinkEscape, {}),
    ("hard-up", lambda: _tar([_hard("h", "../x")]), errors.HardlinkEscape, {}),
    ("hard-missing", lambda: _tar([_hard("h", "nowhere")]), errors.HardlinkEscape, {}),
    ("hard-to-dir", lambda: _tar([_dir("d"), _hard("h", "d")]), errors.HardlinkEscape, {}),
    ("hard-forward", lambda: _tar([_hard("h", "f"), _file("f")]), errors.HardlinkEscape, {}),
    ("chardev", lambda: _tar([_special("null", tarfile.CHRTYPE)]), errors.DeviceMember, {}),
    ("blockdev", lambda: _tar([_special("sda", tarfile.BLKTYPE)]), errors.DeviceMember, {}),
    ("fifo", lambda: _tar([_special("pipe", tarfile.FIFOTYPE)]), errors.FifoMember, {}),
    ("contig-unknown", lambda: _tar([_special("weird", b"V")]), errors.UnsupportedMember, {}),
    ("dir-then-file", lambda: _tar([_dir("d"), _file("d")]), errors.DirectoryReplaced, {}),
    ("file-then-dir", lambda: _tar([_file("d"), _dir("d/")]), errors.DirectoryReplaced, {}),
    ("file-as-parent", lambda: _tar([_file("f"), _file("f/x")]), errors.DirectoryReplaced, {}),
    ("root-as-file", lambda: _tar([_file(".")]), errors.DirectoryReplaced, {}),
    ("duplicate", lambda: _tar([_file("a"), _file("a")]), errors.DuplicateMember, {}),
    ("duplicate-dotslash", lambda: _tar([_file("a"), _file("./a")]), errors.DuplicateMember, {}),
    ("duplicate-dir", lambda: _tar([_dir("d"), _dir("d/")]), errors.DuplicateMember, {}),
    (
        "too-many",
        lambda: _tar([_file(f"f{i}") for i in range(11)]),
        errors.TooManyMembers,
        {"max_members": 10},
    ),
    (
        "too-large-total",
        lambda: _tar([_file("a", b"x" * 600), _file("b", b"y" * 600)]),
        errors.ArchiveTooLarge,
        {"max_bytes": 1000},
    ),
    (
        "member-too-large",
        lambda: _tar([_file("a", b"x" * 2000)]),
        errors.MemberTooLarge,
        {"max_member_bytes": 1000},
    ),
    ("header-bomb", lambda: _big_header("bomb", 1 << 40), errors.ArchiveTooLarge, {}),
    ("gzip-garbage", lambda: b"\x1f\x8b\x08\x00garbage" * 10, errors.CorruptArchive, {}),
    ("not-a-tar", lambda: b"hello, I am not a tar file at all" * 40, errors.CorruptArchive, {}),
    (
        "late-evil",  # 50 good members then one bad: still nothing written
        lambda: _tar([*[_file(f"ok{i}") for i in range(50)], _file("../late")]),
        errors.ParentTraversal,
        {},
    ),
    (
        "gnu-longname-dotdot",
        lambda: _tar([_file("a/" * 60 + "../" * 70 + "x")], fmt=tarfile.GNU_FORMAT),
        errors.ParentTraversal,
        {},
    ),
    (
        "pax-long-symlink-up",
        lambda: _tar([_sym("l", "../" * 60 + "etc")]),
        errors.SymlinkEscape,
        {},
    ),
]


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root`` (and its parent's listing) with mode and content."""
    found: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.parent.rglob("*")):
        st = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(root.parent))] = (st.st_mode, data)
    return found


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("merge", [False, True], ids=["fresh", "merge"])
@pytest.mark.parametrize(("name", "build", "error", "limits"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malicious_archive_is_refused_and_nothing_written(
    tmp_path: Path,
    name: str,
    build: Callable[[], bytes],
    error: type[errors.UnsafeArchive],
    limits: dict[str, int],
    merge: bool,
) -> None:
    src = tmp_path / "in" / f"{name}.tar"
    src.parent.mkdir()
    src.write_bytes(build())
    work = tmp_path / "work"
    dest = work / "dest"
    dest.mkdir(parents=True)
    if merge:
        (dest / "keep.txt").write_text("precious")
        (dest / "sub").mkdir()
    before = _snapshot(dest)
    with pytest.raises(error) as info:
        archive.extract(src, dest, merge=merge, **limits)
    assert isinstance(info.value, errors.UnsafeArchive)
    assert _snapshot(dest) == before
    assert sorted(p.name for p in work.iterdir()) == ["dest"]  # no staging, no spool left


def test_refusal_message_names_archive_member_and_fix(tmp_path: Path) -> None:
    src = tmp_path / "evil.tar"
    src.write_bytes(_tar([_file("../escape")]))
    with pytest.raises(errors.ParentTraversal) as info:
        archive.extract(src, tmp_path / "out")
    message = str(info.value)
    assert "evil.tar" in message
    assert "../escape" in message
    assert "Rebuild" in message
    assert not (tmp_path / "out").exists()


def test_merge_refuses_replacing_an_existing_directory(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "conf").mkdir(parents=True)
    src = tmp_path / "a.tar"
    src.write_bytes(_tar([_file("conf", b"flat")]))
    with pytest.raises(errors.DirectoryReplaced):
        archive.extract(src, dest, merge=True)
    assert (dest / "conf").is_dir()


def test_merge_refuses_writing_through_an_existing_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    src = tmp_path / "a.tar"
    src.write_bytes(_tar([_file("link/pwned", b"!")]))
    with pytest.raises(errors.MemberThroughSymlink):
        archive.extract(src, dest, merge=True)
    assert list(outside.iterdir()) == []


def test_non_empty_destination_needs_merge(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "x").write_text("x")
    src = tmp_path / "a.tar"
    src.write_bytes(_tar([_file("y")]))
    with pytest.raises(errors.DestinationNotEmpty):
        archive.extract(src, dest)
    archive.extract(src, dest, merge=True)
    assert sorted(p.name for p in dest.iterdir()) == ["x", "y"]


def test_merge_replaces_files_and_keeps_others(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "old").write_text("old")
    (dest / "d" / "same").write_text("before")
    src = tmp_path / "a.tar"
    src.write_bytes(_tar([_dir("d"), _file("d/same", b"after"), _file("d/new", b"new")]))
    archive.extract(src, dest, merge=True)
    assert (dest / "d" / "old").read_text() == "old"
    assert (dest / "d" / "same").read_text() == "after"
    assert (dest / "d" / "new").read_text() == "new"


def test_inside_links_are_allowed(tmp_path: Path) -> None:
    src = tmp_path / "ok.tar"
    src.write_bytes(
        _tar(
            [
                _dir("lib"),
                _file("lib/real.so", b"elf"),
                _dir("bin"),
                _sym("bin/lib", "../lib"),
                _sym("cur", "lib/real.so"),
                _hard("copy", "lib/real.so"),
            ]
        )
    )
    summary = archive.extract(src, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "bin" / "lib" / "real.so").read_bytes() == b"elf"
    assert os.readlink(out / "cur") == "lib/real.so"
    assert (out / "copy").read_bytes() == b"elf"
    assert (summary.files, summary.symlinks, summary.hardlinks) == (1, 2, 1)


def _tree(root: Path) -> dict[str, tuple[str, int, str]]:
    found = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            found[str(path.relative_to(root))] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[str(path.relative_to(root))] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), digest)
    return found


def _sample_tree(root: Path, big: int = 0) -> None:
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "private").mkdir(mode=0o700)
    (root / "private").chmod(0o700)
    (root / "zero").write_bytes(b"")
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_bytes(b"s3cr3t")
    (root / "secret").chmod(0o600)
    (root / "nested" / "deeper" / "deepest" / "leaf.txt").write_text("leaf")
    (root / "nested" / "ünïcödé ✓.txt").write_text("non-ascii ✓")
    (root / "nested" / "link").symlink_to("deeper/deepest/leaf.txt")
    (root / ("long-" + "n" * 150)).write_text("long name")
    if big:
        with open(root / "big.bin", "wb") as out:
            for i in range(big >> 20):
                out.write(hashlib.sha256(str(i).encode()).digest() * (1 << 15))


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_round_trip_is_faithful(tmp_path: Path, suffix: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sample_tree(src)
    dest_archive = archive.create(src, tmp_path / f"snap{suffix}")
    assert stat.S_IMODE(dest_archive.stat().st_mode) == 0o600
    archive.extract(dest_archive, tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(src)


def test_round_trip_through_stream_and_strip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sample_tree(src)
    chunks = archive.stream(src, prefix="data")  # what docker's get_archive("/data") gives
    archive.extract_stream(chunks, tmp_path / "out", strip_first=True)
    assert _tree(tmp_path / "out") == _tree(src)


def test_round_trip_50mb_file_with_bounded_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sample_tree(src, big=50 << 20)
    biggest = max(len(c) for c in archive.stream(src))
    assert biggest <= archive.CHUNK
    archive.create(src, tmp_path / "snap.tar.gz")
    archive.extract(tmp_path / "snap.tar.gz", tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(src)


def test_create_is_atomic_on_failure(tmp_path: Path) -> None:
    def broken() -> object:
        yield b"partial"
        raise RuntimeError("source vanished")

    dest = tmp_path / "snap.tar.gz"
    with pytest.raises(RuntimeError):
        archive.write_atomic(broken(), dest)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- the one-pass streaming path (import_data validates with it; export_data emits with it) ---


@pytest.mark.parametrize(("name", "build", "error", "limits"), CORPUS, ids=[c[0] for c in CORPUS])
def test_streaming_validation_refuses_the_whole_corpus(
    name: str,
    build: Callable[[], bytes],
    error: type[errors.UnsafeArchive],
    limits: dict[str, int],
) -> None:
    data = build()
    with pytest.raises(error):
        archive.validate_stream(io.BytesIO(data), **limits)
    # the same refusal when the archive comes gzipped in several members, as pigz writes them
    raw = data if not data.startswith(b"\x1f\x8b") else None
    if raw is not None:
        half = len(raw) // 2
        multi = gzip.compress(raw[:half]) + gzip.compress(raw[half:])
        with pytest.raises(error):
            archive.validate_stream(io.BytesIO(multi), **limits)


def test_streaming_validation_counts_what_tarfile_counts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 5000)
    (src / ("long-" + "n" * 200)).write_text("é")
    (src / "l").symlink_to("d/f")
    for suffix in (".tar", ".tar.gz"):
        dest = archive.create(src, tmp_path / f"a{suffix}")
        assert archive.validate_stream(dest).names == archive.validate(dest).names
    bomb = gzip.compress(_tar([_file("z", b"\0" * (4 << 20))]))
    with pytest.raises(errors.ArchiveTooLarge):
        archive.validate_stream(io.BytesIO(bomb), max_bytes=1 << 20)
    with pytest.raises(errors.CorruptArchive, match="truncated"):
        archive.validate_stream(io.BytesIO(bomb[: len(bomb) // 2]))
    with pytest.raises(errors.CorruptArchive, match="garbage"):
        archive.validate_stream(io.BytesIO(bomb + b"trailing junk"))


@pytest.mark.parametrize("level", [0, 1, 6])
def test_gzip_blocks_is_one_valid_gzip_member(level: int) -> None:
    text = b"compressible line of text\n" * 100_000
    noise = os.urandom(3 << 20)
    for payload in (b"", text, noise + text[:700_000], noise):
        pieces = [payload[i : i + 300_000] for i in range(0, len(payload), 300_000)]
        out = b"".join(archive.gzip_blocks(pieces, level=level))
        assert gzip.decompress(out) == payload
        assert len(out) < len(payload) + len(payload) // 500 + 64  # stored blocks cost ~0.01%
    assert len(b"".join(archive.gzip_blocks([text], level=1))) < len(text) // 20


def test_scan_strips_dot_slash_and_detects_a_cut_stream() -> None:
    members = [_dir("./"), _file("./a", b"x" * 1000), _file("./é" + "n" * 150, b"yy")]
    hard = _hard("./h", "./a")
    raw = _tar([*members, hard])
    out = b"".join(archive.scan(raw[i : i + 777] for i in range(0, len(raw), 777)))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert [(m.name, m.linkname) for m in tar] == [
            (".", ""),
            ("a", ""),
            ("é" + "n" * 150, ""),
            ("h", "a"),
        ]
        handle = tar.extractfile("a")
        assert handle is not None
        assert handle.read() == b"x" * 1000
    with pytest.raises(errors.CorruptArchive, match="inside a member"):
        b"".join(archive.scan([raw[:2000]]))
    no_end = raw[: raw.rindex(b"yy") + 512]
    with pytest.raises(errors.CorruptArchive, match="end-of-archive"):
        b"".join(archive.scan([no_end]))


def test_prefetch_stops_and_closes_its_source_when_the_consumer_gives_up() -> None:
    closed: list[bool] = []
    ended: list[bool] = []

    def source() -> Iterator[bytes]:
        try:
            for _ in range(1000):
                yield b"x" * 1024
        finally:
            closed.append(True)

    chunks = archive.prefetch(source(), depth=2, on_end=lambda: ended.append(True), gather=1024)
    next(chunks)
    chunks.close()
    assert closed == [True]
    assert ended == []
    gathered = list(archive.prefetch(source(), on_end=lambda: ended.append(True), gather=300_000))
    assert b"".join(gathered) == b"x" * 1024 * 1000
    assert [len(c) for c in gathered] == [300_032] * 3 + [1024 * 1000 - 3 * 300_032]
    assert ended == [True]

    def failing() -> Iterator[bytes]:
        yield b"a"
        raise OSError("engine went away")

    with pytest.raises(OSError, match="went away"):
        b"".join(archive.prefetch(failing()))


def test_write_atomic_gathers_small_pieces(tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in (5, 70_000, 3, 1 << 20, 0, 17)] * 50
    views = [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)]
    assert archive.write_atomic(views, tmp_path / "out") == sum(map(len, pieces))
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_prefetch_does_not_hang_on_a_stalled_source() -> None:
    import threading
    import time

    release = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield b"first"
        release.wait(30)  # a read that does not return
        yield b"never seen"

    chunks = archive.prefetch(stalled(), gather=1, join_timeout=0.3)
    assert next(chunks) == b"first"
    started = time.monotonic()
    chunks.close()
    assert time.monotonic() - started < 5
    release.set()


def test_zero_padding_is_allowed_after_the_last_gzip_member_only() -> None:
    raw = _tar([_file("a", b"x" * 3000), _file("b", b"y" * 3000)])
    one, two = gzip.compress(raw[:2048]), gzip.compress(raw[2048:])
    assert archive.validate_stream(io.BytesIO(one + two + b"\0" * 4096)).names == ["a", "b"]
    # a gzip reader that stops at the zeros would have written "a" but not "b": refused
    with pytest.raises(errors.CorruptArchive, match="zero padding between"):
        archive.validate_stream(io.BytesIO(one + b"\0" * 512 + two))


def test_compression_is_read_from_the_magic_and_the_position_kept() -> None:
    for data, kind in (
        (gzip.compress(b"x"), "gzip"),
        (b"BZh91AY", "bzip2"),
        (b"\xfd7zXZ\x00\x00", "xz"),
        (b"plain", "none"),
    ):
        handle = io.BytesIO(data)
        assert archive.compression(handle) == kind
        assert handle.tell() == 0
