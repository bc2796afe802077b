"""W3C Trace Context (``traceparent`` / ``tracestate``) for launched backends.

Only version ``00`` traceparents are accepted, in the exact lowercase form
``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`` with non-zero ids. ``tracestate`` is
checked member by member (keys and values per the spec, no duplicate keys) and limited to 32
members. Anything else raises :class:`~pytest_sandbox.errors.InvalidTraceContext`: a test that
passes a broken context wants to know, not to have it silently dropped.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from pytest_sandbox.errors import InvalidTraceContext

TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# key = simple-key / multi-tenant-key (W3C Trace Context, section 3.3.1.3.1)
_SIMPLE_KEY = r"[a-z][a-z0-9_\-*/]{0,255}"
_TENANT_KEY = r"[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
TRACESTATE_KEY_RE = re.compile(rf"(?:{_SIMPLE_KEY}|{_TENANT_KEY})")
# value = 0*255(chr) nblk-chr ; chr = %x20 / nblk-chr ; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E
TRACESTATE_VALUE_RE = re.compile(
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE_MEMBERS = 32


def _refuse(value: object, problem: str) -> InvalidTraceContext:
    return InvalidTraceContext(
        "trace",
        value,
        problem,
        "Pass a W3C traceparent '00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>' with "
        "non-zero ids (TraceContext.new() makes one) and at most 32 tracestate members.",
    )


def validate_traceparent(value: str) -> str:
    """Return ``value`` when it is a valid version-00 traceparent, else raise."""
    if not isinstance(value, str):
        raise _refuse(value, "traceparent must be a string")
    match = TRACEPARENT_RE.fullmatch(value)
    if match is None:
        raise _refuse(value, "traceparent is not '00-<32 hex>-<16 hex>-<2 hex>' in lowercase")
    trace_id, parent_id, _flags = match.groups()
    if trace_id == "0" * 32:
        raise _refuse(value, "traceparent has an all-zero trace id")
    if parent_id == "0" * 16:
        raise _refuse(value, "traceparent has an all-zero parent id")
    return value


def validate_tracestate(value: str) -> str:
    """Return ``value`` normalised (no blank members, no spaces around commas), else raise."""
    if not isinstance(value, str):
        raise _refuse(value, "tracestate must be a string")
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if len(members) > MAX_TRACESTATE_MEMBERS:
        raise _refuse(
            value, f"tracestate has {len(members)} members, over {MAX_TRACESTATE_MEMBERS}"
        )
    seen: set[str] = set()
    for member in members:
        key, sep, val = member.partition("=")
        if not sep or not TRACESTATE_KEY_RE.fullmatch(key):
            raise _refuse(value, f"tracestate member {member!r} has no valid key")
        if not TRACESTATE_VALUE_RE.fullmatch(val):
            raise _refuse(value, f"tracestate member {member!r} has an invalid value")
        if key in seen:
            raise _refuse(value, f"tracestate key {key!r} appears twice")
        seen.add(key)
    return ",".join(members)


@dataclass(frozen=True)
class TraceContext:
    """A validated W3C trace context, handed to a backend as ``TRACEPARENT`` / ``TRACESTATE``."""

    traceparent: str
    tracestate: str | None = None

    def __post_init__(self) -> None:
        validate_traceparent(self.traceparent)
        if self.tracestate is not None:
            object.__setattr__(self, "tracestate", validate_tracestate(self.tracestate) or None)

    @classmethod
    def new(cls, *, sampled: bool = True, tracestate: str | None = None) -> TraceContext:
        """A fresh context with random (non-zero) trace and parent ids."""
        trace_id = secrets.token_hex(16)
        parent_id = secrets.token_hex(8)
        if trace_id == "0" * 32 or parent_id == "0" * 16:  # pragma: no cover - 2**-64
            return cls.new(sampled=sampled, tracestate=tracestate)
        flags = "01" if sampled else "00"
        return cls(f"00-{trace_id}-{parent_id}-{flags}", tracestate)

    @classmethod
    def coerce(cls, value: TraceContext | str | Mapping[str, str] | None) -> TraceContext | None:
        """Accept a ``TraceContext``, a traceparent string, or a carrier mapping
        (``{"traceparent": ..., "tracestate": ...}``, keys case-insensitive)."""
        if value is None or isinstance(value, TraceContext):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            lowered = {str(k).lower(): v for k, v in value.items()}
            if "traceparent" not in lowered:
                raise _refuse(value, "carrier mapping has no 'traceparent'")
            return cls(lowered["traceparent"], lowered.get("tracestate"))
        raise _refuse(value, "expected a TraceContext, a traceparent string or a mapping")

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def parent_id(self) -> str:
        return self.traceparent[36:52]

    @property
    def sampled(self) -> bool:
        return bool(int(self.traceparent[53:55], 16) & 1)

    def env(self) -> dict[str, str]:
        """The environment variables a backend receives for this context."""
        env = {"TRACEPARENT": self.traceparent}
        if self.tracestate:
            env["TRACESTATE"] = self.tracestate
        return env
