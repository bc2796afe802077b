"""Resources created once per run and shared by every xdist worker.

The first worker to ask creates the resource under a file lock in the run dir; the others get
the recorded value. Each worker is recorded as a holder while it uses the resource. The resource
is owned by the run (its ledger row names the run's controller), so it outlives the worker that
created it; the last user of the run — the controller, once every worker is done — tears it down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_sandbox.runtime.run import RunContext


class SharedResource:
    """One named resource of a run: ``acquire`` creates it once, ``release`` drops a holder.

    ``create`` returns a JSON-serialisable value (ids, ports, paths) that every worker gets back.
    ``destroy`` runs when the last holder releases with ``final=True`` (the controller at run
    end) or at ``finish()``.
    """

    def __init__(self, run: RunContext, name: str, *, lock_timeout: float = 600.0) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"shared resource name {name!r} must be a plain file name")
        self.run = run
        self.name = name
        directory = run.run_dir / "shared"
        directory.mkdir(parents=True, exist_ok=True)
        self._state_path = directory / f"{name}.json"
        self._lock = FileLock(str(directory / f"{name}.lock"), timeout=lock_timeout)

    def _read(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return None
        return data

    def _write(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self._state_path.unlink(missing_ok=True)
            return
        tmp = self._state_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)

    def acquire(self, create: Callable[[], Any], holder: str | None = None) -> Any:
        """Return the resource's value, creating it if this run has none yet."""
        holder = holder or self.run.worker_id
        with self._lock:
            state = self._read()
            if state is None:
                state = {"value": create(), "holders": [], "creator": self.run.worker_id}
            if holder not in state["holders"]:
                state["holders"].append(holder)
            self._write(state)
            return state["value"]

    def peek(self) -> Any:
        """The current value, or None when the resource does not exist."""
        with self._lock:
            state = self._read()
        return None if state is None else state["value"]

    def holders(self) -> list[str]:
        with self._lock:
            state = self._read()
        return [] if state is None else list(state["holders"])

    def release(
        self,
        destroy: Callable[[Any], None],
        holder: str | None = None,
        *,
        final: bool = False,
    ) -> bool:
        """Drop ``holder``; destroy the resource if it was the last and ``final``.

        Returns True when the resource was destroyed.
        """
        return self._drop(destroy, holder or self.run.worker_id, final=final)

    def finish(self, destroy: Callable[[Any], None]) -> bool:
        """Destroy the resource whatever its holders (run end, every worker gone)."""
        return self._drop(destroy, None, final=True, force=True)

    def _drop(
        self,
        destroy: Callable[[Any], None],
        holder: str | None,
        *,
        final: bool,
        force: bool = False,
    ) -> bool:
        with self._lock:
            state = self._read()
            if state is None:
                return False
            if holder in state["holders"]:
                state["holders"].remove(holder)
            if not force and (state["holders"] or not final):
                self._write(state)
                return False
            try:
                destroy(state["value"])
            finally:
                self._write(None)
            return True


def shared_names(run: RunContext) -> list[str]:
    """Names of the shared resources that currently exist in this run."""
    directory: Path = run.run_dir / "shared"
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json"))
