"""A fresh commit of the ~1 GiB state, compared across versions of ckptrepo.

Each version (a source tree, or a git revision exported to a temporary tree) commits the
first checkpoint of the ``big_fp32`` series into a new repository several times in a child
process of its own; the versions take turns, round after round, so that each sees the same
minutes of a noisy machine. The first commit of each process is left out (it loads the
compiled element loops). The table gives medians of wall time, CPU time of all threads
(user and system) and minor page faults per commit.

    python benchmarks/bench_fresh_commit.py [--rounds 5] [--commits 4] [VERSION ...]

VERSION is a directory holding ``ckptrepo/`` or a git revision (default: this tree).
Used to measure a change to the commit path before it is kept (docs/benchmarks.md, "Where a
fresh commit's time went").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ckptrepo-bench" / "series"


def _worker(commits: int, cache_dir: Path, scratch: Path) -> None:
    """Commit the state ``commits`` times, each into a new repository; a JSON line each."""
    import gc

    import series

    import ckptrepo

    state = series.build_series("big_fp32", cache_dir)[0]
    for _ in range(commits):
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()
        with ckptrepo.init(scratch) as repo:
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            repo.commit(state, step=0)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(json.dumps({"wall": wall, "cpu": cpu, "faults": after.ru_minflt - before.ru_minflt}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


def _tree(version: str, work: Path) -> Path:
    """A directory whose ``ckptrepo/`` is ``version``'s."""
    path = Path(version)
    if (path / "ckptrepo").is_dir():
        return path.resolve()
    out = work / version.replace("/", "_")
    out.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", version, "ckptrepo"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _run(tree: Path, commits: int, cache_dir: Path, scratch: Path) -> list[dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(HERE)]))
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--commits", str(commits),
            "--cache-dir", str(cache_dir), "--scratch", str(scratch)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return runs[1:]  # the first commit of a process loads the compiled loops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("versions", nargs="*", default=[str(ROOT)])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--commits", type=int, default=4, help="commits per process (the first is left out)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "ckptrepo-bench" / "fresh-commit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.commits, args.cache_dir, args.scratch)
        return 0
    if args.commits < 2:
        p.error("--commits must be at least 2 (the first of each process is left out)")
    with tempfile.TemporaryDirectory() as work:
        trees = {version: _tree(version, Path(work)) for version in args.versions}
        results: dict[str, list[dict[str, float]]] = {version: [] for version in trees}
        for round_ in range(args.rounds):
            # Alternate the order, so no version always runs right after another.
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for version, tree in order:
                results[version].extend(_run(tree, args.commits, args.cache_dir, args.scratch))
    print(f"{args.rounds} rounds x {args.commits - 1} commits per version, medians:\n")
    print("| version | wall s | CPU s (all threads) | minor faults |")
    print("|---|---:|---:|---:|")
    for version, runs in results.items():
        wall, cpu, faults = (statistics.median(r[key] for r in runs) for key in ("wall", "cpu", "faults"))
        print(f"| {version} | {wall:.3f} | {cpu:.3f} | {faults:.0f} |")
    print()
    for version, runs in results.items():
        walls = " ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"{version}: wall s in order {walls}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
