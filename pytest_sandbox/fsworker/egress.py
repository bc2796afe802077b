"""The network-namespace egress path: the worker's only way out is the egress proxy.

Used where Landlock has no network rules (ABI < 4), or when forced (``--net-layer netns``).
The worker, still in the host's network namespace, forks a *connector*; then it enters a new
user + network namespace (:func:`~.enforce.enter_netns`) whose only interface is loopback,
and listens on the proxy's address *inside* it, so ``HTTP_PROXY=http://127.0.0.1:PORT`` means
the same thing in there. Each connection accepted there is paired with a connection to the
real proxy that the connector opens in the host namespace and hands over as a file descriptor
(``SCM_RIGHTS`` over a socketpair); a thread copies bytes between the two.

Why this shape: a socket belongs to the namespace it was created in, so a descriptor passed in
from outside is the one thing that crosses; the connector can open a connection to exactly one
address and nothing else, whatever it is asked; no path-named socket is needed (a worker that
dropped to uid 65534 could not reach one in the run's private socket dir); and nothing new runs
in the test process. Stdlib only: the worker imports this module only in this mode.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading

#: Idle seconds after which a relayed connection is dropped (as the proxy does).
IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 5.0


def fork_connector(host: str, port: int, *, harden: bool = True) -> tuple[socket.socket, int]:
    """Fork the connector; return the worker's end of its channel and its pid.

    The connector answers every byte received with one connection to ``(host, port)``
    (``b"\\x00"`` + the descriptor) or ``b"\\x01"`` when the connect failed; it exits on EOF,
    i.e. when the worker is gone. Call while single-threaded and before :func:`enter_netns`.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the connector
        code = 0
        try:
            ours.close()
            _connector(theirs, host, port, harden=harden)
        except BaseException:  # a forked child must never return into the worker
            code = 1
        os._exit(code)
    theirs.close()
    return ours, pid


def _connector(chan: socket.socket, host: str, port: int, *, harden: bool) -> None:
    keep = {chan.fileno(), 2}
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    for fd in os.listdir("/proc/self/fd"):  # the worker's listener, stdout pipe, …
        if int(fd) > 2 and int(fd) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(fd))
    if harden:
        _confine_connector(port)
    while True:
        try:
            request = chan.recv(16)
        except OSError:
            return
        if not request:
            return
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            sys.stderr.write(f"pytest_sandbox.fsworker: egress connector: {host}:{port}: {exc}\n")
            chan.sendall(b"\x01")
            continue
        with upstream:
            socket.send_fds(chan, [b"\x00"], [upstream.fileno()])


def _confine_connector(port: int) -> None:
    """Landlock the connector too: no writes anywhere, TCP connect only to the proxy port."""
    from pytest_sandbox.fsworker import enforce

    abi = enforce.landlock_abi()
    if abi < 1:
        return
    try:
        plan = enforce.plan_landlock(abi=abi, allow_write=[], limit_net=abi >= 4,
                                     connect_ports=[port])  # fmt: skip
        plan.path_rules.clear()  # not even /dev/null
        enforce.apply_landlock(plan)
    except enforce.EnforceError as exc:
        sys.stderr.write(f"pytest_sandbox.fsworker: egress connector not confined: {exc}\n")


def listen(host: str, port: int) -> socket.socket:
    """The listener inside the namespace, on the proxy's own address."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    return listener


class Forwarder:
    """Accepts on the in-namespace listener; pairs each connection with one from the connector.

    Start it after Landlock is applied: threads inherit the domain of the thread creating them.
    """

    def __init__(self, listener: socket.socket, chan: socket.socket) -> None:
        self.listener = listener
        self.chan = chan
        self.relayed = 0
        self.refused = 0

    def start(self) -> Forwarder:
        threading.Thread(target=self._accept_loop, name="egress-accept", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = self._upstream()
            if upstream is None:
                self.refused += 1
                conn.close()
                continue
            self.relayed += 1
            threading.Thread(target=relay, args=(conn, upstream), name="egress-relay",
                             daemon=True).start()  # fmt: skip

    def _upstream(self) -> socket.socket | None:
        try:
            self.chan.sendall(b"c")
            message, fds, _, _ = socket.recv_fds(self.chan, 1, 1)
        except OSError:
            return None
        if message != b"\x00" or not fds:
            for fd in fds:
                os.close(fd)
            return None
        return socket.socket(fileno=fds[0])


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions are closed (half-closes passed on), then close
    both sockets. Also the egress proxy's tunnel."""
    open_ends = {a: b, b: a}
    try:
        while open_ends:
            readable, _, _ = select.select(list(open_ends), [], [], IDLE_TIMEOUT)
            if not readable:
                return
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                other = open_ends[sock]
                if data:
                    try:
                        other.sendall(data)
                    except OSError:
                        return
                    continue
                del open_ends[sock]
                with contextlib.suppress(OSError):
                    other.shutdown(socket.SHUT_WR)
    finally:
        a.close()
        b.close()
