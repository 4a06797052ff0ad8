"""Storage benchmark: ckptrepo against the peer tools on real training checkpoints, in one run.

For each checkpoint series (``series.py``: real fine-tuning of a small transformer) every tool
commits the whole series, then restores the last step; the table gives total bytes on disk,
commit time, restore time and peak memory side by side (``peers.py`` measures the peers; the
ckptrepo row is measured here the same way). Then, on the ~1 GiB state:

- a fresh commit against ``torch.save`` + fsync of the same state, and against restic's and
  borg's backup of that file into a new repository;
- a checkout to torch tensors against ``torch.load`` of the same checkpoint, in this
  process (whose allocator may hand torch.load the memory of the load before) and each in a
  new process, as a training process resuming from the checkpoint would;
- re-committing the unchanged state: hashing speed and bytes written;
- peak RSS while committing a larger state (``--rss-gib``), beyond the state itself.

Usage::

    python benchmarks/bench_storage.py                      # everything, writes docs/benchmarks.md
    python benchmarks/bench_storage.py --series full_fp32 --peers torch.save borg --no-write

Results replace the section between the ``bench_storage`` markers in docs/benchmarks.md, so
other sections of that page survive a re-run. Speed targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import blake3  # noqa: E402
import lmdb  # noqa: E402
import numpy as np  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import safetensors  # noqa: E402
import series as series_mod  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

import ckptrepo  # noqa: E402
from ckptrepo.codec import CodingPolicy  # noqa: E402
from ckptrepo.config import Config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = Path(tempfile.gettempdir()) / "ckptrepo-bench"
DOC = report.DOC
DEFAULT_PEERS = ("torch.save", "safetensors", "zstd", "restic", "borg")
# The targets: bytes as a fraction of raw, per series.
BYTE_TARGETS = {"full_fp32": 0.73, "lora_fp32": 0.15, "bf16": 0.18}
BORG_RATIO_TARGETS = {"full_fp32": 0.8, "lora_fp32": 0.4}


def repo_bytes(root: Path) -> tuple[int, int]:
    """Allocated bytes of the repository, and of its local cache (the rebuildable LMDB index,
    like the caches restic and borg keep outside their repositories)."""
    cache = root / "cache"
    cache_bytes = peers.disk_usage(cache) if cache.exists() else 0
    return peers.disk_usage(root) - cache_bytes, cache_bytes


def _config(args: argparse.Namespace) -> Config:
    base = Config()
    policy = CodingPolicy(
        level=args.level if args.level is not None else base.compression.level,
        planes=base.compression.planes,
        delta=not args.no_delta,
        max_delta_chain=args.max_chain if args.max_chain is not None else base.compression.max_delta_chain,
        min_saving=base.compression.min_saving,
    )
    chunking = base.chunking
    if args.chunk_mib is not None:
        from dataclasses import replace

        chunking = replace(chunking, tensor_chunk_size=int(args.chunk_mib * 2**20))
    return Config(chunking=chunking, compression=policy)


def restore(root: Path, step: int) -> Any:
    # A fresh open each time: the restore includes opening the repository and reading and
    # checking the manifest, as a new training process would.
    with ckptrepo.open(root) as repo:
        state = repo.checkout(step=step).to_dict()
    peers.touch_all(state)
    return state


def run_ckptrepo(series: Sequence[dict[str, Any]], scratch: Path, config: Config) -> peers.PeerResult:
    root = scratch / "ckptrepo"
    shutil.rmtree(root, ignore_errors=True)
    times: list[float] = []
    gc.collect()
    with peers.InProcessPeakRss() as rss:
        with ckptrepo.init(root, config=config) as repo:
            for i, ckpt in enumerate(series):
                t0 = time.perf_counter()
                repo.commit(ckpt, step=int(ckpt.get("step", i)))
                times.append(time.perf_counter() - t0)
        last = int(series[-1].get("step", len(series) - 1))
        restores = []
        for _ in range(peers.RESTORE_REPEATS):
            t0 = time.perf_counter()
            restored = restore(root, last)
            restores.append(time.perf_counter() - t0)
            peers.assert_same(series[-1], restored)
            del restored
    stored, cache = repo_bytes(root)
    return peers.PeerResult(
        tool="ckptrepo",
        total_bytes=stored,
        commit_s_median=statistics.median(times),
        commit_s_total=sum(times),
        restore_s=statistics.median(restores),
        peak_rss_bytes=rss.growth_bytes,
        note=f"repository without its index cache ({cache / 2**20:.1f} MiB); "
        f"restore = open + checkout(step).to_dict(); RSS = in-process growth ({rss.method})",
    )


@dataclass
class Throughput:
    state_bytes: int
    repeats: int
    fresh_commit_s: float  # medians of the repeats, each next to its baseline
    torch_save_s: float
    commit_ratio: float  # median of torch.save / commit over the pairs
    checkout_s: float
    torch_load_s: float
    checkout_ratio: float
    first_checkout_s: float  # the first checkout after the commit (objects not yet cached)
    recommit_s: float
    recommit_cold_s: float
    recommit_written: int
    commit_rss: int
    uncompressed_commit_s: float
    uncompressed_ratio: float
    # Per backup tool: the median of its fresh backups, and of their per-pair ratios.
    backups: dict[str, tuple[float, float]]
    # The checkout and torch.load each in a new process (medians, median per-pair ratio).
    resume_checkout_s: float
    resume_load_s: float
    resume_ratio: float


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_ratio(baseline: Sequence[float], ours: Sequence[float]) -> float:
    return statistics.median(b / o for b, o in zip(baseline, ours, strict=True))


# One restore in a new process, as a training process resuming from a checkpoint does it:
# the imports a training script has anyway (torch, ckptrepo) come first, untimed; the load or
# the checkout is timed, touching every tensor, with nothing of an earlier load to reuse.
_RESUME_SCRIPT = '''
import json, sys, time
sys.path.insert(0, sys.argv[3])
import torch
import ckptrepo
import peers
from pathlib import Path
from bench_storage import restore
t0 = time.perf_counter()
if sys.argv[1] == "torch.load":
    peers.touch_all(torch.load(sys.argv[2], weights_only=True))
else:
    restore(Path(sys.argv[2]), 0)
print(json.dumps(time.perf_counter() - t0))
'''


def resume_s(what: str, path: Path) -> float:
    """Seconds of one ``torch.load`` of ``path`` or one checkout of its step 0, in a new process."""
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, what, str(path), here], capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_throughput(
    state: dict[str, Any], scratch: Path, config: Config, repeats: int, backup_tools: Sequence[str]
) -> Throughput:
    """Fresh commit, checkout and unchanged re-commit of one ~1 GiB state.

    Each ckptrepo measurement is paired with its baselines taken right before it
    (torch.save + fsync, then each of ``backup_tools`` backing up the file just saved into a
    new repository, before each fresh commit; torch.load before each checkout), so the
    members of a pair see the same machine; the report gives the medians and the median of
    the per-pair ratios (the machine is shared, and its disk speed varies by a factor of four
    from minute to minute)."""
    from dataclasses import replace

    size = series_mod.raw_bytes(state)
    staging = scratch / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    pt = staging / "state.pt"
    root = scratch / "throughput"
    plain_root = scratch / "throughput-plain"
    # The same commit with compression switched off (no coded form is kept unless it is at
    # most 1% of raw): what the hashing, writing and fsync alone cost.
    uncompressed = replace(config, compression=replace(config.compression, min_saving=0.01))
    saves: list[float] = []
    fresh: list[float] = []
    plain_saves: list[float] = []
    plain: list[float] = []
    backups: dict[str, list[float]] = {tool: [] for tool in backup_tools}
    rss_growth = 0
    for _ in range(repeats):
        saves.append(_timed(lambda: peers._torch_save_durable(state, pt)))
        for tool in backup_tools:
            backups[tool].append(peers.fresh_backup_s(tool, staging, scratch))
        shutil.rmtree(root, ignore_errors=True)
        gc.collect()
        with peers.InProcessPeakRss() as rss, ckptrepo.init(root, config=config) as repo:
            fresh.append(_timed(lambda: repo.commit(state, step=0)))
        rss_growth = max(rss_growth, rss.growth_bytes)
        plain_saves.append(_timed(lambda: peers._torch_save_durable(state, pt)))
        shutil.rmtree(plain_root, ignore_errors=True)
        with ckptrepo.init(plain_root, config=uncompressed) as repo:
            plain.append(_timed(lambda: repo.commit(state, step=0)))
    shutil.rmtree(plain_root, ignore_errors=True)
    loads: list[float] = []
    checkouts: list[float] = []
    first_checkout_s = _timed(lambda: restore(root, 0))
    for _ in range(repeats):
        loads.append(_timed(lambda: peers.touch_all(torch.load(pt, weights_only=True))))
        checkouts.append(_timed(lambda: restore(root, 0)))
    resume_loads: list[float] = []
    resume_checkouts: list[float] = []
    for _ in range(repeats):
        resume_loads.append(resume_s("torch.load", pt))
        resume_checkouts.append(resume_s("checkout", root))
    shutil.rmtree(staging)
    with ckptrepo.open(root) as repo:
        # Cold: a new process re-commits (reads and checks the parent's manifest); warm: the
        # training process commits again (the parent's manifest is its own).
        t0 = time.perf_counter()
        cold = repo.commit(state, step=1)
        recommit_cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = repo.commit(state, step=2)
        recommit_s = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    median = statistics.median
    return Throughput(
        state_bytes=size,
        repeats=repeats,
        fresh_commit_s=median(fresh),
        torch_save_s=median(saves),
        commit_ratio=_median_ratio(saves, fresh),
        checkout_s=median(checkouts),
        torch_load_s=median(loads),
        checkout_ratio=_median_ratio(loads, checkouts),
        first_checkout_s=first_checkout_s,
        recommit_s=recommit_s,
        recommit_cold_s=recommit_cold_s,
        recommit_written=max(cold.stats.stored_bytes, warm.stats.stored_bytes),
        commit_rss=rss_growth,
        uncompressed_commit_s=median(plain),
        uncompressed_ratio=_median_ratio(plain_saves, plain),
        backups={tool: (median(times), _median_ratio(times, fresh)) for tool, times in backups.items()},
        resume_checkout_s=median(resume_checkouts),
        resume_load_s=median(resume_loads),
        resume_ratio=_median_ratio(resume_loads, resume_checkouts),
    )


def measure_big_rss(gib: float, scratch: Path, config: Config) -> tuple[int, int, float]:
    """Commit a fresh state of ``gib`` GiB (distinct random tensors of 64 MiB) and return
    (state bytes, peak RSS growth beyond the state, seconds)."""
    gen = torch.Generator().manual_seed(7)
    count = max(1, int(gib * 16))
    state = {f"layer{i}.weight": torch.randn(16 << 20, generator=gen) * 0.02 for i in range(count)}
    root = scratch / "rss"
    shutil.rmtree(root, ignore_errors=True)
    gc.collect()
    with peers.InProcessPeakRss() as rss, ckptrepo.init(root, config=config) as repo:
        t0 = time.perf_counter()
        repo.commit(state, step=0)
        seconds = time.perf_counter() - t0
    size = series_mod.raw_bytes(state)
    del state
    shutil.rmtree(root, ignore_errors=True)
    return size, rss.growth_bytes, seconds


# --- report ----------------------------------------------------------------------------------


def machine_info(scratch: Path) -> str:
    return report.machine_info(scratch, {
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "zstandard": zstandard.__version__,
        "restic": peers.restic_version(),
        "borg": peers.borg_version(),
        "ckptrepo": getattr(ckptrepo, "__version__", "dev"),
        "blake3": getattr(blake3, "__version__", "?"),
        "lmdb": lmdb.__version__,
        "numba": importlib.metadata.version("numba"),
        "C loops": "built" if codec_loops_built() else "NOT built (numpy forms)",
    })


def codec_loops_built() -> bool:
    from ckptrepo import codec

    return codec._LOOPS is not None


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def series_section(name: str, series: Sequence[dict[str, Any]], results: Sequence[peers.PeerResult]) -> str:
    raw = series_mod.raw_bytes(series)
    steps = ", ".join(str(c.get("step")) for c in series)
    ours = next(r for r in results if r.tool == "ckptrepo")
    lines = [
        f"### {name}",
        "",
        f"{len(series)} checkpoints (steps {steps}); raw tensor bytes {raw / 2**20:.1f} MiB in all, "
        f"{series_mod.raw_bytes(series[-1]) / 2**20:.1f} MiB per checkpoint.",
        "",
        peers.table(results, raw),
        "",
    ]
    checks = []
    if name in BYTE_TARGETS:
        share = ours.total_bytes / raw
        checks.append(f"bytes {share:.1%} of raw (target at most {BYTE_TARGETS[name]:.0%}): "
                      f"{'met' if share <= BYTE_TARGETS[name] else 'NOT met'}")
    borg = next((r for r in results if r.tool == "borg"), None)
    if borg is not None and name in BORG_RATIO_TARGETS:
        ratio = ours.total_bytes / borg.total_bytes
        checks.append(f"{ratio:.2f}x borg's bytes (target at most {BORG_RATIO_TARGETS[name]}x): "
                      f"{'met' if ratio <= BORG_RATIO_TARGETS[name] else 'NOT met'}")
    load = next((r for r in results if r.tool == "torch.save"), None)
    if load is not None:
        checks.append(f"restore of the last step {ours.restore_s:.3f} s vs torch.load {load.restore_s:.3f} s")
    lines += [f"- {c}" for c in checks] + [""]
    return "\n".join(lines)


def throughput_section(t: Throughput) -> str:
    gib = t.state_bytes / 2**30
    rows = [
        "### Throughput on the ~1 GiB state (first checkpoint of big_fp32)",
        "",
        f"Medians of {t.repeats} repeats; each ckptrepo run is paired with its baselines run just "
        "before it (a fresh commit with torch.save + fsync of the state and with each backup tool's "
        "backup of that file into a new repository, a checkout with torch.load), and the ratio is the "
        "median of the per-pair ratios (baseline time / ckptrepo time: above 1x, ckptrepo is faster). "
        "The checkout is measured twice: in this process, where torch.load's allocator can hand it the "
        "memory of the load before, and each in a new process after its imports, as a training process "
        "resuming from the checkpoint loads it once.",
        "",
        "| measurement | ckptrepo | baseline | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| fresh commit ({gib:.2f} GiB) | {t.fresh_commit_s:.2f} s ({_gbps(t.state_bytes, t.fresh_commit_s)}) "
        f"| torch.save+fsync {t.torch_save_s:.2f} s | {t.commit_ratio:.2f}x | >= 1x |",
        f"| fresh commit, compression off | {t.uncompressed_commit_s:.2f} s "
        f"({_gbps(t.state_bytes, t.uncompressed_commit_s)}) | torch.save+fsync | {t.uncompressed_ratio:.2f}x "
        "| (config `min_saving: 0.01`) |",
    ]
    for tool, (seconds, ratio) in t.backups.items():
        rows.append(
            f"| fresh commit vs {tool} | {t.fresh_commit_s:.2f} s | {tool} {seconds:.2f} s "
            f"(the saved file into a new repository) | {ratio:.2f}x | >= 5x |"
        )
    rows += [
        f"| checkout to torch tensors | {t.checkout_s:.2f} s ({_gbps(t.state_bytes, t.checkout_s)}) "
        f"| torch.load {t.torch_load_s:.2f} s | {t.checkout_ratio:.2f}x | >= 1x |",
        f"| checkout to torch tensors, each in a new process (a resume) | {t.resume_checkout_s:.2f} s "
        f"({_gbps(t.state_bytes, t.resume_checkout_s)}) | torch.load {t.resume_load_s:.2f} s | {t.resume_ratio:.2f}x "
        "| >= 1x |",
        f"| first checkout after the commit (objects read from disk) | {t.first_checkout_s:.2f} s | - | - | - |",
        f"| re-commit unchanged, same process | {t.recommit_s:.2f} s ({_gbps(t.state_bytes, t.recommit_s)}) "
        f"| - | - | >= 2 GB/s |",
        f"| re-commit unchanged, fresh open | {t.recommit_cold_s:.2f} s ({_gbps(t.state_bytes, t.recommit_cold_s)}) "
        f"| - | - | - |",
        f"| chunk + manifest bytes written by the re-commits | {t.recommit_written} | - | - | 0 |",
        f"| peak RSS growth, fresh commit | {t.commit_rss / 2**20:.0f} MiB | - | - | - |",
        "",
    ]
    return "\n".join(rows)


def rss_section(size: int, growth: int, seconds: float) -> str:
    return (
        f"### Memory while committing {size / 2**30:.1f} GiB\n\n"
        f"A fresh commit of {size / 2**30:.1f} GiB (64 MiB float32 tensors) took {seconds:.1f} s "
        f"({_gbps(size, seconds)}); peak RSS grew by {growth / 2**20:.0f} MiB beyond the state "
        f"(target: under 1024 MiB): {'met' if growth < 2**30 else 'NOT met'}.\n"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--series", nargs="+", default=list(series_mod.SERIES_NAMES), choices=series_mod.SERIES_NAMES)
    p.add_argument("--peers", nargs="*", default=list(DEFAULT_PEERS), choices=list(peers.PEERS))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_BASE / "series")
    p.add_argument("--scratch", type=Path, default=DEFAULT_BASE / "scratch-storage")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the throughput measurements")
    p.add_argument("--rss-gib", type=float, default=4.0, help="state size for the memory test (0: skip)")
    p.add_argument("--level", type=int, help="zstd level (default: the config default)")
    p.add_argument("--max-chain", type=int, help="max delta chain (default: the config default)")
    p.add_argument("--chunk-mib", type=float, help="tensor chunk size in MiB (default: config)")
    p.add_argument("--no-delta", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    config = _config(args)
    z = config.compression
    command = "python benchmarks/bench_storage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "## Storage: ckptrepo against the peers",
        "",
        f"Command: `{command.strip()}` (started {time.strftime('%Y-%m-%d %H:%M:%S')}).",
        f"ckptrepo settings: zstd level {z.level}, planes {z.planes}, delta {z.delta}, "
        f"max delta chain {z.max_delta_chain}, tensor chunks {config.chunking.tensor_chunk_size / 2**20:g} MiB.",
        "",
        machine_info(args.scratch),
        "",
    ]
    big_state = None
    for name in args.series:
        series = series_mod.build_series(name, args.cache_dir)
        print(f"[{name}] ckptrepo", flush=True)
        results = [run_ckptrepo(series, args.scratch / name, config)]
        shutil.rmtree(args.scratch / name, ignore_errors=True)
        print(f"[{name}] peers: {' '.join(args.peers)}", flush=True)
        results += peers.run_peers(series, args.scratch / name, args.peers)
        section = series_section(name, series, results)
        print(section, flush=True)
        parts.append(section)
        if name == "big_fp32":
            big_state = series[0]
        del series, results
        gc.collect()
    if big_state is not None:
        print("[throughput] ~1 GiB state", flush=True)
        tools = [tool for tool in peers.BACKUP_TOOLS if tool in args.peers]
        t = measure_throughput(big_state, args.scratch, config, args.repeats, tools)
        section = throughput_section(t)
        print(section, flush=True)
        parts.append(section)
        del big_state
        gc.collect()
    if args.rss_gib > 0:
        print(f"[memory] {args.rss_gib} GiB commit", flush=True)
        section = rss_section(*measure_big_rss(args.rss_gib, args.scratch, config))
        print(section, flush=True)
        parts.append(section)
    parts.append(f"Load average at the end (1/5/15 min): {report.loadavg()} "
                 f"(other work shares the {os.cpu_count()} cores; timings carry that noise).\n")
    text = "\n".join(parts)
    if not args.no_write:
        report.write_section("bench_storage", text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    shutil.rmtree(args.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
