"""The network-namespace fallback of the egress limit (Landlock ABI < 4, or forced here).

This machine's Landlock has network rules, so the tests force the fallback with the
testing/diagnostic knob ``net_layer="netns"`` (``$PYTEST_SANDBOX_FS_NET_LAYER``). Everything else
is real: a user + network namespace, a loopback HTTP server the sandbox must not reach, the
egress proxy it must go through, and commands (and their children) started by ``exec``.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pytest_sandbox.errors import FsKernelUnavailable, FsNetIsolationUnavailable
from pytest_sandbox.fsworker import EgressProxy, FsWorker, NetPolicy, SandboxPolicy
from pytest_sandbox.fsworker.client import NET_LAYER_ENV

SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by uid 65534, unlike a python under /root
POLICY = SandboxPolicy(net=NetPolicy(allow=["127.0.0.1"]))

#: Runs argv[1:] in a user namespace that may not create user namespaces: the netns fallback
#: is impossible there, as on a host with user.max_user_namespaces=0.
NO_USERNS_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000) != 0:
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                   ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as handle:
        handle.write(text)
with open("/proc/sys/user/max_user_namespaces", "w") as handle:
    handle.write("0")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _connect_code(port: int) -> str:
    return (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
        "except OSError as exc:\n"
        "    print('refused', type(exc).__name__, exc.errno); sys.exit(3)\n"
        "print('connected')\n"
    )


def _as_grandchild(argv: list[str]) -> list[str]:
    """``argv`` run by a child of the exec'd command (not by the command itself)."""
    code = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    return [SYSTEM_PYTHON, "-c", code, *argv]


def _group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
def test_netns_only_way_out_is_the_proxy(
    proxy: EgressProxy, upstream: int, user: int | None
) -> None:
    with FsWorker(
        policy=POLICY, proxy=proxy, user=user, kernel="require", net_layer="netns",
        allow_debug=True,
    ) as fs:  # fmt: skip
        assert "netns" in fs.enforcement
        assert "landlock-net" not in fs.enforcement  # the namespace alone does the job
        assert "landlock" in fs.enforcement
        assert fs.degraded == ()

        # the worker process itself: the loopback server is not there; the proxy is
        direct = fs.request({"kind": "debug_connect", "host": "127.0.0.1", "port": upstream})
        assert direct["connected"] is False, direct
        assert direct["errno"] == errno.ECONNREFUSED, direct
        via = fs.request({"kind": "debug_connect", "host": "127.0.0.1", "port": proxy.port})
        assert via["connected"] is True, via

        # a command it execs, and a child of that command
        for wrap in (list, _as_grandchild):
            raw = fs.exec(wrap([SYSTEM_PYTHON, "-c", _connect_code(upstream)]))
            assert raw.exit_code == 3, raw
            assert b"refused ConnectionRefusedError" in raw.output, raw
            allowed = fs.exec(wrap(["curl", "-sS", f"http://127.0.0.1:{upstream}/ok"]))
            assert allowed.output == b"upstream /ok", allowed
            tunnel = fs.exec(wrap(["curl", "-sS", "-p", f"http://127.0.0.1:{upstream}/t"]))
            assert tunnel.output == b"upstream /t", tunnel
            denied = fs.exec(
                wrap(["curl", "-sS", "-w", "%{http_code}", f"http://localhost:{upstream}/no"])
            )
            assert denied.output.endswith(b"403"), denied
            assert b"not in the egress allow list" in denied.output
            # nothing but loopback exists in there
            routed = fs.exec(wrap([SYSTEM_PYTHON, "-c", _connect_code(upstream).replace(
                "127.0.0.1", "192.0.2.1")]))  # fmt: skip
            assert routed.exit_code == 3, routed
            assert b"refused" in routed.output

        # an exec'd uid 0 gets no capability back over the namespace
        caps = fs.exec(["grep", "CapEff", "/proc/self/status"])
        assert caps.output.split()[-1] == b"0000000000000000", caps
        group = _group(fs.pid)
        assert len(group) == 2, group  # the worker and its egress connector
    statuses = [(r.method, r.host, r.status) for r in proxy.requests]
    assert statuses.count(("GET", "127.0.0.1", 200)) == 2
    assert statuses.count(("CONNECT", "127.0.0.1", 200)) == 2
    assert statuses.count(("GET", "localhost", 403)) == 2
    assert not any(r.port == 9 or r.host == "192.0.2.1" for r in proxy.requests)
    deadline = time.monotonic() + 5
    while _group(fs.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _group(fs.pid) == []  # connector gone with the worker


def test_netns_files_still_confined_and_env_given(proxy: EgressProxy, tmp_path: Path) -> None:
    with FsWorker(policy=POLICY, proxy=proxy, kernel="require", net_layer="netns") as fs:
        env = fs.get_env(["HTTP_PROXY", "https_proxy", "NO_PROXY"])
        assert env["HTTP_PROXY"] == env["https_proxy"] == proxy.url
        outside = tmp_path / "outside.txt"
        result = fs.exec([SYSTEM_PYTHON, "-c", f"open({str(outside)!r}, 'w')"])
        assert result.exit_code != 0
        assert b"PermissionError" in result.output
        assert not outside.exists()
        fs.write("inside.txt", b"ok")
        assert (fs.root / "inside.txt").read_bytes() == b"ok"


def test_env_knob_forces_netns(
    proxy: EgressProxy, upstream: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NET_LAYER_ENV, "netns")
    with FsWorker(policy=POLICY, proxy=proxy, kernel="require") as fs:
        assert fs.net_layer == "netns"
        assert "netns" in fs.enforcement
        raw = fs.exec([SYSTEM_PYTHON, "-c", _connect_code(upstream)])
        assert b"refused ConnectionRefusedError" in raw.output


def test_default_layer_is_landlock_net_where_the_abi_has_it(proxy: EgressProxy) -> None:
    with FsWorker(policy=POLICY, proxy=proxy, kernel="require", net_layer="auto") as fs:
        assert fs.landlock_abi >= 4
        assert "landlock-net" in fs.enforcement
        assert "netns" not in fs.enforcement


def test_no_network_policy_no_namespace(upstream: int) -> None:
    with FsWorker(kernel="require", net_layer="netns") as fs:
        assert "netns" not in fs.enforcement
        raw = fs.exec([SYSTEM_PYTHON, "-c", _connect_code(upstream)])
        assert raw.output.strip() == b"connected", raw


def test_bad_net_layer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="net_layer"):
        FsWorker(net_layer="iptables")
    monkeypatch.setenv(NET_LAYER_ENV, "bogus")
    with pytest.raises(ValueError, match=NET_LAYER_ENV):
        FsWorker()


