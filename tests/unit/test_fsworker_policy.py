"""SandboxPolicy: validation, JSON round trip, host patterns, system paths, compose narrows."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_sandbox.errors import FsPolicyInvalid
from pytest_sandbox.fsworker.policy import (
    Limits,
    NetPolicy,
    SandboxPolicy,
    compose,
    host_matches,
    system_path_reason,
    within,
)

rel_paths = st.lists(st.sampled_from(["a", "b", "c", "src"]), min_size=1, max_size=3).map("/".join)
abs_paths = rel_paths.map(lambda p: "/srv/work/" + p)
paths = st.one_of(rel_paths, abs_paths)
hosts = st.sampled_from(["example.com", "a.example.com", "127.0.0.1", "x.org", "a.x.org"])
patterns = st.one_of(hosts, st.sampled_from(["*.example.com", "*.x.org"]))
limits = st.builds(
    Limits,
    cpu_seconds=st.none() | st.integers(1, 100),
    address_space=st.none() | st.integers(1 << 20, 1 << 30),
    open_files=st.none() | st.integers(1, 1024),
    output_bytes=st.integers(1, 512 * 1024),
)
policies = st.builds(
    SandboxPolicy,
    allow_write=st.none() | st.lists(paths, max_size=3).map(tuple),
    deny_write_within_allow=st.lists(paths, max_size=3).map(tuple),
    deny_read=st.lists(paths, max_size=3).map(tuple),
    net=st.none() | st.builds(NetPolicy, allow=st.lists(patterns, max_size=3).map(tuple)),
    limits=limits,
    exec_unconfined=st.booleans(),
)


@given(policies)
def test_json_round_trip(policy: SandboxPolicy) -> None:
    assert SandboxPolicy.from_json(policy.to_json()) == policy
    assert SandboxPolicy.from_json(policy.to_json()).to_json() == policy.to_json()


def _allowed_writes(policy: SandboxPolicy, probe: str) -> bool:
    resolved = policy.resolve("/srv/work")
    return resolved.write_denied(os.path.join("/srv/work", probe)) is None


@given(parent=policies, child=policies, probe=rel_paths)
def test_compose_only_narrows(parent: SandboxPolicy, child: SandboxPolicy, probe: str) -> None:
    both = compose(parent, child)
    if _allowed_writes(both, probe):
        assert _allowed_writes(parent, probe)
        assert _allowed_writes(child, probe)
    assert set(parent.deny_read) | set(child.deny_read) <= set(both.deny_read)
    if both.net is not None:
        for host in ["example.com", "a.example.com", "127.0.0.1", "x.org", "evil.com"]:
            if both.net.allows(host):
                assert parent.net is None or parent.net.allows(host)
                assert child.net is None or child.net.allows(host)
    for name in ("cpu_seconds", "address_space", "open_files"):
        value = getattr(both.limits, name)
        for side in (parent.limits, child.limits):
            if getattr(side, name) is not None:
                assert value is not None
                assert value <= getattr(side, name)
    assert both.limits.output_bytes <= min(parent.limits.output_bytes, child.limits.output_bytes)
    assert both.exec_unconfined <= (parent.exec_unconfined and child.exec_unconfined)


def test_compose_example() -> None:
    parent = SandboxPolicy(allow_write=("src",), net=NetPolicy(allow=("*.example.com",)))
    child = SandboxPolicy(
        allow_write=("src/gen", "docs"), net=NetPolicy(allow=("a.example.com", "evil.com"))
    )
    both = compose(parent, child)
    assert both.allow_write == ("src/gen",)
    assert both.net == NetPolicy(allow=("a.example.com",))


@pytest.mark.parametrize(
    ("host", "pattern", "ok"),
    [
        ("example.com", "example.com", True),
        ("EXAMPLE.com.", "example.com", True),
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", False),
        ("example.com", "*.example.com", False),
        ("evilexample.com", "*.example.com", False),
        ("example.com.evil.org", "example.com", False),
    ],
)
def test_host_patterns(host: str, pattern: str, ok: bool) -> None:
    assert host_matches(host, NetPolicy(allow=(pattern,)).allow[0]) is ok


@pytest.mark.parametrize("pattern", ["*", "*.com", "a.*.com", "**.x.com", "", "ex ample.com", 3])
def test_bad_host_patterns_refused(pattern: object) -> None:
    with pytest.raises(FsPolicyInvalid, match=r"net\.allow"):
        NetPolicy(allow=(pattern,))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/", "/etc", "/etc/ssl", "/usr/lib", "/tmp", "/root", "/home"])
def test_system_paths_never_writable_roots(path: str) -> None:
    with pytest.raises(FsPolicyInvalid, match="system"):
        SandboxPolicy(allow_write=(path,))


def test_home_itself_is_a_system_path_but_not_below_it() -> None:
    home = os.path.expanduser("~")
    assert system_path_reason(home)
    assert system_path_reason(os.path.join(home, "project")) is None or home == "/"


def test_resolve_refuses_a_root_that_is_a_system_path() -> None:
    with pytest.raises(FsPolicyInvalid, match="system"):
        SandboxPolicy().resolve("/etc")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"allow_writes": []}', "unknown policy field"),
        ('{"allow_write": "src"}', "list of paths"),
        ('{"allow_write": ["../up"]}', "climbs out"),
        ('{"deny_read": ["a\\u0000b"]}', "not a path"),
        ('{"net": {"allow": ["*"]}}', "net.allow"),
        ('{"net": {"deny": []}}', "net must be"),
        ('{"limits": {"cpu_seconds": 0}}', "positive"),
        ('{"limits": {"cpu_seconds": true}}', "positive"),
        ('{"limits": {"output_bytes": 99999999}}', "over"),
        ('{"limits": {"wall": 1}}', "unknown limits"),
        ('{"exec_unconfined": "yes"}', "bool"),
    ],
)
def test_malformed_policies_refused(text: str, problem: str) -> None:
    with pytest.raises(FsPolicyInvalid, match=problem):
        SandboxPolicy.from_json(text)


def test_resolved_checks() -> None:
    policy = SandboxPolicy(deny_write_within_allow=(".git",), deny_read=("secrets",))
    resolved = policy.resolve("/srv/work")
    assert resolved.write_denied("/srv/work/src/a.py") is None
    assert "deny_write_within_allow" in (resolved.write_denied("/srv/work/.git/config") or "")
    assert "outside" in (resolved.write_denied("/srv/other") or "")
    assert "outside" in (resolved.write_denied("/srv/work-evil/x") or "")
    assert "system" in (resolved.write_denied("/etc/passwd") or "")
    assert resolved.read_denied("/srv/work/secrets/key") is not None
    assert resolved.read_denied("/srv/work/secrets-not") is None


def test_within_is_component_wise() -> None:
    assert within("/a/b", "/a")
    assert not within("/ab", "/a")
    assert within("/x", "/")
    assert within("src/a", ".")
    assert not within("../a", ".")
