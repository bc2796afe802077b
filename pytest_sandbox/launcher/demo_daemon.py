"""Install the tiny HTTP demo daemon (``_httpd.py``) as an executable script.

The script is copied into the destination (normally an allow root) with a shebang naming the
canonical ``sys.executable`` and ``-IS`` (isolated mode, no ``site``: it needs only the standard
library and starts faster). The kernel therefore runs the interpreter; the backend identity
records both the interpreter (``exe``, ``exe_sha256``) and the script (``binary``,
``binary_sha256``). No PATH lookup is involved anywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pytest_sandbox.errors import BackendError

SOURCE = Path(__file__).with_name("_httpd.py")
#: Linux reads at most this many bytes of a shebang line (``BINPRM_BUF_SIZE``).
SHEBANG_MAX = 255


def shebang(python: str | None = None) -> str:
    interpreter = os.path.realpath(python or sys.executable)
    line = f"#!{interpreter} -IS\n"
    if len(line) > SHEBANG_MAX or " " in interpreter:
        raise BackendError(
            f"cannot write a shebang for {interpreter!r}: the path has a space or is over "
            f"{SHEBANG_MAX} bytes. Use a Python installed at a shorter path."
        )
    return line


def write_demo_daemon(dest: Path, *, python: str | None = None) -> Path:
    """Write the demo daemon to ``dest`` (mode 0755) and return ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(shebang(python) + SOURCE.read_text())
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return dest
