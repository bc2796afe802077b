"""The run's watchdog process and the session-start sweep.

The reaper (``python -m pytest_sandbox.runtime.reaper``) runs in its own session, so neither
Ctrl-C at the terminal nor ``kill -9`` of pytest's process group reaches it. It watches every
owner process of its run (a pidfd each) and the pipe from the controller: within a poll interval
of an owner's death it releases that owner's ledger rows; when the pipe closes without ``done``
the controller died and every row of the run is released. On ``done`` it exits.

The sweep releases every row whose owner is provably dead (pid gone, or pid reused: start time
differs) on this host, and calls the environment sweepers (e.g. Docker objects by label).
Nothing whose owner is alive, or that lives on another host, is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Ledger, LedgerRow, load_releaser, run_releaser

POLL_INTERVAL = 0.1
#: How long the reaper goes on watching workers after the controller died.
ORPHAN_WATCH = 10.0


@dataclass
class SweepReport:
    """What a sweep or a reaper pass did."""

    released: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def extend(self, other: SweepReport) -> None:
        self.released.extend(other.released)
        self.failed.extend(other.failed)


def release_rows(
    ledger: Ledger,
    rows: Iterable[LedgerRow],
    *,
    event: str = "reaped",
    run_id: str | None = None,
    dry_run: bool = False,
) -> SweepReport:
    """Release ``rows`` concurrently with their releasers; failed rows stay in the ledger."""
    report = SweepReport()
    todo = list(rows)
    if dry_run:
        report.released.extend(row.describe() for row in todo)
        return report

    def one(row: LedgerRow) -> tuple[LedgerRow, BaseException | None]:
        try:
            run_releaser(row)
        except Exception as exc:
            return row, exc
        return row, None

    if not todo:
        return report
    from concurrent.futures import ThreadPoolExecutor  # only when there is work

    with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
        for row, error in pool.map(one, todo):
            if error is None:
                ledger.remove(row.id, event=event, run_id=run_id)
                report.released.append(row.describe())
            else:
                report.failed.append(f"{row.describe()}: {error!r}")
    return report


def owner_is_dead(owner: ProcessIdentity) -> bool:
    """True only when the owner is provably gone (never for another host's process)."""
    if not owner.is_local:
        return False
    reason = owner.mismatch()
    return reason is not None and "cannot be inspected" not in reason


def sweep_ledger(
    ledger: Ledger,
    *,
    current_run_id: str | None = None,
    only_run: str | None = None,
    include_kept: bool = False,
    dry_run: bool = False,
) -> SweepReport:
    """Release every row whose owner is provably dead.

    Rows of ``current_run_id`` are never swept (their owners are alive by definition). With
    ``include_kept`` kept rows are released too, whatever their owner, as asked by
    ``pytest-sandbox reap --kept``.
    """
    candidates = []
    for row in ledger.rows(run_id=only_run):
        if row.run_id == current_run_id:
            continue
        if row.kept:
            if include_kept and row.owner.is_local:
                candidates.append(row)
            continue
        if owner_is_dead(row.owner):
            candidates.append(row)
    return release_rows(ledger, candidates, run_id=current_run_id, dry_run=dry_run)


def run_sweepers(
    ledger: Ledger,
    sweepers: Sequence[str],
    *,
    current_run_id: str | None = None,
    only_run: str | None = None,
    dry_run: bool = False,
) -> SweepReport:
    """Call each environment sweeper (``"module:function"``, taking a dict of options and
    returning descriptions of what it released); a missing optional backend is skipped."""
    report = SweepReport()
    options = {"current_run_id": current_run_id, "dry_run": dry_run, "only_run": only_run}
    for name in sweepers:
        try:
            found = load_releaser(name)(options)
        except ImportError:
            continue
        except Exception as exc:
            report.failed.append(f"sweeper {name}: {exc!r}")
            continue
        described = [str(item) for item in found] if isinstance(found, list | tuple) else []
        report.released.extend(described)
        if current_run_id and not dry_run:
            for item in described:
                ledger.record_event(current_run_id, "reaped", "swept", item)
    return report


def sweep(
    ledger: Ledger,
    *,
    current_run_id: str | None = None,
    only_run: str | None = None,
    include_kept: bool = False,
    dry_run: bool = False,
    sweepers: Sequence[str] = (),
) -> SweepReport:
    """The ledger sweep followed by the environment sweepers."""
    report = sweep_ledger(
        ledger,
        current_run_id=current_run_id,
        only_run=only_run,
        include_kept=include_kept,
        dry_run=dry_run,
    )
    report.extend(
        run_sweepers(
            ledger, sweepers, current_run_id=current_run_id, only_run=only_run, dry_run=dry_run
        )
    )
    return report


RETENTION = 7 * 24 * 3600.0


def prune_old_runs(ledger: Ledger, state_dir: Path, *, older_than: float = RETENTION) -> int:
    """Remove run dirs (logs, records) and summary events older than ``older_than`` seconds,
    except those of runs that still have rows (a kept resource's logs stay). Returns how many
    run dirs were removed."""
    cutoff = time.time() - older_than
    ledger.prune_events(cutoff)
    live_runs = {row.run_id for row in ledger.rows()}
    removed = 0
    runs = state_dir / "runs"
    if not runs.is_dir():
        return 0
    for run_dir in runs.iterdir():
        with contextlib.suppress(OSError):
            if run_dir.name not in live_runs and run_dir.stat().st_mtime < cutoff:
                shutil.rmtree(run_dir)
                removed += 1
    return removed


# --- the reaper process --------------------------------------------------------------


class Reaper:
    """Watches the owners of one run and releases the rows of those that die."""

    def __init__(self, ledger: Ledger, run_id: str, control: int | None) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.control = control
        self._pidfds: dict[int, tuple[ProcessIdentity, int]] = {}
        self._dead: set[tuple[int, float]] = set()
        self._controller_dead_at: float | None = None

    def _refresh_owners(self) -> None:
        for _worker, owner in self.ledger.owners(self.run_id):
            key = (owner.pid, owner.start_time)
            if owner.pid in self._pidfds or key in self._dead:
                continue
            try:
                fd = os.pidfd_open(owner.pid)
            except OSError:
                fd = -1
            # Check identity after opening: the pidfd then surely names the owner (or is dead).
            if fd < 0 or owner.mismatch() is not None:
                if fd >= 0:
                    os.close(fd)
                self._owner_died(owner)
                continue
            self._pidfds[owner.pid] = (owner, fd)

    def _owner_died(self, owner: ProcessIdentity) -> None:
        self._dead.add((owner.pid, owner.start_time))
        rows = [
            row
            for row in self.ledger.rows(run_id=self.run_id, owner_pid=owner.pid, kept=False)
            if abs(row.owner.start_time - owner.start_time) < 0.015
        ]
        release_rows(self.ledger, rows)

    def _release_all(self) -> None:
        release_rows(self.ledger, self.ledger.rows(run_id=self.run_id, kept=False))

    def run(self) -> int:
        control_open = self.control is not None
        buffer = b""
        while True:
            self._refresh_owners()
            fds = [fd for _, fd in self._pidfds.values()]
            if control_open and self.control is not None:
                fds.append(self.control)
            try:
                readable, _, _ = select.select(fds, [], [], POLL_INTERVAL)
            except InterruptedError:
                continue
            for pid, (owner, fd) in list(self._pidfds.items()):
                if fd in readable:
                    os.close(fd)
                    del self._pidfds[pid]
                    self._owner_died(owner)
            if control_open and self.control in readable:
                assert self.control is not None
                chunk = os.read(self.control, 4096)
                buffer += chunk
                if b"done" in buffer:
                    return 0  # clean end: the controller released everything itself
                if not chunk:
                    control_open = False
                    self._controller_dead_at = time.monotonic()
                    self._release_all()
            # Controller gone: go on until the workers are gone too, then a last pass.
            if self._controller_dead_at is not None and (
                not self._pidfds or time.monotonic() - self._controller_dead_at > ORPHAN_WATCH
            ):
                self._release_all()
                return 0


#: The reaper's nice value (Linux: per thread, inherited by the threads it starts).
REAPER_NICE = 10


def start_reaper(
    state_dir: Path, run_id: str, log_path: Path, sweepers: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start the run's reaper in its own session; its stdin is the controller's lifeline."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Every session starts a reaper, so its start-up is kept small: ``-S`` skips site and the
    # .pth files (tens of ms in a well-stocked environment); the import path is this process's
    # own, which site already computed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if os.path.isabs(p))}
    with open(log_path, "ab") as log:
        reaper = subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-m",
                "pytest_sandbox.runtime.reaper",
                "--state-dir",
                str(state_dir),
                "--run-id",
                run_id,
                "--sweepers",
                ",".join(sweepers),
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    # A watchdog must not take CPU from the tests it watches (its start-up and sweep cost
    # ~0.1 s of CPU, on two cores beside pytest's own). When pytest dies it is alone, so a
    # lower priority does not slow the clean-up.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, reaper.pid, REAPER_NICE)
    return reaper


def stop_reaper(reaper: subprocess.Popen[bytes], timeout: float = 0.0) -> None:
    """Tell the reaper the run ended cleanly; wait at most ``timeout`` for it to exit.

    Not waiting is safe: the reaper exits by itself on ``done`` (pytest's exit then costs
    nothing), and an orphaned reaper is reparented and reaped like any other process.
    """
    with contextlib.suppress(OSError, ValueError):
        assert reaper.stdin is not None
        reaper.stdin.write(b"done\n")
        reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_sandbox.runtime.reaper")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--sweepers", default="", help="comma-separated module:function names")
    args = parser.parse_args(argv)
    ledger = Ledger.in_state_dir(args.state_dir)
    record = {"pid": os.getpid(), "run_id": args.run_id, "started": time.time()}
    with contextlib.suppress(OSError):
        run_dir = args.state_dir / "runs" / args.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "reaper.json").write_text(json.dumps(record))
    sweeping = None
    if args.sweepers:
        # The controller swept the ledger already; the slow sweepers (Docker) run here, beside
        # the watch loop so that a crash during the sweep is still noticed at once.
        sweeping = threading.Thread(
            target=run_sweepers,
            args=(Ledger.in_state_dir(args.state_dir), args.sweepers.split(",")),
            kwargs={"current_run_id": args.run_id},
            daemon=True,
        )
        sweeping.start()
    code = Reaper(ledger, args.run_id, sys.stdin.fileno()).run()
    if sweeping is not None:
        sweeping.join(timeout=60)
    return code


if __name__ == "__main__":
    sys.exit(main())
