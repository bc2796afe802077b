"""A tiny HTTP daemon for tests, examples and benchmarks (stdlib only, no pytest_sandbox import).

Serves on ``--endpoint`` or ``$PYTEST_SANDBOX_ENDPOINT`` (``unix:/path`` or ``tcp:HOST:PORT``):
``GET /`` answers a JSON description of itself (service env, trace context, pid), ``GET /health``
answers ``ok``. Options (for tests): ``--idle-timeout S`` exits 0 after S seconds without a
request; ``--ignore-sigterm``; ``--spew-bytes N`` writes N bytes to stdout before listening;
``--exit-after S --exit-code N`` exits by itself; ``--no-listen`` never listens; ``--delay S``
sleeps before listening. Every signal received is logged to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler

LAST_ACTIVITY = [time.monotonic()]


class Handler(BaseHTTPRequestHandler):
    server_version = "psb-httpd/1"

    def do_GET(self) -> None:
        LAST_ACTIVITY[0] = time.monotonic()
        if self.path == "/health":
            body = b"ok"
        else:
            env = os.environ
            body = json.dumps(
                {
                    "pid": os.getpid(),
                    "path": self.path,
                    "argv": sys.argv,
                    **{k: v for k, v in env.items() if k.startswith("PYTEST_SANDBOX_")},
                    "TRACEPARENT": env.get("TRACEPARENT"),
                    "TRACESTATE": env.get("TRACESTATE"),
                    "open_fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
                }
            ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # mirakuru's HTTPExecutor probes with HEAD
        LAST_ACTIVITY[0] = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def address_string(self) -> str:
        return "local"

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("httpd: " + (format % args) + "\n")


class UnixServer(socketserver.UnixStreamServer):
    pass


class TcpServer(socketserver.TCPServer):
    allow_reuse_address = True


def _log(message: str) -> None:
    sys.stderr.write(f"httpd[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--ignore-sigterm", "--no-listen"):
            flags.add(arg)
            i += 1
        else:
            opts[arg] = argv[i + 1]
            i += 2
    endpoint = opts.get("--endpoint") or os.environ.get("PYTEST_SANDBOX_ENDPOINT", "")
    idle = float(opts.get("--idle-timeout") or os.environ.get("PYTEST_SANDBOX_IDLE_TIMEOUT") or 0)
    exit_after = float(opts.get("--exit-after", 0))
    exit_code = int(opts.get("--exit-code", 0))

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if "--ignore-sigterm" in flags and signum == signal.SIGTERM:
            _log(f"got {name}, ignoring it")
            return
        _log(f"got {name}, exiting")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    spew = int(opts.get("--spew-bytes", 0))
    if spew:
        chunk = b"x" * 65535 + b"\n"
        out = sys.stdout.buffer
        while spew > 0:
            out.write(chunk[: min(spew, len(chunk))])
            spew -= len(chunk)
        out.flush()
    if "--delay" in opts:
        time.sleep(float(opts["--delay"]))
    started = time.monotonic()
    if "--no-listen" in flags:
        _log("not listening (--no-listen)")
        while True:
            time.sleep(0.05)
            if exit_after and time.monotonic() - started >= exit_after:
                return exit_code
    kind, _, where = endpoint.partition(":")
    server: socketserver.BaseServer
    if kind == "unix":
        server = UnixServer(where, Handler)
    elif kind == "tcp":
        host, _, port = where.rpartition(":")
        server = TcpServer((host or "127.0.0.1", int(port)), Handler)
    else:
        _log(f"bad endpoint {endpoint!r}: expected unix:/path or tcp:HOST:PORT")
        return 2
    _log(f"listening on {endpoint}")
    server.timeout = 0.05
    LAST_ACTIVITY[0] = time.monotonic()
    while True:
        server.handle_request()
        now = time.monotonic()
        if idle and now - LAST_ACTIVITY[0] >= idle:
            _log(f"exiting: idle for {idle:g}s")
            return 0
        if exit_after and now - started >= exit_after:
            _log(f"exiting with code {exit_code} after {exit_after:g}s")
            return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
