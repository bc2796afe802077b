"""Offline images: ``busybox`` from the host's busybox-static, ``debian-git`` via debootstrap.

No registry is needed. Each recipe has a content hash (busybox: the rootfs tar's bytes; debian-git:
the recipe — suite, mirror, variant, packages — plus the recipe version) which is the image tag,
so an image is built once per machine and reused across runs; a file lock in the state dir makes
concurrent xdist workers wait for the one that builds. Images are labelled ``pytest-sandbox=1``
(they are cached on purpose: the sweep never removes images).

Any other name is a user image: used as is when present locally, pulled only when missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_sandbox.containers import archive
from pytest_sandbox.containers.engine import LABEL, Engine
from pytest_sandbox.errors import ImageBuildFailed, ImageUnavailable

REPOSITORY = "pytest-sandbox"
RECIPES = ("busybox", "debian-git")
#: Bump when a recipe changes in a way its inputs do not show.
RECIPE_VERSION = "2"
DEBIAN_PACKAGES = ("git", "openssh-server", "ca-certificates")

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    # sys.__stderr__: pytest captures sys.stderr during fixtures; a long build must be visible.
    stream = sys.__stderr__ or sys.stderr
    print(f"pytest-sandbox: {message}", file=stream, flush=True)


def _image_labels(name: str, digest: str) -> dict[str, str]:
    # No owner labels: an image's labels are inherited by every container made from it, and a
    # user's container from our image must never look like an orphan of ours to the sweep.
    # Images are cached across runs on purpose; nothing sweeps them.
    return {LABEL: "1", f"{LABEL}.image": name, f"{LABEL}.recipe": digest}


# --- busybox ------------------------------------------------------------------------------


def find_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path.resolve()
    found = shutil.which("busybox")
    if found:
        return Path(found).resolve()
    raise ImageBuildFailed(
        "busybox image: no busybox binary on this host. Install busybox-static "
        "(apt-get install busybox-static)."
    )


def _is_static(binary: Path) -> bool:
    with open(binary, "rb") as handle:
        head = handle.read(1 << 16)
    # a dynamic ELF names its interpreter (ld-linux) in PT_INTERP, near the start
    return b"/ld-linux" not in head and b"ld-musl" not in head


def busybox_rootfs(busybox: Path | None = None) -> bytes:
    """A deterministic rootfs tar: /bin/busybox, applet symlinks, /etc basics, /tmp, /data."""
    busybox = busybox or find_busybox()
    if not _is_static(busybox):
        raise ImageBuildFailed(
            f"busybox image: {busybox} is dynamically linked and would not run in an empty "
            "image. Install busybox-static."
        )
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, check=True, stdin=subprocess.DEVNULL
    ).stdout.decode()
    applets = sorted({line.strip() for line in listing.splitlines() if line.strip()})
    buf = io.BytesIO()

    def add(
        name: str,
        *,
        kind: bytes = tarfile.DIRTYPE,
        data: bytes = b"",
        mode: int = 0o755,
        link: str = "",
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        info.uname = info.gname = "root"
        if kind == tarfile.SYMTYPE:
            info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in (
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "etc",
            "root",
            "var",
            "run",
            "data",
            "proc",
            "sys",
            "dev",
        ):
            add(d)
        add("tmp", mode=0o1777)
        add("bin/busybox", kind=tarfile.REGTYPE, data=busybox.read_bytes())
        add(
            "etc/passwd",
            kind=tarfile.REGTYPE,
            mode=0o644,
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        add("etc/group", kind=tarfile.REGTYPE, mode=0o644, data=b"root:x:0:\nnogroup:x:65534:\n")
        for applet in applets:
            path = applet.lstrip("/")
            if path == "bin/busybox" or not path.startswith(("bin/", "sbin/", "usr/")):
                continue
            add(path, kind=tarfile.SYMTYPE, link="/bin/busybox")
    return buf.getvalue()


# --- debian-git ---------------------------------------------------------------------------


def debian_source() -> tuple[str, str]:
    """(mirror URI, suite) of the machine's configured Debian sources (not security)."""
    codename = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    entries: list[tuple[str, list[str]]] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    one_line = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 3 and parts[0] == "deb":
                entries.append((parts[1], [parts[2]]))
    for uri, suites in entries:
        if "security" in uri:
            continue
        if not codename or codename in suites:
            return uri, codename or suites[0]
    raise ImageBuildFailed(
        "debian-git image: no Debian mirror found in /etc/apt/sources.list*. Configure apt "
        "sources (the image is built from them with debootstrap)."
    )


