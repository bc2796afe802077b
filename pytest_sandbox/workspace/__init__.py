"""Git workspaces in guests: prepare a host repo inside a guest, export its changes as a patch.

Cheap to import: nothing here imports docker (ContainerGuest imports it when constructed).
"""

from __future__ import annotations

from pytest_sandbox.workspace.guests import ExecResult, Guest, LocalGuest, SSHGuest, SSHTarget
from pytest_sandbox.workspace.repo import RepoInfo, WorkspacePlan, inspect_repo, plan_workspace

__all__ = [
    "ExecResult",
    "Guest",
    "LocalGuest",
    "RepoInfo",
    "SSHGuest",
    "SSHTarget",
    "WorkspacePlan",
    "inspect_repo",
    "plan_workspace",
]
