"""Framing: length prefix, 1 MiB limit checked from the header, clean vs dirty EOF, garbage."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_sandbox.fsworker import protocol


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(kind=st.text(max_size=30), fields=st.dictionaries(st.text(max_size=10), json_values))
def test_round_trip(kind: str, fields: dict[str, object]) -> None:
    message = {**fields, "kind": kind}
    a, b = socket.socketpair()
    with a, b:
        protocol.write_frame(a, message)
        assert protocol.read_frame(b, frame_timeout=1.0) == message


def test_header_is_big_endian_length(pair: tuple[socket.socket, socket.socket]) -> None:
    frame = protocol.encode({"kind": "ping"})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert frame[4:] == b'{"kind":"ping"}'


def test_oversized_frame_refused_before_body(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    # Only the header is sent: a reader that tried to read the body would block here.
    a.sendall(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(protocol.FrameError, match="refused") as info:
        protocol.read_frame(b, frame_timeout=None)
    assert info.value.fatal


def test_encode_refuses_oversized_message() -> None:
    with pytest.raises(ValueError, match="limit"):
        protocol.encode({"kind": "write", "content": "x" * protocol.MAX_FRAME})


def test_eof_before_frame_is_clean_close(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    with pytest.raises(protocol.ConnectionClosed):
        protocol.read_frame(b)


@pytest.mark.parametrize(
    "data", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x10", b'\x00\x00\x00\x10{"ki']
)
def test_eof_inside_frame_is_an_error(
    pair: tuple[socket.socket, socket.socket], data: bytes
) -> None:
    a, b = pair
    a.sendall(data)
    a.close()
    with pytest.raises(protocol.FrameError, match="closed inside a frame") as info:
        protocol.read_frame(b, frame_timeout=2.0)
    assert info.value.fatal


def test_stall_inside_frame_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\x00\x00\x00\x10{")
    with pytest.raises(protocol.FrameError, match="timed out") as info:
        protocol.read_frame(b, frame_timeout=0.2)
    assert info.value.fatal


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"no": "kind"}', "kind"),
        (b'{"kind": 3}', "kind"),
        (b"[" * 100_000, "JSON|deep"),
        (b"", "not JSON"),
    ],
)
def test_garbage_body_is_not_fatal(
    pair: tuple[socket.socket, socket.socket], body: bytes, problem: str
) -> None:
    a, b = pair
    threading.Thread(target=a.sendall, args=(struct.pack(">I", len(body)) + body,)).start()
    with pytest.raises(protocol.FrameError, match=problem) as info:
        protocol.read_frame(b, frame_timeout=2.0)
    assert not info.value.fatal


def test_wait_timeout_before_first_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    with pytest.raises(TimeoutError):
        protocol.read_frame(b, wait_timeout=0.05)
