"""Safe tar archives: validate the whole archive first, then write; refuse all or nothing.

``extract(src, dest, **limits)`` refuses, before writing a single byte, an archive with an
absolute member name, ``..`` anywhere, a symlink or hard link leaving the root, a member written
through a symlink, a device or FIFO, a member replacing a directory with a file (or a directory
a file), duplicate names, or more content / members than the limits allow. Each refusal is its
own subclass of :class:`pytest_sandbox.errors.UnsafeArchive`. tarfile's ``data`` filter runs as
well, as a second opinion, and the members are written into a staging directory next to
``dest`` that is moved into place only when every member was written.

``create(src_dir, dest)`` writes a tar (``.tar``) or tar.gz (``.tar.gz`` / ``.tgz``) of a
directory's content (names relative to it, symlinks stored as symlinks), atomically.
``stream(src_dir)`` yields the same archive as chunks for the Docker archive API
(``put_archive``), with bounded memory; ``extract_stream(chunks, dest)`` is its counterpart for
``get_archive``: it spools to disk under ``dest``'s parent (the whole archive must be seen before
anything is written) and then extracts.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from pytest_sandbox.errors import (
    AbsoluteMemberName,
    ArchiveTooLarge,
    CorruptArchive,
    DataFilterRefused,
    DestinationNotEmpty,
    DeviceMember,
    DirectoryReplaced,
    DuplicateMember,
    FifoMember,
    HardlinkEscape,
    MemberThroughSymlink,
    MemberTooLarge,
    ParentTraversal,
    SymlinkEscape,
    TooManyMembers,
    UnsupportedMember,
)

CHUNK = 1 << 20
#: Default limits: generous for test data, small enough to stop a tar/gzip bomb.
MAX_BYTES = 16 << 30
MAX_MEMBERS = 200_000
#: Symlinks followed while resolving one path inside the archive (as the kernel's ELOOP limit).
MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True)
class Limits:
    """What an archive may contain: total content bytes, bytes per member, member count."""

    max_bytes: int = MAX_BYTES
    max_member_bytes: int | None = None
    max_members: int = MAX_MEMBERS


@dataclass
class Summary:
    """What a validated archive holds."""

    members: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    total_bytes: int = 0
    names: list[str] = field(default_factory=list, repr=False)


def _limits(
    max_bytes: int = MAX_BYTES, max_member_bytes: int | None = None, max_members: int = MAX_MEMBERS
) -> Limits:
    return Limits(max_bytes=max_bytes, max_member_bytes=max_member_bytes, max_members=max_members)


def _open(src: Path | BinaryIO, label: str) -> tarfile.TarFile:
    try:
        if isinstance(src, Path | str):
            return tarfile.open(src, mode="r:*")
        return tarfile.open(fileobj=src, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CorruptArchive(
            label, "-", f"cannot be read as tar or tar.gz ({exc})", "Check the file is a tar."
        ) from exc


def _normalise(name: str, label: str) -> str:
    """A member name as a relative POSIX path without ``./`` or trailing ``/`` ('.' = root)."""
    if name.startswith("/") or name.startswith("\\"):
        raise AbsoluteMemberName(label, name, "has an absolute name")
    if "\x00" in name:
        raise UnsupportedMember(label, name, "has a NUL byte in its name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ParentTraversal(label, name, "has a '..' component")
    return "/".join(parts) or "."


class _Tree:
    """The archive's tree as validation sees it, including what already exists at ``dest``."""

    def __init__(self, label: str, dest: Path | None) -> None:
        self.label = label
        self.dest = dest
        self.kinds: dict[str, str] = {".": "dir"}  # name -> dir | file | symlink | hardlink
        self.symlinks: dict[str, str] = {}

    def _on_disk(self, name: str) -> str | None:
        if self.dest is None or name == ".":
            return None
        try:
            st = os.lstat(self.dest / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        return "dir" if stat.S_ISDIR(st.st_mode) else "file"

    def kind(self, name: str) -> str | None:
        return self.kinds.get(name) or self._on_disk(name)

    def link_target(self, name: str) -> str | None:
        if name in self.symlinks:
            return self.symlinks[name]
        if self.dest is not None and self._on_disk(name) == "symlink":
            return os.readlink(self.dest / name)
        return None

    def check_parents(self, name: str, member: str) -> None:
        """No ancestor of ``name`` may be a symlink or a non-directory."""
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            kind = self.kind(parent)
            if kind == "symlink":
                raise MemberThroughSymlink(
                    self.label, member, f"would be written through the symlink {parent!r}"
                )
            if kind is not None and kind != "dir":
                raise DirectoryReplaced(
                    self.label, member, f"needs {parent!r} to be a directory, it is a file"
                )

    def resolve(self, start_dir: str, target: str, member: str) -> str:
        """Where ``target`` (relative to ``start_dir``) lands inside the root, following links."""
        if target.startswith("/"):
            raise SymlinkEscape(self.label, member, f"points to the absolute path {target!r}")
        pending = [p for p in target.split("/") if p not in ("", ".")]
        here = [p for p in start_dir.split("/") if p not in ("", ".")]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if not here:
                    raise SymlinkEscape(
                        self.label, member, f"points to {target!r}, which leaves the root"
                    )
                here.pop()
                continue
            candidate = "/".join([*here, part])
            link = self.link_target(candidate)
            if link is None:
                here.append(part)
                continue
            hops += 1
            if hops > MAX_SYMLINK_HOPS or link.startswith("/"):
                raise SymlinkEscape(
                    self.label, member, f"points to {target!r} through a looping/absolute link"
                )
            pending = [p for p in link.split("/") if p not in ("", ".")] + pending
        return "/".join(here) or "."


def _check_member(
    info: tarfile.TarInfo, tree: _Tree, seen: set[str], summary: Summary, limits: Limits
) -> str:
    label = tree.label
    name = _normalise(info.name, label)
    summary.members += 1
    if summary.members > limits.max_members:
        raise TooManyMembers(
            label, info.name, f"is number {summary.members}, over max_members={limits.max_members}"
        )
    if info.ischr() or info.isblk():
        raise DeviceMember(label, info.name, "is a device node")
    if info.isfifo():
        raise FifoMember(label, info.name, "is a FIFO")
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        raise UnsupportedMember(label, info.name, f"has the unsupported tar type {info.type!r}")
    if name in seen:
        before = tree.kinds.get(name)
        if (before == "dir") != info.isdir():
            raise DirectoryReplaced(
                label, info.name, f"changes an earlier {before} of the same name into another type"
            )
        raise DuplicateMember(label, info.name, "appears twice in the archive")
    seen.add(name)
    if name == ".":
        if not info.isdir():
            raise DirectoryReplaced(label, info.name, "would replace the root with a non-directory")
        return name
    tree.check_parents(name, info.name)
    existing = tree.kind(name)
    if info.isdir():
        if existing not in (None, "dir"):
            raise DirectoryReplaced(label, info.name, f"is a directory over an existing {existing}")
        tree.kinds[name] = "dir"
        summary.dirs += 1
    else:
        if existing == "dir":
            raise DirectoryReplaced(label, info.name, "would replace a directory with a file")
        if existing == "symlink" and tree.dest is not None and name not in tree.kinds:
            raise MemberThroughSymlink(label, info.name, "would overwrite a symlink at the target")
    if info.issym():
        target = info.linkname
        if target.startswith("/"):
            raise SymlinkEscape(label, info.name, f"points to the absolute path {target!r}")
        tree.resolve(posixpath.dirname(name), target, info.name)
        tree.kinds[name] = "symlink"
        tree.symlinks[name] = target
        summary.symlinks += 1
    elif info.islnk():
        target = info.linkname
        if target.startswith("/"):
            raise HardlinkEscape(label, info.name, f"links to the absolute path {target!r}")
        parts = [p for p in target.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise HardlinkEscape(label, info.name, f"links to {target!r}, which has '..'")
        norm = "/".join(parts)
        if tree.kinds.get(norm) != "file":
            raise HardlinkEscape(
                label, info.name, f"links to {target!r}, not a regular file earlier in the archive"
            )
        tree.kinds[name] = "file"
        summary.hardlinks += 1
    elif info.isreg():
        tree.kinds[name] = "file"
        summary.files += 1
        cap = limits.max_member_bytes
        if cap is not None and info.size > cap:
            raise MemberTooLarge(
                label, info.name, f"is {info.size} bytes, over max_member_bytes={cap}"
            )
        summary.total_bytes += info.size
        if summary.total_bytes > limits.max_bytes:
            raise ArchiveTooLarge(
                label,
                info.name,
                f"brings the content to {summary.total_bytes} bytes, over max_bytes="
                f"{limits.max_bytes}",
                "Raise max_bytes if the archive is trusted, or split it.",
            )
    # tarfile's own opinion, against a stand-in root (it only reads the path lexically there).
    try:
        tarfile.data_filter(info, "/nonexistent-psb-root")
    except tarfile.FilterError as exc:
        raise DataFilterRefused(
            label, info.name, f"was refused by tarfile's data filter ({exc})"
        ) from exc
    return name


def validate(
    src: Path | BinaryIO,
    *,
    dest: Path | None = None,
    label: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_member_bytes: int | None = None,
    max_members: int = MAX_MEMBERS,
) -> Summary:
    """Read every member header and raise the first refusal; write nothing.

    ``dest``, when given, is the directory the archive would be merged into: existing symlinks
    and directories there count (a member may not go through one or replace one).
    """
    limits = _limits(max_bytes, max_member_bytes, max_members)
    label = label or (str(src) if isinstance(src, Path | str) else "<stream>")
    tree = _Tree(label, dest)
    seen: set[str] = set()
    summary = Summary()
    with _open(src, label) as tar:
        try:
            for info in tar:
                summary.names.append(_check_member(info, tree, seen, summary, limits))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise CorruptArchive(label, "-", f"is truncated or corrupt ({exc})") from exc
    return summary


def _keep_modes(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter, but directories keep their (group/other-safe) mode."""
    filtered = tarfile.data_filter(member, path)
    if member.isdir():
        return filtered.replace(mode=(member.mode & 0o755) | 0o700, deep=False)
    return filtered


def extract(
    src: Path | str,
    dest: Path | str,
    *,
    merge: bool = False,
    max_bytes: int = MAX_BYTES,
    max_member_bytes: int | None = None,
    max_members: int = MAX_MEMBERS,
) -> Summary:
    """Validate the whole archive at ``src`` (tar or tar.gz), then extract it into ``dest``.

    ``dest`` must be missing or empty unless ``merge=True`` (then existing files are replaced
    and existing directories kept). On any refusal nothing is written and ``dest`` is unchanged.
    """
    src, dest = Path(src), Path(dest)
    label = str(src)
    exists = dest.exists()
    if exists and not merge and any(dest.iterdir()):
        raise DestinationNotEmpty(
            label, "-", f"would be extracted into the non-empty {dest}", "Pass merge=True."
        )
    summary = validate(
        src,
        dest=dest if merge and exists else None,
        label=label,
        max_bytes=max_bytes,
        max_member_bytes=max_member_bytes,
        max_members=max_members,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        with _open(src, label) as tar:
            try:
                tar.extractall(staging, filter=_keep_modes)
            except tarfile.FilterError as exc:
                raise DataFilterRefused(
                    label, "-", f"was refused by the data filter ({exc})"
                ) from exc
        _commit(staging, dest, merge=merge and exists)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _commit(staging: Path, dest: Path, *, merge: bool) -> None:
    """Move the staged tree into place (a rename when ``dest`` is missing or empty)."""
    if not merge:
        root_mode = stat.S_IMODE(os.lstat(staging).st_mode)
        with contextlib.suppress(FileNotFoundError, OSError):
            dest.rmdir()  # empty (checked); rename needs it gone
        os.rename(staging, dest)
        staging.mkdir()  # the finally's rmtree expects something there
        os.chmod(dest, root_mode if root_mode != 0o700 else 0o755)
        return
    for dirpath, dirnames, filenames in os.walk(staging):
        rel = Path(dirpath).relative_to(staging)
        target_dir = dest / rel
        for d in dirnames:
            src_d = Path(dirpath) / d
            if src_d.is_symlink():
                os.replace(src_d, target_dir / d)
            else:
                (target_dir / d).mkdir(exist_ok=True)
                shutil.copymode(src_d, target_dir / d)
        for f in filenames:
            os.replace(Path(dirpath) / f, target_dir / f)


def extract_stream(
    chunks: Iterable[bytes],
    dest: Path | str,
    *,
    strip_first: bool = False,
    merge: bool = False,
    max_bytes: int = MAX_BYTES,
    max_member_bytes: int | None = None,
    max_members: int = MAX_MEMBERS,
) -> Summary:
    """Spool ``chunks`` (e.g. ``container.get_archive(path)[0]``) to disk, then :func:`extract`.

    The raw stream is capped at ``2 * max_bytes`` while spooling (headers and padding included),
    so a hostile stream cannot fill the disk. ``strip_first`` drops the leading path component
    (``get_archive("/data")`` names members ``data/...``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, spool_name = tempfile.mkstemp(prefix=f".{dest.name}.spool-", dir=dest.parent)
    spool = Path(spool_name)
    try:
        written = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                written += len(chunk)
                if written > 2 * max_bytes + (1 << 20):
                    raise ArchiveTooLarge(
                        "<stream>", "-", f"is over {written} bytes, above 2 * max_bytes"
                    )
                out.write(chunk)
        source = spool
        if strip_first:
            source = spool.with_name(spool.name + ".stripped")
            with open(source, "wb") as out:
                for piece in rewrite(spool, strip_first=True):
                    out.write(piece)
        try:
            return extract(
                source,
                dest,
                merge=merge,
                max_bytes=max_bytes,
                max_member_bytes=max_member_bytes,
                max_members=max_members,
            )
        finally:
            if source != spool:
                source.unlink(missing_ok=True)
    finally:
        spool.unlink(missing_ok=True)


# --- writing ----------------------------------------------------------------------------


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> bytes:
    rest = size % tarfile.BLOCKSIZE
    return b"\0" * (tarfile.BLOCKSIZE - rest) if rest else b""


def _info_for(path: Path, arcname: str) -> tarfile.TarInfo:
    st = os.lstat(path)
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid, info.gid = st.st_uid, st.st_gid
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    else:
        raise UnsupportedMember(
            str(path), arcname, "is a special file (device, FIFO or socket)", "Remove it first."
        )
    return info


def _walk(
    src_dir: Path, exclude: Callable[[str], bool] | None = None
) -> Iterator[tuple[Path, str]]:
    """(path, member name) for everything under ``src_dir``, parents first, sorted, no follow.

    ``exclude(name)`` drops a member (and, for a directory, what is under it).
    """
    for dirpath, dirnames, filenames in os.walk(src_dir):
        rel = Path(dirpath).relative_to(src_dir)
        kept_dirs = []
        for name in sorted(dirnames + filenames):
            member = (rel / name).as_posix()
            if exclude is not None and exclude(member):
                continue
            if name in dirnames:
                kept_dirs.append(name)
            yield Path(dirpath) / name, member
        # os.walk follows symlinked dirs only with followlinks; sorted for a stable order
        dirnames[:] = [d for d in sorted(kept_dirs) if not (Path(dirpath) / d).is_symlink()]


def _tar_chunks(
    src_dir: Path, prefix: str = "", exclude: Callable[[str], bool] | None = None
) -> Iterator[bytes]:
    """A plain tar of ``src_dir``'s content, member by member, file data in 1 MiB chunks."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir} is not a directory")
    if prefix:
        root = _info_for(src_dir, prefix)
        yield _header(root)
    for path, rel in _walk(src_dir, exclude):
        info = _info_for(path, f"{prefix}/{rel}" if prefix else rel)
        yield _header(info)
        if info.isreg():
            remaining = info.size
            with open(path, "rb") as handle:
                while remaining > 0:
                    data = handle.read(min(CHUNK, remaining))
                    if not data:  # the file shrank while we read it: pad with zeros
                        data = b"\0" * remaining
                    remaining -= len(data)
                    yield data
            yield _pad(info.size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _gzip(chunks: Iterable[bytes], level: int) -> Iterator[bytes]:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush()


def stream(
    src_dir: Path | str,
    *,
    compress: bool = False,
    level: int = 1,
    prefix: str = "",
    exclude: Callable[[str], bool] | None = None,
) -> Iterator[bytes]:
    """Yield a tar (or tar.gz) of ``src_dir``'s content; memory stays at about one chunk.

    Usable as ``container.put_archive(path, stream(dir))``. ``prefix`` puts every member under
    one directory of that name.
    """
    chunks = _tar_chunks(Path(src_dir), prefix, exclude)
    return _gzip(chunks, level) if compress else chunks


def is_gzip_name(path: Path | str) -> bool:
    return str(path).endswith((".gz", ".tgz"))


def _writev_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """``os.writev`` until every byte of ``pieces`` is written (writes may be partial)."""
    while pieces:
        done = os.writev(fd, pieces)
        while pieces and done >= len(pieces[0]):
            done -= len(pieces[0])
            pieces = pieces[1:]
        if done:
            pieces[0] = memoryview(pieces[0])[done:]


def write_atomic(
    chunks: Iterable[bytes | memoryview], dest: Path | str, *, mode: int = 0o600
) -> int:
    """Write ``chunks`` to a temp file beside ``dest``, fsync, rename. Returns bytes written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            # gathered writes: many small pieces (stored gzip blocks) cost one syscall per MiB
            batch: list[bytes | memoryview] = []
            pending = 0
            for chunk in chunks:
                batch.append(chunk)
                pending += len(chunk)
                written += len(chunk)
                if pending >= CHUNK or len(batch) >= 256:
                    _writev_all(fd, batch)
                    batch, pending = [], 0
            _writev_all(fd, batch)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def create(
    src_dir: Path | str, dest: Path | str, *, compress: bool | None = None, mode: int = 0o600
) -> Path:
    """Archive ``src_dir``'s content into ``dest`` atomically (temp file + fsync + rename).

    Compressed (gzip level 1, for speed) when ``dest`` ends with ``.gz``/``.tgz`` unless
    ``compress`` says otherwise. The file gets ``mode`` (0600: data snapshots may be secret).
    """
    dest = Path(dest)
    gz = is_gzip_name(dest) if compress is None else compress
    write_atomic(stream(src_dir, compress=gz), dest, mode=mode)
    return dest


# --- rewriting (for the Docker archive API) ----------------------------------------------


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (for ``tarfile.open(mode="r|*")``)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def reader(chunks: Iterable[bytes]) -> IO[bytes]:
    """A buffered, read-only file object over an iterator of chunks."""
    return io.BufferedReader(_ChunkReader(chunks), buffer_size=CHUNK)


def rewrite(
    src: Path | Iterable[bytes],
    *,
    strip_first: bool = False,
    compress: bool = False,
    level: int = 1,
) -> Iterator[bytes]:
    """Re-emit a tar stream, optionally dropping each member's first path component.

    Docker's ``get_archive("/data")`` names members ``data/...``; a data snapshot names them
    relative to the data dir. The root entry itself becomes ``.``. Streams: constant memory.
    """

    def chunks() -> Iterator[bytes]:
        fileobj: IO[bytes]
        opened = open(src, "rb") if isinstance(src, Path) else reader(src)  # noqa: SIM115
        with opened as fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                name = info.name
                if strip_first:
                    _, _, rest = name.lstrip("/").partition("/")
                    name = rest or "."
                    if info.islnk():
                        _, _, link_rest = info.linkname.lstrip("/").partition("/")
                        info.linkname = link_rest
                # the name/linkname set above must win over the original pax records
                info.pax_headers = {
                    k: v for k, v in info.pax_headers.items() if k not in ("path", "linkpath")
                }
                if name == "." and info.isdir():
                    info.name = "."
                else:
                    info.name = name
                yield _header(info)
                if info.isreg():
                    handle = tar.extractfile(info)
                    if handle is not None:
                        while True:
                            data = handle.read(CHUNK)
                            if not data:
                                break
                            yield data
                        yield _pad(info.size)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    return _gzip(chunks(), level) if compress else chunks()


# --- one-pass streaming (the Docker archive API's fast path) ---------------------------------

#: gzip level of data snapshots: 1 is zlib's fastest real compression. Blocks that do not
#: compress (random or already compressed data) are stored instead, whatever the level.
GZIP_LEVEL = 1
#: Bytes compressed independently (pigz-style): lets two threads share the work.
GZIP_BLOCK = 1 << 20
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_EXT_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
#: A pax / GNU long-name record larger than this is refused (names are short; this is a bomb).
MAX_EXTENDED_HEADER = 1 << 20


def _block_size(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _pax_records(data: bytes, label: str) -> dict[str, str]:
    """The ``"%d %s=%s\\n"`` records of a pax header (parsing stops, as tarfile's does, at the
    first record that does not match)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space <= pos or not data[pos:space].isdigit():
            break
        length = int(data[pos:space])
        if length == 0:
            raise CorruptArchive(label, "-", "has a pax record of length 0")
        record = data[space + 1 : pos + length - 1]
        key, eq, value = record.partition(b"=")
        if not eq:
            break
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _apply_pax(info: tarfile.TarInfo, headers: dict[str, str], label: str) -> None:
    for key, value in headers.items():
        if key.startswith("GNU.sparse"):
            raise UnsupportedMember(label, info.name, "is a GNU sparse file (pax)")
        if key == "path":
            info.name = value.rstrip("/")
        elif key == "linkpath":
            info.linkname = value
        elif key in ("size", "uid", "gid"):
            try:
                setattr(info, key, int(value))
            except ValueError:
                setattr(info, key, 0)
        elif key in ("uname", "gname"):
            setattr(info, key, value)
        elif key == "mtime":
            with contextlib.suppress(ValueError):
                info.mtime = float(value)
    info.pax_headers = dict(headers)


class TarScanner:
    """A tar parser fed with chunks as they arrive: it reads each member's header (pax and GNU
    long names included), hands the :class:`tarfile.TarInfo` to ``on_member`` and skips the
    file data without copying it. One pass, constant memory, no tarfile stream object.

    With ``emit=True``, :meth:`feed` returns the archive's bytes to pass on: file data as
    slices of the input, each header as it came, or regenerated when ``rename(info)`` returned
    a new name (``./a`` -> ``a``). ``close()`` raises :class:`CorruptArchive` when the stream
    stopped inside a member or (``require_end=True``) before the end-of-archive blocks: a
    stream cut short is never mistaken for a complete snapshot.
    """

    def __init__(
        self,
        *,
        label: str = "<stream>",
        on_member: Callable[[tarfile.TarInfo], object] | None = None,
        emit: bool = False,
        rename: Callable[[tarfile.TarInfo], str | None] | None = None,
        require_end: bool = False,
    ) -> None:
        self.label = label
        self.on_member = on_member
        self.emit = emit
        self.rename = rename
        self.require_end = require_end
        self.members = 0
        self.data_bytes = 0
        self.ended = False
        self._buf = bytearray()
        self._want = tarfile.BLOCKSIZE
        self._skip = 0
        self._ext: tarfile.TarInfo | None = None
        self._raw: list[bytes] = []  # extended-header units of the member being read
        self._pax: dict[str, str] = {}
        self._global: dict[str, str] = {}
        self._longname: str | None = None
        self._longlink: str | None = None
        self._seen_any = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        if end:
            self._seen_any = True
        while pos < end:
            if self.ended:  # after the end-of-archive marker: padding, ignored
                break
            if self._skip:
                step = min(self._skip, end - pos)
                if self.emit:
                    out.append(view[pos : pos + step])
                self._skip -= step
                pos += step
                continue
            take = min(self._want - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._want:
                unit = bytes(self._buf)
                self._buf.clear()
                self._unit(unit, out)
        return out

    def _unit(self, unit: bytes, out: list[bytes | memoryview]) -> None:
        if self._ext is not None:
            self._extended(unit)
            return
        if unit == _ZERO_BLOCK:
            if self._raw or self._pax or self._longname or self._longlink:
                raise CorruptArchive(self.label, "-", "ends right after an extended header")
            self.ended = True
            if self.emit:
                out.append(_ZERO_BLOCK * 2)
            return
        try:
            info = tarfile.TarInfo.frombuf(unit, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as exc:
            raise CorruptArchive(
                self.label, "-", f"has an invalid tar header after {self.members} members ({exc})"
            ) from exc
        if info.type in _EXT_TYPES or info.type in _LONG_TYPES:
            if info.size > MAX_EXTENDED_HEADER:
                raise CorruptArchive(
                    self.label, info.name, f"has a {info.size}-byte extended header"
                )
            self._ext = info
            self._raw.append(unit)
            self._want = max(_block_size(info.size), tarfile.BLOCKSIZE)
            if info.size == 0:
                self._ext, self._want = None, tarfile.BLOCKSIZE
            return
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise UnsupportedMember(self.label, info.name, "is a GNU sparse file")
        if self._global or self._pax:
            _apply_pax(info, {**self._global, **self._pax}, self.label)
        if self._longname is not None:
            info.name = self._longname
        if self._longlink is not None:
            info.linkname = self._longlink
        if info.isdir():
            info.name = info.name.rstrip("/")
        raw, self._raw = self._raw, []
        self._pax, self._longname, self._longlink = {}, None, None
        self.members += 1
        if self.on_member is not None:
            self.on_member(info)
        if self.emit:
            new_name = self.rename(info) if self.rename is not None else None
            if new_name is None:
                out.extend(raw)
                out.append(unit)
            else:
                info.name = new_name
                info.pax_headers = {
                    k: v for k, v in info.pax_headers.items() if k not in ("path", "linkpath")
                }
                out.append(_header(info))
        if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:
            self._skip = _block_size(info.size)
            self.data_bytes += info.size

    def _extended(self, unit: bytes) -> None:
        ext = self._ext
        assert ext is not None
        self._ext, self._want = None, tarfile.BLOCKSIZE
        self._raw.append(unit)
        data = unit[: ext.size]
        if ext.type == tarfile.GNUTYPE_LONGNAME:
            self._longname = data.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        elif ext.type == tarfile.GNUTYPE_LONGLINK:
            self._longlink = data.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        elif ext.type == tarfile.XGLTYPE:
            self._global.update(_pax_records(data, self.label))
        else:
            self._pax.update(_pax_records(data, self.label))

    def close(self) -> None:
        """Raise :class:`CorruptArchive` unless the stream ended where an archive may end."""
        if self.ended:
            return
        if not self._seen_any:
            raise CorruptArchive(self.label, "-", "is empty (not even an end-of-archive block)")
        at_boundary = not self._skip and not self._buf and self._ext is None and not self._raw
        if not at_boundary or self.require_end:
            raise CorruptArchive(
                self.label,
                "-",
                f"is truncated after {self.members} members (the stream stopped "
                f"{'inside a member' if not at_boundary else 'before the end-of-archive blocks'})",
                "The engine or the file cut the archive short; export again.",
            )


def strip_dot(info: tarfile.TarInfo) -> str | None:
    """``./a`` -> ``a`` (the root ``./`` stays ``.``); None when the name needs no change.

    Docker's ``GET archive`` of ``/data/.`` names members ``./...``; data snapshots name them
    relative to the data dir, as ``create`` does.
    """
    if not info.name.startswith("./"):
        return None
    if info.islnk() and info.linkname.startswith("./"):
        info.linkname = info.linkname[2:].lstrip("/")
    return info.name[2:].lstrip("/") or "."


def scan(
    chunks: Iterable[bytes],
    *,
    label: str = "<stream>",
    rename: Callable[[tarfile.TarInfo], str | None] | None = strip_dot,
    require_end: bool = True,
) -> Generator[bytes, None, None]:
    """Pass a tar stream through a :class:`TarScanner`: the same bytes (names renamed by
    ``rename``), one output chunk per input chunk; raises :class:`CorruptArchive` at the end
    when the stream was cut short."""
    scanner = TarScanner(label=label, emit=True, rename=rename, require_end=require_end)
    for chunk in chunks:
        pieces = scanner.feed(chunk)
        if len(pieces) == 1:
            yield bytes(pieces[0]) if isinstance(pieces[0], memoryview) else pieces[0]
        elif pieces:
            yield b"".join(pieces)
    scanner.close()


def _stored(data: bytes) -> list[bytes | memoryview]:
    """``data`` as non-final stored deflate blocks: 5-byte headers around slices of ``data``
    (no copy, no zlib state: storing costs nothing but the CRC)."""
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    for start in range(0, len(data), 0xFFFF):
        piece = view[start : start + 0xFFFF]
        n = len(piece)
        out.append(b"\x00" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little"))
        out.append(piece)
    return out


def _deflate_block(data: bytes, level: int) -> list[bytes | memoryview]:
    """Raw deflate of one block, ending byte-aligned and not final (pigz-style): blocks made
    independently concatenate into one valid deflate stream."""
    if level == 0:
        return _stored(data)
    if len(data) >= 1 << 16:
        # a 4 KiB sample from the middle decides: data that does not shrink is stored
        # (deflate of random bytes runs at ~60 MB/s; storing at memory speed). The probe's
        # small window and hash keep its state small (no fresh pages per block).
        mid = len(data) // 2
        sample = data[mid : mid + (1 << 12)]
        probe = zlib.compressobj(1, zlib.DEFLATED, -12, 4)
        if len(probe.compress(sample)) + len(probe.flush()) > len(sample) * 0.92:
            return _stored(data)
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)
    return [comp.compress(data), comp.flush(zlib.Z_SYNC_FLUSH)]


def gzip_blocks(
    chunks: Iterable[bytes],
    *,
    level: int = GZIP_LEVEL,
    threads: int | None = None,
    block: int = GZIP_BLOCK,
) -> Generator[bytes | memoryview, None, None]:
    """gzip ``chunks`` as one gzip member made of independently deflated blocks.

    Blocks (a chunk of at least ``block / 2`` bytes is one block, smaller ones are gathered)
    are compressed on ``threads`` threads (zlib releases the GIL; default: 2 when the machine
    has 2 cores or more) and yielded in order; a block that does not compress is stored.
    Memory: about ``4 * threads`` blocks. Any gzip reader reads the result (one member).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    if not 0 <= level <= 9:
        raise ValueError(f"gzip level {level} is not in 0..9")
    workers = max(1, threads if threads is not None else min(2, os.cpu_count() or 1))
    crc, size = 0, 0
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip header: no name, no mtime
    pending: list[Future[list[bytes | memoryview]]] = []
    buf = bytearray()
    with ThreadPoolExecutor(workers, thread_name_prefix="psb-gzip") as pool:
        try:

            def submit(data: bytes) -> Iterator[bytes | memoryview]:
                nonlocal crc, size
                crc = zlib.crc32(data, crc)
                size += len(data)
                pending.append(pool.submit(_deflate_block, data, level))
                while len(pending) > workers * 2 or (pending and pending[0].done()):
                    yield from pending.pop(0).result()

            for chunk in chunks:
                if not buf and len(chunk) >= block // 2:
                    yield from submit(bytes(chunk))  # no copy for bytes
                    continue
                buf += chunk
                if len(buf) >= block:
                    data = bytes(buf)
                    buf.clear()
                    yield from submit(data)
            if buf:
                yield from submit(bytes(buf))
            while pending:
                yield from pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()
    final = zlib.compressobj(level, zlib.DEFLATED, -15)
    yield (
        final.flush(zlib.Z_FINISH)
        + (crc & 0xFFFFFFFF).to_bytes(4, "little")
        + (size & 0xFFFFFFFF).to_bytes(4, "little")
    )


def prefetch(
    chunks: Iterable[bytes],
    *,
    depth: int = 16,
    on_end: Callable[[], object] | None = None,
    gather: int = CHUNK,
    join_timeout: float = 10.0,
) -> Generator[bytes, None, None]:
    """Iterate ``chunks`` on a reader thread, up to ``depth`` chunks ahead, so that reading
    (the engine's socket) overlaps what the consumer does with them (compress, write).
    Smaller chunks are gathered into chunks of ``gather`` bytes. A reader blocked on a source
    that stalls is abandoned after ``join_timeout`` seconds once the consumer has gone.

    Closing the returned generator stops the reader at its next chunk and closes ``chunks``
    (when it is a generator) on that thread. ``on_end()`` runs on the reader thread once
    ``chunks`` is exhausted and closed, before the consumer sees the end (e.g. to restart a
    container whose archive has been read while the last chunks are still being written).
    """
    import queue
    import threading

    q: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader() -> None:
        it = iter(chunks)
        complete = False
        buf = bytearray()

        def put(chunk: bytes) -> bool:
            while not stop.is_set():
                try:
                    q.put(("data", chunk), timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for chunk in it:
                # the engine's HTTP chunks are 32 KiB: handing them on one by one costs more
                # in queue and parser calls than the data costs to copy once
                if not buf and len(chunk) >= gather:
                    if not put(chunk):
                        return
                    continue
                buf += chunk
                if len(buf) >= gather:
                    if not put(bytes(buf)):
                        return
                    buf.clear()
            if buf and not put(bytes(buf)):
                return
            complete = True
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        if complete:
            if on_end is not None:
                with contextlib.suppress(Exception):  # its owner reports its failures
                    on_end()
            q.put(("end", None))

    thread = threading.Thread(target=reader, name="psb-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "data":
                yield value  # type: ignore[misc]
            elif kind == "error":
                assert isinstance(value, BaseException)
                raise value
            else:
                return
    finally:
        stop.set()
        # unblock a reader waiting on a full queue; one stuck in a read of a stalled source
        # is left behind after a while (a daemon thread) rather than hanging the consumer
        deadline = time.monotonic() + join_timeout
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


def decompressed(handle: IO[bytes], label: str, cap: int) -> Iterator[bytes]:
    """The tar bytes of a tar / tar.gz / tar.bz2 / tar.xz file, in chunks of at most CHUNK
    (a small compressed chunk never expands into a huge buffer); ``cap`` bounds the total.
    Concatenated members and zero padding after the last one are read as gzip readers do."""
    import bz2
    import lzma

    head = handle.read(CHUNK)
    magic = next((m for m in (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00") if head.startswith(m)), None)
    if magic is None:
        data = head
        while data:
            yield data
            data = handle.read(CHUNK)
        return

    def new() -> Any:
        if magic == b"\x1f\x8b":
            return zlib.decompressobj(31)
        return bz2.BZ2Decompressor() if magic == b"BZh" else lzma.LZMADecompressor()

    gz = magic == b"\x1f\x8b"
    decomp = new()
    total = 0
    padded = False
    data = head
    try:
        while True:
            if not data:
                data = handle.read(CHUNK)
                if not data:
                    break
            if decomp.eof:
                stripped = data.lstrip(b"\0")  # zero padding after the last member is allowed
                padded = padded or len(stripped) < len(data)
                data = stripped
                if not data:
                    continue
                if not data.startswith(magic):
                    raise CorruptArchive(label, "-", "has trailing garbage after its data")
                if padded:  # the engine's gzip reader stops there: refuse, not half-import
                    raise CorruptArchive(label, "-", "has zero padding between gzip members")
                decomp = new()
            out = decomp.decompress(data, CHUNK)
            data = decomp.unconsumed_tail if gz else b""
            while True:
                total += len(out)
                if total > cap:
                    raise ArchiveTooLarge(
                        label, "-", f"expands to more than {cap} bytes", "Raise max_bytes."
                    )
                if out:
                    yield out
                if gz or decomp.eof or decomp.needs_input:
                    break
                out = decomp.decompress(b"", CHUNK)  # bz2/xz keep the rest buffered
            if decomp.eof:
                data = decomp.unused_data + data
        if not decomp.eof:
            raise CorruptArchive(label, "-", "is truncated (the compressed stream stops early)")
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise CorruptArchive(label, "-", f"cannot be decompressed ({exc})") from exc


def compression(handle: IO[bytes]) -> str:
    """``gzip``, ``bzip2``, ``xz`` or ``none``, from the first bytes (the position is kept)."""
    where = handle.tell()
    head = handle.read(6)
    handle.seek(where)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    return "xz" if head.startswith(b"\xfd7zXZ\x00") else "none"


def file_chunks(handle: IO[bytes], size: int = CHUNK) -> Generator[bytes, None, None]:
    """``handle``'s bytes from its position on, ``size`` at a time."""
    while chunk := handle.read(size):
        yield chunk


def expansion_cap(max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> int:
    """The most tar bytes an archive within the limits can decompress to: the content plus
    headers and padding, generously; a hard cap on a decompression bomb."""
    return 2 * max_bytes + (max_members + 2) * 3 * tarfile.BLOCKSIZE


def validate_stream(
    src: Path | str | IO[bytes],
    *,
    label: str | None = None,
    dest: Path | None = None,
    max_bytes: int = MAX_BYTES,
    max_member_bytes: int | None = None,
    max_members: int = MAX_MEMBERS,
) -> Summary:
    """The checks of :func:`validate` in one streaming pass (a :class:`TarScanner` over the
    decompressed bytes, read 1 MiB at a time): every refusal raises before anything is written.
    For an archive handed to the engine (``import_data``), which extracts it itself."""
    limits = _limits(max_bytes, max_member_bytes, max_members)
    label = label or (str(src) if isinstance(src, Path | str) else "<stream>")
    tree = _Tree(label, dest)
    seen: set[str] = set()
    summary = Summary()

    def check(info: tarfile.TarInfo) -> None:
        summary.names.append(_check_member(info, tree, seen, summary, limits))

    scanner = TarScanner(label=label, on_member=check)
    cap = expansion_cap(max_bytes, max_members)
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(open(src, "rb")) if isinstance(src, Path | str) else src
        # read to the very end even after the end-of-archive blocks: the gzip CRC is checked
        for chunk in decompressed(handle, label, cap):
            scanner.feed(chunk)
        scanner.close()
    return summary
