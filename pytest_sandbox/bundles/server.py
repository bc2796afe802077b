"""BundleServer: versioned bundles per tenant over loopback HTTP(S), misbehaving on demand.

A plain class (no pytest): ``with BundleServer() as server: ...``. It runs in a thread of the
calling process; ``close()`` stops it and closes every socket it opened (listener and client
connections). Errors raised in its threads are kept and re-raised by ``check()``.

Protocol (kept exactly):

* ``GET /api/v1/memory/bundle/manifest`` with ``X-API-Key`` → the tenant's current manifest;
* ``GET /api/v1/memory/bundle/<ts>/<path>`` (each segment percent-encoded) → file bytes;
* no key → 401, unknown key → 403; a tenant sees only its own bundles.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pytest_sandbox.bundles import faults
from pytest_sandbox.bundles.faults import Scenario, Wire
from pytest_sandbox.bundles.manifest import (
    API_KEY_HEADER,
    FILE_PREFIX,
    MANIFEST_PATH,
    FileEntry,
    Manifest,
    Version,
    build_manifest,
    read_tree,
    rfc3339,
)
from pytest_sandbox.errors import BundleServerError

_REASONS = {
    200: "OK",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def fingerprint(api_key: str) -> str:
    """SHA-256 of an API key: how logs and pullers name a tenant without keeping the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass
