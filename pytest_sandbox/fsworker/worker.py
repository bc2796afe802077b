"""The fs worker process: ``python -m pytest_sandbox.fsworker --socket PATH [--root DIR]``.

Start-up: parse argv, load the policy (``PYTEST_SANDBOX_FS_POLICY``), bind the socket, drop to
``--uid`` if asked, apply the kernel layer (``--kernel auto|require|off``), print ``ready``.
Then accept one connection and serve one request at a time until EOF or ``shutdown``.

Imports only the stdlib and this package's protocol/policy/enforce modules (start-up speed).
Exit codes before ready: 2 bad arguments/policy/root, 3 kernel layer required but unavailable.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from pytest_sandbox.errors import FsPolicyInvalid
from pytest_sandbox.fsworker import protocol
from pytest_sandbox.fsworker.policy import (
    POLICY_ENV,
    ResolvedPolicy,
    SandboxPolicy,
    system_path_reason,
    within,
)

EXIT_USAGE = 2
EXIT_KERNEL = 3
#: A network policy under ``--kernel require`` and no layer can confine TCP egress.
EXIT_NET = 4
NET_LAYERS = ("auto", "landlock", "netns")
#: Seconds after ``ready`` to wait for the one connection (``--accept-timeout``).
DEFAULT_ACCEPT_TIMEOUT = "30"

#: Largest file a ``read`` returns whole (base64 of it must fit in one frame).
MAX_READ = 700_000
MAX_GREP_MATCHES = 1000
MAX_GREP_FILE = 8 << 20
MAX_LINE = 1000
PR_SET_CHILD_SUBREAPER = 36

USAGE = (
    "usage: python -m pytest_sandbox.fsworker --socket PATH [--root DIR] "
    "[--kernel auto|require|off] [--uid N] [--gid N] [--proxy-port N] [--proxy-host IP] "
    "[--net-layer auto|landlock|netns] [--frame-timeout S] [--accept-timeout S]"
)


class Denied(Exception):
    """A request the policy refuses."""


class BadRequest(Exception):
    """A request whose fields are missing or of the wrong type."""


class Usage(Exception):
    """Bad command-line arguments."""


def parse_args(argv: list[str]) -> dict[str, str]:
    options = {"--socket", "--root", "--kernel", "--uid", "--gid", "--proxy-port",
               "--proxy-host", "--net-layer", "--frame-timeout", "--accept-timeout"}  # fmt: skip
    flags = {"--allow-debug"}
    parsed: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags and not eq:
            parsed[name] = "1"
            i += 1
            continue
        if name not in options:
            raise Usage(f"unknown argument {arg!r}")
        if not eq:
            if i + 1 >= len(argv):
                raise Usage(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        parsed[name] = value
        i += 1
    if "--socket" not in parsed:
        raise Usage("--socket PATH is required")
    if parsed.get("--kernel", "auto") not in ("auto", "require", "off"):
        raise Usage(f"--kernel must be auto, require or off, got {parsed['--kernel']!r}")
    if parsed.get("--net-layer", "auto") not in NET_LAYERS:
        raise Usage(f"--net-layer must be auto, landlock or netns, got {parsed['--net-layer']!r}")
    for name in ("--uid", "--gid", "--proxy-port"):
        if name in parsed and not parsed[name].isdigit():
            raise Usage(f"{name} must be a non-negative integer, got {parsed[name]!r}")
    for name in ("--frame-timeout", "--accept-timeout"):
        if name in parsed:
            try:
                if not float(parsed[name]) > 0:
                    raise ValueError
            except ValueError:
                raise Usage(f"{name} must be a positive number, got {parsed[name]!r}") from None
    return parsed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(request: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = request.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{request.get('kind')} needs {name!r} of type {kind}, got {value!r}")
    return value


def _children_of(pid: int) -> list[int] | None:
    """``pid``'s children from ``/proc/PID/task/*/children`` (None: the kernel lacks them)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                found.extend(int(c) for c in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return found


