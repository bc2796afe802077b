"""Ledger: the SQLite (WAL) record of every live resource.

A row is written before a resource can leak and removed when it is released. Every row names its
owner process (pid + start time + boot id + host) and a releaser (``"module:function"``) that the
reaper and the sweep import by name to release it when the owner died. Concurrent writers (xdist
workers, the reaper, the CLI) are safe: WAL mode, a busy timeout, and short transactions.
"""

from __future__ import annotations

import importlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pytest_sandbox.errors import LedgerError
from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.run import RunContext

LEDGER_NAME = "ledger.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    run_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    owner TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    nodeid TEXT NOT NULL,
    created_at REAL NOT NULL,
    releaser TEXT NOT NULL,
    details TEXT NOT NULL,
    kept INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS resources_run ON resources(run_id);
CREATE TABLE IF NOT EXISTS owners (
    run_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    pid INTEGER NOT NULL,
    identity TEXT NOT NULL,
    PRIMARY KEY (run_id, worker, pid)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    event TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id);
"""

#: Events counted in the terminal summary.
EVENTS = ("created", "released", "reaped", "kept", "leaked")


@dataclass(frozen=True)
class LedgerRow:
    """One live resource as recorded in the ledger."""

    id: int
    kind: str
    key: str
    run_id: str
    worker: str
    owner: ProcessIdentity
    nodeid: str
    created_at: float
    releaser: str
    details: dict[str, Any] = field(default_factory=dict)
    kept: bool = False

    def describe(self) -> str:
        return f"{self.kind} {self.key} (run {self.run_id}, {self.worker}, {self.nodeid or '-'})"


def load_releaser(name: str) -> Callable[[Mapping[str, Any]], object]:
    """Import a releaser given as ``"package.module:function"``."""
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise LedgerError(f"releaser {name!r} is not of the form 'module:function'")
    func = getattr(importlib.import_module(module_name), func_name)
    if not callable(func):
        raise LedgerError(f"releaser {name!r} is not callable")
    return func  # type: ignore[no-any-return]


def run_releaser(row: LedgerRow) -> None:
    """Release the resource a row describes with the releaser it names."""
    load_releaser(row.releaser)(row.details)


class Ledger:
    """The record of live resources in ``<state_dir>/ledger.sqlite3``.

    Thread-safe; one connection per instance. Safe to share the file between processes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except sqlite3.Error as exc:
            raise LedgerError(
                f"cannot open the ledger {path}: {exc}. Check that the state dir is writable "
                "(--sandbox-state-dir) and not on a filesystem without locking."
            ) from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Ledger:
        return cls(state_dir / LEDGER_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # --- resources ------------------------------------------------------------------

    def add(
        self,
        kind: str,
        key: str,
        *,
        run_id: str,
        worker: str,
        owner: ProcessIdentity,
        releaser: str,
        nodeid: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> int:
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO resources (kind, key, run_id, worker, owner, owner_pid, nodeid,"
                " created_at, releaser, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    key,
                    run_id,
                    worker,
                    json.dumps(owner.to_dict()),
                    owner.pid,
                    nodeid,
                    now,
                    releaser,
                    json.dumps(dict(details or {})),
                ),
            )
            db.execute(
                "INSERT INTO events (run_id, event, kind, key, at) VALUES (?, 'created', ?, ?, ?)",
                (run_id, kind, key, now),
            )
            rid = cursor.lastrowid
        assert rid is not None
        return rid

    def update(self, rid: int, *, key: str | None = None, **details: Any) -> None:
        """Change a row's key and merge ``details`` into its details."""
        with self._write() as db:
            found = db.execute("SELECT details FROM resources WHERE id = ?", (rid,)).fetchone()
            if found is None:
                return
            merged = {**json.loads(found[0]), **details}
            db.execute("UPDATE resources SET details = ? WHERE id = ?", (json.dumps(merged), rid))
            if key is not None:
                db.execute("UPDATE resources SET key = ? WHERE id = ?", (key, rid))

    def remove(self, rid: int, *, event: str = "released", run_id: str | None = None) -> bool:
        """Delete a row and record ``event`` (under ``run_id``, default the row's run)."""
        with self._write() as db:
            found = db.execute(
                "SELECT run_id, kind, key FROM resources WHERE id = ?", (rid,)
            ).fetchone()
            if found is None:
                return False
            db.execute("DELETE FROM resources WHERE id = ?", (rid,))
            db.execute(
                "INSERT INTO events (run_id, event, kind, key, at) VALUES (?, ?, ?, ?, ?)",
                (run_id or found[0], event, found[1], found[2], time.time()),
            )
        return True

    def mark_kept(self, rid: int) -> None:
        with self._write() as db:
            found = db.execute(
                "SELECT run_id, kind, key FROM resources WHERE id = ?", (rid,)
            ).fetchone()
            if found is None:
                return
            db.execute("UPDATE resources SET kept = 1 WHERE id = ?", (rid,))
            db.execute(
                "INSERT INTO events (run_id, event, kind, key, at) VALUES (?, 'kept', ?, ?, ?)",
                (found[0], found[1], found[2], time.time()),
            )

    def record_event(self, run_id: str, event: str, kind: str, key: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO events (run_id, event, kind, key, at) VALUES (?, ?, ?, ?, ?)",
                (run_id, event, kind, key, time.time()),
            )

    def get(self, rid: int) -> LedgerRow | None:
        found = self._select("WHERE id = ?", (rid,))
        return found[0] if found else None

    def rows(
        self,
        *,
        run_id: str | None = None,
        owner_pid: int | None = None,
        kept: bool | None = None,
    ) -> list[LedgerRow]:
        clauses: list[str] = []
        args: list[object] = []
        if run_id is not None:
            clauses.append("run_id = ?")
            args.append(run_id)
        if owner_pid is not None:
            clauses.append("owner_pid = ?")
            args.append(owner_pid)
        if kept is not None:
            clauses.append("kept = ?")
            args.append(int(kept))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._select(where, tuple(args))

    def _select(self, where: str, args: tuple[Any, ...]) -> list[LedgerRow]:
        rows = self._read(
            "SELECT id, kind, key, run_id, worker, owner, nodeid, created_at, releaser, details,"
            f" kept FROM resources {where} ORDER BY id",
            args,
        )
        return [
            LedgerRow(
                id=r[0],
                kind=r[1],
                key=r[2],
                run_id=r[3],
                worker=r[4],
                owner=ProcessIdentity.from_dict(json.loads(r[5])),
                nodeid=r[6],
                created_at=r[7],
                releaser=r[8],
                details=json.loads(r[9]),
                kept=bool(r[10]),
            )
            for r in rows
        ]

    # --- owners and events -----------------------------------------------------------

    def register_owner(self, run_id: str, worker: str, identity: ProcessIdentity) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO owners (run_id, worker, pid, identity) VALUES (?, ?, ?, ?)",
                (run_id, worker, identity.pid, json.dumps(identity.to_dict())),
            )

    def owners(self, run_id: str) -> list[tuple[str, ProcessIdentity]]:
        found = self._read("SELECT worker, identity FROM owners WHERE run_id = ?", (run_id,))
        return [(w, ProcessIdentity.from_dict(json.loads(i))) for w, i in found]

    def forget_run(self, run_id: str) -> None:
        """Drop a finished run's owner records (events stay for the summary)."""
        with self._write() as db:
            db.execute("DELETE FROM owners WHERE run_id = ?", (run_id,))

    def counts(self, run_id: str) -> dict[str, int]:
        found = self._read(
            "SELECT event, COUNT(*) FROM events WHERE run_id = ? GROUP BY event", (run_id,)
        )
        counts = dict.fromkeys(EVENTS, 0)
        counts.update({event: n for event, n in found})
        return counts

    def prune_events(self, older_than: float) -> None:
        with self._write() as db:
            db.execute("DELETE FROM events WHERE at < ?", (older_than,))


