"""Fixtures shared by the integration tests of the egress path (proxy and network namespace)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from pytest_sandbox.fsworker.proxy import EgressProxy


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"upstream {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    """A loopback HTTP server that is not the proxy; answers ``upstream <path>``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy() -> Iterator[EgressProxy]:
    """An egress proxy that lets only 127.0.0.1 through."""
    with EgressProxy(allow=["127.0.0.1"]) as egress:
        yield egress