class Bundle:
    """A published bundle: its manifest and the bytes the server serves for each path."""

    manifest: Manifest
    bodies: dict[str, bytes]
    hidden: bool = False
    retired: bool = False


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it (``status`` 0 when no status line was sent)."""

    method: str
    path: str
    status: int
    kind: str
    tenant: str | None
    fault: str | None
    bytes_sent: int
    at: float = field(default_factory=time.time)


ExpiresSpec = str | _dt.datetime | _dt.timedelta | None


def _expires_text(expires: ExpiresSpec) -> str | None:
    if expires is None or isinstance(expires, str):
        return expires
    if isinstance(expires, _dt.timedelta):
        return rfc3339(_dt.datetime.now(_dt.UTC) + expires)
    return rfc3339(expires)


class Tenant:
    """The bundles one API key can see. ``publish`` makes a new bundle current."""

    def __init__(self, server: BundleServer, api_key: str) -> None:
        self.server = server
        self.api_key = api_key
        self.fingerprint = fingerprint(api_key)
        self.bundles: dict[str, Bundle] = {}
        self.history: list[str] = []  # published (non-hidden) ts, oldest first
        self.current_ts: str | None = None

    @property
    def current(self) -> Bundle | None:
        return self.bundles.get(self.current_ts) if self.current_ts else None

    @property
    def manifest(self) -> Manifest | None:
        """The current manifest (signed when the server signs)."""
        bundle = self.current
        return None if bundle is None else self.server._sign(bundle.manifest)

    def previous(self) -> Bundle | None:
        if len(self.history) < 2:
            return None
        return self.bundles[self.history[-2]]

    def publish(
        self,
        files: Mapping[str, bytes] | Path,
        *,
        version: str,
        ts: str | None = None,
        expires: ExpiresSpec = None,
        corrupt: Iterable[str] = (),
        lie_size: Mapping[str, int] | None = None,
        current: bool = True,
    ) -> Manifest:
        """Publish ``files`` (a mapping or a directory) as a bundle at ``version``.

        Every size and hash is computed here. Deliberate lies are explicit: ``corrupt`` names
        paths whose served bytes differ from the manifest (one byte flipped); ``lie_size`` maps
        paths to the size the manifest declares instead of the true one. ``current=False``
        publishes without making the bundle current.
        """
        Version.parse(version)
        data = read_tree(files) if isinstance(files, Path) else dict(files)
        with self.server._lock:
            ts = ts or self.server._next_ts()
            if ts in self.bundles:
                raise BundleServerError(
                    f"bundle server: tenant {self.fingerprint[:12]} already has bundle_ts {ts!r}."
                    " Pass a new ts= or omit it to get a fresh one."
                )
            manifest = build_manifest(data, version=version, ts=ts, expires=_expires_text(expires))
            if lie_size:
                entries = tuple(
                    replace(e, size=lie_size[e.path]) if e.path in lie_size else e
                    for e in manifest.files
                )
                manifest = replace(manifest, files=entries).with_integrity()
            bodies = dict(data)
            for path in corrupt:
                bodies[path] = _flip(bodies[path])
            self.bundles[ts] = Bundle(manifest, bodies)
            if current:
                self.history.append(ts)
                self.current_ts = ts
        return self.server._sign(manifest)

    def _hidden(self, manifest: Manifest, bodies: dict[str, bytes]) -> Bundle:
        bundle = Bundle(manifest, bodies, hidden=True)
        self.bundles[manifest.bundle_ts] = bundle
        return bundle

    def retire(self, ts: str) -> None:
        """Stop serving the files of bundle ``ts`` (404 from now on)."""
        with self.server._lock:
            self.bundles[ts].retired = True

    def export_tree(self, dest: Path) -> Path:
        """Write the current manifest and every published bundle's files as a static tree.

        The layout mirrors the URL space, so any static server rooted at ``dest`` speaks the
        protocol (without the API key check). Returns ``dest``.
        """
        base = dest / MANIFEST_PATH.strip("/").rsplit("/", 1)[0]
        base.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest
        if manifest is not None:
            (base / "manifest").write_bytes(manifest.to_json())
        for ts in self.history:
            for path, body in self.bundles[ts].bodies.items():
                target = base / ts / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(body)
        return dest


def _flip(body: bytes) -> bytes:
    if not body:
        return b"\x00"
    return bytes([body[0] ^ 0xFF]) + body[1:]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TCPServer

    def setup(self) -> None:
        owner = self.server.owner
        if owner._ssl_context is not None:
            self.request.settimeout(10.0)
            tls = owner._ssl_context.wrap_socket(self.request, server_side=True)
            tls.settimeout(None)
            owner._swap_connection(self.request, tls)
            self.request = tls
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is ``server.requests``

    def do_GET(self) -> None:
        self.close_connection = not self.server.owner._serve(self)

    def _not_allowed(self) -> None:
        self.close_connection = not self.server.owner._serve(self, allowed=False)

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _not_allowed


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, owner: BundleServer, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # head and body go out in separate writes: without NODELAY, Nagle + delayed ACK
        # would add ~40 ms to every small response
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner._add_connection(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.owner._drop_connection(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ssl.SSLError):
            return  # the client went away: that is the client's business, not an error
        if exc is not None:
            self.owner._record_error(exc)


class BundleServer:
    """An HTTP bundle server on loopback, publishing versioned bundles per tenant.

    ``url`` is where it listens; ``tenant(api_key)`` returns (creating) a tenant to publish
    into; ``scenario(name, **params)`` makes it misbehave (see ``faults.SCENARIOS``);
    ``requests`` is its request log. ``tls=True`` serves HTTPS with a certificate from a test CA
    it generates (``ca_pem``, ``client_ssl_context()``). ``signing_key`` (an Ed25519 private key)
    signs every manifest it serves.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        signing_key: Any = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.tls = tls
        self.signing_key = signing_key
        self._lock = threading.RLock()
        self._tenants: dict[str, Tenant] = {}
        self._scenarios: list[Scenario] = []
        self._requests: list[RequestRecord] = []
        self._errors: list[BaseException] = []
        self._connections: set[Any] = set()
        self._stop = threading.Event()
        self._last_ts = 0
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._tls_dir: Path | None = None
        self.ca_pem: str | None = None
        self._closed = False

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> BundleServer:
        if self._server is not None:
            return self
        try:
            if self.tls:
                self._setup_tls()
            self._server = _TCPServer(self, (self.host, self._requested_port))
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"bundle-server-{self.port}",
                daemon=True,
            )
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop serving and close every socket; idempotent. Does not raise thread errors."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._server is not None:
            if self._thread is not None and self._thread.is_alive():
                self._server.shutdown()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._server.server_close()  # joins the handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    def __enter__(self) -> BundleServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise BundleServerError("bundle server: not started; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def check(self) -> None:
        """Re-raise (as ``BundleServerError``) the first error raised in a server thread."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            first = errors[0]
            raise BundleServerError(
                f"bundle server at {self.url}: {len(errors)} error(s) in its threads; first: "
                f"{type(first).__name__}: {first}. See the chained traceback."
            ) from first

    def reset(self) -> None:
        """Forget tenants, scenarios, the request log and recorded errors."""
        with self._lock:
            self._tenants.clear()
            self._scenarios.clear()
            self._requests.clear()
            self._errors.clear()

    # --- publishing and scenarios ---------------------------------------------------

    def tenant(self, api_key: str) -> Tenant:
        """The tenant for ``api_key`` (created on first use)."""
        if not api_key:
            raise BundleServerError("bundle server: an API key must be a non-empty string")
        with self._lock:
            if api_key not in self._tenants:
                self._tenants[api_key] = Tenant(self, api_key)
            return self._tenants[api_key]

    def scenario(
        self, name: str, *, once: bool = False, on: str | None = None, **params: Any
    ) -> Scenario:
        """Play scenario ``name`` (see ``faults.SCENARIOS``) until ``clear_scenarios()``.

        ``once=True`` queues it instead: it fires on the next matching request only, in the
        order queued. ``on`` overrides what it applies to (``manifest``, ``file``, ``any``).
        """
        made = faults.make_scenario(name, on=on, once=once, params=params)
        with self._lock:
            self._scenarios.append(made)
        return made

    def queue(self, name: str, *, on: str | None = None, **params: Any) -> Scenario:
        """``scenario(name, once=True, ...)``: a one-shot fault for the next matching request."""
        return self.scenario(name, once=True, on=on, **params)

    def clear_scenarios(self) -> None:
        with self._lock:
            self._scenarios.clear()

    # --- the request log ------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def file_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.kind == "file"]

    def assert_requested(self, path: str, count: int | None = None) -> None:
        """Assert ``path`` (raw or percent-decoded) was requested (exactly ``count`` times)."""
        seen = [r for r in self.requests if path in (r.path, unquote(r.path))]
        if count is None and not seen:
            raise AssertionError(f"{path} was never requested; log: {self._log_summary()}")
        if count is not None and len(seen) != count:
            raise AssertionError(
                f"{path} was requested {len(seen)} time(s), expected {count}; "
                f"log: {self._log_summary()}"
            )

    def assert_no_file_requests(self) -> None:
        """Assert no bundle file was requested (only manifests)."""
        files = self.file_requests()
        if files:
            raise AssertionError(
                f"{len(files)} file request(s) were made, expected none: "
                + ", ".join(unquote(r.path) for r in files[:5])
            )

    def _log_summary(self) -> str:
        return ", ".join(f"{r.method} {unquote(r.path)} {r.status}" for r in self.requests[-10:])

    # --- internals ------------------------------------------------------------------

    def _next_ts(self) -> str:
        with self._lock:
            self._last_ts = max(int(time.time()), self._last_ts + 1)
            return str(self._last_ts)

    def _sign(self, manifest: Manifest) -> Manifest:
        return manifest.sign(self.signing_key) if self.signing_key is not None else manifest

    def _add_connection(self, conn: Any) -> None:
        with self._lock:
            self._connections.add(conn)

    def _drop_connection(self, conn: Any) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _swap_connection(self, old: Any, new: Any) -> None:
        with self._lock:
            self._connections.discard(old)
            self._connections.add(new)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _record(self, record: RequestRecord) -> int:
        with self._lock:
            self._requests.append(record)
            return len(self._requests) - 1

    def _pick(self, kind: str) -> list[Scenario]:
        """The scenarios for one request: the first matching one-shot, or the persistent ones."""
        with self._lock:
            for scenario in self._scenarios:
                if scenario.once and scenario.matches(kind):
                    self._scenarios.remove(scenario)
                    scenario.fired += 1
                    return [scenario]
            active = [s for s in self._scenarios if not s.once and s.matches(kind)]
            for scenario in active:
                scenario.fired += 1
            return active

    def _setup_tls(self) -> None:
        from pytest_sandbox.bundles import tlsutil

        self._tls_dir = Path(tempfile.mkdtemp(prefix="psb-bundle-tls-"))
        self.ca_pem, cert, key = tlsutil.make_ca_and_cert(self._tls_dir, self.host)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._ssl_context = context

    @property
    def ca_file(self) -> Path:
        """The test CA's certificate as a PEM file (for curl ``--cacert``)."""
        if self._tls_dir is None:
            raise BundleServerError("bundle server: ca_file needs tls=True")
        return self._tls_dir / "ca.pem"

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting only this server's test CA."""
        if self.ca_pem is None:
            raise BundleServerError("bundle server: client_ssl_context needs tls=True")
        return ssl.create_default_context(cadata=self.ca_pem)

    def _serve(self, handler: _Handler, allowed: bool = True) -> bool:
        """Answer one request; returns True when the connection may stay open."""
        raw_path = handler.path
        path = urlsplit(raw_path).path
        kind = (
            "manifest"
            if path == MANIFEST_PATH
            else "file"
            if path.startswith(FILE_PREFIX)
            else "other"
        )
        picked = self._pick(kind)
        transport = next((s for s in picked if s.family == "transport"), None)
        wire = Wire(handler.connection, self._stop)
        key = handler.headers.get(API_KEY_HEADER)
        tenant: Tenant | None = None
        status, body, extra, fault_name = 200, b"", [], transport.name if transport else None
        streamed: Iterator[bytes] | None = None
        content_length = True
        try:
            if transport is not None and transport.name in (
                "status",
                "not_found",
                "server_error",
                "unavailable",
            ):
                status = int(transport.params["code"])
                if transport.params.get("retry_after") is not None:
                    extra.append(("Retry-After", str(transport.params["retry_after"])))
                body = json.dumps({"error": f"scenario {transport.name}"}).encode()
                transport = None
            elif not allowed:
                status, body = 405, b'{"error": "method not allowed"}'
            elif kind == "other":
                status, body = 404, b'{"error": "not found"}'
            elif not key:
                status, body = 401, b'{"error": "missing X-API-Key"}'
            else:
                with self._lock:
                    tenant = self._tenants.get(key)
                if tenant is None:
                    status, body = 403, b'{"error": "unknown API key"}'
                elif kind == "manifest":
                    status, body, content_length, fault_name = self._manifest_response(
                        tenant, picked, fault_name
                    )
                else:
                    status, body, streamed, fault_name = self._file_response(
                        tenant, path, picked, fault_name
                    )
        except Exception as exc:  # a bug or a misused scenario: answer 500 and let check() say
            self._record_error(exc)
            status, body = 500, json.dumps({"error": repr(exc)}).encode()
        keep = streamed is None and content_length and not handler.close_connection
        headers = [
            ("Content-Type", "application/json" if kind != "file" else "application/octet-stream")
        ]
        if streamed is None and content_length:
            headers.append(("Content-Length", str(len(body))))
        headers += extra
        headers.append(("Connection", "keep-alive" if keep else "close"))
        head = faults.head_bytes(status, _REASONS.get(status, "Status"), headers)
        payload: bytes | Iterator[bytes] = (
            body
            if streamed is None and content_length
            else (streamed if streamed is not None else iter([body]))
        )
        no_head = transport is not None and (
            transport.name == "garbage"
            or (transport.name == "reset" and transport.params["after"] is None)
        )
        record = RequestRecord(
            handler.command,
            raw_path,
            0 if no_head else status,
            kind,
            tenant.fingerprint if tenant else None,
            fault_name,
            0,
        )
        # logged before the first byte goes out: a client that saw the answer finds it logged
        index = self._record(record)
        alive = False
        try:
            alive = faults.deliver(wire, head, payload, transport)
        finally:
            with self._lock:
                if index < len(self._requests) and self._requests[index] is record:
                    self._requests[index] = replace(record, bytes_sent=wire.sent)
        return alive and keep

    def _manifest_response(
        self, tenant: Tenant, picked: list[Scenario], fault_name: str | None
    ) -> tuple[int, bytes, bool, str | None]:
        content = next((s for s in picked if s.family == "manifest"), None)
        current = tenant.current
        if current is None:
            return 404, b'{"error": "no bundle published for this tenant"}', True, fault_name
        if content is None:
            return 200, self._sign(current.manifest).to_json(), True, fault_name
        name = content.name
        base = current.manifest
        with self._lock:
            if name == "malformed":
                return 200, _malformed(base, content.params["kind"]), True, name
            if name == "oversized":
                data = base.to_dict()
                data["padding"] = "x" * int(content.params["size"])
                return 200, json.dumps(data).encode(), bool(content.params["content_length"]), name
            manifest = self._scenario_manifest(tenant, current, content)
        signed = _foreign_signature(manifest) if name == "bad_signature" else self._sign(manifest)
        manifest = signed
        return 200, manifest.to_json(), True, name

    def _scenario_manifest(self, tenant: Tenant, current: Bundle, content: Scenario) -> Manifest:
        name, params, base = content.name, content.params, current.manifest
        if "bundle" in content.state:
            return content.state["bundle"].manifest  # type: ignore[no-any-return]
        now = _dt.datetime.now(_dt.UTC)
        if name == "rollback" and params["version"] is None:
            previous = tenant.previous()
            if previous is None:
                raise BundleServerError(
                    "bundle server: scenario 'rollback' needs a previous bundle; publish two "
                    "versions first or pass version='0.4.0'"
                )
            return previous.manifest
        if name in ("frozen",):
            return replace(base, expires=rfc3339(now - _dt.timedelta(seconds=params["age"])))
        if name == "wrong_integrity":
            return replace(base, integrity_sha256=hashlib.sha256(b"wrong").hexdigest())
        if name == "size_bytes_lie":
            return replace(base, size_bytes=base.size_bytes + int(params["delta"]))
        bodies = dict(current.bodies)
        version, ts, expires = base.bundle_version, self._next_ts(), base.expires
        entries: list[FileEntry] = list(base.files)
        if name in ("rollback", "out_of_range", "fast_forward"):
            version = str(params["version"])
        elif name == "expired":
            expires = rfc3339(now - _dt.timedelta(seconds=params["age"]))
        elif name == "stale":
            ts = str(int(time.time() - float(params["age"])))
            while ts in tenant.bundles:
                ts = str(int(ts) - 1)
        elif name == "unsafe_path":
            for bad in faults.UNSAFE_PATHS[params["kind"]]:
                body = b"planted by the unsafe_path scenario\n"
                bodies[bad] = body
                entries.append(FileEntry(bad, len(body), hashlib.sha256(body).hexdigest()))
        manifest = replace(
            base, bundle_ts=ts, bundle_version=version, expires=expires, files=tuple(entries)
        ).with_integrity()
        bundle = tenant._hidden(manifest, bodies)
        content.state["bundle"] = bundle
        return manifest

    def _file_response(
        self, tenant: Tenant, path: str, picked: list[Scenario], fault_name: str | None
    ) -> tuple[int, bytes, Iterator[bytes] | None, str | None]:
        rest = path[len(FILE_PREFIX) :]
        ts_raw, _, file_raw = rest.partition("/")
        ts = unquote(ts_raw)
        file_path = "/".join(unquote(seg) for seg in file_raw.split("/"))
        with self._lock:
            bundle = tenant.bundles.get(ts)
            control = next((s for s in picked if s.family == "control"), None)
            if control is not None and bundle is not None and not control.state.get("done"):
                control.state["done"] = True
                # the bundle being fetched is replaced: a new one becomes current, this one 404s
                new_bodies = {p: b + b"\n# republished\n" for p, b in bundle.bodies.items()}
                v = bundle.manifest.version
                tenant.publish(new_bodies, version=f"{v.major}.{v.minor}.{v.patch + 1}")
                bundle.retired = True
                fault_name = control.name
        if bundle is None or bundle.retired or file_path not in bundle.bodies:
            return 404, b'{"error": "no such bundle file"}', None, fault_name
        body = bundle.bodies[file_path]
        content = next((s for s in picked if s.family == "file"), None)
        if content is None:
            return 200, body, None, fault_name
        params = content.params
        if content.name == "changed_bytes":
            if params["path"] in (None, file_path):
                body = _flip(body)
        elif content.name == "short_data":
            body = body[: int(len(body) * float(params["keep"]))]
        elif content.name == "endless_data":
            return 200, b"", faults.endless(body, int(params["limit"])), content.name
        elif content.name == "mix_and_match":
            with self._lock:
                other = (
                    tenant.bundles.get(params["other_ts"]) if params["other_ts"] else None
                ) or tenant.previous()
            if other is None or other is bundle:
                raise BundleServerError(
                    "bundle server: scenario 'mix_and_match' needs another bundle of this "
                    "tenant; publish two versions first or pass other_ts="
                )
            body = other.bodies.get(file_path, next(iter(other.bodies.values()), b""))
        return 200, body, None, content.name