def _exclude_rootfs(rel: str) -> bool:
    """Skip what the engine provides (/dev, /proc, /sys content) and apt's download cache."""
    top, _, rest = rel.partition("/")
    if top in ("dev", "proc", "sys"):
        return bool(rest)
    return rel.startswith(("var/cache/apt/archives/", "var/lib/apt/lists/")) and not rel.endswith(
        ("/partial", "/lock")
    )


# --- building -----------------------------------------------------------------------------


class ImageBuilder:
    """Builds (once) and finds the plugin's images on an :class:`Engine`.

    ``get(name)`` returns an image id: a recipe name (``busybox``, ``debian-git``) is built when
    its content-addressed tag is missing, under a file lock in ``state_dir`` so that parallel
    workers build it once; any other name is used when present locally and pulled otherwise.
    """

    def __init__(
        self,
        engine: Engine,
        state_dir: Path,
        *,
        progress: Progress | None = _stderr_progress,
        progress_every: float = 10.0,
    ) -> None:
        self.engine = engine
        self.state_dir = Path(state_dir)
        self.progress = progress or (lambda _message: None)
        self.progress_every = progress_every
        self._cache: dict[str, str] = {}

    def tag_for(self, name: str) -> str:
        """The content-addressed reference of a recipe image (no build)."""
        return f"{REPOSITORY}/{name}:{self._digest(name)[:16]}"

    def _digest(self, name: str) -> str:
        if name == "busybox":
            rootfs = busybox_rootfs()
            return hashlib.sha256(RECIPE_VERSION.encode() + rootfs).hexdigest()
        if name == "debian-git":
            mirror, suite = debian_source()
            recipe = f"{RECIPE_VERSION}|minbase|{suite}|{mirror}|{','.join(DEBIAN_PACKAGES)}"
            return hashlib.sha256(recipe.encode()).hexdigest()
        raise ImageUnavailable(f"{name!r} is not one of the plugin's recipes {RECIPES}")

    def _local(self, ref: str) -> str | None:
        try:
            return str(self.engine.client.api.inspect_image(ref)["Id"])
        except Exception as exc:
            docker = sys.modules.get("docker")
            if docker is not None and isinstance(exc, docker.errors.ImageNotFound):
                return None
            if docker is not None and isinstance(exc, docker.errors.NotFound):
                return None
            raise

    def get(self, name: str) -> str:
        """The image id for ``name``, building or pulling it if needed."""
        if name in self._cache:
            return self._cache[name]
        image_id = self.build(name) if name in RECIPES else self._user_image(name)
        self._cache[name] = image_id
        return image_id

    def _user_image(self, name: str) -> str:
        found = self._local(name)
        if found:
            return found
        self.progress(f"image {name} is not present locally; pulling it")
        try:
            with _Ticker(self.progress, f"pulling {name}", every=self.progress_every):
                image = self.engine.client.images.pull(name)
        except Exception as exc:
            raise ImageUnavailable(
                f"image {name!r} is not present locally and could not be pulled: {exc}. "
                "Load it with `docker load`, build it, or use sandbox_image('busybox' | "
                "'debian-git') which build offline."
            ) from exc
        return str(image.id)

    def build(self, name: str, *, force: bool = False) -> str:
        """Build recipe ``name`` unless its tag exists (or ``force``); returns the image id."""
        if name not in RECIPES:
            raise ImageUnavailable(
                f"image recipe {name!r} is unknown; the plugin builds {', '.join(RECIPES)}"
            )
        ref = self.tag_for(name)
        if not force:
            found = self._local(ref)
            if found:
                return found
        lock_dir = self.state_dir / "images"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_dir / f"{name}.lock"), timeout=1800)
        with build_lock(lock, self.progress, f"image {name}", every=self.progress_every):
            found = None if force else self._local(ref)  # another worker may have built it
            if found:
                return found
            started = time.monotonic()
            self.progress(f"building image {name} as {ref} (once; cached across runs)")
            if name == "busybox":
                image_id = self._import(ref, name, [busybox_rootfs()], cmd='["sh"]')
            else:
                image_id = self._build_debian(ref, lock_dir)
            self.progress(f"built {ref} in {time.monotonic() - started:.1f}s")
            return image_id

    def _import(self, ref: str, name: str, chunks: Any, *, cmd: str) -> str:
        repository, _, tag = ref.rpartition(":")
        labels = _image_labels(name, tag)
        changes = [f"CMD {cmd}", *(f'LABEL "{k}"="{v}"' for k, v in labels.items())]
        data: bytes | Iterator[bytes] = b"".join(chunks) if isinstance(chunks, list) else chunks
        try:
            api = self.engine.client.api
            # import_image_from_data accepts bytes or a generator (chunked upload, no buffering)
            out = api.import_image_from_data(data, repository=repository, tag=tag, changes=changes)
        except Exception as exc:
            raise ImageBuildFailed(f"importing {ref} into the engine failed: {exc}") from exc
        found = self._local(ref)
        if not found:
            raise ImageBuildFailed(f"importing {ref} reported {out!r} but the tag is missing")
        return found

    def _build_debian(self, ref: str, work_root: Path) -> str:
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            raise ImageBuildFailed(
                "debian-git image: debootstrap is not installed (apt-get install debootstrap)."
            )
        if os.geteuid() != 0:
            raise ImageBuildFailed(
                "debian-git image: debootstrap needs root (it chroots and mknods). Build it once "
                "as root with `pytest-sandbox image build debian-git`; it is then cached."
            )
        mirror, suite = debian_source()
        work = Path(tempfile.mkdtemp(prefix="debian-git-", dir=work_root))
        rootfs = work / "rootfs"
        log = work_root / "debian-git.build.log"
        argv = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            suite,
            str(rootfs),
            mirror,
        ]
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            ticker = _Ticker(self.progress, "debootstrap debian-git", log, self.progress_every)
            ticker.start()
            try:
                code = proc.wait(timeout=1800)
            finally:
                ticker.stop()
            if code != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise ImageBuildFailed(
                    f"debootstrap of debian-git failed with exit code {code} (mirror from "
                    f"/etc/apt/sources.list*, suite {suite}).\n--- last lines of {log} ---\n"
                    f"{tail}"
                )
            # sshd wants its privilege-separation dir; host keys are made per test by the guest
            (rootfs / "run" / "sshd").mkdir(parents=True, exist_ok=True)
            for key in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
                key.unlink()  # never ship the same host keys in every container
            self.progress("importing the debian-git rootfs into the engine")
            chunks = archive.stream(rootfs, exclude=_exclude_rootfs)
            with _Ticker(self.progress, "importing debian-git", every=self.progress_every):
                return self._import(ref, "debian-git", chunks, cmd='["/bin/bash"]')
        finally:
            shutil.rmtree(work, ignore_errors=True)


