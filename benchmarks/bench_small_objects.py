"""What a checkpoint's small tensors cost a commit, as object files and inline.

The ~1 GiB state of ``series.py`` (first checkpoint of big_fp32) holds hundreds of tensors
under 1 MiB (biases, norms, optimizer state of those) that make up a tenth of a percent of
its bytes. Stored as an object file each, they cost what a file costs to create and make
durable, whatever its size; entries up to ``chunking.inline_max_size`` bytes (4096 by
default) are held in the manifest instead. This script commits, each into a fresh
repository and interleaved repeat by repeat:

- the whole state, with every tensor an object file (``inline_max_size: 0``) and with the
  default inline limit;
- the state without its tensors under ``--small-kib`` (the large tensors alone);
- those small tensors alone, both ways;

and ``torch.save`` + fsync of each, and reports medians of wall time and of CPU time (user +
system, all threads) with the number of object files written.

    python benchmarks/bench_small_objects.py [--repeats 5] [--small-kib 1024] [--no-write]

Results replace the ``bench_small_objects`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import series as series_mod  # noqa: E402
import torch  # noqa: E402

import ckptrepo  # noqa: E402
from ckptrepo.config import Chunking, Config  # noqa: E402

DEFAULT_BASE = Path(tempfile.gettempdir()) / "ckptrepo-bench"


def select(state: Any, keep: Callable[[torch.Tensor], bool]) -> Any:
    """The state with only the tensors ``keep`` accepts (other leaves kept as they are)."""
    if isinstance(state, dict):
        return {k: select(v, keep) for k, v in state.items() if not isinstance(v, torch.Tensor) or keep(v)}
    if isinstance(state, (list, tuple)):
        return type(state)(select(v, keep) for v in state if not isinstance(v, torch.Tensor) or keep(v))
    return state


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _object_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root / "objects"))


@dataclass
class Variant:
    name: str
    state: Any
    tensors: int
    raw_bytes: int
    inline_max_size: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    save_wall: list[float] = field(default_factory=list)
    files: int = 0


def run(variants: list[Variant], scratch: Path, repeats: int) -> None:
    pt = scratch / "state.pt"
    for _ in range(repeats):
        for v in variants:
            start = time.perf_counter()
            peers._torch_save_durable(v.state, pt)
            v.save_wall.append(time.perf_counter() - start)
            root = scratch / "repo"
            shutil.rmtree(root, ignore_errors=True)
            gc.collect()
            config = Config(chunking=Chunking(inline_max_size=v.inline_max_size))
            with ckptrepo.init(root, config=config) as repo:
                cpu, start = _cpu_seconds(), time.perf_counter()
                repo.commit(v.state, step=0)
                v.wall.append(time.perf_counter() - start)
                v.cpu.append(_cpu_seconds() - cpu)
            v.files = _object_files(root)
    pt.unlink(missing_ok=True)


def section(variants: list[Variant], small_kib: int, repeats: int, machine: str, started: str) -> str:
    med = statistics.median
    lines = [
        "## Small tensors: object files or inline",
        "",
        f"Command: `python benchmarks/bench_small_objects.py` (started {started}); medians of "
        f"{repeats} repeats, each variant committed into a fresh repository, variants interleaved.",
        "",
        machine,
        "",
        "| what is committed | tensors | raw bytes | object files | commit wall | commit CPU (all threads) "
        "| torch.save + fsync |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(
            f"| {v.name} | {v.tensors} | {v.raw_bytes / 2**20:.1f} MiB | {v.files} | {med(v.wall):.2f} s "
            f"| {med(v.cpu):.2f} s | {med(v.save_wall):.2f} s |"
        )
    files, inline, large, small_files, small_inline = variants
    per_file_ms = 1000 * med(small_files.cpu) / max(1, small_files.files - 2)
    lines += [
        "",
        f"Tensors under {small_kib} KiB are {small_files.raw_bytes / files.raw_bytes:.2%} of the bytes. "
        f"As object files they are {small_files.files - 2} of the whole state's {files.files} files "
        f"(with the manifest and the commit), and its commit takes "
        f"{med(files.wall) - med(large.wall):.2f} s of wall time and {med(files.cpu) - med(large.cpu):.2f} s "
        f"of CPU more than its large tensors alone; committed alone, they cost about {per_file_ms:.1f} ms "
        f"of CPU per object file. With the default inline limit the whole state writes {inline.files} files "
        f"and its commit takes {med(inline.wall):.2f} s against {med(files.wall):.2f} s "
        f"({med(inline.wall) - med(large.wall):+.2f} s against the large tensors alone); the small "
        f"tensors alone take {med(small_inline.wall):.2f} s in {small_inline.files} files.",
        "",
        f"Load average at the end (1/5/15 min): {report.loadavg()}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small-kib", type=int, default=1024, help="tensors under this size count as small")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_BASE / "series")
    p.add_argument("--scratch", type=Path, default=DEFAULT_BASE / "scratch-small")
    p.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    state = series_mod.build_series("big_fp32", args.cache_dir)[0]
    limit = args.small_kib << 10
    variants = []
    inline = Chunking().inline_max_size
    for name, keep, inline_max_size in (
        ("whole state, an object file each", lambda t: True, 0),
        (f"whole state, inline up to {inline} B", lambda t: True, inline),
        (f"tensors of {args.small_kib} KiB and more", lambda t: _nbytes(t) >= limit, inline),
        (f"tensors under {args.small_kib} KiB, an object file each", lambda t: _nbytes(t) < limit, 0),
        (f"tensors under {args.small_kib} KiB, inline up to {inline} B", lambda t: _nbytes(t) < limit, inline),
    ):
        chosen = select(state, keep)
        count = sum(1 for _ in series_mod.iter_tensors(chosen))
        variants.append(Variant(name, chosen, count, series_mod.raw_bytes(chosen), inline_max_size))
    args.scratch.mkdir(parents=True, exist_ok=True)
    machine = report.machine_info(args.scratch, {"torch": torch.__version__, "numpy": np.__version__})
    try:
        run(variants, args.scratch, args.repeats)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    text = section(variants, args.small_kib, args.repeats, machine, started)
    print(text)
    if not args.no_write:
        report.write_section("bench_small_objects", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
