"""The kernel layer: Landlock (raw syscalls through ctypes), no_new_privs, dropping to a uid,
and the user + network namespace of the egress fallback (see :mod:`.egress`).

Stdlib only (the worker imports this module at start-up). Landlock is an allow-list applied by
a process to itself and inherited by everything it starts; it cannot be lifted. We handle every
write right (plus READ_FILE when the policy denies reads, plus TCP bind/connect when it limits
the network) and grant them back only where the policy allows. Landlock scopes (ABI 6) also cut
signals and abstract Unix sockets to processes outside the sandbox.

Limits of the layer (see docs/fsworker.md): chmod/chown/utime/xattr are not Landlock rights;
connecting to an existing path-named Unix socket is not restricted; a hard link made *before*
the worker started is writable through its in-root path (the worker's own checks refuse it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

# Syscall numbers are shared by every architecture (added in the unified table, Linux 5.13).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

#: Rights that make sense on a non-directory (others on a file's rule are EINVAL).
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE

WRITE_RIGHTS_V1 = (
    FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_CHAR
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_BLOCK
    | FS_MAKE_SYM
)

#: Device files every shell expects to write to.
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


class EnforceError(Exception):
    """The kernel layer could not be applied (the worker turns this into its exit reason)."""


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _syscall(number: int, *args: object) -> int:
    result = int(_lib().syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))  # fmt: skip
    except OSError:
        return 0


def write_rights(abi: int) -> int:
    rights = WRITE_RIGHTS_V1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    return rights


def _within(path: str, base: str) -> bool:
    return base == "/" or path == base or path.startswith(base + "/")


@dataclass
class LandlockPlan:
    """What :func:`apply_landlock` will grant; built first so it can be inspected and tested."""

    abi: int
    handled_fs: int
    handled_net: int = 0
    scoped: int = 0
    path_rules: list[tuple[str, int]] = field(default_factory=list)
    connect_ports: list[int] = field(default_factory=list)

    def grant_except(self, path: str, rights: int, excluded: Iterable[str]) -> None:
        """Grant ``rights`` beneath ``path``, except beneath any of ``excluded``.

        Landlock rules only add rights, so a hole is made by granting every sibling along the
        way down to the excluded subtree instead of its ancestor.
        """
        inner = [e for e in excluded if _within(e, path)]
        if not inner:
            self.path_rules.append((path, rights))
            return
        if path in inner:
            return
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            if entry.is_symlink():
                continue  # Landlock checks the resolved target, which has its own rule
            child = os.path.join(path, entry.name)
            self.grant_except(child, rights, inner)


def plan_landlock(
    *,
    abi: int,
    allow_write: Iterable[str],
    deny_write_within_allow: Iterable[str] = (),
    deny_read: Iterable[str] = (),
    limit_net: bool = False,
    connect_ports: Iterable[int] = (),
) -> LandlockPlan:
    """The ruleset for a resolved policy (all paths absolute and resolved)."""
    if abi < 1:
        raise EnforceError("Landlock is not available in this kernel")
    writes = write_rights(abi)
    deny_read = list(deny_read)
    plan = LandlockPlan(abi=abi, handled_fs=writes | (FS_READ_FILE if deny_read else 0))
    deny_within = list(deny_write_within_allow)
    for root in allow_write:
        plan.grant_except(root, writes, deny_within)
    for device in WRITABLE_DEVICES:
        plan.path_rules.append((device, FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)))
    if deny_read:
        plan.grant_except("/", FS_READ_FILE, deny_read)
    if limit_net:
        if abi < 4:
            raise EnforceError(
                f"Landlock ABI {abi} has no network rules (ABI 4 needed) to limit TCP egress"
            )
        plan.handled_net = NET_BIND_TCP | NET_CONNECT_TCP
        plan.connect_ports = sorted(set(connect_ports))
    if abi >= 6:
        plan.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    return plan


def set_no_new_privs() -> None:
    if _lib().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise EnforceError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")


def apply_landlock(plan: LandlockPlan) -> int:
    """Restrict this process (and all it will start) to ``plan``; returns the rule count."""
    attr = _RulesetAttr(plan.handled_fs, plan.handled_net, plan.scoped)
    try:
        ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))  # fmt: skip
    except OSError as exc:
        raise EnforceError(f"landlock_create_ruleset failed: {exc.strerror}") from None
    count = 0
    try:
        for path, rights in plan.path_rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone since planning: nothing to grant
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= FILE_RIGHTS
                rights &= plan.handled_fs
                if not rights:
                    continue
                rule = _PathBeneathAttr(rights, fd)
                _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                         ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                         ctypes.c_uint32(0))  # fmt: skip
                count += 1
            except OSError as exc:
                raise EnforceError(f"landlock_add_rule({path}) failed: {exc.strerror}") from None
            finally:
                os.close(fd)
        for port in plan.connect_ports:
            net_rule = _NetPortAttr(NET_CONNECT_TCP, port)
            try:
                _syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                         ctypes.c_int(LANDLOCK_RULE_NET_PORT), ctypes.byref(net_rule),
                         ctypes.c_uint32(0))  # fmt: skip
            except OSError as exc:
                raise EnforceError(
                    f"landlock_add_rule(port {port}) failed: {exc.strerror}"
                ) from None
            count += 1
        set_no_new_privs()
        try:
            _syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        except OSError as exc:
            raise EnforceError(f"landlock_restrict_self failed: {exc.strerror}") from None
    finally:
        os.close(ruleset)
    return count


CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_CAPBSET_DROP = 24
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
CAP_LAST_CAP_MAX = 63
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

#: What to do where unprivileged user namespaces are refused (said in every netns error).
NETNS_FIX = (
    "allow user namespaces (sysctl user.max_user_namespaces > 0; on Debian/Ubuntu kernels "
    "also kernel.unprivileged_userns_clone=1 or kernel.apparmor_restrict_unprivileged_userns=0), "
    "or run on a kernel with Landlock ABI >= 4"
)


def enter_netns() -> None:
    """Move this (single-threaded) process into a new user + network namespace.

    The uid and gid are mapped to themselves (one id each: all an unprivileged process may
    map), so file access is unchanged for a non-root uid; root keeps its powers only over
    root-owned files, and loses every capability over the host (it cannot ``setns`` back).
    The new namespace has only a loopback interface, brought up here. Raises
    :class:`EnforceError` naming the step that failed and the fix.
    """
    uid, gid = os.geteuid(), os.getegid()
    try:
        if _lib().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except OSError as exc:
        raise EnforceError(
            f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed as uid {uid}: {exc.strerror}; " + NETNS_FIX
        ) from None
    # After a setuid the process is not dumpable, and its /proc/self files belong to root:
    # it could not write its own maps. Dumpable only for these writes.
    dumpable = _lib().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    _lib().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    except OSError as exc:
        raise EnforceError(f"writing {exc.filename} in the new user namespace failed: "
                           f"{exc.strerror}") from None  # fmt: skip
    finally:
        if dumpable != 1:
            _lib().prctl(PR_SET_DUMPABLE, max(dumpable, 0), 0, 0, 0)
    loopback_up()


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace (needs CAP_NET_ADMIN there)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
        except OSError as exc:
            raise EnforceError(f"cannot bring up lo in the new network namespace: "
                               f"{exc.strerror}") from None  # fmt: skip


def drop_bounding_capabilities() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP, which :func:`enter_netns` gives).

    After :func:`enter_netns` the worker holds every capability *inside* its namespaces; a
    command it execs as uid 0 would get them all back (CAP_NET_ADMIN over the namespace, …).
    With an empty bounding set an exec gains none. The worker keeps its own (they reach
    nothing outside its namespaces), so a root worker still writes root-owned files as root.
    """
    lib = _lib()
    for cap in range(CAP_LAST_CAP_MAX + 1):
        if lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                return  # past the kernel's last capability
            raise EnforceError(f"prctl(PR_CAPBSET_DROP, {cap}) failed: {os.strerror(err)}")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (no supplementary groups). Needs root to change."""
    if os.getuid() == uid and os.geteuid() == uid:
        return
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise EnforceError(f"cannot switch to uid {uid} / gid {gid}: {exc.strerror}") from None
    if os.geteuid() != uid or os.getegid() != gid:
        raise EnforceError(f"still euid {os.geteuid()} after switching to uid {uid}")
