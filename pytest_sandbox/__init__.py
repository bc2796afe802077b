"""pytest-sandbox: real, isolated test environments with teardown guarantees.

Cheap to import: the public names below are loaded on first use (``__getattr__``), so child
processes such as the fs worker can import a submodule without paying for psutil or sqlite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SandboxError": "pytest_sandbox.errors",
    "CleanupStack": "pytest_sandbox.runtime.cleanup",
    "ProcessIdentity": "pytest_sandbox.runtime.identity",
    "Ledger": "pytest_sandbox.runtime.ledger",
    "Tracker": "pytest_sandbox.runtime.ledger",
    "TrackedProcess": "pytest_sandbox.runtime.processes",
    "RunContext": "pytest_sandbox.runtime.run",
    "HttpStatus": "pytest_sandbox.runtime.waiting",
    "LogRegex": "pytest_sandbox.runtime.waiting",
    "TcpPort": "pytest_sandbox.runtime.waiting",
    "UnixSocket": "pytest_sandbox.runtime.waiting",
    "wait_for": "pytest_sandbox.runtime.waiting",
}

if TYPE_CHECKING:
    from pytest_sandbox.errors import SandboxError
    from pytest_sandbox.runtime.cleanup import CleanupStack
    from pytest_sandbox.runtime.identity import ProcessIdentity
    from pytest_sandbox.runtime.ledger import Ledger, Tracker
    from pytest_sandbox.runtime.processes import TrackedProcess
    from pytest_sandbox.runtime.run import RunContext
    from pytest_sandbox.runtime.waiting import HttpStatus, LogRegex, TcpPort, UnixSocket, wait_for


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CleanupStack",
    "HttpStatus",
    "Ledger",
    "LogRegex",
    "ProcessIdentity",
    "RunContext",
    "SandboxError",
    "TcpPort",
    "TrackedProcess",
    "Tracker",
    "UnixSocket",
    "__version__",
    "wait_for",
]
