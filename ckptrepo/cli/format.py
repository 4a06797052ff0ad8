"""Shared formatting for command output: sizes, times, JSON of commits."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..objects import Commit


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def commit_json(commit: Commit) -> dict[str, Any]:
    """The stable --json form of a commit (documented in docs/cli.md)."""
    doc = commit.to_document()
    doc.pop("kind")
    doc.pop("format")
    return {"id": commit.id, **doc}


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
