"""The identity record of a launched backend, verified before every signal.

A backend is named by pid + OS start time + boot id + host (as every process of the plugin) and
additionally by the executable the kernel runs for it (``/proc/<pid>/exe``, canonical) and that
executable's SHA-256. For a script launched through its shebang the running executable is the
interpreter; the launched file is recorded beside it (``binary`` and ``binary_sha256``).

The record is written as JSON in the run dir and into the ledger row; the in-memory handle, the
reaper and the sweep all compare it with the live process before sending any signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from pytest_sandbox.runtime.identity import BOOT_ID, HOST, ProcessIdentity

_HASH_CACHE: dict[tuple[int, int, int, int, int], str] = {}
_HASH_LOCK = threading.Lock()

#: Start times are kept with 10 ms resolution (the kernel's clock ticks).
START_TIME_TOLERANCE = 0.015


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, cached by (device, inode, size, mtime, ctime).

    ``ctime`` cannot be set from user space, so an in-place rewrite always misses the cache.
    ``/proc/<pid>/exe`` may be passed: it opens the very file the process runs, even when the
    path on disk was since replaced or deleted.
    """
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _HASH_LOCK:
            cached = _HASH_CACHE.get(key)
        if cached is not None:
            return cached
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def process_exe(pid: int) -> str:
    """Canonical path of the executable ``pid`` runs (raises ``psutil`` errors)."""
    exe = psutil.Process(pid).exe()
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    return os.path.realpath(exe)


Verdict = Literal["ok", "gone", "mismatch"]


@dataclass(frozen=True)
class Check:
    """The outcome of comparing a record with the live process."""

    verdict: Verdict
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


@dataclass(frozen=True)
class BackendIdentity:
    """Who a launched backend is; compared with the live process before every signal.

    ``exe`` / ``exe_sha256`` name the executable the kernel runs (``/proc/<pid>/exe``);
    ``binary`` / ``binary_sha256`` the allow-listed file that was launched (the same file for a
    native binary, the script for a shebang script).
    """

    service: str
    pid: int
    start_time: float
    exe: str
    exe_sha256: str
    binary: str
    binary_sha256: str
    boot_id: str
    host: str
    argv: tuple[str, ...]
    endpoint: str
    idle_timeout: float | None
    run_id: str
    instance: str
    token: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def capture(
        cls,
        pid: int,
        *,
        service: str,
        binary: str,
        binary_sha256: str,
        argv: tuple[str, ...],
        endpoint: str,
        idle_timeout: float | None,
        run_id: str,
        instance: str,
        token: str = "",
    ) -> BackendIdentity:
        """Read the live identity of ``pid`` (raises ``psutil.NoSuchProcess`` when gone)."""
        base = ProcessIdentity.of(pid)
        exe = process_exe(pid)
        exe_sha = file_sha256(f"/proc/{pid}/exe")
        return cls(
            service=service,
            pid=pid,
            start_time=base.start_time,
            exe=exe,
            exe_sha256=exe_sha,
            binary=binary,
            binary_sha256=binary_sha256,
            boot_id=base.boot_id,
            host=base.host,
            argv=tuple(argv),
            endpoint=endpoint,
            idle_timeout=idle_timeout,
            run_id=run_id,
            instance=instance,
            token=token,
        )

    @property
    def process(self) -> ProcessIdentity:
        """The plain process identity (what the runtime's stop ladder takes)."""
        return ProcessIdentity(
            pid=self.pid,
            start_time=self.start_time,
            exe=self.exe,
            boot_id=self.boot_id,
            host=self.host,
        )

    def check(self) -> Check:
        """Compare with the live process: ``ok``, ``gone`` (exited, zombie) or ``mismatch``.

        ``mismatch`` covers a recycled pid, a different start time, a different executable and
        a different executable hash: the pid must not be signalled then.
        """
        if self.host != HOST:
            return Check("mismatch", f"recorded on host {self.host!r}, this is {HOST!r}")
        if self.boot_id != BOOT_ID:
            return Check("gone", "recorded before the machine last booted")
        try:
            live = psutil.Process(self.pid)
            with live.oneshot():
                if live.status() == psutil.STATUS_ZOMBIE:
                    return Check("gone", f"pid {self.pid} has exited (zombie)")
                start = round(live.create_time(), 2)
            if abs(start - self.start_time) > START_TIME_TOLERANCE:
                return Check(
                    "mismatch",
                    f"pid {self.pid} started at {start:.2f}, the record says "
                    f"{self.start_time:.2f}: it is another process (recycled pid or a "
                    "substituted record)",
                )
            exe = process_exe(self.pid)
            if exe != self.exe:
                return Check(
                    "mismatch", f"pid {self.pid} runs {exe!r}, the record says {self.exe!r}"
                )
            digest = file_sha256(f"/proc/{self.pid}/exe")
        except psutil.NoSuchProcess:
            return Check("gone", f"pid {self.pid} is gone")
        except FileNotFoundError:
            return Check("gone", f"pid {self.pid} is gone")
        except (psutil.AccessDenied, PermissionError) as exc:
            return Check("mismatch", f"pid {self.pid} cannot be inspected: {exc}")
        if digest != self.exe_sha256:
            return Check(
                "mismatch",
                f"pid {self.pid} runs {exe!r} with SHA-256 {digest[:16]}…, the record says "
                f"{self.exe_sha256[:16]}…",
            )
        return Check("ok")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackendIdentity:
        idle = data.get("idle_timeout")
        return cls(
            service=str(data["service"]),
            pid=int(data["pid"]),
            start_time=float(data["start_time"]),
            exe=str(data["exe"]),
            exe_sha256=str(data["exe_sha256"]),
            binary=str(data["binary"]),
            binary_sha256=str(data["binary_sha256"]),
            boot_id=str(data["boot_id"]),
            host=str(data["host"]),
            argv=tuple(str(a) for a in data.get("argv", ())),
            endpoint=str(data.get("endpoint", "")),
            idle_timeout=None if idle is None else float(idle),
            run_id=str(data.get("run_id", "")),
            instance=str(data.get("instance", "")),
            token=str(data.get("token", "")),
            extra=dict(data.get("extra", {})),
        )

    def write(self, path: Path) -> None:
        """Write the record as JSON (atomically: a reader never sees half a record)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BackendIdentity:
        return cls.from_dict(json.loads(path.read_text()))
