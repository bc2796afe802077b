"""Protocol fuzzing against a live worker: no crash, no hang past the deadline, memory bounded.

Two sources: hypothesis (raw byte streams, well-framed garbage, random requests) and a fixed
corpus of truncated / oversized / garbage frames. After every input the worker has either
answered and still answers ``ping``, or closed the connection and exited with code 0.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sandbox.fsworker import FsWorker, protocol

FRAME_TIMEOUT = 0.5  # the worker gives up on a stalled frame after this
DEADLINE = 10.0  # generous liveness bound for any single reply
MEMORY_BOUND_KB = 80_000


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def raw_connection(worker: FsWorker) -> socket.socket:
    """Take over the worker's connection (the client object is not used afterwards)."""
    sock = worker._sock
    assert sock is not None
    worker._sock = None
    return sock


def recv_all(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(deadline)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def frames_in(data: bytes) -> list[dict[str, object]]:
    replies = []
    while len(data) >= 4:
        (size,) = struct.unpack(">I", data[:4])
        replies.append(json.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return replies


@pytest.fixture(scope="module", params=[None, 65534], ids=["root", "uid65534"])
def long_lived(request: pytest.FixtureRequest) -> Iterator[FsWorker]:
    """One worker for well-framed inputs: it must survive all of them (as root and 65534)."""
    with FsWorker(frame_timeout=FRAME_TIMEOUT, user=request.param) as worker:
        yield worker


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
kinds = st.sampled_from([*protocol.REQUEST_KINDS, "debug_raw_write", "", "x"]).filter(
    lambda k: k not in ("shutdown", "exec")
)
field_names = st.sampled_from(
    ["path", "content", "old", "new", "src", "dst", "pattern", "include", "names", "argv",
     "timeout", "max_bytes", "id"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=kinds, fields=st.dictionaries(field_names, json_values, max_size=6))
def test_random_requests_always_get_a_reply(
    long_lived: FsWorker, kind: str, fields: dict[str, object]
) -> None:
    message = {**fields, "kind": kind}
    try:
        frame = protocol.encode(message)
    except ValueError:
        return
    reply = long_lived.request(message, timeout=DEADLINE)
    assert reply["kind"] in ("ok", "error")
    if reply["kind"] == "error":
        assert reply["code"] in protocol.ERROR_CODES
        assert reply["code"] != "internal", reply
    assert frame  # encoded fine
    assert long_lived.ping()["pid"] == long_lived.pid


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=2000))
def test_framed_garbage_gets_a_protocol_error(long_lived: FsWorker, body: bytes) -> None:
    sock = long_lived._sock
    assert sock is not None
    with long_lived._lock:
        sock.sendall(struct.pack(">I", len(body)) + body)
        reply = protocol.read_frame(sock, wait_timeout=DEADLINE)
    if reply["kind"] == "error":
        assert reply["code"] in ("protocol", "unimplemented", "io", "policy_denied"), reply
    assert long_lived.ping()["pid"] == long_lived.pid


def test_long_lived_worker_memory_is_bounded(long_lived: FsWorker) -> None:
    assert long_lived.returncode is None
    assert vm_hwm_kb(long_lived.pid) < MEMORY_BOUND_KB


@settings(max_examples=40, deadline=None)
@given(stream=st.binary(max_size=300))
def test_raw_streams_never_crash_or_hang(stream: bytes) -> None:
    with FsWorker(frame_timeout=FRAME_TIMEOUT) as worker:
        sock = raw_connection(worker)
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        data = recv_all(sock, DEADLINE)
        sock.close()
        worker._popen.wait(timeout=DEADLINE)  # type: ignore[union-attr]
        assert worker.returncode == 0
        for reply in frames_in(data):
            assert reply["kind"] in ("ok", "error")


BIG = struct.pack(">I", protocol.MAX_FRAME + 1)
CORPUS = {
    "empty": b"",
    "half-header": b"\x00\x00",
    "header-only": b"\x00\x00\x00\x20",
    "truncated-body": b'\x00\x00\x00\x20{"kind": "pi',
    "oversized-header": BIG,
    "oversized-with-body": BIG + b"x" * 4096,
    "max-uint32": b"\xff\xff\xff\xff",
    "zero-length": b"\x00\x00\x00\x00",
    "not-json": b"\x00\x00\x00\x03abc",
    "not-utf8": b"\x00\x00\x00\x02\xff\xfe",
    "array": b"\x00\x00\x00\x02[]",
    "no-kind": b"\x00\x00\x00\x02{}",
    "deep-nesting": struct.pack(">I", 200_000) + b"[" * 200_000,
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-frames-then-junk": protocol.encode({"kind": "ping"}) * 2 + b"\x00\x00",
    "huge-string": protocol.encode({"kind": "read", "path": "a" * 900_000}),
    "nul-path": protocol.encode({"kind": "write", "path": "a\x00b", "content": ""}),
    "bad-base64": protocol.encode({"kind": "write", "path": "a", "content": "!!!"}),
}


#: Inputs after which the connection stays usable (each got an error reply).
SURVIVES = {"empty", "zero-length", "not-json", "not-utf8", "array", "no-kind", "deep-nesting",
            "huge-string", "nul-path", "bad-base64"}  # fmt: skip


@pytest.mark.parametrize("user", [None, 65534], ids=["root", "uid65534"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_frame_corpus(name: str, user: int | None) -> None:
    with FsWorker(frame_timeout=FRAME_TIMEOUT, user=user) as worker:
        sock = raw_connection(worker)
        sock.sendall(CORPUS[name])
        if name in SURVIVES:
            protocol.write_frame(sock, {"kind": "ping", "id": "after"})
            replies = []
            while not replies or replies[-1].get("id") != "after":
                replies.append(protocol.read_frame(sock, wait_timeout=DEADLINE))
            assert replies[-1]["kind"] == "ok"
            assert replies[-1]["pid"] == worker.pid
            for reply in replies[:-1]:
                assert reply["kind"] == "error"
                assert reply["code"] in ("protocol", "io"), reply
            assert vm_hwm_kb(worker.pid) < MEMORY_BOUND_KB
            sock.close()
        else:
            # Oversized, stalled or desynchronised: the worker answers what it can, then
            # closes by itself (we keep our side open: no EOF helps it).
            data = recv_all(sock, DEADLINE)
            sock.close()
            replies = frames_in(data)
            assert replies, "a refused frame gets a protocol error before the close"
            assert replies[-1]["kind"] == "error"
            assert replies[-1]["code"] == "protocol"
        worker._popen.wait(timeout=DEADLINE)  # type: ignore[union-attr]
        assert worker.returncode == 0
