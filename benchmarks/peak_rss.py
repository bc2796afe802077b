"""Peak RSS growth of one data operation, measured in a fresh interpreter.

The interpreter that runs the benchmarks (or the tests) has its own earlier peaks, so the
operation runs alone: ``python -m benchmarks.peak_rss CONTAINER DEST LOCK_DIR export|import``
prints ``{"growth", "growth_kib", "bytes"}``. :func:`peak_growth` runs it and returns that.
Shared by ``bench_containers`` (the figure for 1 GiB) and the containers test that asserts
the < 100 MB budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> None:
    from pytest_sandbox.containers.container import SandboxContainer
    from pytest_sandbox.containers.engine import Engine

    cid, dest, lock_dir, what = argv
    container = SandboxContainer.attach(Engine(), cid, lock_dir=Path(lock_dir))
    container.inspect()  # the client's connection pool is up (the baseline includes the SDK)
    base = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    if what == "export":
        size = container.export_data(dest)
    else:
        size = container.import_data(dest, mode="merge").total_bytes
    done.set()
    sampler.join()
    growth = max(peak, _rss()) - base
    print(json.dumps({"growth": growth, "growth_kib": growth // 1024, "bytes": size}))


def peak_growth(container_id: str, dest: Path, lock_dir: Path, what: str) -> dict[str, Any]:
    """Run ``what`` (``export`` / ``import``) of ``dest`` alone and return its figures."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak_rss", container_id, str(dest), str(lock_dir), what],
        capture_output=True,
        check=True,
        env=env,
        timeout=600,
        start_new_session=True,
    )
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


if __name__ == "__main__":
    main(sys.argv[1:])
