"""SandboxSettings: the effective settings of a run, built once.

Precedence: command line > environment ``PYTEST_SANDBOX_*`` > ini ``sandbox_*`` > default. Every
bad value is refused at start-up with a message naming the option, where it came from, and the
value.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.errors import SettingsError
from pytest_sandbox.runtime.run import socket_dir_problem

KEEP_CHOICES = ("never", "failed", "always")
BACKEND_CHOICES = ("auto", "require", "off")
GUEST_CHOICES = ("local", "container", "ssh")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class _Option:
    name: str  # field name
    cli: str  # --sandbox-x
    dest: str  # argparse dest
    ini: str
    env: str
    help: str
    choices: tuple[str, ...] = ()


OPTIONS = (
    _Option(
        "state_dir",
        "--sandbox-state-dir",
        "sandbox_state_dir",
        "sandbox_state_dir",
        "PYTEST_SANDBOX_STATE_DIR",
        "directory for the resource ledger and run logs (default: $XDG_STATE_HOME/pytest-sandbox)",
    ),
    _Option(
        "keep",
        "--sandbox-keep",
        "sandbox_keep",
        "sandbox_keep",
        "PYTEST_SANDBOX_KEEP",
        "keep resources after a test: never (default), failed (of failed tests), always",
        KEEP_CHOICES,
    ),
    _Option(
        "docker",
        "--sandbox-docker",
        "sandbox_docker",
        "sandbox_docker",
        "PYTEST_SANDBOX_DOCKER",
        "Docker engine: auto (skip when none answers), require (fail instead), off",
        BACKEND_CHOICES,
    ),
    _Option(
        "kernel",
        "--sandbox-kernel",
        "sandbox_kernel",
        "sandbox_kernel",
        "PYTEST_SANDBOX_KERNEL",
        "kernel enforcement (Landlock, namespaces): auto, require (fail where missing), off",
        BACKEND_CHOICES,
    ),
    _Option(
        "guest",
        "--sandbox-guest",
        "sandbox_guest",
        "sandbox_guest",
        "PYTEST_SANDBOX_GUEST",
        "guest backend for sandbox_guest: local, container, ssh "
        "(default: container when an engine answers, else local)",
        GUEST_CHOICES,
    ),
    _Option(
        "socket_dir",
        "--sandbox-socket-dir",
        "sandbox_socket_dir",
        "sandbox_socket_dir",
        "PYTEST_SANDBOX_SOCKET_DIR",
        "short directory for Unix sockets (default: $TMPDIR/psb-<uid>)",
    ),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "pytest-sandbox"


@dataclass(frozen=True)
class SandboxSettings:
    """The effective settings; ``sources`` says where each value came from."""

    state_dir: Path
    socket_dir: Path
    keep: str = "never"
    docker: str = "auto"
    kernel: str = "auto"
    guest: str | None = None
    reaper: bool = True
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        guest = self.guest or "auto"
        return (
            f"keep={self.keep} docker={self.docker} kernel={self.kernel} guest={guest} "
            f"reaper={'on' if self.reaper else 'off'} state_dir={self.state_dir}"
        )

    def with_overrides(self, overrides: Mapping[str, Any], source: str) -> SandboxSettings:
        """Settings with ``overrides`` (from a ``sandbox`` marker) applied and validated."""
        unknown = sorted(set(overrides) - {"keep", "docker", "kernel", "guest"})
        if unknown:
            raise SettingsError(
                "@pytest.mark.sandbox",
                source,
                unknown,
                "unknown setting(s)",
                "Use keep=, docker=, kernel= or guest=.",
            )
        changes: dict[str, Any] = {}
        sources = dict(self.sources)
        for name, value in overrides.items():
            changes[name] = _check_choice(_BY_NAME[name], value, source)
            sources[name] = source
        return replace(self, **changes, sources=sources)


def _check_choice(option: _Option, value: object, source: str) -> str:
    if not isinstance(value, str) or value not in option.choices:
        raise SettingsError(
            option.cli,
            source,
            value,
            "not a valid value",
            f"Use one of: {', '.join(option.choices)}.",
        )
    return value


def _check_state_dir(path: Path, source: str) -> Path:
    fix = "Point --sandbox-state-dir (or PYTEST_SANDBOX_STATE_DIR) at a writable directory."
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(
            "--sandbox-state-dir",
            source,
            str(path),
            f"the directory is not writable ({exc.strerror or exc})",
            fix,
        ) from exc
    return path


def _check_socket_dir(path: Path, source: str) -> Path:
    problem = socket_dir_problem(path / "0123456789ab")  # + the run id level
    if problem:
        raise SettingsError(
            "--sandbox-socket-dir",
            source,
            str(path),
            problem,
            "Set --sandbox-socket-dir (or PYTEST_SANDBOX_SOCKET_DIR, or a shorter TMPDIR) to a "
            "short path such as /tmp/psb.",
        )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            "--sandbox-socket-dir",
            source,
            str(path),
            f"cannot create it ({exc.strerror or exc})",
            "Choose a writable, short directory.",
        ) from exc
    return path


def _parse_bool(option_name: str, source: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(
        option_name, source, value, "not a boolean", f"Use one of: {', '.join(_TRUE + _FALSE)}."
    )


def resolve(
    cli: Callable[[str], Any],
    ini: Callable[[str], Any],
    environ: Mapping[str, str],
) -> SandboxSettings:
    """Build the settings from the three sources (``cli``/``ini`` look a name up, or None)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        raw: Any = None
        source = "default"
        if cli(option.dest) not in (None, ""):
            raw, source = cli(option.dest), "command line"
        elif environ.get(option.env, "") != "":
            raw, source = environ[option.env], f"environment {option.env}"
        elif ini(option.ini) not in (None, ""):
            raw, source = ini(option.ini), f"ini {option.ini}"
        sources[option.name] = source
        if raw is None:
            continue
        if option.choices:
            values[option.name] = _check_choice(option, str(raw), source)
        else:
            values[option.name] = Path(str(raw)).expanduser()

    state_dir = values.get("state_dir") or default_state_dir()
    values["state_dir"] = _check_state_dir(Path(state_dir).absolute(), sources["state_dir"])
    if "socket_dir" in values:
        socket_dir, socket_source = values["socket_dir"], sources["socket_dir"]
    else:
        socket_dir = Path(tempfile.gettempdir()) / f"psb-{os.getuid()}"
        socket_source = "default ($TMPDIR)"
    values["socket_dir"] = _check_socket_dir(Path(socket_dir).absolute(), socket_source)

    reaper = True
    sources["reaper"] = "default"
    if cli("sandbox_no_reaper"):
        reaper, sources["reaper"] = False, "command line --sandbox-no-reaper"
    elif environ.get("PYTEST_SANDBOX_REAPER", "") != "":
        source = "environment PYTEST_SANDBOX_REAPER"
        reaper = _parse_bool("PYTEST_SANDBOX_REAPER", source, environ["PYTEST_SANDBOX_REAPER"])
        sources["reaper"] = source
    elif ini("sandbox_reaper") not in (None, ""):
        source = "ini sandbox_reaper"
        reaper = _parse_bool("sandbox_reaper", source, str(ini("sandbox_reaper")))
        sources["reaper"] = source
    return SandboxSettings(**values, reaper=reaper, sources=sources)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest-sandbox: isolated environments")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": option.help}
        if option.choices:
            kwargs["metavar"] = "{" + ",".join(option.choices) + "}"
        group.addoption(option.cli, **kwargs)
        parser.addini(option.ini, option.help, default="")
    group.addoption(
        "--sandbox-no-reaper",
        dest="sandbox_no_reaper",
        action="store_true",
        default=False,
        help="do not start the run's reaper process (crash clean-up then waits for the next "
        "session's sweep)",
    )
    parser.addini("sandbox_reaper", "start the run's reaper process (default true)", default="")


def from_config(config: pytest.Config) -> SandboxSettings:
    """Build settings from a pytest config; bad values become a ``pytest.UsageError``."""
    try:
        return resolve(
            lambda dest: config.getoption(dest, None),
            lambda name: config.getini(name),
            os.environ,
        )
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-sandbox: {exc}") from exc
