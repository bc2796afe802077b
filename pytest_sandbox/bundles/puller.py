"""BundlePuller: fetch, verify and atomically install a tenant's bundle; refuse anything odd.

One ``tick()``:

1. ``flock`` the bundle root (another holder: ``busy``, no work). The kernel drops the lock
   when a holder dies, so a crashed puller never blocks the next one.
2. Clean what a crashed tick left (staging dirs, temporary links, trash).
3. Tenant fingerprint (SHA-256 of the key; the key itself is never written): on a change, the
   old tenant's bundles are wiped first and its rollback floor forgotten.
4. Fetch the manifest (size cap, schema), verify its signature (when a key is configured),
   the version range and the rollback floor (persisted atomically), freshness (``expires``,
   ``max_age``); same ``bundle_ts`` as ``current``: ``up_to_date``.
5. Validate every path, ``size_bytes`` and ``integrity_sha256`` *before* any file request.
6. Stream each file with SHA-256, a hard stop at the declared size, a per-read gap timeout
   and one total deadline.
7. Install: rename the staging dir to ``bundles/<ts>``, rename a temporary symlink over
   ``current``; notify the sidecar; keep the newest ``keep`` bundles (never ``current``'s).

Layout of ``root``: ``.lock``, ``state.json``, ``bundles/<ts>/…``, ``current -> bundles/<ts>``.
A refusal is a typed ``BundleRefused`` subclass, reported by ``tick()`` (and raised by
``pull()``), sent to the ``audit`` callback, and leaves ``current`` exactly as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_sandbox.bundles.manifest import (
    API_KEY_HEADER,
    MANIFEST_PATH,
    FileEntry,
    Manifest,
    Version,
    VersionRange,
    check_paths,
    file_url_path,
    load_public_key,
    parse_rfc3339,
)
from pytest_sandbox.errors import (
    BundleRefusal,
    BundleRefused,
    FetchFailed,
    FetchTimeout,
    FileHashMismatch,
    FileSizeMismatch,
    ManifestExpired,
    ManifestInvalid,
    ManifestStale,
    RollbackRefused,
    VersionOutOfRange,
)

DEFAULT_RANGE = ">=0.4.0,<0.5.0"
CHUNK = 1 << 20
#: Test-only: kill -9 ourselves / pause when reaching the named install step.
CRASH_ENV = "PYTEST_SANDBOX_BUNDLE_CRASH_AT"
PAUSE_ENV = "PYTEST_SANDBOX_BUNDLE_PAUSE_AT"
PAUSE_FILE_ENV = "PYTEST_SANDBOX_BUNDLE_PAUSE_FILE"
KEY_ENV = "PYTEST_SANDBOX_BUNDLE_API_KEY"
#: The named steps a tick passes through (for hooks and crash tests).
STEPS = ("locked", "downloaded", "staged", "symlinked", "swapped", "retention", "unlocking")


@dataclass(frozen=True)
class AuditEvent:
    """One thing the puller did or refused. Never carries the API key."""

    event: str
    reason: str = ""
    code: str | None = None
    bundle_ts: str | None = None
    version: str | None = None
    tenant: str = ""
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PullResult:
    """The outcome of one tick: ``status`` is ``installed``, ``up_to_date``, ``busy`` or
    ``refused``; ``reason`` says why; ``code`` is the refusal's short name; ``error`` the
    typed refusal; ``sidecar`` the reload outcome after an install."""

    status: str
    reason: str = ""
    bundle_ts: str | None = None
    version: str | None = None
    code: str | None = None
    error: BundleRefused | None = None
    sidecar: Any = None
    retry_after: float | None = None
    bytes_fetched: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "bundle_ts": self.bundle_ts,
            "version": self.version,
            "code": self.code,
            "error": type(self.error).__name__ if self.error else None,
            "sidecar": self.sidecar.status if self.sidecar is not None else None,
            "retry_after": self.retry_after,
            "bytes_fetched": self.bytes_fetched,
        }


@dataclass
class _State:
    tenant: str | None = None
    floor: str | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(top: Path) -> None:
    """Make every file and dir under ``top`` durable before it is renamed into place.

    One ``syncfs`` flushes the filesystem once (64 per-file fsyncs cost 64 device flushes);
    per-file ``fsync`` is the fallback where ``syncfs`` is missing.
    """
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    for directory, _, names in os.walk(top):
        for name in names:
            file_fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(file_fd)
            finally:
                os.close(file_fd)
        _fsync_dir(Path(directory))


def _syncfs(fd: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syncfs(fd) == 0)
    except (OSError, AttributeError):
        return False


class BundlePuller:
    """Installs a tenant's bundle from a bundle server into ``root``, safely and atomically.

    ``tick()`` returns a :class:`PullResult` (a refusal is reported, not raised); ``pull()``
    raises the typed refusal instead. ``current`` (``root/current``) always resolves to a
    complete, hash-verified bundle once one was installed. Options: ``version_range``,
    ``keep``, ``max_manifest_bytes``, ``max_bundle_bytes``, ``max_files``, ``gap_timeout``
    (seconds without a byte), ``deadline`` (seconds per tick), ``max_age`` (seconds since
    ``bundle_ts``), ``public_key`` (Ed25519: manifests must be signed), ``sidecar_socket``,
    ``sidecar_timeout``, ``audit`` (callback for :class:`AuditEvent`), ``ssl_context``,
    ``fsync``, ``step_hook`` (called with each step name in ``STEPS``).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        root: str | os.PathLike[str],
        *,
        version_range: str = DEFAULT_RANGE,
        keep: int = 3,
        max_manifest_bytes: int = 1 << 20,
        max_bundle_bytes: int | None = None,
        max_files: int = 100_000,
        gap_timeout: float = 10.0,
        deadline: float = 300.0,
        max_age: float | None = None,
        public_key: Any = None,
        sidecar_socket: str | os.PathLike[str] | None = None,
        sidecar_timeout: float = 2.0,
        audit: Callable[[AuditEvent], object] | None = None,
        ssl_context: Any = None,
        fsync: bool = True,
        step_hook: Callable[[str], object] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bundle puller: url {url!r} must be http(s)://host[:port]")
        if not api_key:
            raise ValueError("bundle puller: api_key must be a non-empty string")
        if keep < 1:
            raise ValueError(f"bundle puller: keep={keep} must be at least 1 (current)")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._api_key = api_key
        self.tenant = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
        self.root = Path(root)
        self.version_range = VersionRange.parse(version_range)
        self.keep = keep
        self.max_manifest_bytes = max_manifest_bytes
        self.max_bundle_bytes = max_bundle_bytes
        self.max_files = max_files
        self.gap_timeout = gap_timeout
        self.deadline = deadline
        self.max_age = max_age
        self.public_key = load_public_key(public_key) if public_key is not None else None
        self.sidecar_socket = Path(sidecar_socket) if sidecar_socket is not None else None
        self.sidecar_timeout = sidecar_timeout
        self.audit = audit
        self.ssl_context = ssl_context
        self.fsync = fsync
        self.step_hook = step_hook
        self._crash_at = os.environ.get(CRASH_ENV)
        self._pause_at = os.environ.get(PAUSE_ENV)

    def __repr__(self) -> str:  # never show the key
        return f"<BundlePuller {self.url} tenant={self.tenant[:12]} root={self.root}>"

    # --- public API -------------------------------------------------------------------

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    def current_ts(self) -> str | None:
        """The ``bundle_ts`` ``current`` points to, or None."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        return Path(target).name

    def installed(self) -> list[str]:
        """The ``bundle_ts`` of every installed bundle dir (unordered)."""
        try:
            return [p.name for p in self.bundles_dir.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    def floor(self) -> str | None:
        """The rollback floor: the highest version installed for this tenant."""
        return self._load_state().floor

    def pull(self) -> PullResult:
        """Like ``tick()`` but raise the typed ``BundleRefused`` on a refusal."""
        result = self.tick()
        if result.status == "refused" and result.error is not None:
            raise result.error
        return result

    def tick(self) -> PullResult:
        """One pull attempt; never raises for a refusal (see :class:`PullResult`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                result = PullResult("busy", "another puller holds the lock on " + str(self.root))
                self._audit("busy", result.reason)
                return result
            try:
                self._step("locked")
                return self._tick_locked()
            finally:
                self._step("unlocking")
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- the tick ---------------------------------------------------------------------

    def _tick_locked(self) -> PullResult:
        self._clean_stale()
        state = self._load_state()
        if state.tenant != self.tenant:
            if state.tenant is not None or self.current_ts() or self.installed():
                self._wipe()
                self._audit("tenant_changed", "API key changed: old bundles wiped")
            state = _State(tenant=self.tenant, floor=None)
            self._save_state(state)
        deadline = time.monotonic() + self.deadline
        conn = self._connect()
        staging: Path | None = None
        manifest: Manifest | None = None
        fetched = 0
        try:
            manifest = self._fetch_manifest(conn, deadline)
            if self.public_key is not None:
                manifest.verify(self.public_key)
            version = manifest.version
            self._gate(manifest, version, state)
            if (
                self.current_ts() == manifest.bundle_ts
                and (self.bundles_dir / manifest.bundle_ts).is_dir()
            ):
                result = PullResult(
                    "up_to_date",
                    "current is bundle " + manifest.bundle_ts,
                    manifest.bundle_ts,
                    manifest.bundle_version,
                )
                self._audit("up_to_date", result.reason, None, manifest)
                return result
            self._check_before_download(manifest)
            staging = self.root / f".staging-{manifest.bundle_ts}-{secrets.token_hex(4)}"
            staging.mkdir()
            for entry in manifest.files:
                fetched += self._fetch_file(conn, manifest, entry, staging, deadline)
            self._step("downloaded")
            self._install(manifest, version, state, staging)
            staging = None
        except BundleRefusal as err:
            retry = err.detail.get("retry_after")
            result = PullResult(
                "refused",
                str(err),
                manifest.bundle_ts if manifest else None,
                manifest.bundle_version if manifest else None,
                err.code,
                err,
                retry_after=float(retry) if isinstance(retry, int | float) else None,
                bytes_fetched=fetched,
            )
            self._audit("refused", str(err), err.code, manifest)
            return result
        finally:
            conn.close()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        self._retention()
        sidecar = self._notify(manifest)
        result = PullResult(
            "installed",
            f"installed bundle {manifest.bundle_ts} ({manifest.bundle_version})",
            manifest.bundle_ts,
            manifest.bundle_version,
            sidecar=sidecar,
            bytes_fetched=fetched,
        )
        self._audit("installed", result.reason, None, manifest)
        return result

    def _gate(self, manifest: Manifest, version: Version, state: _State) -> None:
        where = f"bundle {manifest.bundle_ts} from {self.url}"
        if version not in self.version_range:
            raise VersionOutOfRange(
                f"{where}: version {version} is outside the accepted range "
                f"{self.version_range}. Publish a version in range or widen version_range.",
                version=str(version),
            )
        if state.floor is not None and version < Version.parse(state.floor):
            raise RollbackRefused(
                f"{where}: version {version} is below {state.floor}, the last version "
                f"installed for this tenant (rollback). Publish a version >= {state.floor}.",
                version=str(version),
            )
        now = _dt.datetime.now(_dt.UTC)
        if manifest.expires is not None and parse_rfc3339(manifest.expires) <= now:
            raise ManifestExpired(
                f"{where}: the manifest expired at {manifest.expires} (a frozen or replayed "
                "feed). The server must publish a fresh manifest.",
            )
        if self.max_age is not None:
            if not manifest.bundle_ts.isdigit():
                raise ManifestStale(
                    f"{where}: max_age is set but bundle_ts {manifest.bundle_ts!r} is not "
                    "Unix seconds, so its age is unknown. Publish numeric timestamps.",
                )
            age = time.time() - int(manifest.bundle_ts)
            if age > self.max_age:
                raise ManifestStale(
                    f"{where}: the bundle is {age:.0f}s old, over max_age={self.max_age:g}s. "
                    "The feed may be frozen; publish a fresh bundle.",
                )

    def _check_before_download(self, manifest: Manifest) -> None:
        where = f"bundle {manifest.bundle_ts} from {self.url}"
        if len(manifest.files) > self.max_files:
            raise ManifestInvalid(
                f"{where}: {len(manifest.files)} files, over max_files={self.max_files}."
            )
        check_paths([f.path for f in manifest.files])
        manifest.check_integrity()
        if self.max_bundle_bytes is not None and manifest.size_bytes > self.max_bundle_bytes:
            raise ManifestInvalid(
                f"{where}: size_bytes {manifest.size_bytes} is over max_bundle_bytes="
                f"{self.max_bundle_bytes}. Raise the cap if the bundle is legitimate.",
            )

    # --- HTTP ---------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            import ssl

            context = self.ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.gap_timeout, context=context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.gap_timeout)

    def _timeout(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchTimeout(
                f"{what} from {self.url}: the total deadline of {self.deadline:g}s passed "
                "(slow retrieval). Raise deadline= if the bundle is that large.",
            )
        return min(self.gap_timeout, left)

    def _get(
        self, conn: http.client.HTTPConnection, path: str, deadline: float, what: str
    ) -> tuple[http.client.HTTPResponse, socket.socket]:
        try:
            conn.timeout = self._timeout(deadline, what)
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            conn.request("GET", path, headers={API_KEY_HEADER: self._api_key})
            sock = conn.sock
            assert sock is not None
            sock.settimeout(self._timeout(deadline, what))
            response = conn.getresponse()
        except TimeoutError as exc:
            conn.close()
            raise self._timeout_error(deadline, what) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise FetchFailed(
                f"{what} from {self.url}: {type(exc).__name__}: {exc} (connection broken, "
                "reset, or not HTTP). Check the server; the next tick retries.",
            ) from exc
        if response.status != 200:
            retry_after = response.getheader("Retry-After")
            conn.close()
            hint = {
                401: "the request had no API key",
                403: "the server does not know this API key",
                404: "the server has no such bundle or file",
            }.get(response.status, "the server failed")
            detail: dict[str, object] = {"status": response.status}
            if retry_after is not None and retry_after.strip().isdigit():
                detail["retry_after"] = int(retry_after.strip())
                hint += f"; retry after {retry_after.strip()}s"
            raise FetchFailed(f"{what} from {self.url}: HTTP {response.status} ({hint}).", **detail)
        return response, sock

    def _timeout_error(self, deadline: float, what: str) -> FetchTimeout:
        if time.monotonic() >= deadline:
            return FetchTimeout(
                f"{what} from {self.url}: the total deadline of {self.deadline:g}s passed "
                "(slow retrieval). Raise deadline= if the bundle is that large.",
            )
        return FetchTimeout(
            f"{what} from {self.url}: no byte for {self.gap_timeout:g}s (gap_timeout). The "
            "server stalled; the next tick retries.",
        )

    def _read1(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        sock: socket.socket,
        n: int,
        deadline: float,
        what: str,
    ) -> bytes:
        try:
            sock.settimeout(self._timeout(deadline, what))
            return response.read1(n)
        except TimeoutError as exc:
            conn.close()
            raise self._timeout_error(deadline, what) from exc
        except http.client.IncompleteRead as exc:
            conn.close()
            error = FetchFailed if what == "manifest" else FileSizeMismatch
            raise error(
                f"{what} from {self.url}: the body ended early ({exc.partial!r:.40} …); "
                "the connection was cut. The next tick retries.",
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise FetchFailed(
                f"{what} from {self.url}: {type(exc).__name__}: {exc} while reading the body.",
            ) from exc

    @staticmethod
    def _done(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """The body was read to its end: free the connection for the next request."""
        response.close()
        if response.will_close:
            conn.close()

    def _fetch_manifest(self, conn: http.client.HTTPConnection, deadline: float) -> Manifest:
        what = "manifest"
        response, sock = self._get(conn, MANIFEST_PATH, deadline, what)
        cap = self.max_manifest_bytes
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > cap:
            conn.close()
            raise ManifestInvalid(
                f"manifest from {self.url}: Content-Length {length} is over the "
                f"{cap}-byte cap (max_manifest_bytes). Nothing was read.",
            )
        data = bytearray()
        while len(data) <= cap:
            chunk = self._read1(conn, response, sock, cap + 1 - len(data), deadline, what)
            if not chunk:
                break
            data += chunk
        if response.length:  # read1 says b"" at a premature EOF instead of raising
            conn.close()
            raise FetchFailed(
                f"manifest from {self.url}: the body ended {response.length} bytes short of "
                "its Content-Length (connection cut). The next tick retries.",
            )
        if len(data) > cap:
            conn.close()
            raise ManifestInvalid(
                f"manifest from {self.url}: over the {cap}-byte cap (max_manifest_bytes); "
                "reading stopped there.",
            )
        self._done(conn, response)
        return Manifest.parse(bytes(data))

    def _fetch_file(
        self,
        conn: http.client.HTTPConnection,
        manifest: Manifest,
        entry: FileEntry,
        staging: Path,
        deadline: float,
    ) -> int:
        what = f"bundle {manifest.bundle_ts} file {entry.path!r}"
        response, sock = self._get(
            conn, file_url_path(manifest.bundle_ts, entry.path), deadline, what
        )
        length = response.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) != entry.size):
            conn.close()
            raise FileSizeMismatch(
                f"{what}: Content-Length {length} but the manifest declares {entry.size} "
                "bytes. Nothing was read; the server or the manifest lies.",
            )
        target = staging / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        digest = hashlib.sha256()
        remaining = entry.size
        try:
            while remaining > 0:
                chunk = self._read1(conn, response, sock, min(CHUNK, remaining), deadline, what)
                if not chunk:
                    conn.close()
                    raise FileSizeMismatch(
                        f"{what}: the body ended after {entry.size - remaining} of "
                        f"{entry.size} bytes.",
                    )
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                remaining -= len(chunk)
            # no length: the body must end exactly here (hard stop, no endless data)
            if length is None and self._read1(conn, response, sock, 1, deadline, what):
                conn.close()
                raise FileSizeMismatch(
                    f"{what}: the body goes on past the declared {entry.size} bytes "
                    "(endless data). Reading stopped at the declared size.",
                )
        finally:
            os.close(fd)
        self._done(conn, response)
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise FileHashMismatch(
                f"{what}: SHA-256 is {actual}, the manifest says {entry.sha256}. The file was "
                "altered or comes from another bundle.",
            )
        return entry.size

    # --- install ------------------------------------------------------------------------

    def _install(self, manifest: Manifest, version: Version, state: _State, staging: Path) -> None:
        ts = manifest.bundle_ts
        if self.fsync:
            _sync_tree(staging)
        self.bundles_dir.mkdir(exist_ok=True)
        dest = self.bundles_dir / ts
        if dest.exists() or dest.is_symlink():
            # a leftover of a crashed tick (current does not point to it): replace it
            self._trash(dest)
        # raise the floor first: a crash after the swap must never leave a lower floor
        if state.floor is None or version > Version.parse(state.floor):
            state.floor = str(version)
        self._save_state(state)
        os.rename(staging, dest)
        os.utime(dest)  # retention orders bundles by install time
        if self.fsync:
            _fsync_dir(self.bundles_dir)
        self._step("staged")
        link = self.root / f".current-{secrets.token_hex(4)}"
        os.symlink(f"bundles/{ts}", link)
        self._step("symlinked")
        os.replace(link, self.current)
        if self.fsync:
            _fsync_dir(self.root)
        self._step("swapped")

    def _retention(self) -> None:
        current = self.current_ts()
        try:
            dirs = [p for p in self.bundles_dir.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            return
        dirs.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        # current is always kept and counts towards keep; then the newest others
        others = [p for p in dirs if p.name != current]
        doomed = others[self.keep - (1 if len(others) < len(dirs) else 0) :]
        for i, path in enumerate(doomed):
            self._trash(path)
            if i == 0:
                self._step("retention")
        if doomed:
            self._audit("retention", f"removed {len(doomed)} old bundle(s)")

    def _trash(self, path: Path) -> None:
        """Rename then delete: a crash leaves a ``.trash-*`` dir the next tick removes."""
        trash = self.root / f".trash-{secrets.token_hex(4)}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _wipe(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.current)
        if self.bundles_dir.exists():
            self._trash(self.bundles_dir)

    def _clean_stale(self) -> None:
        """Remove what a crashed tick left: we hold the lock, so nothing else is using it."""
        cleaned = 0
        for path in self.root.iterdir():
            name = path.name
            if name.startswith((".staging-", ".trash-")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                cleaned += 1
            elif name.startswith((".current-", ".state-")):
                path.unlink(missing_ok=True)
                cleaned += 1
        if cleaned:
            self._audit("cleaned", f"removed {cleaned} leftover(s) of an interrupted tick")

    # --- state ------------------------------------------------------------------------

    def _load_state(self) -> _State:
        try:
            data = json.loads((self.root / "state.json").read_text())
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError):
            # unreadable state: keep the bundles, but trust no floor we cannot read
            return _State(tenant=None)
        return _State(tenant=data.get("tenant"), floor=data.get("floor"))

    def _save_state(self, state: _State) -> None:
        """Write ``state.json`` atomically: temp file, fsync, rename, fsync the dir."""
        tmp = self.root / f".state-{secrets.token_hex(4)}.json"
        data = json.dumps({"tenant": state.tenant, "floor": state.floor}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / "state.json")
        if self.fsync:
            _fsync_dir(self.root)

    # --- side effects -------------------------------------------------------------------

    def _notify(self, manifest: Manifest) -> Any:
        if self.sidecar_socket is None:
            return None
        from pytest_sandbox.bundles.sidecar import notify

        outcome = notify(
            self.sidecar_socket,
            {
                "bundle_ts": manifest.bundle_ts,
                "bundle_version": manifest.bundle_version,
                "path": str(self.current),
            },
            timeout=self.sidecar_timeout,
        )
        if not outcome.ok:
            self._audit(
                "sidecar_failed",
                f"sidecar {self.sidecar_socket}: {outcome.status} {outcome.detail}".strip(),
                None,
                manifest,
            )
        return outcome

    def _audit(
        self, event: str, reason: str, code: str | None = None, manifest: Manifest | None = None
    ) -> None:
        if self.audit is None:
            return
        self.audit(
            AuditEvent(
                event,
                reason,
                code,
                manifest.bundle_ts if manifest else None,
                manifest.bundle_version if manifest else None,
                self.tenant[:16],
            )
        )

    def _step(self, name: str) -> None:
        if self.step_hook is not None:
            self.step_hook(name)
        if self._pause_at == name:
            marker = os.environ.get(PAUSE_FILE_ENV)
            if marker:
                Path(marker).write_text(str(os.getpid()))
            time.sleep(60)  # until the test kills us; bounded in case it never does
        if self._crash_at == name:
            os.kill(os.getpid(), signal.SIGKILL)


def verify_tree(directory: Path, manifest: Manifest) -> list[str]:
    """Problems between an installed bundle dir and its manifest (empty when it matches)."""
    problems = []
    expected = {f.path: f for f in manifest.files}
    seen = set()
    for path in directory.rglob("*"):
        if path.is_file():
            rel = path.relative_to(directory).as_posix()
            seen.add(rel)
            entry = expected.get(rel)
            if entry is None:
                problems.append(f"unexpected file {rel}")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.sha256:
                problems.append(f"hash mismatch {rel}")
    problems += [f"missing {p}" for p in expected if p not in seen]
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_sandbox.bundles.puller --url U --root R [--ticks N]``.

    The API key comes from the environment (``PYTEST_SANDBOX_BUNDLE_API_KEY``), never argv.
    Prints one JSON result per tick. ``--journal F`` appends ``<pid> enter|exit`` lines while
    the lock is held (used to prove two pullers never interleave).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pytest_sandbox.bundles.puller")
    parser.add_argument("--url", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--ticks", type=int, default=1)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--range", default=DEFAULT_RANGE)
    parser.add_argument("--journal")
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to hold the lock")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between ticks")
    args = parser.parse_args(argv)
    key = os.environ.get(KEY_ENV, "")
    journal = args.journal

    def hook(step: str) -> None:
        if journal and step in ("locked", "unlocking"):
            with open(journal, "a") as handle:
                handle.write(f"{os.getpid()} {'enter' if step == 'locked' else 'exit'}\n")
            if step == "locked" and args.hold:
                time.sleep(args.hold)

    puller = BundlePuller(
        args.url,
        key,
        args.root,
        keep=args.keep,
        version_range=args.range,
        fsync=not args.no_fsync,
        step_hook=hook,
    )
    for i in range(args.ticks):
        if i and args.interval:
            time.sleep(args.interval)
        print(json.dumps(puller.tick().to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