class Tracker:
    """What an environment uses to record its resources: a ledger bound to a run and a test.

    ``track(...)`` writes the row and returns a :class:`Tracked` handle; resources shared across
    xdist workers pass ``shared=True`` and are owned by the run's controller, not this worker.
    """

    def __init__(self, ledger: Ledger, run: RunContext, nodeid: str = "") -> None:
        self.ledger = ledger
        self.run = run
        self.nodeid = nodeid

    def for_node(self, nodeid: str) -> Tracker:
        return Tracker(self.ledger, self.run, nodeid)

    def track(
        self,
        kind: str,
        key: str,
        *,
        releaser: str,
        details: Mapping[str, Any] | None = None,
        shared: bool = False,
    ) -> Tracked:
        token = secrets.token_hex(8)
        rid = self.ledger.add(
            kind,
            key,
            run_id=self.run.run_id,
            worker=self.run.worker_id,
            owner=self.run.run_owner if shared else self.run.me,
            releaser=releaser,
            nodeid=self.nodeid,
            details={"token": token, **({"shared": True} if shared else {}), **(details or {})},
        )
        return Tracked(self.ledger, rid, token)


class Tracked:
    """A ledger row for one resource: ``update`` its details, ``released()`` when it is gone.

    ``Tracked.untracked()`` is the same handle with no ledger behind it, for classes used
    without pytest. ``token`` is a random id the resource can carry (environment, label) so the
    sweep can recognise what belongs to it.
    """

    def __init__(self, ledger: Ledger | None, rid: int, token: str | None = None) -> None:
        self.ledger = ledger
        self.rid = rid
        self.token = token or secrets.token_hex(8)
        self._done = False

    @classmethod
    def untracked(cls) -> Tracked:
        return cls(None, -1)

    def update(self, *, key: str | None = None, **details: Any) -> None:
        if self.ledger is not None and not self._done:
            self.ledger.update(self.rid, key=key, **details)

    def released(self) -> None:
        if self.ledger is not None and not self._done:
            self.ledger.remove(self.rid)
        self._done = True

    def kept(self) -> None:
        if self.ledger is not None and not self._done:
            self.ledger.mark_kept(self.rid)
        self._done = True


def track(
    tracker: ResourceTracker | None,
    kind: str,
    key: str,
    *,
    releaser: str,
    details: Mapping[str, Any] | None = None,
    shared: bool = False,
) -> Tracked:
    """``tracker.track(...)``, or an untracked handle when there is no tracker."""
    if tracker is None:
        return Tracked.untracked()
    return tracker.track(kind, key, releaser=releaser, details=details, shared=shared)


class ResourceTracker(Protocol):
    """The part of :class:`Tracker` environments depend on (a fake works in unit tests)."""

    def track(
        self,
        kind: str,
        key: str,
        *,
        releaser: str,
        details: Mapping[str, Any] | None = None,
        shared: bool = False,
    ) -> Tracked: ...
