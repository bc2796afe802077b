"""EgressProxy: an HTTP CONNECT + plain HTTP forward proxy on loopback with an allow filter.

Hosts matching ``allow`` (exact, or one leftmost ``*.`` label) are forwarded; every other
request gets ``403`` and never reaches the network. Every request is logged in ``requests``.
A fs worker given the proxy gets the proxy variables in its environment and, under Landlock
network rules, may open TCP connections to the proxy's port only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pytest_sandbox.errors import EgressProxyError
from pytest_sandbox.fsworker.egress import relay
from pytest_sandbox.fsworker.policy import check_host_pattern, host_matches

MAX_HEAD = 64 * 1024
IO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ProxyRequest:
    """One request the proxy saw: ``method`` (``CONNECT``, ``GET``…), ``host``, ``port``,
    ``target`` (as sent), ``status`` (what the proxy answered: 200, 403, 400, 502…)."""

    method: str
    host: str
    port: int
    target: str
    status: int

    @property
    def allowed(self) -> bool:
        return self.status < 400


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: EgressProxy


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(IO_TIMEOUT)
        proxy = self.server.proxy
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
                if len(head) > MAX_HEAD:
                    self._reply(client, 431, "Request Header Fields Too Large")
                    return
        except OSError:
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            proxy._log("?", "", 0, lines[0][:200], 400)
            self._reply(client, 400, "Bad Request")
            return
        method, target, version = parts
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
            path = ""
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                proxy._log(method, "", 0, target, 400)
                self._reply(client, 400, "Bad Request: absolute http:// URL expected")
                return
            host = url.hostname
            port_text = str(url.port or 80)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if not port_text.isdigit() or not host:
            proxy._log(method, host, 0, target, 400)
            self._reply(client, 400, "Bad Request")
            return
        port = int(port_text)
        if not proxy.allows(host):
            proxy._log(method, host, port, target, 403)
            self._reply(client, 403, f"Forbidden: {host} is not in the egress allow list")
            return
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError:
            proxy._log(method, host, port, target, 502)
            self._reply(client, 502, f"Bad Gateway: cannot reach {host}:{port}")
            return
        with upstream:
            upstream.settimeout(None)
            client.settimeout(None)
            try:
                if method == "CONNECT":
                    proxy._log(method, host, port, target, 200)
                    client.sendall(f"{version} 200 Connection established\r\n\r\n".encode())
                    if rest:
                        upstream.sendall(rest)
                else:
                    headers = [
                        line
                        for line in lines[1:]
                        if line.split(":", 1)[0].strip().lower()
                        not in ("proxy-connection", "proxy-authorization", "connection")
                    ]
                    out = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close"])
                    upstream.sendall(out.encode("latin-1") + b"\r\n\r\n" + rest)
                    proxy._log(method, host, port, target, 200)
                relay(client, upstream)
            except OSError:
                return

    @staticmethod
    def _reply(client: socket.socket, status: int, reason: str) -> None:
        body = (reason + "\n").encode()
        with contextlib.suppress(OSError):
            client.sendall(
                f"HTTP/1.1 {status} {reason.split(':')[0]}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )


class EgressProxy:
    """A forward proxy on ``127.0.0.1:port`` letting through only hosts matching ``allow``.

    ``env()`` is what a worker (and what it execs) needs to use it; ``requests`` the log of
    what it saw. ``ca_bundle`` (a path) is advertised to clients through ``SSL_CERT_FILE``,
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and ``NODE_EXTRA_CA_CERTS``. Context manager;
    ``close()`` is idempotent.
    """

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        ca_bundle: str | os.PathLike[str] | None = None,
        no_proxy: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.allow = tuple(sorted({check_host_pattern(p) for p in allow}))
        self.ca_bundle = os.fspath(ca_bundle) if ca_bundle is not None else None
        self.no_proxy = tuple(no_proxy)
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log_lock = threading.Lock()
        self._requests: list[ProxyRequest] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise EgressProxyError("the egress proxy is not started: call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[ProxyRequest]:
        with self._log_lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._log_lock:
            self._requests.clear()

    def set_allow(self, allow: Iterable[str]) -> None:
        """Replace the allow list (takes effect for the next request)."""
        self.allow = tuple(sorted({check_host_pattern(p) for p in allow}))

    def allows(self, host: str) -> bool:
        return any(host_matches(host, pattern) for pattern in self.allow)

    def _log(self, method: str, host: str, port: int, target: str, status: int) -> None:
        with self._log_lock:
            self._requests.append(ProxyRequest(method, host, port, target, status))

    def env(self) -> dict[str, str]:
        """Proxy variables for a worker and its children (both spellings, as tools differ)."""
        env: dict[str, str] = {}
        for name in ("HTTPS_PROXY", "HTTP_PROXY"):
            env[name] = env[name.lower()] = self.url
        env["NO_PROXY"] = env["no_proxy"] = ",".join(self.no_proxy)
        if self.ca_bundle is not None:
            for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                         "NODE_EXTRA_CA_CERTS"):  # fmt: skip
                env[name] = self.ca_bundle
        return env

    def start(self) -> EgressProxy:
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self._port), _Handler)
        except OSError as exc:
            raise EgressProxyError(
                f"egress proxy cannot listen on {self.host}:{self._port}: {exc.strerror}; "
                "pass port=0 for a free port"
            ) from exc
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"egress-proxy-{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> EgressProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._server.server_address[1]}" if self._server else "stopped"
        return f"<EgressProxy {where} allow={list(self.allow)}>"
