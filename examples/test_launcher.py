"""Demo: verified backends — a daemon launched only from an allow-listed root, with a verified
identity, W3C trace context, a readiness probe, and a stop that checks who it signals.

Uses only the public fixtures, as a downstream suite would.
"""

from __future__ import annotations

import json
import time

import pytest

from pytest_sandbox.errors import BackendIdentityMismatch, LaunchRefused
from pytest_sandbox.launcher import ServiceDefinition, TraceContext


def test_http_backend_over_a_unix_socket(sandbox_backend):
    daemon = sandbox_backend.install_demo_daemon()  # a tiny HTTP server, copied into the root
    trace = TraceContext.new(tracestate="acme=demo")
    backend = sandbox_backend.launch(
        ServiceDefinition(
            "orders", "1.4.2", daemon, sandbox_backend.allow_root, probe="http:/health"
        ),
        trace=trace,
    )
    status, body = backend.http("GET", "/")
    seen = json.loads(body)
    assert status == 200
    assert seen["PYTEST_SANDBOX_SERVICE_NAME"] == "orders"
    assert seen["PYTEST_SANDBOX_ENDPOINT"] == str(backend.endpoint)  # unix:/short/path.sock
    assert seen["TRACEPARENT"] == trace.traceparent
    assert backend.verify().exe_sha256  # pid + start time + exe + exe SHA-256 still hold
    assert backend.status == "running"


def test_tcp_backend_with_idle_timeout(sandbox_backend):
    daemon = sandbox_backend.install_demo_daemon()
    backend = sandbox_backend.launch(
        sandbox_backend.service("search", daemon, endpoint="tcp", idle_timeout=0.3)
    )
    assert backend.http("GET", "/health") == (200, b"ok")
    deadline = time.monotonic() + 10
    while backend.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon leaves by itself once idle
    assert backend.status == "exited: idle"  # not "crashed: exit code N"


def test_binaries_outside_the_allow_root_are_refused(sandbox_backend):
    with pytest.raises(LaunchRefused, match="outside the allow root"):
        sandbox_backend.launch(ServiceDefinition("sh", "0", "/bin/sh", sandbox_backend.allow_root))


def test_a_forged_identity_is_never_signalled(sandbox_backend):
    import dataclasses

    daemon = sandbox_backend.install_demo_daemon()
    backend = sandbox_backend.launch(sandbox_backend.service("billing", daemon))
    real = backend.identity
    backend.identity = dataclasses.replace(real, start_time=real.start_time - 60)
    with pytest.raises(BackendIdentityMismatch):
        backend.stop()  # refuses: the record does not name the live process
    assert backend.http("GET", "/health") == (200, b"ok")  # untouched
    backend.identity = real  # teardown stops it, verified
