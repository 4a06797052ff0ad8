"""A fresh commit and a checkout of the ~1 GiB state, compared across versions of ckptrepo.

Each version (a source tree, or a git revision exported to a temporary tree) commits the
first checkpoint of the ``big_fp32`` series into a new repository, then restores it twice as
``bench_storage.py`` does (a fresh open, a checkout to torch tensors, every page touched):
the first checkout reads object files the commit wrote past the page cache, the second
("checkout again") finds them cached, as a restore repeated in the same minutes does. This
is done several times in a child process of its own; the versions take turns, round after
round, so that each sees the same minutes of a noisy machine. The first repeat of each
process is left out (it loads the compiled element loops). The table gives medians of wall
time, CPU time of all threads (user and system) and minor page faults.

    python benchmarks/bench_versions.py [--rounds 5] [--repeats 4] [VERSION ...]

VERSION is a directory holding ``ckptrepo/`` or a git revision (default: this tree).
Used to measure a change to the data path before it is kept (docs/benchmarks.md, "Where a
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
OPERATIONS = ("commit", "checkout", "checkout again")


class _Usage:
    """Wall time, CPU time of all threads and minor faults of the block it wraps."""

    def __enter__(self) -> _Usage:
        self.before = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = after.ru_utime - self.before.ru_utime + after.ru_stime - self.before.ru_stime
        self.faults = after.ru_minflt - self.before.ru_minflt


def _worker(repeats: int, cache_dir: Path, scratch: Path) -> None:
    """Commit the state into a new repository and check it out, ``repeats`` times; one JSON
    line each."""
    import gc

    import bench_storage
    import series

    import ckptrepo

    state = series.build_series("big_fp32", cache_dir)[0]
    for _ in range(repeats):
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()
        with ckptrepo.init(scratch) as repo, _Usage() as commit:
            repo.commit(state, step=0)
        gc.collect()
        usages = {"commit": commit}
        for operation in OPERATIONS[1:]:
            with _Usage() as usages[operation]:
                restored = bench_storage.restore(scratch, 0)
            del restored
        print(json.dumps({name: [u.wall, u.cpu, u.faults] for name, u in usages.items()}), flush=True)
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


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(HERE)]))


def _compile(tree: Path) -> None:
    """Build ``tree``'s C loops in place and fill its on-disk cache of numba loops, so that no
    measured process compiles anything (an exported revision starts with neither). Revisions
    from before the C loops had their element loops in numba."""
    if (tree / "setup.py").exists():
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True)
    names = ["ans_kernels"] + (["element_kernels"] if (tree / "ckptrepo" / "element_kernels.py").exists() else [])
    code = "from ckptrepo import compiled\n" + "".join(f"compiled.load({n!r})\n" for n in names)
    subprocess.run([sys.executable, "-c", code], env=_env(tree), check=True)


def _run(tree: Path, repeats: int, cache_dir: Path, scratch: Path) -> list[dict[str, list[float]]]:
    env = _env(tree)
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--repeats", str(repeats),
            "--cache-dir", str(cache_dir), "--scratch", str(scratch)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return runs[1:]  # the first commit of a process loads the compiled loops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("versions", nargs="*", default=[str(ROOT)])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4, help="commits and checkouts per process (the first left out)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "ckptrepo-bench" / "versions")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.repeats, args.cache_dir, args.scratch)
        return 0
    if args.repeats < 2:
        p.error("--repeats must be at least 2 (the first of each process is left out)")
    with tempfile.TemporaryDirectory() as work:
        trees = {version: _tree(version, Path(work)) for version in args.versions}
        for tree in trees.values():
            _compile(tree)
        results: dict[str, list[dict[str, list[float]]]] = {version: [] for version in trees}
        for round_ in range(args.rounds):
            # Alternate the order, so no version always runs right after another.
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for version, tree in order:
                results[version].extend(_run(tree, args.repeats, args.cache_dir, args.scratch))
    print(f"{args.rounds} rounds x {args.repeats - 1} repeats per version, medians:\n")
    print("| version | operation | wall s | CPU s (all threads) | minor faults |")
    print("|---|---|---:|---:|---:|")
    for version, runs in results.items():
        for operation in OPERATIONS:
            wall, cpu, faults = (statistics.median(r[operation][i] for r in runs) for i in range(3))
            print(f"| {version} | {operation} | {wall:.3f} | {cpu:.3f} | {faults:.0f} |")
    print()
    for version, runs in results.items():
        for operation in OPERATIONS:
            walls = " ".join(f"{r[operation][0]:.2f}" for r in runs)
            print(f"{version} {operation}: wall s in order {walls}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
