"""RunContext: who this run is and where its files live.

One run id serves the whole pytest run: the controller makes it and hands it to xdist workers
(``workerinput``), so every worker's resources are recorded under the same run.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_sandbox.runtime.identity import ProcessIdentity

#: Longest file name we ever put in the socket dir (``<kind>-<16 hex>.sock`` and similar).
SOCKET_NAME_BUDGET = 32
#: ``sun_path`` is 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107


def default_socket_root() -> Path:
    """Short, per-user directory for Unix sockets (``tmp_path`` is often too long for them)."""
    return Path(tempfile.gettempdir()) / f"psb-{os.getuid()}"


def socket_dir_problem(socket_dir: Path) -> str | None:
    """Why a socket dir cannot hold our sockets, or None when it can."""
    longest = len(os.fsencode(socket_dir)) + 1 + SOCKET_NAME_BUDGET
    if longest > SUN_PATH_MAX:
        return (
            f"socket paths under it would be {longest} bytes, over the {SUN_PATH_MAX}-byte "
            "limit of a Unix socket address"
        )
    return None


def new_run_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class RunContext:
    """The run this process belongs to.

    ``run_id`` is shared by the controller and every xdist worker; ``worker_id`` is ``master``
    or ``gwN``; ``state_dir`` holds the ledger; ``run_dir`` this run's logs and records;
    ``socket_dir`` a short directory for Unix sockets; ``run_owner`` the controller process,
    which owns resources shared across workers.
    """

    run_id: str
    worker_id: str
    state_dir: Path
    socket_root: Path
    run_owner: ProcessIdentity
    me: ProcessIdentity = field(default_factory=ProcessIdentity.current)

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "runs" / self.run_id

    @property
    def socket_dir(self) -> Path:
        return self.socket_root / self.run_id

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def is_controller(self) -> bool:
        return self.worker_id == "master"

    def ensure_dirs(self) -> None:
        for directory in (self.run_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.socket_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)

    def new_socket_path(self, prefix: str) -> Path:
        """A fresh, unused socket path in the run's socket dir (``prefix`` ≤ 12 chars)."""
        if len(prefix) > 12:
            raise ValueError(f"socket prefix {prefix!r} is longer than 12 characters")
        while True:
            path = self.socket_dir / f"{prefix}-{secrets.token_hex(8)}.sock"
            if not path.exists():
                return path

    def new_log_path(self, name: str) -> Path:
        """A fresh log file path in the run's log dir, named after ``name``."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "log"
        return self.log_dir / f"{safe}-{secrets.token_hex(4)}.log"

    @classmethod
    def for_controller(cls, state_dir: Path, socket_root: Path | None = None) -> RunContext:
        me = ProcessIdentity.current()
        return cls(
            run_id=new_run_id(),
            worker_id="master",
            state_dir=state_dir,
            socket_root=socket_root or default_socket_root(),
            run_owner=me,
            me=me,
        )

    def to_workerinput(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "state_dir": str(self.state_dir),
            "socket_root": str(self.socket_root),
            "run_owner": self.run_owner.to_dict(),
        }

    @classmethod
    def for_worker(cls, data: dict[str, Any], worker_id: str) -> RunContext:
        return cls(
            run_id=str(data["run_id"]),
            worker_id=worker_id,
            state_dir=Path(data["state_dir"]),
            socket_root=Path(data["socket_root"]),
            run_owner=ProcessIdentity.from_dict(data["run_owner"]),
        )
