"""Verified backend launcher: allow-listed binaries, verified identity, trace context."""

from __future__ import annotations

from pytest_sandbox.launcher.identity import BackendIdentity
from pytest_sandbox.launcher.launcher import (
    BackendHandle,
    BackendLauncher,
    Endpoint,
    ServiceDefinition,
    release_backend,
)
from pytest_sandbox.launcher.trace import TraceContext

__all__ = [
    "BackendHandle",
    "BackendIdentity",
    "BackendLauncher",
    "Endpoint",
    "ServiceDefinition",
    "TraceContext",
    "release_backend",
]
