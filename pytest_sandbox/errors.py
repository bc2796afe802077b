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
# The fs worker imports this module at start-up: errors.py must stay free of imports.


class FsPolicyInvalid(FsWorkerError, ValueError):
    """A SandboxPolicy (or its JSON) is malformed or names a path it may never name."""


class FsPolicyDenied(PolicyDenied):
    """The fs worker denied a request; ``op``, ``path`` and ``reason`` say which and why."""

    def __init__(self, op: str, path: str, reason: str) -> None:
        self.op = op
        self.path = path
        self.reason = reason
        super().__init__(
            f"fs worker denied {op} {path!r}: {reason}. Write under the worker's root, or widen "
            "the policy's allow_write (system paths are never writable)."
        )


class FsWorkerExited(FsWorkerError):
    """The fs worker exited before it printed ``ready`` (bad policy, bad root, crash)."""

    def __init__(self, socket_path: str, returncode: int | None, stderr_tail: str) -> None:
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(
            f"fs worker for {socket_path} exited with code {returncode} before it was ready.\n"
            f"--- its stderr ---\n{stderr_tail.strip() or '(empty)'}"
        )


class FsWorkerReadyTimeout(FsWorkerError, TimeoutError):
    """The fs worker did not print ``ready`` in time (raise ``ready_timeout``)."""


class FsWorkerConnectTimeout(FsWorkerError, TimeoutError):
    """The fs worker printed ``ready`` but its socket did not accept in time."""


class FsKernelUnavailable(FsWorkerError):
    """``--sandbox-kernel=require`` but the kernel layer (Landlock) cannot be applied here."""


class FsWorkerRequestError(FsWorkerError):
    """The worker answered a request with an error other than a policy denial."""

    def __init__(self, kind: str, code: str, message: str) -> None:
        self.kind = kind
        self.code = code
        super().__init__(f"fs worker {kind} request failed ({code}): {message}")


class FsWorkerProtocolError(FsWorkerError):
    """The connection to the fs worker broke or carried something that is not a frame."""


class EgressProxyError(SandboxError):
    """The egress proxy could not start, or failed while serving."""


class FsNetIsolationUnavailable(FsKernelUnavailable):
    """A network policy is set, the kernel layer is required, and neither Landlock network
    rules (ABI >= 4) nor a user + network namespace can confine the worker's TCP egress."""


# --- bundles ---


class BundleRefusal(BundleRefused):
    """Base of the puller's typed refusals; ``code`` is a short stable name for the reason."""

    code = "refused"

    def __init__(self, message: str, **detail: object) -> None:
        self.detail = detail
        super().__init__(message)


class ManifestInvalid(BundleRefusal):
    """The manifest is not JSON, breaks the schema, or is larger than the size cap."""

    code = "manifest_invalid"


class SignatureInvalid(BundleRefusal):
    """The manifest's Ed25519 signature is missing or does not verify against the key."""

    code = "signature_invalid"


class VersionOutOfRange(BundleRefusal):
    """``bundle_version`` is outside the puller's accepted range (e.g. a fast-forward)."""

    code = "version_out_of_range"


class RollbackRefused(BundleRefusal):
    """``bundle_version`` is below the last version installed for this tenant."""

    code = "rollback"


class ManifestExpired(BundleRefusal):
    """The manifest's ``expires`` has passed (a frozen or replayed feed)."""

    code = "expired"


class ManifestStale(BundleRefusal):
    """The bundle is older than the puller's ``max_age``."""

    code = "stale"


class UnsafeBundlePath(BundleRefusal):
    """A file path in the manifest could escape or alias inside the bundle root."""

    code = "unsafe_path"


class IntegrityMismatch(BundleRefusal):
    """``integrity_sha256`` or ``size_bytes`` does not match the manifest's file list."""

    code = "integrity_mismatch"


class FileHashMismatch(BundleRefusal):
    """A downloaded file's SHA-256 differs from the manifest."""

    code = "hash_mismatch"


class FileSizeMismatch(BundleRefusal):
    """A file body ended before, or ran past, the size the manifest declares."""

    code = "size_mismatch"


