"""The one shape every benchmark row has (read by ``python -m benchmarks``)."""

from __future__ import annotations

import math
from typing import Any


def result_row(
    name: str,
    ours: float,
    peer: float,
    peer_name: str,
    unit: str,
    goal: str,
    met: bool,
    *,
    ratio: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """A row: our figure, the peer's, their ratio (ours / peer unless given), the goal."""
    if ratio is None:
        ratio = ours / peer if peer and not math.isnan(peer) else float("nan")
    found: dict[str, Any] = {
        "name": name,
        "ours": ours,
        "peer": peer,
        "peer_name": peer_name,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "met": met,
    }
    if note:
        found["note"] = note
    return found
