"""Build every checkpoint series and measure the peer tools on each.

Usage::

    python benchmarks/run_peers.py --out /tmp/peers.md
    python benchmarks/run_peers.py --series full_fp32 lora_fp32 --peers torch.save restic

The report (Markdown) starts with the machine description, then one table
per series. Series are cached (see ``--cache-dir``), so only the first run
pays for training.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Make the sibling modules importable however the script is launched.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy  # noqa: E402
import peers  # noqa: E402
import safetensors  # noqa: E402
import series as series_mod  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

DEFAULT_BASE = Path(tempfile.gettempdir()) / "ckptrepo-bench"


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


def _loadavg() -> str:
    # Timings on a small shared machine are only meaningful next to the load
    # other processes put on it, so the report records it.
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(scratch: Path) -> str:
    """Markdown bullet list describing where the numbers were taken."""
    items = {
        "CPU": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "RAM": f"{_mem_total_bytes() / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "scratch filesystem": _filesystem_of(scratch),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "zstandard": zstandard.__version__,
        "restic": peers.restic_version(),
        "borg": peers.borg_version(),
        "load average at start (1/5/15 min)": _loadavg(),
    }
    return "\n".join(f"- {k}: {v}" for k, v in items.items())


def _series_section(name: str, series: list[dict[str, Any]], results: Sequence[peers.PeerResult]) -> str:
    total_raw = series_mod.raw_bytes(series)
    per_ckpt = series_mod.raw_bytes(series[-1])
    steps = ", ".join(str(c["step"]) for c in series)
    return (
        f"## {name}\n\n"
        f"{len(series)} checkpoints (steps {steps}); raw tensor bytes "
        f"{total_raw / 2**20:.1f} MiB total, {per_ckpt / 2**20:.1f} MiB per checkpoint.\n\n"
        f"{peers.table(results, total_raw)}\n\n"
        f"Load average when this series finished: {_loadavg()}.\n"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="write the Markdown report here as well")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_BASE / "series")
    p.add_argument("--scratch", type=Path, default=DEFAULT_BASE / "scratch")
    p.add_argument(
        "--series", nargs="+", default=list(series_mod.SERIES_NAMES), choices=series_mod.SERIES_NAMES
    )
    p.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=list(peers.PEERS))
    p.add_argument("--keep", action="store_true", help="keep each tool's files in --scratch")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    sections = ["# Peer tools on checkpoint series\n", machine_info(args.scratch) + "\n"]
    build_times: list[str] = []
    for name in args.series:
        t0 = time.perf_counter()
        series = series_mod.build_series(name, args.cache_dir)
        build_times.append(f"{name} {time.perf_counter() - t0:.1f}s")
        print(f"[{name}] running peers: {' '.join(args.peers)}", flush=True)
        results = peers.run_peers(series, args.scratch / name, args.peers, keep=args.keep)
        section = _series_section(name, series, results)
        print(section, flush=True)
        sections.append(section)
        # Drop the series before loading the next one: big_fp32 alone is 2 GiB.
        del series, results
        gc.collect()
    sections.append(
        "Series load/build time this run (cached series only pay torch.load): "
        + ", ".join(build_times)
        + "\n"
    )
    report = "\n".join(sections)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
