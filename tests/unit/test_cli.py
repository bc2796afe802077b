"""The pytest-sandbox command, run as a real subprocess where it matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pytest_sandbox.runtime.identity import ProcessIdentity
from pytest_sandbox.runtime.ledger import Ledger
from pytest_sandbox.runtime.processes import RELEASER, spawn
from tests.conftest import dead_identity, pids_alive


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_sandbox.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_ls_reap_dry_run_and_reap(tmp_path: Path) -> None:
    ledger = Ledger.in_state_dir(tmp_path)
    orphan = spawn(["sleep", "60"], log_path=tmp_path / "o.log", token="tok-cli")
    rid = ledger.add(
        "process",
        "orphan sleep",
        run_id="deadrun",
        worker="master",
        owner=dead_identity(),
        releaser=RELEASER,
        details={
            "token": "tok-cli",
            "grace": 0.2,
            "identity": ProcessIdentity.of(orphan.pid).to_dict(),
        },
    )
    listed = cli(tmp_path, "ls", "--json")
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)
    assert rows[0]["id"] == rid
    assert rows[0]["owner_alive"] is False
    assert "orphan sleep" in cli(tmp_path, "ls").stdout

    dry = cli(tmp_path, "reap", "--dry-run")
    assert dry.returncode == 1
    assert "would release: process orphan sleep" in dry.stdout
    assert pids_alive([orphan.pid]) == [orphan.pid]

    done = cli(tmp_path, "reap")
    assert done.returncode == 1
    assert "released: process orphan sleep" in done.stdout
    orphan.wait(5)
    assert ledger.rows() == []
    again = cli(tmp_path, "reap")
    assert again.returncode == 0
    assert "nothing to reap" in again.stdout


def test_doctor_json_lists_every_check(tmp_path: Path) -> None:
    done = cli(tmp_path, "doctor", "--json")
    checks = json.loads(done.stdout)
    assert set(checks) >= {"docker", "landlock", "bubblewrap", "sshd", "git", "state_dir"}
    assert checks["state_dir"]["ok"] is True
    assert done.returncode == (0 if all(c["ok"] for c in checks.values()) else 1)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli(tmp_path, "frobnicate").returncode == 2
    assert cli(tmp_path).returncode == 2
