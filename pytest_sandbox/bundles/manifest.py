"""Bundle manifests: schema, canonical integrity hash, semver gate, path rules, signatures.

The wire format (kept exactly)::

    {"bundle_ts": "1732860000", "bundle_version": "0.4.2", "size_bytes": 123,
     "integrity_sha256": "<hex>", "files": [{"path": "a/b.md", "size": 3, "sha256": "<hex>"}],
     "expires": "2030-01-01T00:00:00Z", "signature": "<base64 Ed25519>"}

``integrity_sha256`` is the SHA-256 of the *canonical file list*: the entries sorted by path,
serialised as compact JSON ``[[path, size, sha256], ...]`` (UTF-8, no ASCII escaping). The
signature covers the canonical manifest: every field except ``signature``, compact JSON with
sorted keys. Neither depends on how the server happened to format its JSON.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import (
    IntegrityMismatch,
    ManifestInvalid,
    SignatureInvalid,
    UnsafeBundlePath,
)

MANIFEST_PATH = "/api/v1/memory/bundle/manifest"
FILE_PREFIX = "/api/v1/memory/bundle/"
API_KEY_HEADER = "X-API-Key"

#: Longest path (bytes, UTF-8) and path segment a bundle may hold.
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
#: ``bundle_ts`` becomes a directory name: keep it to a safe alphabet.
TS_RE = re.compile(r"^[0-9A-Za-z_.-]{1,64}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


# --- semver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A semantic version (2.0.0 rules: prereleases sort before the release, build ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> Version:
        match = SEMVER_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre, text)

    def _key(self) -> tuple[Any, ...]:
        # A release sorts after all its prereleases; numeric identifiers before alphanumeric.
        pre: tuple[Any, ...] = tuple(
            (0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease
        )
        return (self.major, self.minor, self.patch, not self.prerelease, pre)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a._key() == b._key(),
    "!=": lambda a, b: a._key() != b._key(),
}


@dataclass(frozen=True)
class VersionRange:
    """A comma-separated list of comparators, all of which must hold: ``>=0.4.0,<0.5.0``."""

    spec: str
    clauses: tuple[tuple[str, Version], ...]

    @classmethod
    def parse(cls, spec: str) -> VersionRange:
        clauses = []
        for raw in spec.split(","):
            part = raw.strip()
            if not part:
                continue
            op = next((o for o in (">=", "<=", "==", "!=", ">", "<") if part.startswith(o)), "")
            if not op:
                raise ValueError(
                    f"version range {spec!r}: clause {part!r} needs an operator "
                    "(>=, <=, >, <, ==, !=), e.g. '>=0.4.0,<0.5.0'"
                )
            clauses.append((op, Version.parse(part[len(op) :].strip())))
        if not clauses:
            raise ValueError(f"version range {spec!r} is empty; use e.g. '>=0.4.0,<0.5.0'")
        return cls(spec, tuple(clauses))

    def __contains__(self, version: Version) -> bool:
        return all(_OPS[op](version, bound) for op, bound in self.clauses)

    def __str__(self) -> str:
        return self.spec


# --- paths ----------------------------------------------------------------------------


def path_problem(path: object) -> str | None:
    """Why ``path`` may not name a file inside a bundle, or None when it is safe.

    Safe means: a non-empty relative POSIX path of normal segments (no ``.``, ``..``, empty
    segment, backslash, NUL or control character), NFC-normalised, within the length limits.
    """
    if not isinstance(path, str):
        return f"path is {type(path).__name__}, not a string"
    if path == "":
        return "path is empty"
    if "\x00" in path:
        return "path contains a NUL byte"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "path contains a control character"
    if "\\" in path:
        return "path contains a backslash (a separator on Windows)"
    if path.startswith("/"):
        return "path is absolute"
    if re.match(r"^[A-Za-z]:", path):
        return "path starts with a drive letter"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8 (lone surrogate)"
    if len(encoded) > MAX_PATH_BYTES:
        return f"path is {len(encoded)} bytes, over the {MAX_PATH_BYTES}-byte limit"
    if unicodedata.normalize("NFC", path) != path:
        return "path is not NFC-normalised (it could alias another name)"
    for segment in path.split("/"):
        if segment == "":
            return "path has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"path has a {segment!r} segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"a segment is over {MAX_SEGMENT_BYTES} bytes"
    return None


def _collision_key(path: str) -> str:
    return unicodedata.normalize("NFKC", path).casefold()


def check_paths(paths: Sequence[object]) -> None:
    """Refuse (``UnsafeBundlePath``) any unsafe path, duplicate, or aliasing pair.

    Aliasing pairs are paths equal after case folding / Unicode compatibility normalisation
    (they collide on case-insensitive or normalising filesystems), and a file that is also
    another file's directory.
    """
    seen: dict[str, str] = {}
    folded: dict[str, str] = {}
    for path in paths:
        problem = path_problem(path)
        if problem is not None:
            raise UnsafeBundlePath(
                f"bundle manifest: file path {path!r} refused: {problem}. The publisher must "
                "use relative POSIX paths of normal segments.",
                path=path,
            )
        assert isinstance(path, str)
        if path in seen:
            raise UnsafeBundlePath(
                f"bundle manifest: file path {path!r} is listed twice. Each path must be unique.",
                path=path,
            )
        seen[path] = path
        key = _collision_key(path)
        if key in folded:
            raise UnsafeBundlePath(
                f"bundle manifest: file paths {folded[key]!r} and {path!r} collide on a "
                "case-insensitive or normalising filesystem. Rename one of them.",
                path=path,
            )
        folded[key] = path
    for path in seen:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UnsafeBundlePath(
                    f"bundle manifest: {'/'.join(parts[:i])!r} is a file and also the "
                    f"directory of {path!r}. A path cannot be both.",
                    path=path,
                )


def ts_problem(ts: object) -> str | None:
    if not isinstance(ts, str) or not TS_RE.match(ts) or ts in (".", ".."):
        return f"bundle_ts {ts!r} must match {TS_RE.pattern} (it names a directory)"
    return None


# --- the manifest ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle: its relative path, size in bytes and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def canonical_files(files: Iterable[FileEntry]) -> bytes:
    """The canonical file list that ``integrity_sha256`` is computed over."""
    rows = sorted(([f.path, f.size, f.sha256] for f in files), key=lambda r: str(r[0]))
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def integrity_of(files: Iterable[FileEntry]) -> str:
    return hashlib.sha256(canonical_files(files)).hexdigest()


def rfc3339(when: _dt.datetime) -> str:
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> _dt.datetime:
    value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (RFC 3339 needs 'Z' or an offset)")
    return value


@dataclass(frozen=True)
class Manifest:
    """A bundle manifest as published by the server and checked by the puller."""

    bundle_ts: str
    bundle_version: str
    size_bytes: int
    integrity_sha256: str
    files: tuple[FileEntry, ...]
    expires: str | None = None
    signature: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def version(self) -> Version:
        return Version.parse(self.bundle_version)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.extra)
        data.update(
            bundle_ts=self.bundle_ts,
            bundle_version=self.bundle_version,
            size_bytes=self.size_bytes,
            integrity_sha256=self.integrity_sha256,
            files=[f.to_dict() for f in self.files],
        )
        if self.expires is not None:
            data["expires"] = self.expires
        if self.signature is not None:
            data["signature"] = self.signature
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8")

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but ``signature``, canonical JSON."""
        data = self.to_dict()
        data.pop("signature", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )

    def with_integrity(self) -> Manifest:
        """The same manifest with ``size_bytes`` and ``integrity_sha256`` recomputed."""
        return replace(
            self,
            size_bytes=sum(f.size for f in self.files),
            integrity_sha256=integrity_of(self.files),
        )

    def sign(self, private_key: Any) -> Manifest:
        """Sign with an ``Ed25519PrivateKey`` (``cryptography``)."""
        unsigned = replace(self, signature=None)
        raw = private_key.sign(unsigned.signed_bytes())
        return replace(self, signature=base64.b64encode(raw).decode("ascii"))

    def verify(self, public_key: Any) -> None:
        """Raise ``SignatureInvalid`` unless the signature verifies against ``public_key``."""
        from cryptography.exceptions import InvalidSignature

        if not self.signature:
            raise SignatureInvalid(
                f"bundle {self.bundle_ts}: the manifest has no signature but the puller "
                "requires one (public_key is set). Sign manifests on the server.",
            )
        try:
            raw = base64.b64decode(self.signature, validate=True)
            public_key.verify(raw, self.signed_bytes())
        except (InvalidSignature, binascii.Error, ValueError) as exc:
            raise SignatureInvalid(
                f"bundle {self.bundle_ts}: the manifest signature does not verify against the "
                "configured Ed25519 public key. The manifest was altered or signed by another "
                "key; check the server's signing key.",
            ) from exc

    def check_integrity(self) -> None:
        """Refuse a manifest whose ``size_bytes`` / ``integrity_sha256`` disagree with files."""
        total = sum(f.size for f in self.files)
        if total != self.size_bytes:
            raise IntegrityMismatch(
                f"bundle {self.bundle_ts}: size_bytes is {self.size_bytes} but the files add up "
                f"to {total}. The manifest is inconsistent; republish it.",
            )
        actual = integrity_of(self.files)
        if actual != self.integrity_sha256:
            raise IntegrityMismatch(
                f"bundle {self.bundle_ts}: integrity_sha256 {self.integrity_sha256!r} does not "
                f"match the file list (computed {actual}). The manifest was altered.",
            )

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """Parse and schema-check a manifest; raise ``ManifestInvalid`` on any problem."""

        def bad(problem: str) -> ManifestInvalid:
            return ManifestInvalid(
                f"bundle manifest refused: {problem}. The server must send the documented "
                "schema (bundle_ts, bundle_version, size_bytes, integrity_sha256, files).",
            )

        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"not UTF-8 JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise bad(f"top level is {type(data).__name__}, not an object")
        required = {
            "bundle_ts": (str, int),
            "bundle_version": (str,),
            "size_bytes": (int,),
            "integrity_sha256": (str,),
            "files": (list,),
        }
        for name, types in required.items():
            if name not in data:
                raise bad(f"field {name!r} is missing")
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise bad(f"field {name!r} has type {type(value).__name__}")
        ts = str(data["bundle_ts"])
        if (problem := ts_problem(ts)) is not None:
            raise bad(problem)
        try:
            Version.parse(data["bundle_version"])
        except ValueError as exc:
            raise bad(str(exc)) from exc
        if data["size_bytes"] < 0:
            raise bad("size_bytes is negative")
        if not SHA_RE.match(data["integrity_sha256"]):
            raise bad("integrity_sha256 is not 64 lowercase hex digits")
        files = []
        for i, item in enumerate(data["files"]):
            if not isinstance(item, dict):
                raise bad(f"files[{i}] is not an object")
            path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
            if not isinstance(path, str):
                raise bad(f"files[{i}].path is not a string")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"files[{i}].size {size!r} is not a non-negative integer")
            if not isinstance(sha, str) or not SHA_RE.match(sha):
                raise bad(f"files[{i}].sha256 is not 64 lowercase hex digits")
            files.append(FileEntry(path, size, sha))
        expires = data.get("expires")
        if expires is not None:
            if not isinstance(expires, str):
                raise bad("expires is not a string")
            try:
                parse_rfc3339(expires)
            except ValueError as exc:
                raise bad(f"expires {expires!r} is not RFC 3339") from exc
        signature = data.get("signature")
        if signature is not None and not isinstance(signature, str):
            raise bad("signature is not a string")
        known = {*required, "expires", "signature"}
        return cls(
            bundle_ts=ts,
            bundle_version=data["bundle_version"],
            size_bytes=data["size_bytes"],
            integrity_sha256=data["integrity_sha256"],
            files=tuple(files),
            expires=expires,
            signature=signature,
            extra={k: v for k, v in data.items() if k not in known},
        )


