"""Run every ``benchmarks/bench_*.py`` and print a table of ratios against the peers.

Each module exposes ``run(quick: bool) -> list[dict]`` with rows of ``name``, ``ours``, ``peer``,
``peer_name``, ``unit``, ``ratio``, ``goal``, ``met``. Results go to
``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("only", nargs="*", help="module names to run (e.g. core bundles)")
    args = parser.parse_args()
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n.removeprefix("bench_") in args.only or n in args.only]
    # pip compiles a package's bytecode at install time; an editable install under
    # PYTHONDONTWRITEBYTECODE (set on this machine) never gets any, and every benchmarked process
    # would recompile the plugin from source while pytest itself loads cached bytecode.
    compileall.compile_dir(HERE.parent / "pytest_sandbox", quiet=1)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            found = module.run(args.quick)
        except Exception:
            traceback.print_exc()
            found = [
                {
                    "name": f"{name}: failed to run",
                    "ours": 0.0,
                    "peer": 0.0,
                    "peer_name": "-",
                    "unit": "-",
                    "ratio": 0.0,
                    "goal": "-",
                    "met": False,
                }
            ]
        for row in found:
            row.setdefault("module", name)
        rows.extend(found)
        print(f"# {name} took {time.monotonic() - t0:.1f}s", file=sys.stderr)
    width = max([len(r["name"]) for r in rows] + [10])
    print(
        f"{'benchmark':<{width}}  {'ours':>12}  {'peer':>12}  {'ratio':>7}  goal          met  peer"
    )
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['ours']:>12.4g}  {r['peer']:>12.4g}  {r['ratio']:>7.3f}  "
            f"{r['goal']:<12}  {'yes' if r['met'] else 'NO ':<3}  {r['peer_name']} ({r['unit']})"
        )
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    # Only a run of every module may replace the committed results; a partial run (while working
    # on one module) goes to a scratch file so it cannot clobber the others' rows.
    target = results / ("partial.json" if args.only else "latest.json")
    target.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "kernel": platform.release(),
                },
                "seconds": round(time.monotonic() - started, 1),
                "rows": rows,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
