"""The Guest protocol on every backend, and the test sshd itself."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import errors
from pytest_sandbox.workspace.guests import Guest

BACKENDS = [
    pytest.param(name, marks=pytest.mark.sandbox(guest=name), id=name)
    for name in ("local", "ssh", "container")
]
DURATION = "117.5"  # a command line no other test uses
ODD_ARGS = ["a b", "it's", '"q"', "$HOME", "`id`", "-x", "--", "new\nline", "ünï", "*", ""]


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_argv_reaches_the_guest_unchanged(backend: str, sandbox_guest: Any) -> None:
    assert isinstance(sandbox_guest, Guest)
    assert sandbox_guest.kind == backend
    result = sandbox_guest.run(["printf", "%s|", *ODD_ARGS])
    assert result.exit_code == 0
    assert result.output.decode() == "".join(f"{a}|" for a in ODD_ARGS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_code_stdout_stderr_env(backend: str, sandbox_guest: Any) -> None:
    result = sandbox_guest.run(
        ["sh", "-c", 'echo out; echo "err $X" >&2; exit 7'], env={"X": "from env"}
    )
    assert (result.exit_code, result.output, result.stderr) == (7, b"out\n", b"err from env\n")
    with pytest.raises(errors.GuestCommandFailed, match="exit code 7") as info:
        result.check("the command")
    assert info.value.exit_code == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_script_gets_args_never_spliced(backend: str, sandbox_guest: Any) -> None:
    result = sandbox_guest.run_script('printf "%s|" "$@"; cat', *ODD_ARGS, stdin=b"in")
    assert result.check("script").output.decode() == "".join(f"{a}|" for a in ODD_ARGS) + "in"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdin_is_streamed(backend: str, sandbox_guest: Any) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(8)]
    result = sandbox_guest.run(["sha256sum"], stdin=iter(chunks))
    import hashlib

    assert result.output.split()[0].decode() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert sandbox_guest.run(["cat"], stdin=b"bytes").output == b"bytes"
    assert sandbox_guest.run(["cat"], stdin=io.BytesIO(b"file")).output == b"file"


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_kills_and_guest_stays_usable(backend: str, sandbox_guest: Any) -> None:
    started = time.monotonic()
    with pytest.raises(errors.GuestTimeout, match="timeout"):
        sandbox_guest.run(["sleep", "61.25"], timeout=1.0)
    assert time.monotonic() - started < 30
    assert wait_gone(["sleep", "61.25"])  # the command itself, not just our client
    assert sandbox_guest.run(["echo", "ok"]).output == b"ok\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_put_tar_and_read_file(backend: str, sandbox_guest: Any) -> None:
    base = os.path.dirname(sandbox_guest.default_workspace_path)
    target = f"{base}/drop zone/nested"
    files = {"a.txt": b"A", "dir/ü b.bin": bytes(range(256)), "-dash": b"-"}
    sandbox_guest.put_tar(tar_of(files), target)
    for name, data in files.items():
        assert sandbox_guest.read_file(f"{target}/{name}") == data
    with pytest.raises(errors.GuestCommandFailed):
        sandbox_guest.read_file(f"{target}/missing")


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_is_idempotent_and_final(backend: str, sandbox_guest: Any) -> None:
    sandbox_guest.close()
    sandbox_guest.close()
    assert sandbox_guest.closed
    with pytest.raises(errors.GuestClosed):
        sandbox_guest.run(["true"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_aborts_a_running_command(backend: str, sandbox_guest: Any) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            sandbox_guest.run(["sleep", DURATION], timeout=200)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    sandbox_guest.close()
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 30
    assert len(failures) == 1
    assert isinstance(failures[0], errors.GuestClosed)
    assert wait_gone(["sleep", DURATION])  # the command itself, not just our client


def test_container_guest_close_without_waiting_stops_it_at_once(
    sandbox_docker: Any, sandbox_image: Any
) -> None:
    from pytest_sandbox.workspace.guests import ContainerGuest

    sandbox_docker.wait_for_removals()  # earlier tests' teardowns
    guest = ContainerGuest(sandbox_docker, sandbox_image("debian-git"))
    long_run = ["sleep", "118.5"]  # a command line no other test uses
    failures: list[BaseException] = []

    def run() -> None:
        try:
            guest.run(long_run, timeout=200)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not sleepers(long_run):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    guest.close(wait=False)
    assert sleepers(long_run) == []  # gone when close returned, not later
    assert sandbox_docker.pending_removals == 1
    thread.join(30)
    assert [type(f) for f in failures] == [errors.GuestClosed]
    sandbox_docker.wait_for_removals()
    assert sandbox_docker.client.api.containers(all=True, filters={"id": guest.id}) == []


def test_container_guest_output_is_whole_when_the_command_answers_first(
    sandbox_docker: Any, sandbox_image: Any
) -> None:
    # Busy threads delay this one between the request and the response's headers, so a quick
    # command's output arrives with the headers in one read: it must not be lost with them.
    from pytest_sandbox.workspace.guests import ContainerGuest

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(2000))

    spinners = [threading.Thread(target=spin) for _ in range(3)]
    with ContainerGuest(sandbox_docker, sandbox_image("debian-git")) as guest:
        for spinner in spinners:
            spinner.start()
        try:
            outputs = [guest.run(["echo", str(i)]).output for i in range(60)]
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join()
    assert [i for i, out in enumerate(outputs) if out != f"{i}\n".encode()] == []


def sleepers(cmdline: list[str]) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] == cmdline:
            found.append(proc.pid)
    return found


def wait_gone(cmdline: list[str], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while sleepers(cmdline):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_local_guest_runs_in_own_session_and_namespace(sandbox_guest: Any) -> None:
    from pytest_sandbox.workspace.guests import LocalGuest

    with LocalGuest() as guest:
        sid = guest.run(["sh", "-c", "ps -o sid= -p $$"]).output.strip()
        assert int(sid) != os.getsid(0)
        if guest.namespaces:
            for kind in ("mnt", "user"):
                ns = guest.run(["readlink", f"/proc/self/ns/{kind}"]).output.strip()
                assert ns != os.readlink(f"/proc/self/ns/{kind}").encode(), kind
            guest.run(["sh", "-c", "echo x > /tmp/guest-private"]).check("write /tmp")
            assert (guest.root / "tmp" / "guest-private").exists()
            assert not Path("/tmp/guest-private").exists()
        root = guest.root
    assert not root.exists()


# --- the test sshd ----------------------------------------------------------------------


def test_sshd_admits_the_user_key_for_root_and_pins_the_host_key(
    sandbox_ssh_host: Any, tmp_path: Path
) -> None:
    host = sandbox_ssh_host
    assert host.host == "127.0.0.1"
    assert host.user == os.environ.get("USER", host.user)
    done = subprocess.run(host.ssh_argv("id", "-un"), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == host.user
    # another host key under the same name is refused (StrictHostKeyChecking, own known_hosts)
    wrong = tmp_path / "known_hosts"
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong.write_text(f"[127.0.0.1]:{host.port} {other.with_suffix('.pub').read_text()}")
    argv = host.ssh_argv("true")
    argv[argv.index(f"UserKnownHostsFile={host.known_hosts}")] = f"UserKnownHostsFile={wrong}"
    refused = subprocess.run(argv, capture_output=True, timeout=60)
    assert refused.returncode == 255
    assert b"host key" in refused.stderr.lower() or b"verification failed" in refused.stderr


def test_sshd_refuses_other_keys_and_passwords(sandbox_ssh_host: Any, tmp_path: Path) -> None:
    host = sandbox_ssh_host
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    argv = host.ssh_argv("true")
    argv[argv.index(str(host.key_path))] = str(stranger)
    done = subprocess.run(argv, capture_output=True, timeout=60)
    assert done.returncode == 255
    assert b"Permission denied (publickey)" in done.stderr


def test_sshd_is_a_tracked_process_and_guests_get_own_scratch(sandbox_ssh_host: Any) -> None:
    host = sandbox_ssh_host
    assert host.pid is not None
    assert host.log_path is not None
    assert "Server listening" in host.log_path.read_text()
    one, two = host.guest(), host.guest()
    try:
        assert one.scratch != two.scratch
        assert one.default_workspace_path.startswith(str(host.dir))
    finally:
        one.close()
        two.close()
    assert not Path(one.scratch).exists()