def build_manifest(
    files: Mapping[str, bytes],
    *,
    version: str,
    ts: str,
    expires: str | None = None,
) -> Manifest:
    """A truthful manifest for ``files`` (every size and hash computed here)."""
    entries = tuple(
        FileEntry(path, len(data), hashlib.sha256(data).hexdigest())
        for path, data in sorted(files.items())
    )
    return Manifest(ts, version, 0, "", entries, expires=expires).with_integrity()


def read_tree(directory: Path) -> dict[str, bytes]:
    """Every regular file under ``directory`` as ``{relative posix path: bytes}``."""
    found: dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def file_url_path(ts: str, path: str) -> str:
    """``/api/v1/memory/bundle/<ts>/<path>`` with each segment percent-encoded."""
    from urllib.parse import quote

    return (
        FILE_PREFIX
        + quote(ts, safe="")
        + "/"
        + "/".join(quote(seg, safe="") for seg in path.split("/"))
    )


def load_public_key(key: Any) -> Any:
    """An Ed25519 public key from a key object, raw 32 bytes, or PEM bytes/str."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PublicKey.from_public_bytes(key)
    if isinstance(key, bytes):
        loaded = serialization.load_pem_public_key(key)
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError("public key is not Ed25519")
        return loaded
    raise TypeError(f"cannot use {type(key).__name__} as an Ed25519 public key")
