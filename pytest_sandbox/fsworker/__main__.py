"""``python -m pytest_sandbox.fsworker``: run the fs worker (see :mod:`.worker`)."""

from __future__ import annotations

import sys

from pytest_sandbox.fsworker.worker import main

if __name__ == "__main__":
    sys.exit(main())
