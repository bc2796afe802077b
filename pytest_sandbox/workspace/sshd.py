"""A real OpenSSH server on 127.0.0.1 with its own host key, user key and known_hosts.

:class:`SSHHost` generates an ed25519 host key and user key in a private directory, writes an
``sshd_config`` that admits exactly that user key for the current user (root included:
``PermitRootLogin prohibit-password``), starts ``/usr/sbin/sshd -D -e`` as a tracked process and
waits for "Server listening". ``guest()`` returns an :class:`SSHGuest` bound to it. The private
directory (keys, config, logs, guests' scratch dirs) is a ledger resource removed at close.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import ProcessExitedEarly, ReadinessTimeout, SSHUnavailable
from pytest_sandbox.runtime.ledger import ResourceTracker, track
from pytest_sandbox.runtime.processes import TrackedProcess, log_tail
from pytest_sandbox.workspace.guests import (
    SSHGuest,
    SSHTarget,
    new_marked_dir,
    remove_marked_dir,
)

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
_MARKER = ".psb-sshd"


def find_sshd() -> str | None:
    """Absolute path of ``sshd`` (it refuses to start from a relative path), or None."""
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    done = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise SSHUnavailable(
            f"ssh-keygen could not create {path}: {done.stderr.decode(errors='replace')}. "
            "Install openssh-client."
        )


class SSHHost:
    """A running test ``sshd`` on 127.0.0.1: ``host``, ``port``, ``user``, ``key_path``,
    ``known_hosts``; ``guest()`` makes an :class:`SSHGuest` on it; ``close()`` stops it.
    """

    def __init__(
        self,
        *,
        base_dir: Path | str | None = None,
        tracker: ResourceTracker | None = None,
        log_dir: Path | None = None,
        socket_dir: Path | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self._tracker = tracker
        self.socket_dir = socket_dir
        self.host = "127.0.0.1"
        self.user = getpass.getuser()
        self.port = 0
        self._process: TrackedProcess | None = None
        self._guests: list[SSHGuest] = []
        sshd = find_sshd()
        if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            raise SSHUnavailable(
                "OpenSSH is not installed (need sshd, ssh and ssh-keygen). Install "
                "openssh-server and openssh-client (apt-get install openssh-server)."
            )
        self.sshd = sshd
        self._tracked = track(tracker, "ssh-host", "sshd (creating)", releaser=RELEASER)
        try:
            self.dir = new_marked_dir("psb-sshd-", base_dir, _MARKER, self._tracked)
            self.dir.chmod(0o700)
            self._tracked.update(key=f"sshd dir {self.dir}", path=str(self.dir))
            self.log_dir = log_dir or self.dir
            self.scratch_root = str(self.dir / "guests")
            (self.dir / "guests").mkdir()
            self._prepare_keys()
            self._start(start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def key_path(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def target(self) -> SSHTarget:
        return SSHTarget(self.host, self.port, self.user, self.key_path, self.known_hosts)

    def _prepare_keys(self) -> None:
        _keygen(self.host_key, "pytest-sandbox host key")
        _keygen(self.key_path, "pytest-sandbox user key")
        authorized = self.dir / "authorized_keys"
        authorized.write_bytes(self.key_path.with_suffix(".pub").read_bytes())
        authorized.chmod(0o600)
        # privilege separation needs this directory to exist (a fresh container lacks it)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    def _config(self) -> str:
        return "\n".join(
            [
                f"Port {self.port}",
                f"ListenAddress {self.host}",
                f"HostKey {self.host_key}",
                "PidFile none",
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                "AuthorizedKeysCommand none",
                f"AllowUsers {self.user}",
                # the user is root on CI machines: admit its key, never a password
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "HostbasedAuthentication no",
                "UsePAM no",
                # our files live under a temp dir whose ancestors StrictModes would reject
                "StrictModes no",
                "PermitUserEnvironment no",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                "PrintMotd no",
                "UseDNS no",
                "MaxStartups 200",
                "MaxSessions 200",
                "LogLevel INFO",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )

    def _start(self, timeout: float) -> None:
        last: Exception | None = None
        for _attempt in range(5):  # a free port can be taken between probe and bind
            self.port = _free_port()
            config = self.dir / "sshd_config"
            config.write_text(self._config())
            self.known_hosts.write_text(
                f"[{self.host}]:{self.port} "
                + " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
                + "\n"
            )
            log_path = self.log_dir / f"sshd-{self.port}.log"
            process = TrackedProcess(
                [self.sshd, "-D", "-e", "-f", str(config)],
                log_path=log_path,
                ready=rf"Server listening on {self.host} port {self.port}",
                timeout=timeout,
                grace=2.0,
                tracker=self._tracker,
                name="sshd",
            )
            try:
                process.start()
            except ProcessExitedEarly as exc:
                last = exc
                if "Address already in use" in log_tail(log_path):
                    continue
                raise SSHUnavailable(
                    f"sshd on {self.host}:{self.port} exited at start: {exc}. Check "
                    f"{config} and the log {log_path}."
                ) from exc
            except ReadinessTimeout as exc:
                raise SSHUnavailable(f"sshd did not start listening: {exc}") from exc
            self._process = process
            self._tracked.update(key=f"sshd 127.0.0.1:{self.port} {self.dir}", port=self.port)
            return
        raise SSHUnavailable(f"sshd could not bind a free port after 5 attempts: {last}")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        return self._process.log_path if self._process else None

    def ssh_argv(self, *remote: str) -> list[str]:
        """An ``ssh`` argv (BatchMode, pinned host key, the user key) running ``remote``."""
        return ["ssh", *self.target.options(), "-T", self.host, "--", *remote]

    def guest(self, *, tracker: ResourceTracker | None = None) -> SSHGuest:
        """A new :class:`SSHGuest` on this host; its scratch dir lives under this host's dir."""
        guest = SSHGuest(
            self.target,
            socket_dir=self.socket_dir,
            scratch_root=self.scratch_root,
            tracker=tracker if tracker is not None else self._tracker,
            log_dir=self.log_dir if self.log_dir != self.dir else None,
        )
        self._guests.append(guest)
        return guest

    def close(self) -> None:
        """Close its guests, stop sshd, remove keys and scratch. Idempotent."""
        for guest in self._guests:
            guest.close()
        self._guests.clear()
        if self._process is not None:
            self._process.stop()
        release_ssh_host({"path": str(getattr(self, "dir", "")), "token": self._tracked.token})
        self._tracked.released()

    def keep(self) -> None:
        self._tracked.kept()
        if self._process is not None:
            self._process.keep()

    def __enter__(self) -> SSHHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SSHHost {self.user}@{self.host}:{self.port} pid={self.pid}>"


def release_ssh_host(details: Mapping[str, Any]) -> None:
    """Ledger releaser for the sshd's directory (the sshd itself is a ``process`` row).

    Removes the directory only when its marker holds this host's token.
    """
    remove_marked_dir(details, _MARKER, before=_kill_guest_commands)


def _kill_guest_commands(root: Path) -> None:
    """Kill commands its guests started through this sshd (their ``PSB_TAG`` names a pid file
    under ``root``): sshd runs each session in its own session, so stopping sshd spares them."""
    import psutil

    prefix = f"{root}/"
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PSB_TAG", "").startswith(prefix):
                proc.kill()


RELEASER = f"{__name__}:release_ssh_host"