class _Ticker:
    """Reports a long step every ``every`` seconds: elapsed time and, when given, the last line
    of its log (a context manager)."""

    def __init__(
        self, progress: Progress, what: str, log: Path | None = None, every: float = 10.0
    ) -> None:
        self.progress, self.what, self.log, self.every = progress, what, log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def __enter__(self) -> _Ticker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            last: list[str] = []
            if self.log is not None:
                try:
                    last = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                except OSError:
                    last = []
            elapsed = time.monotonic() - self._started
            tail = f" {last[0][:100]}" if last else ""
            self.progress(f"{self.what}: still running after {elapsed:.0f}s{tail}")


@contextlib.contextmanager
def build_lock(
    lock: FileLock, progress: Progress, what: str, *, every: float = 10.0
) -> Iterator[None]:
    """Hold ``lock``; when another process holds it (building the same image), say so and
    keep saying so while waiting, instead of hanging silently."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"waiting for another process building {what} (lock {lock.lock_file})")
        with _Ticker(progress, f"waiting for {what}", every=every):
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_image(name: str, *, state_dir: Path | None = None, force: bool = False) -> str:
    """Build recipe image ``name`` (``busybox`` | ``debian-git``) on the default engine.

    For the CLI (``pytest-sandbox image build NAME``). Returns the image reference
    (``pytest-sandbox/NAME:<hash>``); prints progress to stderr. Raises ``ImageBuildFailed``
    / ``DockerUnavailable`` with the reason.
    """
    if state_dir is None:
        base = os.environ.get("PYTEST_SANDBOX_STATE_DIR") or os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
            "pytest-sandbox",
        )
        state_dir = Path(base)
    with Engine() as engine:
        builder = ImageBuilder(engine, state_dir)
        builder.build(name, force=force)
        return builder.tag_for(name)
