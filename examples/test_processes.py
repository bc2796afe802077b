"""Demo: tracked processes — a real TCP server started, probed, used and stopped.

Uses only the public fixtures, as a downstream suite would.
"""

from __future__ import annotations

import socket
import sys

SERVER = """
import socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print("listening on", srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(conn.recv(1024).upper())
"""


def test_echo_server_is_ready_when_the_fixture_returns(sandbox_process):
    server = sandbox_process([sys.executable, "-c", SERVER], ready=r"listening on \d+")
    port = int(server.log_path.read_text().split()[-1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"hello")
        assert conn.recv(1024) == b"HELLO"
    assert server.returncode is None  # still running; stopped at teardown


def test_ready_by_port_and_explicit_stop(sandbox_process):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import socket,time;s=socket.socket();"
        f"s.bind(('127.0.0.1',{port}));s.listen();time.sleep(60)"
    )
    server = sandbox_process([sys.executable, "-c", code], ready=port)
    server.stop()
    assert server.returncode is not None


def test_every_worker_shares_one_run(sandbox_run):
    assert sandbox_run.worker_id == "master" or sandbox_run.worker_id.startswith("gw")
    assert sandbox_run.run_dir.is_dir()
    assert len(str(sandbox_run.socket_dir)) < 80
