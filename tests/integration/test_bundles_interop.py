"""Interop: the puller against a bundle tree served by a real nginx, and curl against our server.

Both must give the same bytes: the protocol is plain HTTP, not something only our two halves
agree on.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.bundles.interop import free_port, nginx_argv, nginx_config
from pytest_sandbox.bundles.manifest import file_url_path
from pytest_sandbox.bundles.puller import BundlePuller, verify_tree
from pytest_sandbox.bundles.server import BundleServer

KEY = "interop-key"
FILES = {
    "notes/readme.md": b"# hello\n" * 100,
    "dir with space/caf\u00e9.md": "ünïcödé\n".encode(),
    "bin/blob.bin": bytes(range(256)) * 64,
    "empty.txt": b"",
}

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with BundleServer() as srv:
        yield srv
        srv.check()


@needs_nginx
def test_puller_installs_from_real_nginx(
    server: BundleServer, tmp_path: Path, sandbox_process: Callable[..., Any]
) -> None:
    tenant = server.tenant(KEY)
    tenant.publish(FILES, version="0.4.1")
    tree = tenant.export_tree(tmp_path / "tree")
    port = free_port()
    conf = nginx_config(tree, tmp_path / "nginx", port, KEY)
    nginx = sandbox_process(nginx_argv(conf, tmp_path / "nginx"), ready=port, timeout=15)
    assert nginx.pid > 0
    url = f"http://127.0.0.1:{port}"

    puller = BundlePuller(url, KEY, tmp_path / "root")
    result = puller.tick()
    assert result.status == "installed", result.reason
    assert verify_tree(puller.current.resolve(), tenant.bundles[result.bundle_ts].manifest) == []
    for path, body in FILES.items():
        assert (puller.current / path).read_bytes() == body
    assert puller.tick().status == "up_to_date"
    # nginx guards the key like our server does
    assert BundlePuller(url, "wrong", tmp_path / "r2").tick().code == "fetch_failed"


@needs_curl
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_curl_gets_the_same_bytes_from_our_server(tmp_path: Path, tls: bool) -> None:
    with BundleServer(tls=tls) as server:
        manifest = server.tenant(KEY).publish(FILES, version="0.4.1")
        options = {"ssl_context": server.client_ssl_context()} if tls else {}
        puller = BundlePuller(server.url, KEY, tmp_path / "root", **options)
        assert puller.tick().status == "installed"
        tls_args = ["--cacert", str(server.ca_file)] if tls else []
        for entry in manifest.files:
            out = tmp_path / "curl" / hashlib.sha256(entry.path.encode()).hexdigest()
            out.parent.mkdir(exist_ok=True)
            subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    *tls_args,
                    "-H",
                    f"X-API-Key: {KEY}",
                    "-o",
                    str(out),
                    server.url + file_url_path(manifest.bundle_ts, entry.path),
                ],
                check=True,
                timeout=30,
            )
            assert out.read_bytes() == (puller.current / entry.path).read_bytes()
            assert hashlib.sha256(out.read_bytes()).hexdigest() == entry.sha256
        manifest_out = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                *tls_args,
                "-H",
                f"X-API-Key: {KEY}",
                server.url + "/api/v1/memory/bundle/manifest",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        assert manifest_out == manifest.to_json()
        missing = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                *tls_args,
                server.url + "/api/v1/memory/bundle/manifest",
            ],
            capture_output=True,
            timeout=30,
        ).stdout
        assert missing == b"401"
        server.check()


@needs_curl
def test_curl_sees_a_truncated_body(server: BundleServer, tmp_path: Path) -> None:
    manifest = server.tenant(KEY).publish(FILES, version="0.4.1")
    server.scenario("truncate", on="file")
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            f"X-API-Key: {KEY}",
            "-o",
            str(tmp_path / "out"),
            server.url + file_url_path(manifest.bundle_ts, "bin/blob.bin"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 18  # CURLE_PARTIAL_FILE: the socket really closed early


def test_serve_dir_serves_a_directory_until_ctrl_c(tmp_path: Path) -> None:
    import signal
    import sys

    from pytest_sandbox.runtime.waiting import LogRegex, wait_for

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.md").write_bytes(b"served")
    (src / ".bundle-version").write_text("0.4.7\n")
    port = free_port()
    log = tmp_path / "serve.log"
    code = (
        "import sys; from pytest_sandbox.bundles.server import serve_dir; "
        f"sys.exit(serve_dir({str(src)!r}, host='127.0.0.1', port={port}, api_key='k'))"
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for(LogRegex(log, "Ctrl-C to stop"), timeout=20, what="serve_dir", process=proc)
        puller = BundlePuller(f"http://127.0.0.1:{port}", "k", tmp_path / "root")
        result = puller.tick()
        assert result.status == "installed", result.reason
        assert result.version == "0.4.7"
        assert (puller.current / "sub" / "a.md").read_bytes() == b"served"
        assert not (puller.current / ".bundle-version").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