def _descendants(pid: int, spare: frozenset[int] = frozenset()) -> list[int]:
    """Every live descendant of ``pid`` except the subtrees of ``spare`` (from /proc).

    Called with the worker's own pid: as a child subreaper it inherits what an exec'd command
    left running (a background job, a ``setsid`` daemon) once the command exits. Walks the
    ``children`` files (a few reads) where the kernel has them, else scans all of /proc.
    """
    found: list[int] = []
    todo = [pid]
    while todo:
        children = _children_of(todo.pop())
        if children is None:
            return _descendants_by_scan(pid, spare)
        for child in children:
            if child not in spare:
                found.append(child)
                todo.append(child)
    return found


def _descendants_by_scan(pid: int, spare: frozenset[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in spare:
                continue
            found.append(child)
            todo.append(child)
    return found


class Worker:
    """The request handlers, over a policy bound to a root."""

    def __init__(
        self,
        policy: SandboxPolicy,
        resolved: ResolvedPolicy,
        *,
        enforcement: list[str],
        landlock_abi: int,
        allow_debug: bool = False,
        exec_confined: bool = False,
        degraded: list[str] | None = None,
        helpers: frozenset[int] = frozenset(),
    ) -> None:
        self.policy = policy
        self.resolved = resolved
        self.root = resolved.root
        self.enforcement = enforcement
        self.landlock_abi = landlock_abi
        self.allow_debug = allow_debug
        self.exec_confined = exec_confined
        self.degraded = degraded or []
        #: Our own children (the egress connector) that cleaning up after exec must spare.
        self.helpers = helpers
        self.stop = False
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.ping,
            "shutdown": self.shutdown,
            "read": self.read,
            "write": self.write,
            "edit": self.edit,
            "rename": self.rename,
            "glob": self.glob,
            "grep": self.grep,
            "stat": self.stat,
            "get_env": self.get_env,
            "exec": self.exec,
        }
        if allow_debug:
            self.handlers["debug_raw_write"] = self.debug_raw_write
            self.handlers["debug_connect"] = self.debug_connect

    # --- dispatch ---------------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        kind = request["kind"]
        handler = self.handlers.get(kind)
        if handler is None:
            reply = protocol.error("unimplemented", f"unknown request kind {kind!r}")
        else:
            try:
                reply = {"kind": "ok", **handler(request)}
            except Denied as exc:
                reply = protocol.error("policy_denied", str(exc))
            except BadRequest as exc:
                reply = protocol.error("protocol", str(exc))
            except OSError as exc:
                reply = protocol.error("io", f"{exc.strerror or exc}: {exc.filename or ''}")
            except Exception as exc:  # a bug must not kill the worker
                reply = protocol.error("internal", f"{type(exc).__name__}: {exc}")
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    # --- paths ------------------------------------------------------------------------------

    def _path(self, request: dict[str, Any], name: str = "path") -> str:
        path = _field(request, name, str)
        if not path or "\x00" in path:
            raise BadRequest(f"{name!r} must be a non-empty path without NUL")
        return os.path.join(self.root, path)

    def _write_target(self, path: str, *, follow_final: bool = True) -> str:
        """The resolved path a write to ``path`` lands on; every hop must be writable."""
        parent = os.path.realpath(os.path.dirname(path))
        current = os.path.join(parent, os.path.basename(path))
        for _ in range(40):
            reason = self.resolved.write_denied(current)
            if reason:
                raise Denied(reason)
            if not follow_final or not os.path.islink(current):
                return current
            target = os.path.join(os.path.dirname(current), os.readlink(current))
            parent = os.path.realpath(os.path.dirname(target))
            current = os.path.join(parent, os.path.basename(target))
        raise Denied(f"{path}: too many levels of symbolic links")

    def _base_for(self, real: str) -> str:
        for base in sorted(self.resolved.allow_write, key=len, reverse=True):
            if within(real, base):
                return base
        raise Denied(f"{real} is outside the writable roots")

    def _open_dir_chain(self, real: str, *, create: bool) -> tuple[int, str]:
        """Open the parent of ``real`` component by component, never following a symlink.

        A symlink swapped in after the policy check makes the walk fail instead of escaping.
        """
        base = self._base_for(real)
        rel = os.path.relpath(real, base)
        if rel == ".":
            raise OSError(errno.EISDIR, "is a writable root, not a file", real)
        parts = rel.split("/")
        dirfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    nfd = os.open(part, flags, dir_fd=dirfd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=dirfd)
                    except PermissionError:
                        self._split_denial(os.path.join(base, *parts[: parts.index(part) + 1]))
                        raise
                    nfd = os.open(part, flags, dir_fd=dirfd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                        os.lstat(part, dir_fd=dirfd).st_mode
                    ):
                        raise Denied(
                            f"{real}: {part!r} became a symlink during the write"
                        ) from None
                    raise
                os.close(dirfd)
                dirfd = nfd
        except BaseException:
            os.close(dirfd)
            raise
        return dirfd, parts[-1]

    def _split_denial(self, new_path: str) -> None:
        """Raise :class:`Denied` (saying why) when the kernel refused to create ``new_path``
        because its directory holds a ``deny_write_within_allow`` subtree.

        Landlock grants rights to whole subtrees: to keep ``root/.git`` read-only it grants
        nothing on ``root`` itself, only on each of its entries, so nothing new can be made
        directly in ``root`` (nor in any directory on the way down to a denied subtree).
        """
        if "landlock" not in self.enforcement:
            return
        parent = os.path.dirname(new_path)
        held = [
            d for d in self.resolved.deny_write_within_allow if d != parent and within(d, parent)
        ]
        if held:
            raise Denied(
                f"{new_path}: nothing new can be created directly in {parent} while it holds "
                f"deny_write_within_allow subtree(s) {held}: Landlock grants write rights to "
                "whole subtrees, so that directory itself is read-only in the kernel layer. "
                "Create it in a subdirectory, or make it exist before the worker starts"
            )

    def _open_file_for_write(self, real: str, *, create: bool = True) -> int:
        dirfd, name = self._open_dir_chain(real, create=create)
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags | (os.O_CREAT if create else 0), 0o666, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise Denied(f"{real} became a symlink during the write") from None
                if isinstance(exc, PermissionError) and create:
                    self._split_denial(real)
                raise
        finally:
            os.close(dirfd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise Denied(f"{real} is not a regular file")
        if info.st_nlink > 1:
            os.close(fd)
            raise Denied(
                f"{real} has {info.st_nlink} hard links: writing through it could change a file "
                "outside the writable roots"
            )
        os.set_blocking(fd, True)
        return fd

    def _read_target(self, path: str) -> str:
        real = os.path.realpath(path)
        reason = self.resolved.read_denied(real)
        if reason:
            raise Denied(reason)
        return real

    # --- requests ---------------------------------------------------------------------------

    def ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "root": self.root,
            "enforcement": self.enforcement,
            "landlock_abi": self.landlock_abi,
            "degraded": self.degraded,
        }

    def shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        self.stop = True
        return {}

    def read(self, request: dict[str, Any]) -> dict[str, Any]:
        path = self._path(request)
        max_bytes = request.get("max_bytes")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
        ):
            raise BadRequest(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self._read_target(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # what was opened, not what the path says now (a swap after the check is caught)
            self._read_target(os.readlink(f"/proc/self/fd/{fd}"))
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            limit = MAX_READ if max_bytes is None else min(max_bytes, MAX_READ)
            if max_bytes is None and info.st_size > MAX_READ:
                raise OSError(
                    errno.EFBIG,
                    f"file is {info.st_size} bytes, over the {MAX_READ}-byte limit of one "
                    "read; pass max_bytes",
                    path,
                )
            chunks: list[bytes] = []
            left = limit
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return {"content": _b64(data), "size": info.st_size, "truncated": info.st_size > len(data)}

    def write(self, request: dict[str, Any]) -> dict[str, Any]:
        path = self._path(request)
        try:
            data = base64.b64decode(_field(request, "content", str), validate=True)
        except ValueError:
            raise BadRequest("write content must be base64") from None
        real = self._write_target(path)
        fd = self._open_file_for_write(real)
        try:
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return {"path": real, "size": len(data)}

    def edit(self, request: dict[str, Any]) -> dict[str, Any]:
        path = self._path(request)
        old = _field(request, "old", str)
        new = _field(request, "new", str)
        if not old:
            raise BadRequest("edit needs a non-empty 'old' text")
        real = self._write_target(path)
        fd = self._open_file_for_write(real, create=False)
        try:
            if os.fstat(fd).st_size > MAX_READ:
                raise OSError(errno.EFBIG, f"file is over the {MAX_READ}-byte edit limit", path)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            text = b"".join(chunks).decode("utf-8")
            count = text.count(old)
            if count != 1:
                raise OSError(
                    errno.EINVAL,
                    f"'old' occurs {count} times in the file; it must occur exactly once",
                    path,
                )
            data = text.replace(old, new).encode("utf-8")
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, "file is not UTF-8 text", path) from None
        finally:
            os.close(fd)
        return {"path": real, "replacements": 1}

    def rename(self, request: dict[str, Any]) -> dict[str, Any]:
        src = self._write_target(self._path(request, "src"), follow_final=False)
        dst = self._write_target(self._path(request, "dst"), follow_final=False)
        src_dir, src_name = self._open_dir_chain(src, create=False)
        try:
            dst_dir, dst_name = self._open_dir_chain(dst, create=True)
            try:
                os.rename(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            finally:
                os.close(dst_dir)
        finally:
            os.close(src_dir)
        return {"src": src, "dst": dst}

    def _relative_pattern(self, pattern: str, name: str) -> str:
        if os.path.isabs(pattern) or ".." in pattern.split("/"):
            raise Denied(f"{name} {pattern!r} must stay inside the root (relative, no '..')")
        return pattern

    def glob(self, request: dict[str, Any]) -> dict[str, Any]:
        import glob as globmod

        pattern = self._relative_pattern(_field(request, "pattern", str), "glob pattern")
        found = globmod.glob(pattern, root_dir=self.root, recursive=True)
        allowed = [
            p
            for p in found
            if not self.resolved.read_denied(os.path.realpath(os.path.join(self.root, p)))
        ]
        return {"paths": sorted(allowed)}

    def grep(self, request: dict[str, Any]) -> dict[str, Any]:
        import fnmatch
        import re

        try:
            regex = re.compile(_field(request, "pattern", str))
        except re.error as exc:
            raise BadRequest(f"grep pattern is not a valid regex: {exc}") from None
        include = request.get("include")
        if include is not None:
            include = self._relative_pattern(_field(request, "include", str), "grep include")
        matches: list[dict[str, Any]] = []
        truncated = False
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                if include is not None and not (
                    fnmatch.fnmatch(rel, include) or fnmatch.fnmatch(name, include)
                ):
                    continue
                if os.path.islink(full) or self.resolved.read_denied(full):
                    continue
                try:
                    if os.path.getsize(full) > MAX_GREP_FILE:
                        continue
                    with open(full, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue
                if b"\x00" in data[:8192]:
                    continue  # binary
                for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                    if regex.search(line):
                        if len(matches) >= MAX_GREP_MATCHES:
                            truncated = True
                            break
                        matches.append({"path": rel, "line": number, "text": line[:MAX_LINE]})
        return {"matches": matches, "truncated": truncated}

    def stat(self, request: dict[str, Any]) -> dict[str, Any]:
        path = self._path(request)
        self._read_target(path)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return {"exists": False}
        is_link = stat.S_ISLNK(info.st_mode)
        if is_link:
            try:
                info = os.stat(path)
            except OSError:
                return {"exists": True, "type": "symlink", "dangling": True, "is_symlink": True}
        mode = info.st_mode
        kind = "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"
        return {
            "exists": True,
            "type": kind,
            "is_symlink": is_link,
            "size": info.st_size,
            "mode": stat.S_IMODE(mode),
            "mtime": info.st_mtime,
            "nlink": info.st_nlink,
            "uid": info.st_uid,
        }

    def get_env(self, request: dict[str, Any]) -> dict[str, Any]:
        names = request.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequest(f"get_env needs 'names' as a list of strings, got {names!r}")
        return {"env": {name: os.environ.get(name) for name in names}}

    def exec(self, request: dict[str, Any]) -> dict[str, Any]:
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise BadRequest(f"exec needs 'argv' as a non-empty list of strings, got {argv!r}")
        timeout = request.get("timeout", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise BadRequest(f"exec timeout must be a positive number, got {timeout!r}")
        if not self.exec_confined and not self.policy.exec_unconfined:
            raise Denied(
                "exec refused: no kernel layer confines the command here (Landlock is off or "
                "unavailable), so it could write outside the root. Run with Landlock, or set "
                "exec_unconfined=True in the policy to accept that"
            )
        return run_command(argv, float(timeout), self.root, self.policy, spare=self.helpers)

    def debug_raw_write(self, request: dict[str, Any]) -> dict[str, Any]:
        """Test hook (``--allow-debug`` only): a raw open+write with no policy check at all."""
        path = _field(request, "path", str)
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(_field(request, "content", str)))
        return {"path": path}

    def debug_connect(self, request: dict[str, Any]) -> dict[str, Any]:
        """Test hook (``--allow-debug`` only): a TCP connect from the worker process itself."""
        host = _field(request, "host", str)
        port = _field(request, "port", int)
        try:
            with socket.create_connection((host, port), timeout=5.0):
                return {"connected": True}
        except OSError as exc:
            return {"connected": False, "errno": exc.errno, "error": f"{type(exc).__name__}: {exc}"}


def run_command(
    argv: list[str],
    timeout: float,
    cwd: str,
    policy: SandboxPolicy,
    *,
    spare: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Run ``argv`` in ``cwd`` (stdout+stderr merged, capped), then kill all it left behind:
    every descendant of this worker but ``spare`` (its helpers)."""
    import selectors
    import subprocess

    limits = policy.limits
    if limits.cpu_seconds or limits.address_space or limits.open_files:
        # rlimits are set by a trampoline that then execs argv (no preexec_fn in the worker)
        trampoline = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rlimit_exec.py")
        spec = f"{limits.cpu_seconds or 0},{limits.address_space or 0},{limits.open_files or 0}"
        if os.access(sys.executable, os.X_OK) and os.access(trampoline, os.R_OK):
            argv = [sys.executable, "-I", "-S", trampoline, spec, *argv]
        else:  # e.g. after dropping to a uid that cannot reach this interpreter
            prlimit = [
                f"--{name}={value}"
                for name, value in (
                    ("cpu", limits.cpu_seconds),
                    ("as", limits.address_space),
                    ("nofile", limits.open_files),
                )
                if value
            ]
            argv = ["prlimit", *prlimit, "--", *argv]
    cap = limits.output_bytes
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            close_fds=True,
        )
    except OSError as exc:
        return {"exit_code": 127, "output": _b64(f"{argv[0]}: {exc.strerror}\n".encode()),
                "truncated": False, "timed_out": False}  # fmt: skip
    assert proc.stdout is not None
    out = bytearray()
    truncated = timed_out = False
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if now - started > timeout:
                timed_out = True
                break
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > 0.2:
                    break  # a background process still holds the pipe
            if not selector.select(timeout=0.05):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            room = cap - len(out)
            if len(chunk) > room:
                truncated = True
            out += chunk[: max(room, 0)]
    left = {proc.pid, *_descendants(os.getpid(), spare)}
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    code = proc.wait()
    proc.stdout.close()
    left.discard(proc.pid)
    _reap_orphans(left)
    return {
        "exit_code": code,
        "output": _b64(bytes(out)),
        "truncated": truncated,
        "timed_out": timed_out,
    }


def _reap_orphans(killed: set[int], wait: float = 1.0) -> None:
    """Collect the zombies of what we just killed (each ends up our child: we are a child
    subreaper), waiting up to ``wait`` seconds for them, and any other zombie child."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            killed.discard(pid)
            continue
        if not killed or time.monotonic() > deadline:
            return
        time.sleep(0.001)


def serve(conn: socket.socket, worker: Worker, frame_timeout: float) -> None:
    """Answer frames on ``conn`` until EOF, ``shutdown`` or a stream that is out of sync."""
    reader = protocol.FrameReader(conn)
    while not worker.stop:
        try:
            request = reader.read(frame_timeout=frame_timeout)
        except protocol.ConnectionClosed:
            return
        except protocol.FrameError as exc:
            try:
                protocol.write_frame(conn, protocol.error("protocol", str(exc)))
            except OSError:
                return
            if exc.fatal:
                _linger(conn)
                return
            continue
        except OSError:
            return
        reply = worker.handle(request)
        try:
            data = protocol.encode(reply)
        except ValueError as exc:
            data = protocol.encode(protocol.error("internal", f"reply too large: {exc}"))
        try:
            conn.sendall(data)
        except OSError:
            return


def _linger(conn: socket.socket, budget: int = 1 << 20, seconds: float = 0.2) -> None:
    """Before closing on a fatal frame: let the peer read our error reply.

    Closing with unread input makes the kernel reset the connection, and the reply is lost;
    so half-close, then discard a bounded amount of input for a bounded time.
    """
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        while budget > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            chunk = conn.recv(min(budget, 65536))
            if not chunk:
                return
            budget -= len(chunk)


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"pytest_sandbox.fsworker: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except Usage as exc:
        return _fail(EXIT_USAGE, f"{exc}\n{USAGE}")
    try:
        policy = SandboxPolicy.from_json(os.environ.get(POLICY_ENV) or "{}")
        root = args.get("--root", os.getcwd())
        if not os.path.isdir(root):
            return _fail(EXIT_USAGE, f"--root {root!r} is not a directory; create it first")
        resolved = policy.resolve(root)
    except FsPolicyInvalid as exc:
        return _fail(EXIT_USAGE, f"bad policy in {POLICY_ENV}: {exc}")
    if system_path_reason(resolved.root):
        return _fail(EXIT_USAGE, f"--root {root!r}: {system_path_reason(resolved.root)}")

    socket_path = args["--socket"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(socket_path)
        listener.listen(1)
    except OSError as exc:
        return _fail(EXIT_USAGE, f"cannot listen on {socket_path!r}: {exc.strerror}")

    kernel = args.get("--kernel", "auto")
    enforcement = ["policy"]
    abi = 0
    exec_confined = False
    from pytest_sandbox.fsworker import enforce

    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if "--uid" in args:
        # What the handlers import lazily may sit where the new uid cannot read (/root/...).
        import encodings.idna  # noqa: F401 - getaddrinfo() encodes host names with it
        import fnmatch  # noqa: F401
        import glob  # noqa: F401
        import re  # noqa: F401
        import selectors  # noqa: F401
        import subprocess  # noqa: F401

        if policy.net is not None:  # the network-namespace fallback may need it after the drop
            from pytest_sandbox.fsworker import egress

        uid = int(args["--uid"])
        gid = int(args.get("--gid", args["--uid"]))
        try:
            enforce.drop_privileges(uid, gid)
        except enforce.EnforceError as exc:
            return _fail(EXIT_USAGE, str(exc))
        enforcement.append(f"uid:{uid}")
    degraded: list[str] = []
    egress_state: tuple[Any, Any, int] | None = None
    if kernel != "off":
        abi = enforce.landlock_abi()
        proxy_port = int(args["--proxy-port"]) if "--proxy-port" in args else None
        proxy_host = args.get("--proxy-host", "127.0.0.1")
        net_layer = args.get("--net-layer", "auto")
        landlock_net = policy.net is not None and net_layer != "netns" and abi >= 4
        if policy.net is not None and not landlock_net:
            why_not_landlock = (
                "Landlock network rules were not used (--net-layer netns)"
                if abi >= 4
                else f"Landlock ABI {abi} has no network rules (ABI >= 4 needed)"
            )
            problem: str | None = None
            if net_layer == "landlock":
                problem = "--net-layer landlock forbids the network-namespace fallback"
            else:
                try:
                    egress_state = _enter_egress_netns(proxy_host, proxy_port)
                except enforce.EnforceError as exc:
                    problem = f"no network namespace either: {exc}"
                else:
                    enforcement.append("netns")
            if problem is not None:
                message = (
                    f"TCP egress cannot be limited to the proxy: {why_not_landlock}; {problem}"
                )
                if kernel == "require":
                    return _fail(
                        EXIT_NET,
                        f"--sandbox-kernel=require and the policy sets net: {message}. Fix: "
                        f"{enforce.NETNS_FIX}; or --sandbox-kernel=auto to rely on the proxy "
                        "variables alone (a command can then ignore them)",
                    )
                degraded.append(f"net: {message}")
                sys.stderr.write(f"pytest_sandbox.fsworker: {message}\n")
        try:
            plan = enforce.plan_landlock(
                abi=abi,
                allow_write=resolved.allow_write,
                deny_write_within_allow=resolved.deny_write_within_allow,
                deny_read=resolved.deny_read,
                limit_net=landlock_net,
                connect_ports=[proxy_port] if proxy_port else [],
            )
            enforce.apply_landlock(plan)
        except enforce.EnforceError as exc:
            if kernel == "require":
                return _fail(
                    EXIT_KERNEL,
                    f"--sandbox-kernel=require but the kernel layer cannot be applied: {exc} "
                    f"(Landlock ABI {abi}). Use a kernel with Landlock enabled (lsm=landlock), "
                    "or --sandbox-kernel=auto to run with the worker's own checks only",
                )
            degraded.append(f"landlock: {exc}")
            sys.stderr.write(f"pytest_sandbox.fsworker: kernel layer off: {exc}\n")
        else:
            enforcement.append("landlock")
            exec_confined = True
            if plan.handled_net:
                enforcement.append("landlock-net")
            if plan.scoped:
                enforcement.append("landlock-scope")
        if egress_state is not None and egress_state[0] is not None:
            from pytest_sandbox.fsworker import egress

            # after Landlock: a thread inherits the domain of the thread that starts it
            egress.Forwarder(egress_state[0], egress_state[1]).start()

    worker = Worker(
        policy,
        resolved,
        enforcement=enforcement,
        landlock_abi=abi,
        allow_debug="--allow-debug" in args,
        exec_confined=exec_confined,
        degraded=degraded,
        helpers=frozenset([egress_state[2]]) if egress_state and egress_state[2] else frozenset(),
    )
    frame_timeout = float(args.get("--frame-timeout", "10"))
    # nobody connecting means whoever started us is gone (a client connects right after ready)
    listener.settimeout(float(args.get("--accept-timeout", DEFAULT_ACCEPT_TIMEOUT)))
    os.write(1, b"ready\n")
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return _fail(1, "nobody connected after ready: the client is gone; exiting")
    except OSError as exc:
        return _fail(1, f"accept failed: {exc.strerror}")
    conn.settimeout(None)
    listener.close()
    with conn:
        serve(conn, worker, frame_timeout)
    if egress_state is not None:
        _stop_connector(egress_state[1], egress_state[2])
    return 0


def _enter_egress_netns(host: str, port: int | None) -> tuple[Any, Any, int]:
    """Fork the egress connector, enter a fresh user + net namespace, listen on the proxy's
    address in it. Returns (listener, channel, connector pid); no proxy: (None, None, 0)."""
    from pytest_sandbox.fsworker import egress, enforce

    chan, pid = egress.fork_connector(host, port) if port else (None, 0)
    try:
        enforce.enter_netns()
        try:
            listener = egress.listen(host, port) if port else None
        except OSError as exc:
            raise enforce.EnforceError(
                f"cannot listen on {host}:{port} inside the network namespace: {exc.strerror}"
            ) from None
        enforce.drop_bounding_capabilities()
    except enforce.EnforceError:
        _stop_connector(chan, pid)
        raise
    return listener, chan, pid


def _stop_connector(chan: Any, pid: int) -> None:
    """Close the connector's channel (it exits on EOF) and reap it, so our group is empty."""
    if chan is None:
        return
    chan.close()
    deadline = time.monotonic() + 1.0
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.005)
