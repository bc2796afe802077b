"""Fast start of the fs worker: ``python -I -S .../fsworker/_boot.py ARGS``.

``python -m pytest_sandbox.fsworker`` runs ``pytest_sandbox/__init__.py``, which re-exports the
runtime (psutil, sqlite3): tens of milliseconds the worker does not need. This script registers
a bare ``pytest_sandbox`` package (same directory, ``__init__`` not executed) and runs the worker,
which imports only the stdlib, errors.py and this package's protocol/policy/enforce modules.
"""

import os
import sys
import types

_pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "pytest_sandbox" not in sys.modules:
    _pkg = types.ModuleType("pytest_sandbox")
    _pkg.__path__ = [_pkg_dir]
    sys.modules["pytest_sandbox"] = _pkg

from pytest_sandbox.fsworker.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
