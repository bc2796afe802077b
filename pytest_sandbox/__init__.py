"""pytest-sandbox: real, isolated test environments with teardown guarantees.

Cheap to import: only the runtime's light classes are re-exported here; environment packages
(containers, bundles, …) are imported when their fixtures are first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pytest_sandbox.errors import SandboxError
from pytest_sandbox.runtime.cleanup import CleanupStack
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Ledger, Tracker
from pytest_sandbox.runtime.processes import TrackedProcess
from pytest_sandbox.runtime.run import RunContext
from pytest_sandbox.runtime.waiting import HttpStatus, LogRegex, TcpPort, UnixSocket, wait_for

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
