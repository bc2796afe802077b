"""Demo: a sandboxed fs worker — hand untrusted file work to a process confined to a root.

Uses only the public fixtures, as a downstream suite would.
"""

from __future__ import annotations

import http.server
import threading

import pytest

from pytest_sandbox.errors import PolicyDenied
from pytest_sandbox.fsworker import NetPolicy, SandboxPolicy


def test_an_agent_edits_files_inside_its_root(sandbox_fs):
    sandbox_fs.write("app/config.toml", b'mode = "dev"\n')
    sandbox_fs.edit("app/config.toml", '"dev"', '"prod"')
    assert sandbox_fs.read("app/config.toml") == b'mode = "prod"\n'
    assert sandbox_fs.glob("**/*.toml") == ["app/config.toml"]
    [hit] = sandbox_fs.grep("prod")
    assert (hit.path, hit.line) == ("app/config.toml", 1)


def test_writes_outside_the_root_are_denied(sandbox_fs):
    (sandbox_fs.root / "escape").symlink_to("/etc")
    for path in ("../outside.txt", "/etc/hosts", "escape/hosts", "/proc/self/root/etc/hosts"):
        with pytest.raises(PolicyDenied):
            sandbox_fs.write(path, b"pwned")


def test_the_kernel_confines_commands_too(sandbox_fs):
    if "landlock" not in sandbox_fs.enforcement:
        pytest.skip("Landlock is not available here (run with --sandbox-kernel=require to fail)")
    result = sandbox_fs.exec(["sh", "-c", "echo inside > ok.txt; echo outside > /tmp/nope.txt"])
    assert result.exit_code != 0
    assert b"Permission denied" in result.output
    assert sandbox_fs.read("ok.txt") == b"inside\n"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello from upstream")

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("sandbox_egress_proxy", [["127.0.0.1"]], indirect=True)
def test_network_only_through_the_allow_listed_proxy(
    sandbox_fs_factory, sandbox_egress_proxy, upstream
):
    policy = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))
    with sandbox_fs_factory(policy=policy, proxy=sandbox_egress_proxy) as fs:
        if "landlock-net" not in fs.enforcement:
            pytest.skip("Landlock network rules are not available here")
        ok = fs.exec(["curl", "-sS", f"http://127.0.0.1:{upstream}/"])
        assert ok.output == b"hello from upstream"
        denied = fs.exec(["curl", "-sS", f"http://localhost:{upstream}/"])
        assert b"not in the egress allow list" in denied.output
    assert [r.status for r in sandbox_egress_proxy.requests] == [200, 403]
