"""The error family of pytest-sandbox.

Every error says what failed, on which resource, with what value, and what to do about it.
Environments add their own subclasses here so that downstream suites can catch them by type
without importing an environment package.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error raised by pytest-sandbox."""


# --- settings and the run ---------------------------------------------------------------


class SettingsError(SandboxError):
    """A setting has a value the plugin cannot use.

    ``option`` is the name as the user spelled it, ``source`` where the value came from
    (``command line``, ``environment PYTEST_SANDBOX_X``, ``ini sandbox_x``, ``default``).
    """

    def __init__(self, option: str, source: str, value: object, problem: str, fix: str) -> None:
        self.option = option
        self.source = source
        self.value = value
        super().__init__(f"{option} (from {source}) = {value!r}: {problem}. {fix}")


class LedgerError(SandboxError):
    """The resource ledger could not be read or written."""


# --- processes and waiting --------------------------------------------------------------


class ProcessError(SandboxError):
    """A tracked process could not be started, probed or stopped."""


class SpawnFailed(ProcessError):
    """The command could not be executed at all (missing binary, bad cwd, permission)."""


class ProcessExitedEarly(ProcessError):
    """A process exited while it was being waited for; carries the exit code and log tail."""

    def __init__(self, what: str, returncode: int | None, log_tail: str) -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        tail = log_tail.strip() or "(log is empty)"
        super().__init__(
            f"{what} exited with code {returncode} before it was ready.\n"
            f"--- last lines of its log ---\n{tail}"
        )


class ReadinessTimeout(ProcessError, TimeoutError):
    """A readiness probe did not succeed before the deadline."""


class IdentityMismatch(ProcessError):
    """A recorded process identity no longer matches the live process: no signal was sent."""


# --- environments (each package adds subclasses) -----------------------------------------


class PolicyDenied(SandboxError):
    """The sandboxed fs worker refused an operation because of its policy."""


class FsWorkerError(SandboxError):
    """The fs worker could not be started, reached, or answered an error."""


class BundleRefused(SandboxError):
    """The bundle puller refused a manifest or a file; ``current`` was left as it was."""


class BundleServerError(SandboxError):
    """An error raised inside the bundle server's thread, re-raised by ``check()``."""


class UnsafeArchive(SandboxError):
    """An archive was refused as a whole; nothing was written."""


class DockerUnavailable(SandboxError):
    """No Docker engine answered."""


class ContainerError(SandboxError):
    """A container operation failed."""


class WorkspaceRefused(SandboxError):
    """A workspace could not be prepared from the given repo/arguments; no guest was touched."""


class GuestError(SandboxError):
    """A guest could not run a command or move files."""


class LaunchRefused(SandboxError):
    """A backend was refused before anything was spawned."""


class BackendError(SandboxError):
    """A launched backend failed its probe, died, or could not be stopped safely."""


# --- fsworker ---


# --- bundles ---


# --- containers ---


# --- workspace ---


# --- launcher ---
