"""The sandboxed fs worker: a subprocess confined to a writable root, spoken to over a socket.

This package's ``__init__`` stays empty of imports: the worker process imports
``pytest_sandbox.fsworker.worker`` and must not pay for the client side (psutil, the ledger).
The public names are loaded on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_sandbox.fsworker.client import ExecResult, FsWorker
    from pytest_sandbox.fsworker.policy import Limits, NetPolicy, SandboxPolicy, compose
    from pytest_sandbox.fsworker.pool import FsWorkerPool
    from pytest_sandbox.fsworker.proxy import EgressProxy

_EXPORTS = {
    "ExecResult": "client",
    "FsWorker": "client",
    "Limits": "policy",
    "NetPolicy": "policy",
    "SandboxPolicy": "policy",
    "compose": "policy",
    "FsWorkerPool": "pool",
    "EgressProxy": "proxy",
}

__all__ = [
    "EgressProxy",
    "ExecResult",
    "FsWorker",
    "FsWorkerPool",
    "Limits",
    "NetPolicy",
    "SandboxPolicy",
    "compose",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