class FetchFailed(BundleRefusal):
    """The server answered an error status, or the connection broke or was reset."""

    code = "fetch_failed"


class FetchTimeout(BundleRefusal):
    """No byte arrived within the gap timeout, or the total deadline passed."""

    code = "timeout"


class UnknownScenario(BundleServerError):
    """A bundle-server scenario name or parameter is not known."""


# --- containers ---


class ArchiveRefused(UnsafeArchive):
    """An archive member broke a safety rule (named by ``archive`` and ``member``); nothing
    was written."""

    def __init__(self, archive: str, member: str, problem: str, fix: str = "") -> None:
        self.archive = archive
        self.member = member
        self.problem = problem
        fix = fix or "Rebuild the archive without this member (refusals are all-or-nothing)."
        super().__init__(f"archive {archive} refused: member {member!r} {problem}. {fix}")


class AbsoluteMemberName(ArchiveRefused):
    """A member name starts with ``/``."""


class ParentTraversal(ArchiveRefused):
    """A member name (or link target) contains a ``..`` component."""


class SymlinkEscape(ArchiveRefused):
    """A symlink points outside the extraction root (absolute, or resolving above it)."""


class HardlinkEscape(ArchiveRefused):
    """A hard link points outside the archive's own regular files."""


class MemberThroughSymlink(ArchiveRefused):
    """A member would be written through a symlink (in the archive or already at the target)."""


class DeviceMember(ArchiveRefused):
    """A character or block device member."""


class FifoMember(ArchiveRefused):
    """A FIFO (named pipe) member."""


class UnsupportedMember(ArchiveRefused):
    """A member of a type that is neither file, directory, symlink nor hard link."""


class DirectoryReplaced(ArchiveRefused):
    """A non-directory member would replace a directory (or a directory a file)."""


class DuplicateMember(ArchiveRefused):
    """Two members have the same normalised name."""


class ArchiveTooLarge(ArchiveRefused):
    """The archive's total content is over the configured ``max_bytes``."""


class MemberTooLarge(ArchiveRefused):
    """One member is over the configured ``max_member_bytes``."""


class TooManyMembers(ArchiveRefused):
    """The archive has more members than the configured ``max_members``."""


class CorruptArchive(ArchiveRefused):
    """The archive cannot be read as tar (or tar.gz) at all."""


class DataFilterRefused(ArchiveRefused):
    """tarfile's ``data`` filter refused a member our own checks let through."""


class DestinationNotEmpty(ArchiveRefused):
    """``extract`` into a non-empty directory without ``merge=True``."""


class EngineError(DockerUnavailable):
    """The Docker engine answered with an error to a plugin call."""


class ImageUnavailable(ContainerError):
    """An image is not present locally and could not be pulled or built."""


class ImageBuildFailed(ContainerError):
    """Building one of the plugin's offline images failed; carries the build log tail."""


class LabelRefused(ContainerError):
    """A user label uses the reserved ``pytest-sandbox.`` prefix."""


class ContainerStartFailed(ContainerError):
    """A container could not be created or started; nothing was left behind."""


class ContainerNotReady(ContainerError, TimeoutError):
    """A container's readiness check did not pass; carries its state and log tail."""


class ContainerExited(ContainerError):
    """A container exited while it was being waited for; carries its exit code and log tail."""


class AutoRemoveRefused(ContainerError):
    """Stop-and-export was asked of a container created with auto-remove."""


class DataDirOnTmpfs(ContainerError):
    """The data dir is a tmpfs mount: stopping the container would lose it."""


class RestartFailed(ContainerError):
    """The container could not be returned to its prior (running) state after a data operation."""


class SnapshotError(ContainerError):
    """A DataStore operation failed (no backup for the key, unreadable backup, …)."""


# --- workspace ---


class NotAGitRepository(WorkspaceRefused):
    """The path given as ``repo`` is missing or not inside a git working tree."""


class BareRepositoryRefused(WorkspaceRefused):
    """The path is a bare repository (or inside a ``.git`` dir): there is no working tree."""


class EmptyRepositoryRefused(WorkspaceRefused):
    """The repository has no commit yet, so there is no base commit to prepare from."""


