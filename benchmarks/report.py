"""docs/benchmarks.md is one page with a section per benchmark script: each script rewrites
only its own section, between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, so the
prose around the sections (how to read them, how the defaults were chosen) stays put."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def write_section(name: str, section: str, doc: Path = DOC) -> None:
    """Replace the section ``name`` of ``doc`` with ``section`` (appended if it is new)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _filesystem_of(path: Path) -> str:
    """Mount point and fs type holding ``path`` (storage speed depends on it)."""
    path = path.resolve()
    best = ("?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return f"{best[1]} mounted at {best[0]}"


def loadavg() -> str:
    # Timings on a small shared machine are only meaningful next to the load
    # other processes put on it, so the report records it.
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(scratch: Path, versions: Mapping[str, str]) -> str:
    """Markdown bullet list describing where the numbers were taken: the machine, the load
    on it, and the ``versions`` of what was measured."""
    items = {
        "CPU": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "RAM": f"{_mem_total_bytes() / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "scratch filesystem": _filesystem_of(scratch),
        "python": platform.python_version(),
        **versions,
        "load average at start (1/5/15 min)": loadavg(),
    }
    return "\n".join(f"- {k}: {v}" for k, v in items.items())
