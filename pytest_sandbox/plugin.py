"""The pytest face of pytest-sandbox: options, hooks and thin fixtures — nothing else."""

from __future__ import annotations

# === core (lead) ===


# === fsworker fixtures ===


# === bundles fixtures ===


# === containers fixtures ===


# === workspace fixtures ===


# === launcher fixtures ===
