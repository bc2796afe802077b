"""Render ``benchmarks/results/latest.json`` into the results table of ``docs/performance.md``.

``python -m benchmarks.report`` replaces the text between the two marker comments, so the
commentary around the table stays hand-written and the numbers always come from a real run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"
PAGE = HERE.parent / "docs" / "performance.md"
START = "<!-- results:start -->"
END = "<!-- results:end -->"


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def render(results: dict[str, Any]) -> str:
    mode = "`--quick`" if results["quick"] else "full size"
    machine = results["machine"]
    lines = [
        f"{results['when']}, {mode}, {results['seconds']} s, on {machine['cpus']} cores, "
        f"Python {machine['python']}, kernel {machine['kernel']}.",
        "",
        "| module | benchmark | ours | peer | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        module = str(row.get("module", "")).removeprefix("bench_")
        met = "yes" if row["met"] else "**no**"
        lines.append(
            f"| {module} | {row['name']} | {_number(row['ours'])} {row['unit']} | "
            f"{_number(row['peer'])} ({row['peer_name']}) | {_number(row['ratio'])} | "
            f"{row['goal']} | {met} |"
        )
    return "\n".join(lines)


def main() -> int:
    page = PAGE.read_text()
    if START not in page or END not in page:
        print(f"{PAGE}: the markers {START} / {END} are missing", file=sys.stderr)
        return 2
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    table = render(json.loads(RESULTS.read_text()))
    PAGE.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"wrote the results table of {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
