"""W3C trace context validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_sandbox.errors import InvalidTraceContext, LaunchRefused
from pytest_sandbox.launcher.trace import TraceContext, validate_tracestate

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_traceparent():
    ctx = TraceContext(VALID, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ctx.parent_id == "00f067aa0ba902b7"
    assert ctx.sampled
    assert ctx.env() == {
        "TRACEPARENT": VALID,
        "TRACESTATE": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",  # short parent id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  # short flags
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",  # not hex
    ],
)
def test_invalid_traceparent_raises(bad):
    with pytest.raises(InvalidTraceContext) as info:
        TraceContext(bad)
    assert isinstance(info.value, LaunchRefused)
    assert "traceparent" in str(info.value)


def test_tracestate_limit_is_32_members():
    ok = ",".join(f"k{i}=v{i}" for i in range(32))
    assert TraceContext(VALID, ok).tracestate == ok
    with pytest.raises(InvalidTraceContext, match="33 members"):
        TraceContext(VALID, ok + ",k32=v32")


@pytest.mark.parametrize(
    "bad",
    [
        "Key=v",  # uppercase key
        "1key=v",  # simple key must start with a letter
        "key",  # no value
        "key=",  # empty value
        "key=a,b",  # second member without '='
        "key=va=lue",  # '=' in the value
        "key=v,key=w",  # duplicate key
    ],
)
def test_invalid_tracestate_raises(bad):
    with pytest.raises(InvalidTraceContext):
        TraceContext(VALID, bad)


def test_tracestate_normalised_and_multitenant_keys():
    assert validate_tracestate(" a=1 ,, t@sys=2 ") == "a=1,t@sys=2"
    assert TraceContext(VALID, "").tracestate is None


def test_coerce_forms():
    assert TraceContext.coerce(None) is None
    assert TraceContext.coerce(VALID) == TraceContext(VALID)
    carrier = {"TraceParent": VALID, "tracestate": "a=1"}
    assert TraceContext.coerce(carrier) == TraceContext(VALID, "a=1")
    with pytest.raises(InvalidTraceContext):
        TraceContext.coerce({"tracestate": "a=1"})
    with pytest.raises(InvalidTraceContext):
        TraceContext.coerce(42)  # type: ignore[arg-type]


@given(st.booleans())
def test_new_is_always_valid(sampled):
    ctx = TraceContext.new(sampled=sampled)
    assert TraceContext(ctx.traceparent) == ctx
    assert ctx.sampled is sampled


@given(st.text(max_size=80))
def test_random_text_never_crashes_the_validator(text):
    try:
        TraceContext(text)
    except InvalidTraceContext:
        return
    assert text.startswith("00-")
