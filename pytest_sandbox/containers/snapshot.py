"""DataStore: preserve / restore a container's data dir as ``<root>/backups/<key>.tar.gz``.

``preserve`` writes the backup atomically (temp file + fsync + rename, mode 0600): a crash never
leaves a truncated file under the final name. ``restore`` deletes the backup only after a
successful import. ``migrate_legacy`` imports ``<root>/bots/<key>/`` exactly once (a marker is
written before the rename to ``.migrated``, so a failed rename still counts as done).
``recover_orphan`` handles a key whose container is gone but whose labelled volume survived:
preserve the volume's content, recreate the container, restore, report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_sandbox.containers import archive
from pytest_sandbox.containers.container import (
    L_COMMAND,
    L_DATA_DIR,
    L_IMAGE,
    SandboxContainer,
    archive_chunks,
)
from pytest_sandbox.containers.engine import L_KEY, L_ROLE, LABEL, Engine
from pytest_sandbox.errors import SnapshotError

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

ContainerFactory = Callable[..., SandboxContainer]


@dataclass(frozen=True)
class Recovery:
    """What ``recover_orphan`` did: the backup it took, the new container, the old volume."""

    key: str
    backup: Path
    container: SandboxContainer
    old_volume: str
    removed_old_volume: bool

    def describe(self) -> str:
        return (
            f"key {self.key}: volume {self.old_volume} preserved to {self.backup}, restored into "
            f"new container {self.container.name}"
        )


class DataStore:
    """Backups of container data dirs under ``root``.

    ``factory(image, key=..., data_dir=...)`` makes a container for ``recover_orphan`` (the
    ``sandbox_container`` fixture's factory in tests; :class:`SandboxContainer` by default).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        engine: Engine | None = None,
        factory: ContainerFactory | None = None,
    ) -> None:
        self.root = Path(root)
        self.backups = self.root / "backups"
        self.legacy = self.root / "bots"
        self.engine = engine
        self.factory = factory
        self.backups.mkdir(parents=True, exist_ok=True)
        os.chmod(self.backups, 0o700)

    def _check_key(self, key: str) -> str:
        if not _KEY.match(key) or ".." in key:
            raise SnapshotError(
                f"data key {key!r} is not a safe file name (letters, digits, '_', '-', '.'; "
                "at most 128; no '..'). Pick another key."
            )
        return key

    def backup_path(self, key: str) -> Path:
        return self.backups / f"{self._check_key(key)}.tar.gz"

    def _lock(self, key: str) -> FileLock:
        return FileLock(str(self.backups / f".{self._check_key(key)}.lock"))

    def has_preserved(self, key: str) -> bool:
        return self.backup_path(key).is_file()

    def preserve(self, container: SandboxContainer, key: str) -> Path:
        """Export ``container``'s data dir to ``backups/<key>.tar.gz`` (replacing an older one)."""
        dest = self.backup_path(key)
        with self._lock(key):
            container.export_data(dest)
        return dest

    def restore(self, container: SandboxContainer, key: str, *, mode: str = "replace") -> None:
        """Import ``backups/<key>.tar.gz`` into ``container``; delete it only on success."""
        src = self.backup_path(key)
        with self._lock(key):
            if not src.is_file():
                raise SnapshotError(
                    f"no preserved data for key {key!r} ({src} does not exist); preserve() first "
                    "or check has_preserved(key)."
                )
            container.import_data(src, mode=mode)
            src.unlink()

    def migrate_legacy(self, container: SandboxContainer, key: str) -> bool:
        """Import ``<root>/bots/<key>/`` into ``container`` once. True when it migrated now.

        The ``.migrated`` marker is written before the directory is renamed: a rename that
        fails (read-only parent, busy) still leaves the migration marked done.
        """
        source = self.legacy / self._check_key(key)
        marker = self.legacy / f".{key}.migrated"
        with self._lock(key):
            if marker.exists() or not source.is_dir():
                return False
            staged = self.backups / f".{key}.legacy.tar.gz"
            try:
                archive.create(source, staged)
                container.import_data(staged, mode="merge")
            finally:
                staged.unlink(missing_ok=True)
            archive.write_atomic([b"migrated\n"], marker, mode=0o600)
            with contextlib.suppress(OSError):
                os.rename(source, source.with_name(f"{key}.migrated"))
            return True

    def recover_orphan(self, key: str, *, image: str | None = None) -> Recovery | None:
        """Preserve, recreate, restore a key whose container is gone but volume survived.

        Returns None when there is nothing to recover (a container for the key still exists, or
        no volume is labelled with it).
        """
        engine = self.engine
        if engine is None:
            raise SnapshotError("recover_orphan needs DataStore(engine=...) to find volumes")
        engine.wait_for_removals()  # a container being removed is gone, not live
        api = engine.client.api
        live = api.containers(all=True, filters={"label": [f"{L_KEY}={key}", f"{LABEL}=1"]})
        live = [c for c in live if (c.get("Labels") or {}).get(L_ROLE) != "helper"]
        if live:
            return None
        volumes = (
            api.volumes(filters={"label": [f"{L_KEY}={key}", f"{LABEL}=1"]}).get("Volumes") or []
        )
        if not volumes:
            return None
        volume = volumes[0]
        labels = volume.get("Labels") or {}
        data_dir = labels.get(L_DATA_DIR, "/data")
        image = image or labels.get(L_IMAGE)
        if not image:
            raise SnapshotError(
                f"volume {volume['Name']} for key {key!r} does not record its image; pass "
                "recover_orphan(key, image=...)"
            )
        backup = self.backup_path(key)
        with self._lock(key):
            chunks = _export_volume(engine, volume["Name"], data_dir)
            archive.write_atomic(chunks, backup)
        factory = self.factory or (lambda img, **kw: SandboxContainer(engine, img, **kw).launch())
        options: dict[str, Any] = {"key": key, "data_dir": data_dir}
        if labels.get(L_COMMAND):
            options["command"] = json.loads(labels[L_COMMAND])
        container = factory(image, **options)
        self.restore(container, key)
        removed = False
        with contextlib.suppress(Exception):
            from pytest_sandbox.containers.engine import release_docker_object

            release_docker_object(
                {"type": "volume", "name": volume["Name"], "engine": engine.endpoint}
            )
            removed = True
        return Recovery(key, backup, container, volume["Name"], removed)


def _export_volume(engine: Engine, volume: str, data_dir: str) -> Any:
    """tar.gz chunks of a volume's content via a created-not-started helper container."""
    from pytest_sandbox.containers.images import ImageBuilder

    state_dir = engine.run.state_dir if engine.run else Path(tempfile.gettempdir())
    image = ImageBuilder(engine, state_dir, progress=None).get("busybox")
    container, tracked = engine.create_container(
        image,
        command=["true"],
        volumes={volume: {"bind": data_dir, "mode": "ro"}},
        extra_labels={L_ROLE: "helper"},
    )
    chunks = archive_chunks(container, data_dir, compress=True)
    try:
        yield from chunks
    finally:
        chunks.close()
        with contextlib.suppress(Exception):
            container.remove(force=True)
        tracked.released()
