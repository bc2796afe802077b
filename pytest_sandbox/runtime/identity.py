"""Process identity: pid + OS start time + boot id + host (+ executable).

A pid is signalled only while the identity recorded for it still holds, so a recycled pid is
never killed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"btime-{psutil.boot_time():.0f}"


BOOT_ID = _read_boot_id()
HOST = socket.gethostname()


@dataclass(frozen=True)
class ProcessIdentity:
    """Who a process is: pid, OS start time, executable, boot id and host.

    ``start_time`` is the kernel's start time (seconds since the epoch, 10 ms resolution):
    together with the pid and boot id it names one process for the life of the machine.
    """

    pid: int
    start_time: float
    exe: str
    boot_id: str
    host: str

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """Read the identity of a live process (raises ``psutil.NoSuchProcess`` when gone)."""
        proc = psutil.Process(pid)
        with proc.oneshot():
            start = proc.create_time()
            try:
                exe = proc.exe()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                exe = ""
        return cls(pid=pid, start_time=round(start, 2), exe=exe, boot_id=BOOT_ID, host=HOST)

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls.of(os.getpid())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessIdentity:
        return cls(
            pid=int(data["pid"]),
            start_time=float(data["start_time"]),
            exe=str(data.get("exe", "")),
            boot_id=str(data["boot_id"]),
            host=str(data["host"]),
        )

    @property
    def is_local(self) -> bool:
        return self.host == HOST

    def mismatch(self, *, check_exe: bool = False) -> str | None:
        """Why this identity no longer names a live process, or None if it still does.

        A zombie counts as gone. ``check_exe`` also requires the executable to be the same
        (off by default: a tracked ``sh -c 'exec server'`` legitimately changes executable).
        """
        if self.host != HOST:
            return f"recorded on host {self.host!r}, this is {HOST!r}"
        if self.boot_id != BOOT_ID:
            return "recorded before the machine last booted"
        try:
            live = psutil.Process(self.pid)
            with live.oneshot():
                if live.status() == psutil.STATUS_ZOMBIE:
                    return f"pid {self.pid} has exited (zombie)"
                start = round(live.create_time(), 2)
                exe = live.exe() if check_exe else ""
        except psutil.NoSuchProcess:
            return f"pid {self.pid} is gone"
        except psutil.AccessDenied:
            return f"pid {self.pid} cannot be inspected (access denied)"
        if abs(start - self.start_time) > 0.015:
            return (
                f"pid {self.pid} now belongs to another process "
                f"(started {start:.2f}, recorded {self.start_time:.2f})"
            )
        if check_exe and self.exe and exe != self.exe:
            return f"pid {self.pid} now runs {exe!r}, recorded {self.exe!r}"
        return None

    def is_alive(self) -> bool:
        return self.mismatch() is None
