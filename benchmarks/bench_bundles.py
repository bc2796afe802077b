"""Bundle server and puller against peers, side by side in one run over loopback.

* pull: end-to-end ``BundlePuller.tick()`` (download, SHA-256, fsync, atomic install) of a bundle
  of 64 files vs ``curl`` fetching the same 64 files from the same server into files (one curl
  process, one kept-alive connection). Goal: >= 0.7x curl's throughput.
* server: ``curl`` fetching those files from our server vs from nginx serving the same tree
  (sendfile on). Goal: >= 0.5x nginx. Also vs pytest-httpserver (werkzeug): reported.
* scenario matrix: the whole ``tests/unit/test_bundles_scenarios.py`` in a subprocess: < 60 s.

Full size: 256 MiB (64 x 4 MiB). ``--quick``: 32 MiB (64 x 512 KiB), fewer rounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import result_row
from pytest_sandbox.bundles.interop import free_port, nginx_argv, nginx_config
from pytest_sandbox.bundles.manifest import file_url_path
from pytest_sandbox.bundles.puller import BundlePuller
from pytest_sandbox.bundles.server import BundleServer
from pytest_sandbox.runtime.processes import TrackedProcess

KEY = "bench-key"
FILES = 64
REPO = Path(__file__).resolve().parents[1]


def _best(rounds: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _curl_all(base: str, urls: list[str], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = ["curl", "-sS", "--fail", "-H", f"X-API-Key: {KEY}"]
    for i, url in enumerate(urls):
        argv += ["-o", str(out / f"f{i}"), base + url]
    subprocess.run(argv, check=True, timeout=300)


def _row(
    name: str, ours: float, peer: float, peer_name: str, unit: str, goal: float | None
) -> dict[str, Any]:
    ratio = ours / peer if peer else 0.0
    return result_row(
        name, round(ours, 2), round(peer, 2), peer_name, unit,
        f">= {goal}x" if goal is not None else "report",
        ratio >= goal if goal is not None else True,
        ratio=round(ratio, 3),
    )  # fmt: skip


def run(quick: bool) -> list[dict[str, Any]]:
    size_each = (512 << 10) if quick else (4 << 20)
    rounds = 2 if quick else 3
    total_mib = size_each * FILES / (1 << 20)
    label = f"{total_mib:.0f} MiB/{FILES} files"
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="psb-bench-bundles-"))
    try:
        files = {f"part/{i:03d}.bin": os.urandom(size_each) for i in range(FILES)}
        with BundleServer() as server:
            tenant = server.tenant(KEY)
            manifest = tenant.publish(files, version="0.4.0")
            urls = [file_url_path(manifest.bundle_ts, f.path) for f in manifest.files]

            counter = iter(range(1000))

            def pull() -> None:
                root = work / f"root-{next(counter)}"
                result = BundlePuller(server.url, KEY, root).tick()
                assert result.status == "installed", result.reason
                shutil.rmtree(root)

            def curl_durable() -> None:
                _curl_all(server.url, urls, work / "curl")
                os.sync()

            os.sync()  # neither side pays for the set-up's dirty pages
            t_pull = _best(rounds, pull)
            t_curl_durable = _best(rounds, curl_durable)
            t_curl_ours = _best(rounds, lambda: _curl_all(server.url, urls, work / "curl"))
            # The puller returns with the bundle on disk (it syncs the filesystem before the
            # switch to the new version); curl returns with its files in the page cache. The goal
            # is judged on equal work; the as-returned ratio is reported beside it.
            rows.append(
                _row(
                    f"pull+verify+install {label} (data on disk)",
                    total_mib / t_pull,
                    total_mib / t_curl_durable,
                    "curl + sync (same server)",
                    "MiB/s",
                    0.7,
                )
            )
            rows.append(
                _row(
                    f"pull+verify+install {label} (as returned)",
                    total_mib / t_pull,
                    total_mib / t_curl_ours,
                    "curl (same server)",
                    "MiB/s",
                    None,
                )
            )

            tree = tenant.export_tree(work / "tree")
            port = free_port()
            conf = nginx_config(tree, work / "nginx", port, KEY)
            nginx = TrackedProcess(
                nginx_argv(conf, work / "nginx"),
                log_path=work / "nginx.log",
                ready=port,
                timeout=15,
                name="nginx",
            )
            with nginx:
                nginx_url = f"http://127.0.0.1:{port}"
                t_curl_nginx = _best(rounds, lambda: _curl_all(nginx_url, urls, work / "curl"))
            rows.append(
                _row(
                    f"serve {label} to curl",
                    total_mib / t_curl_ours,
                    total_mib / t_curl_nginx,
                    "nginx",
                    "MiB/s",
                    0.5,
                )
            )
            server.check()

        import logging

        from pytest_httpserver import HTTPServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request

        peer = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        for path, url in zip((f.path for f in manifest.files), urls, strict=True):
            peer.expect_request(url).respond_with_data(files[path])
        peer.start()
        try:
            base = f"http://127.0.0.1:{peer.port}"
            t_curl_peer = _best(rounds, lambda: _curl_all(base, urls, work / "curl"))
        finally:
            peer.clear()
            peer.stop()
        rows.append(
            _row(
                f"serve {label} to curl",
                total_mib / t_curl_ours,
                total_mib / t_curl_peer,
                "pytest-httpserver",
                "MiB/s",
                None,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "unit" / "test_bundles_scenarios.py"),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    row = _row(
        "scenario matrix (all scenarios vs puller)",
        60.0 / elapsed,
        1.0,
        "60 s budget",
        "budget/s",
        1.0,
    )
    row.update(ours=round(elapsed, 2), peer=60.0, unit="s", goal="< 60 s")
    row["met"] = row["met"] and proc.returncode == 0
    rows.append(row)
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
