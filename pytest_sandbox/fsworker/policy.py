"""SandboxPolicy: what a fs worker may write, read and reach — immutable, JSON round-trip.

Stdlib only plus :mod:`pytest_sandbox.errors` (dependency-free), because the worker imports it
at start-up. Paths in a policy are absolute, or relative to the worker's root (so one policy
value serves every fresh root of a pool bucket). ``compose(parent, child)`` only ever narrows.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pytest_sandbox.errors import FsPolicyInvalid

#: Environment variable carrying the policy (JSON) into the worker.
POLICY_ENV = "PYTEST_SANDBOX_FS_POLICY"

#: Paths that are never a write target themselves (their subtrees may be, e.g. a dir in /tmp).
SYSTEM_EXACT = frozenset(
    {"/", "/tmp", "/var", "/var/tmp", "/home", "/root", "/run", "/opt", "/srv", "/mnt", "/media"}
)
#: Trees no write ever reaches.
SYSTEM_TREES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
)

#: Cap of one exec's captured output, and the default when the policy sets none; keeps a
#: reply frame (base64) under the 1 MiB frame limit.
MAX_OUTPUT_BYTES = 512 * 1024

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def within(path: str, base: str) -> bool:
    """True when ``path`` is ``base`` or below it (both normalised, same kind)."""
    if base == "/":
        return path.startswith("/")
    if base == ".":
        return not os.path.isabs(path) and not path.startswith("..")
    return path == base or path.startswith(base + "/")


def _norm(path: object, what: str) -> str:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise FsPolicyInvalid(f"{what}: {path!r} is not a path (a non-empty string without NUL)")
    normed = os.path.normpath(path)
    if normed.startswith("//"):
        normed = "/" + normed.lstrip("/")
    if not os.path.isabs(normed) and (normed == ".." or normed.startswith("../")):
        raise FsPolicyInvalid(
            f"{what}: {path!r} climbs out of the root; use an absolute path instead"
        )
    return normed


def _paths(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise FsPolicyInvalid(f"{what} must be a list of paths, got {value!r}")
    return tuple(sorted({_norm(p, what) for p in value}))


def system_path_reason(path: str) -> str | None:
    """Why an absolute, resolved path is a system path no write may touch (None if it is not)."""
    home = os.path.normpath(os.path.expanduser("~"))
    if path in SYSTEM_EXACT or path == home:
        return f"{path} is a system directory"
    for tree in SYSTEM_TREES:
        if within(path, tree):
            return f"{path} is inside the system tree {tree}"
    return None


def check_host_pattern(pattern: object) -> str:
    """Validate a ``net.allow`` host pattern: an exact host, or one leftmost ``*.`` label."""
    if not isinstance(pattern, str) or not pattern:
        raise FsPolicyInvalid(f"net.allow: {pattern!r} is not a host pattern")
    host = pattern.lower().rstrip(".")
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if any(not _LABEL.match(label) for label in labels):
        raise FsPolicyInvalid(
            f"net.allow: {pattern!r} is not a host pattern: use an exact host name or IP "
            "('api.example.com', '127.0.0.1') or one leftmost wildcard label ('*.example.com')"
        )
    if host.startswith("*.") and len(labels) < 2:
        raise FsPolicyInvalid(f"net.allow: {pattern!r} is too broad: '*.' needs a domain below it")
    return host


def host_matches(host: str, pattern: str) -> bool:
    """``*.example.com`` matches exactly one extra label (``a.example.com``), not the apex."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


def _pattern_covers(parent: str, child: str) -> bool:
    if parent == child:
        return True
    return parent.startswith("*.") and not child.startswith("*.") and host_matches(child, parent)


@dataclass(frozen=True)
class NetPolicy:
    """Network egress: only through the egress proxy, only to hosts matching ``allow``."""

    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.allow, str) or not isinstance(self.allow, Iterable):
            raise FsPolicyInvalid(f"net.allow must be a list of host patterns, got {self.allow!r}")
        object.__setattr__(
            self, "allow", tuple(sorted({check_host_pattern(p) for p in self.allow}))
        )

    def allows(self, host: str) -> bool:
        return any(host_matches(host, pattern) for pattern in self.allow)