class SubmodulesRefused(WorkspaceRefused):
    """The repository has submodules and the mode is not ``full_copy``."""


class FromRefWithoutBranch(WorkspaceRefused):
    """``from_ref`` was given without ``branch``: a branch to create at that ref is needed."""


class UnresolvedRef(WorkspaceRefused):
    """``from_ref`` does not resolve to a commit in the repository."""


class InvalidWorkspaceArgument(WorkspaceRefused):
    """An argument (mode, branch name, guest path) has a value the workspace cannot use."""


class GuestPathInUse(WorkspaceRefused):
    """The guest path already exists and is not empty; nothing in it was changed."""


class HostGitFailed(WorkspaceRefused):
    """A git command on the host failed while reading the repository."""


class GuestCommandFailed(GuestError):
    """A command in the guest exited non-zero; carries ``exit_code``, ``stdout`` and ``stderr``."""

    def __init__(self, message: str, exit_code: int, stdout: bytes, stderr: bytes) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(message)


class GuestTimeout(GuestError, TimeoutError):
    """A command in the guest ran past its timeout; it was killed."""


class GuestClosed(GuestError):
    """The guest was stopped or removed; the operation in flight was aborted."""


class SSHUnavailable(GuestError):
    """OpenSSH (``sshd``/``ssh``/``ssh-keygen``) is missing or the test sshd did not start."""


# --- launcher ---


class LaunchRefusal(LaunchRefused):
    """A backend definition was refused; ``service``, ``value`` and ``fix`` say which and why.

    Raised by ``BackendLauncher.launch()`` before anything is spawned.
    """

    def __init__(self, service: str, value: object, problem: str, fix: str) -> None:
        self.service = service
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"backend {service!r} refused: {problem} ({value!r}). {fix}")


class BinaryPathEmpty(LaunchRefusal):
    """The definition's ``binary_path`` is empty."""


class AllowRootEmpty(LaunchRefusal):
    """The definition's ``allow_root`` is empty."""


class AllowRootInvalid(LaunchRefusal):
    """The allow root does not exist, is not a directory, or is ``/``."""


class BinaryPathTraversal(LaunchRefusal):
    """The binary path contains a ``..`` component (``root/../x``)."""


class BinaryOutsideRoot(LaunchRefusal):
    """The canonical binary path does not lie under the canonical allow root."""


class BinarySiblingPrefix(BinaryOutsideRoot):
    """The binary lies in a sibling that merely shares the root's prefix (``root-evil/``)."""


class BinarySymlinkEscape(BinaryOutsideRoot):
    """The path is under the root as written, but a symlink on it points out of the root."""


class BinaryMissing(LaunchRefusal):
    """The binary does not exist."""


class BinaryNotExecutable(LaunchRefusal):
    """The binary is not a regular file with an execute bit for us."""


class WorldWritable(LaunchRefusal):
    """The binary, the root or a directory between them is writable by every user."""


class BinaryWorldWritable(WorldWritable):
    """The binary itself is world-writable."""


class AllowRootWorldWritable(WorldWritable):
    """The allow root (or a directory between it and the binary) is world-writable."""


class InvalidTraceContext(LaunchRefusal, ValueError):
    """``traceparent`` / ``tracestate`` is not valid W3C Trace Context."""


class ReservedEnvironment(LaunchRefusal):
    """The definition's env sets a variable the launcher owns (``PYTEST_SANDBOX_*``, ``TRACE*``)."""


class BackendNotReady(BackendError):
    """The backend failed its readiness probe or exited while probed; it was stopped.

    ``returncode`` is its exit code (None when it was stopped by us), ``log_tail`` its last lines.
    """

    def __init__(self, message: str, returncode: int | None = None, log_tail: str = "") -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(message)


class BackendIdentityMismatch(BackendError, IdentityMismatch):
    """The identity record no longer matches the live process (pid, start time, exe, hash).

    Nothing was signalled.
    """


class BackendUnexpectedExit(BackendError):
    """The backend crashed, or its exit code after ``stop()`` is not an expected one."""
