"""The bundle fixtures driven black-box with pytester, with and without xdist."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = """
import os
from pathlib import Path

def test_pull(sandbox_bundle_server, sandbox_bundle_puller, sandbox_run):
    sandbox_bundle_server.tenant("k").publish({"a.md": b"hi"}, version="0.4.0")
    puller = sandbox_bundle_puller("k")
    assert puller.tick().status == "installed"
    assert (puller.root / "current" / "a.md").read_bytes() == b"hi"
    sandbox_bundle_server.assert_requested("/api/v1/memory/bundle/manifest", count=1)

def test_sidecar_in_run_socket_dir(sandbox_bundle_server, sandbox_bundle_puller, sandbox_sidecar,
                                   sandbox_run):
    assert sandbox_sidecar.socket_path.parent == sandbox_run.socket_dir
    assert len(os.fsencode(sandbox_sidecar.socket_path)) < 108
    sandbox_bundle_server.tenant("k").publish({"a.md": b"hi"}, version="0.4.0")
    result = sandbox_bundle_puller("k").tick()  # the sidecar is wired in by default
    assert result.sidecar.status == "ok"
    assert len(sandbox_sidecar.calls) == 1
    with open(os.environ["SOCKETS_FILE"], "a") as f:
        f.write(str(sandbox_sidecar.socket_path) + "\\n")

def test_fresh_server_per_test(sandbox_bundle_server):
    assert sandbox_bundle_server.requests == []
"""

BROKEN = """
def test_server_error_fails_teardown(sandbox_bundle_server, sandbox_bundle_puller):
    sandbox_bundle_server.tenant("k").publish({"a.md": b"hi"}, version="0.4.0")
    sandbox_bundle_server.scenario("mix_and_match")  # needs a second bundle: a server bug
    assert sandbox_bundle_puller("k").tick().status == "refused"
"""


@pytest.mark.parametrize("xdist", [["-p", "no:xdist"], ["-n", "2"]], ids=["no-xdist", "n2"])
def test_fixtures_work_and_clean_up(
    pytester: pytest.Pytester,
    state_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    xdist: list[str],
) -> None:
    sockets = tmp_path / "sockets.txt"
    monkeypatch.setenv("SOCKETS_FILE", str(sockets))
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess(*xdist)
    result.assert_outcomes(passed=3)
    for line in sockets.read_text().split():
        assert not Path(line).exists()


def test_server_thread_error_fails_the_test_at_teardown(
    pytester: pytest.Pytester, state_dir: Path
) -> None:
    pytester.makepyfile(BROKEN)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*BundleServerError*mix_and_match*"])


def test_fixture_docs_show_in_pytest_fixtures(pytester: pytest.Pytester, state_dir: Path) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:xdist")
    result.stdout.fnmatch_lines(
        [
            "*sandbox_bundle_server*",
            "*fresh for this test*",
            "*sandbox_bundle_puller*",
            "*sandbox_sidecar*",
        ]
    )