@dataclass(frozen=True)
class Limits:
    """Resource limits of commands run by ``exec`` (None: no limit)."""

    cpu_seconds: int | None = None
    address_space: int | None = None
    open_files: int | None = None
    output_bytes: int = MAX_OUTPUT_BYTES

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.name != "output_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FsPolicyInvalid(
                    f"limits.{item.name} must be a positive integer, got {value!r}"
                )
        if self.output_bytes > MAX_OUTPUT_BYTES:
            raise FsPolicyInvalid(
                f"limits.output_bytes = {self.output_bytes} is over {MAX_OUTPUT_BYTES}, the most "
                "one reply frame can carry"
            )

    def narrowed(self, other: Limits) -> Limits:
        def lower(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(
            cpu_seconds=lower(self.cpu_seconds, other.cpu_seconds),
            address_space=lower(self.address_space, other.address_space),
            open_files=lower(self.open_files, other.open_files),
            output_bytes=min(self.output_bytes, other.output_bytes),
        )


@dataclass(frozen=True)
class ResolvedPolicy:
    """A policy bound to one root: every path absolute and resolved."""

    root: str
    allow_write: tuple[str, ...]
    deny_write_within_allow: tuple[str, ...]
    deny_read: tuple[str, ...]

    def write_denied(self, real: str) -> str | None:
        """Why a write to the resolved path ``real`` is denied, or None when it is allowed."""
        reason = system_path_reason(real)
        if reason:
            return reason
        if not any(within(real, base) for base in self.allow_write):
            return f"{real} is outside the writable roots {list(self.allow_write)}"
        for denied in self.deny_write_within_allow:
            if within(real, denied):
                return f"{real} is under {denied} (deny_write_within_allow)"
        return None

    def read_denied(self, real: str) -> str | None:
        for denied in self.deny_read:
            if within(real, denied):
                return f"{real} is under {denied} (deny_read)"
        return None


@dataclass(frozen=True)
class SandboxPolicy:
    """What a fs worker may do. Immutable; ``to_json()`` / ``from_json()`` round-trip.

    - ``allow_write``: writable roots; None means the worker's root.
    - ``deny_write_within_allow``: subtrees of the writable roots that stay read-only.
    - ``deny_read``: subtrees nothing may read.
    - ``net``: None leaves the network alone; a :class:`NetPolicy` limits TCP egress to the
      egress proxy, which lets through only hosts matching ``net.allow``.
    - ``limits``: rlimits and the output cap of ``exec``.
    - ``exec_unconfined``: allow ``exec`` when no kernel layer confines the command (off by
      default: without Landlock a command could write anywhere the worker's uid can).
    """

    allow_write: tuple[str, ...] | None = None
    deny_write_within_allow: tuple[str, ...] = ()
    deny_read: tuple[str, ...] = ()
    net: NetPolicy | None = None
    limits: Limits = field(default_factory=Limits)
    exec_unconfined: bool = False

    def __post_init__(self) -> None:
        if self.allow_write is not None:
            allow = _paths(self.allow_write, "allow_write")
            for path in allow:
                reason = system_path_reason(path) if os.path.isabs(path) else None
                if reason:
                    raise FsPolicyInvalid(
                        f"allow_write: {reason}; writable roots must be project directories "
                        "(e.g. a tmp dir), never system paths"
                    )
            object.__setattr__(self, "allow_write", allow)
        object.__setattr__(
            self,
            "deny_write_within_allow",
            _paths(self.deny_write_within_allow, "deny_write_within_allow"),
        )
        object.__setattr__(self, "deny_read", _paths(self.deny_read, "deny_read"))
        if self.net is not None and not isinstance(self.net, NetPolicy):
            raise FsPolicyInvalid(f"net must be a NetPolicy or None, got {self.net!r}")
        if not isinstance(self.limits, Limits):
            raise FsPolicyInvalid(f"limits must be a Limits, got {self.limits!r}")
        if not isinstance(self.exec_unconfined, bool):
            raise FsPolicyInvalid(f"exec_unconfined must be a bool, got {self.exec_unconfined!r}")

    # --- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow_write": None if self.allow_write is None else list(self.allow_write),
            "deny_write_within_allow": list(self.deny_write_within_allow),
            "deny_read": list(self.deny_read),
            "net": None if self.net is None else {"allow": list(self.net.allow)},
            "limits": {
                "cpu_seconds": self.limits.cpu_seconds,
                "address_space": self.limits.address_space,
                "open_files": self.limits.open_files,
                "output_bytes": self.limits.output_bytes,
            },
            "exec_unconfined": self.exec_unconfined,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> SandboxPolicy:
        if not isinstance(data, Mapping):
            raise FsPolicyInvalid(f"a policy must be a JSON object, got {data!r}")
        known = {"allow_write", "deny_write_within_allow", "deny_read", "net", "limits",
                 "exec_unconfined"}  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise FsPolicyInvalid(
                f"unknown policy field(s) {unknown}; known fields are {sorted(known)}"
            )
        net = data.get("net")
        if net is not None:
            if not isinstance(net, Mapping) or set(net) - {"allow"}:
                raise FsPolicyInvalid(f"net must be {{'allow': [...]}} or null, got {net!r}")
            net = NetPolicy(allow=tuple(net.get("allow", ())))
        limits = data.get("limits") or {}
        if not isinstance(limits, Mapping):
            raise FsPolicyInvalid(f"limits must be an object, got {limits!r}")
        unknown_limits = sorted(set(limits) - {f.name for f in fields(Limits)})
        if unknown_limits:
            raise FsPolicyInvalid(f"unknown limits field(s) {unknown_limits}")
        limit_values = {k: v for k, v in limits.items() if v is not None}
        allow = data.get("allow_write")
        return cls(
            allow_write=None if allow is None else _paths(allow, "allow_write"),
            deny_write_within_allow=_paths(
                data.get("deny_write_within_allow", ()), "deny_write_within_allow"
            ),
            deny_read=_paths(data.get("deny_read", ()), "deny_read"),
            net=net,
            limits=Limits(**limit_values),
            exec_unconfined=data.get("exec_unconfined", False),
        )

    @classmethod
    def from_json(cls, text: str) -> SandboxPolicy:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise FsPolicyInvalid(f"the policy is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # --- binding to a root ---------------------------------------------------------------

    def resolve(self, root: str | os.PathLike[str]) -> ResolvedPolicy:
        """Bind to ``root``: relative paths become absolute; symlinks in them are resolved."""
        real_root = os.path.realpath(root)

        def absolute(paths: Iterable[str]) -> tuple[str, ...]:
            return tuple(sorted({os.path.realpath(os.path.join(real_root, p)) for p in paths}))

        allow = absolute(self.allow_write if self.allow_write is not None else (".",))
        for path in allow:
            reason = system_path_reason(path)
            if reason:
                raise FsPolicyInvalid(
                    f"writable root {path}: {reason}; pick a project directory as the root"
                )
        return ResolvedPolicy(
            root=real_root,
            allow_write=allow,
            deny_write_within_allow=absolute(self.deny_write_within_allow),
            deny_read=absolute(self.deny_read),
        )


def _effective_allow(policy: SandboxPolicy) -> tuple[str, ...]:
    return policy.allow_write if policy.allow_write is not None else (".",)


def compose(parent: SandboxPolicy, child: SandboxPolicy) -> SandboxPolicy:
    """The policy allowing only what both allow: ``child`` can narrow ``parent``, never widen it.

    Writable roots are intersected (a relative and an absolute root never intersect, so mix
    them only through :meth:`SandboxPolicy.resolve`); deny lists are united; ``net.allow``
    keeps only the child's patterns a parent pattern covers; limits take the lower value.
    """
    allow: set[str] = set()
    for c in _effective_allow(child):
        for p in _effective_allow(parent):
            if os.path.isabs(c) != os.path.isabs(p):
                continue
            if within(c, p):
                allow.add(c)
            elif within(p, c):
                allow.add(p)
    if parent.net is None:
        net = child.net
    elif child.net is None:
        net = parent.net
    else:
        net = NetPolicy(
            allow=tuple(
                c for c in child.net.allow if any(_pattern_covers(p, c) for p in parent.net.allow)
            )
        )
    allow_write: tuple[str, ...] | None = tuple(sorted(allow))
    if allow_write == (".",):
        allow_write = None
    return replace(
        child,
        allow_write=allow_write,
        deny_write_within_allow=tuple(
            set(parent.deny_write_within_allow) | set(child.deny_write_within_allow)
        ),
        deny_read=tuple(set(parent.deny_read) | set(child.deny_read)),
        net=net,
        limits=parent.limits.narrowed(child.limits),
        exec_unconfined=parent.exec_unconfined and child.exec_unconfined,
    )


DEFAULT_POLICY = SandboxPolicy()
