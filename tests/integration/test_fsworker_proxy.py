"""Egress proxy over real loopback HTTP, and a worker whose TCP egress is limited to it."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
from pathlib import Path

import pytest

from pytest_sandbox.fsworker import EgressProxy, FsWorker, NetPolicy, SandboxPolicy

SYSTEM_PYTHON = "/usr/bin/python3"


def _get_via_proxy(proxy: EgressProxy, url: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_plain_http_allowed_and_logged(proxy: EgressProxy, upstream: int) -> None:
    status, body = _get_via_proxy(proxy, f"http://127.0.0.1:{upstream}/a?b=1")
    assert status == 200
    assert body.startswith(b"upstream /a?b=1")
    [record] = proxy.requests
    assert (record.method, record.host, record.port, record.status) == (
        "GET", "127.0.0.1", upstream, 200,
    )  # fmt: skip


def test_plain_http_denied_is_403(proxy: EgressProxy, upstream: int) -> None:
    status, body = _get_via_proxy(proxy, f"http://localhost:{upstream}/")
    assert status == 403
    assert b"not in the egress allow list" in body
    assert proxy.requests[-1].status == 403
    assert not proxy.requests[-1].allowed


def test_connect_tunnel(proxy: EgressProxy, upstream: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.set_tunnel("127.0.0.1", upstream)
    conn.request("GET", "/tunnel")
    assert conn.getresponse().read().startswith(b"upstream /tunnel")
    conn.close()
    assert proxy.requests[-1].method == "CONNECT"


def test_connect_denied(proxy: EgressProxy, upstream: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT example.com:{upstream} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 403")
    assert proxy.requests[-1].host == "example.com"


@pytest.mark.parametrize(
    "head",
    [b"garbage\r\n\r\n", b"GET /relative HTTP/1.1\r\n\r\n", b"CONNECT nohost HTTP/1.1\r\n\r\n"],
)
def test_malformed_requests_are_400(proxy: EgressProxy, head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def test_unreachable_upstream_is_502(proxy: EgressProxy) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    status, _ = _get_via_proxy(proxy, f"http://127.0.0.1:{dead_port}/")
    assert status == 502


def test_env_for_workers() -> None:
    with EgressProxy(allow=["*.example.com"], ca_bundle="/etc/ssl/certs/ca.pem") as egress:
        env = egress.env()
    url = env["HTTPS_PROXY"]
    assert url.startswith("http://127.0.0.1:")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert env[name] == url
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/etc/ssl/certs/ca.pem"
    with EgressProxy() as plain:
        assert "SSL_CERT_FILE" not in plain.env()


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_worker_egress_only_through_the_proxy(
    proxy: EgressProxy, upstream: int, user: int | None
) -> None:
    policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
    with FsWorker(policy=policy, proxy=proxy, user=user, kernel="require") as fs:
        assert "landlock-net" in fs.enforcement
        env = fs.get_env(["HTTP_PROXY", "https_proxy", "NO_PROXY"])
        assert env["HTTP_PROXY"] == proxy.url
        via_proxy = fs.exec(["curl", "-sS", f"http://127.0.0.1:{upstream}/ok"])
        assert via_proxy.output.startswith(b"upstream /ok"), via_proxy
        tunnel = fs.exec(["curl", "-sS", "-p", f"http://127.0.0.1:{upstream}/t"])
        assert tunnel.output.startswith(b"upstream /t"), tunnel
        denied = fs.exec(["curl", "-sS", f"http://localhost:{upstream}/no"])
        assert b"not in the egress allow list" in denied.output
        direct = fs.exec(
            [
                SYSTEM_PYTHON,
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {upstream}))",
            ]
        )
        assert direct.exit_code != 0
        assert b"PermissionError" in direct.output
        bind = fs.exec(
            [SYSTEM_PYTHON, "-c", "import socket; socket.socket().bind(('127.0.0.1', 0))"]
        )
        assert b"PermissionError" in bind.output
    methods = [(r.method, r.host, r.status) for r in proxy.requests]
    assert ("GET", "127.0.0.1", 200) in methods
    assert ("CONNECT", "127.0.0.1", 200) in methods
    assert ("GET", "localhost", 403) in methods


def test_network_policy_without_proxy_gets_its_own(upstream: int) -> None:
    policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
    with FsWorker(policy=policy) as fs:
        own = fs.proxy
        assert own is not None
        assert fs.exec(["curl", "-sS", f"http://127.0.0.1:{upstream}/own"]).output.startswith(
            b"upstream /own"
        )
    with pytest.raises(Exception, match="not started"):
        own.port  # noqa: B018 - closed with the worker


def test_no_network_policy_leaves_tcp_alone(upstream: int) -> None:
    with FsWorker() as fs:
        assert "landlock-net" not in fs.enforcement
        assert fs.exec(["curl", "-sS", f"http://127.0.0.1:{upstream}/free"]).output.startswith(
            b"upstream /free"
        )


CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_worker_and_its_commands_get_proxy_and_ca_variables(
    tmp_path: Path, user: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PSB_TEST_SECRET", "hunter2")  # the test process's env stays out
    monkeypatch.setenv("HTTPS_PROXY", "http://corporate.invalid:3128")  # overridden
    policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
    with (
        EgressProxy(allow=["127.0.0.1"], ca_bundle=bundle, no_proxy=["localhost"]) as egress,
        FsWorker(policy=policy, proxy=egress, user=user, kernel="require") as fs,
    ):
        expected = egress.env()
        assert set(expected) == {*PROXY_VARS, *CA_VARS}
        assert fs.get_env([*expected, "PSB_TEST_SECRET"]) == {**expected, "PSB_TEST_SECRET": None}
        printed = fs.exec(
            [SYSTEM_PYTHON, "-c", "import os, json; print(json.dumps(dict(os.environ)))"]
        )
        seen = json.loads(printed.output)
        for name, value in expected.items():
            assert seen[name] == value, name
        assert seen["SSL_CERT_FILE"] == str(bundle)
        assert seen["NO_PROXY"] == "localhost"
        assert "PSB_TEST_SECRET" not in seen
        assert seen["HTTPS_PROXY"] == egress.url