def _malformed(base: Manifest, kind: str) -> bytes:
    data = base.to_dict()
    if kind == "not_json":
        return b"<html>this is not a manifest</html>"
    if kind == "truncated_json":
        return base.to_json()[: max(1, len(base.to_json()) // 2)]
    if kind == "not_object":
        return json.dumps([data]).encode()
    if kind == "missing_field":
        data.pop("integrity_sha256")
    elif kind == "wrong_type":
        data["size_bytes"] = str(data["size_bytes"])
    elif kind == "bad_version":
        data["bundle_version"] = "v0.4"
    elif kind == "bad_sha":
        if data["files"]:
            data["files"][0]["sha256"] = "not-a-hash"
        else:
            data["integrity_sha256"] = "XYZ"
    elif kind == "negative_size":
        if data["files"]:
            data["files"][0]["size"] = -1
        else:
            data["size_bytes"] = -1
    elif kind == "bad_ts":
        data["bundle_ts"] = "../../etc"
    elif kind == "bad_expires":
        data["expires"] = "next tuesday"
    return json.dumps(data).encode()


def _foreign_signature(manifest: Manifest) -> Manifest:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return manifest.sign(Ed25519PrivateKey.generate())


# --- `pytest-sandbox bundle serve DIR` -----------------------------------------------------


def serve_dir(
    directory: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str,
    version: str | None = None,
) -> int:
    """Serve ``directory`` as one bundle for the tenant ``api_key``; blocks until Ctrl-C.

    The bundle's version is ``version``, else the first line of ``DIR/.bundle-version``, else
    ``0.4.0`` (the puller's default range is ``>=0.4.0,<0.5.0``). Returns the exit code: 0 after
    Ctrl-C, 2 when the directory is unusable.
    """
    root = Path(directory)
    if not root.is_dir():
        print(f"pytest-sandbox bundle serve: {root} is not a directory", file=sys.stderr)
        return 2
    version_file = root / ".bundle-version"
    if version is None:
        version = (
            version_file.read_text().splitlines()[0].strip() if version_file.is_file() else "0.4.0"
        )
    files = {p: b for p, b in read_tree(root).items() if p != ".bundle-version"}
    try:
        Version.parse(version)
    except ValueError as exc:
        print(f"pytest-sandbox bundle serve: {exc}", file=sys.stderr)
        return 2
    with BundleServer(host=host, port=port) as server:
        manifest = server.tenant(api_key).publish(files, version=version)
        print(
            f"serving {len(files)} file(s) of {root} as bundle {manifest.bundle_ts} "
            f"version {version} at {server.url} (header {API_KEY_HEADER}); Ctrl-C to stop",
            flush=True,
        )
        try:
            while True:
                time.sleep(0.5)
                server.check()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0
