"""Downstream-style demo: test an update client against a bundle server that misbehaves.

Uses only the public fixtures: ``sandbox_bundle_server``, ``sandbox_bundle_puller``,
``sandbox_sidecar``.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_sandbox.errors import BundleRefused, RollbackRefused

KEY = "demo-tenant"


def test_install_then_up_to_date(sandbox_bundle_server: Any, sandbox_bundle_puller: Any) -> None:
    sandbox_bundle_server.tenant(KEY).publish({"memory/notes.md": b"# notes\n"}, version="0.4.0")
    puller = sandbox_bundle_puller(KEY)

    assert puller.tick().status == "installed"
    assert (puller.root / "current" / "memory" / "notes.md").read_bytes() == b"# notes\n"
    assert puller.tick().status == "up_to_date"


def test_a_rollback_is_refused_before_any_file_is_fetched(
    sandbox_bundle_server: Any, sandbox_bundle_puller: Any
) -> None:
    tenant = sandbox_bundle_server.tenant(KEY)
    tenant.publish({"a.md": b"new"}, version="0.4.2")
    puller = sandbox_bundle_puller(KEY)
    puller.pull()
    fetched = len(sandbox_bundle_server.file_requests())

    sandbox_bundle_server.scenario("rollback", version="0.4.1")
    with pytest.raises(RollbackRefused):
        puller.pull()
    assert len(sandbox_bundle_server.file_requests()) == fetched
    assert (puller.root / "current" / "a.md").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("scenario", "params"),
    [
        ("unsafe_path", {"kind": "dotdot"}),
        ("endless_data", {}),
        ("changed_bytes", {}),
        ("stall", {"on": "file", "after": 3, "seconds": 5}),
        ("reset", {}),
    ],
)
def test_faults_leave_current_alone(
    sandbox_bundle_server: Any, sandbox_bundle_puller: Any, scenario: str, params: dict[str, Any]
) -> None:
    tenant = sandbox_bundle_server.tenant(KEY)
    tenant.publish({"a.md": b"good"}, version="0.4.0")
    puller = sandbox_bundle_puller(KEY, gap_timeout=0.5)
    puller.pull()
    tenant.publish({"a.md": b"next"}, version="0.4.1")

    sandbox_bundle_server.scenario(scenario, **params)
    result = puller.tick()

    assert result.status == "refused"
    assert isinstance(result.error, BundleRefused)
    assert (puller.root / "current" / "a.md").read_bytes() == b"good"


def test_sidecar_is_told_to_reload(
    sandbox_bundle_server: Any, sandbox_bundle_puller: Any, sandbox_sidecar: Any
) -> None:
    sandbox_bundle_server.tenant(KEY).publish({"a.md": b"x"}, version="0.4.0")
    sandbox_sidecar.reply(409, 200)  # busy once, then fine

    result = sandbox_bundle_puller(KEY).tick()

    assert result.sidecar.status == "ok"
    assert [c.path for c in sandbox_sidecar.calls] == ["/bundle/reload", "/bundle/reload"]