def _no_userns_worker(tmp_path: Path, proxy: EgressProxy, kernel: str) -> FsWorker:
    wrapper = tmp_path / "no_userns.py"
    wrapper.write_text(NO_USERNS_WRAPPER)
    root = tmp_path / "root"
    root.mkdir()
    probe = FsWorker(root, POLICY, proxy=proxy, kernel=kernel, net_layer="netns")
    return FsWorker(
        root, POLICY, proxy=proxy, kernel=kernel, net_layer="netns",
        socket_path=probe.socket_path, argv=[sys.executable, str(wrapper), *probe.argv()],
    )  # fmt: skip


def test_require_fails_loudly_when_no_layer_can_limit_egress(
    proxy: EgressProxy, tmp_path: Path
) -> None:
    worker = _no_userns_worker(tmp_path, proxy, "require")
    with pytest.raises(FsNetIsolationUnavailable) as caught:
        worker.start()
    assert isinstance(caught.value, FsKernelUnavailable)
    message = str(caught.value)
    assert "exit code 4" in message
    assert "unshare(CLONE_NEWUSER|CLONE_NEWNET) failed" in message
    assert "No space left on device" in message  # what the kernel said
    assert "user.max_user_namespaces" in message  # the fix
    assert "--sandbox-kernel=auto" in message
    assert not worker.socket_path.exists()


def test_auto_degrades_and_reports(proxy: EgressProxy, tmp_path: Path) -> None:
    with _no_userns_worker(tmp_path, proxy, "auto") as fs:
        assert "landlock" in fs.enforcement
        assert not fs.enforcement & {"netns", "landlock-net"}
        [line] = fs.degraded
        assert line.startswith("net: TCP egress cannot be limited to the proxy")
        assert "unshare" in line
        assert fs.get_env(["HTTP_PROXY"])["HTTP_PROXY"] == proxy.url  # the proxy env remains


def test_connector_exits_when_the_worker_is_killed(proxy: EgressProxy) -> None:
    """kill -9 of the worker alone (not its group) leaves no egress connector behind."""
    fs = FsWorker(policy=POLICY, proxy=proxy, kernel="require", net_layer="netns").start()
    try:
        [connector] = [pid for pid in _group(fs.pid) if pid != fs.pid]
        os.kill(fs.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.path.exists(f"/proc/{connector}/status"):
            with open(f"/proc/{connector}/status") as status:
                if "State:\tZ" in status.read():
                    break
            time.sleep(0.02)
        else:
            pytest.fail(f"egress connector {connector} outlived its worker")
    finally:
        fs.close()
