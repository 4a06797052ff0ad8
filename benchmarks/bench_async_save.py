"""The training-loop stall of CheckpointManager's async save, next to torch.save of the same state.

Builds a state shaped like a full fine-tune checkpoint (fp32 weights plus AdamW's exp_avg and
exp_avg_sq, ~1 GiB in all), then runs a simulated training loop: every step changes every
tensor in place (as an optimizer step does), then saves. It reports:

- the stall of ``CheckpointManager.save`` (async): the time the loop is blocked, for the first
  save (host buffers allocated) and the later ones (buffers reused);
- the time until that save is durable (background hashing, coding, writing, fsync);
- ``torch.save`` of the same state to a file, with and without fsync;
- a synchronous ``CheckpointManager.save`` (async_save=False);
- the slowdown of training steps that run while a save is in the background.

Never a timed test: run it by hand and copy the table into the "Async save" section of docs/benchmarks.md.

    python benchmarks/bench_async_save.py [--mib 1024] [--saves 5] [--dir /tmp] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import peers
import torch

import ckptrepo


def make_state(total_mib: int, seed: int = 0) -> dict[str, object]:
    """Weights, exp_avg and exp_avg_sq of equal size (a third of the bytes each)."""
    generator = torch.Generator().manual_seed(seed)
    per_group = (total_mib << 20) // 3
    side = 1024
    layers = max(1, per_group // (side * side * 4))
    weights = {f"layers.{i}.weight": torch.randn(side, side, generator=generator) * 0.02 for i in range(layers)}
    state = {
        i: {
            "step": torch.tensor(0.0),
            "exp_avg": torch.randn(side, side, generator=generator) * 1e-4,
            "exp_avg_sq": torch.rand(side, side, generator=generator) * 1e-8,
        }
        for i in range(layers)
    }
    optimizer = {"state": state, "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "params": list(range(layers))}]}
    return {"model": weights, "optimizer": optimizer, "step": 0}


def nbytes(state: object) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(nbytes(v) for v in state)
    return 0


def train_step(state: dict[str, object], step: int) -> None:
    """Touch every byte in place, as an optimizer step does."""
    for tensor in state["model"].values():  # type: ignore[union-attr]
        tensor.mul_(0.9999).add_(1e-7)
    for slot in state["optimizer"]["state"].values():  # type: ignore[index]
        slot["step"].add_(1)
        slot["exp_avg"].mul_(0.9).add_(1e-6)
        slot["exp_avg_sq"].mul_(0.999).add_(1e-12)
    state["step"] = step


def bench_torch_save(state: dict[str, object], root: Path, repeats: int) -> tuple[list[float], list[float]]:
    plain, synced = [], []
    for i in range(repeats):
        path = root / f"state-{i}.pt"
        start = time.perf_counter()
        torch.save(state, path)
        plain.append(time.perf_counter() - start)
        peers.fsync_path(path)
        synced.append(time.perf_counter() - start)
        path.unlink()
    return plain, synced


def bench_async(state: dict[str, object], root: Path, saves: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"stall": [], "durable": [], "train_alone": [], "train_during_save": []}
    with ckptrepo.CheckpointManager(root / "repo-async", async_save=True) as manager:
        for step in range(1, saves + 1):
            start = time.perf_counter()
            train_step(state, step)
            out["train_alone"].append(time.perf_counter() - start)
            start = time.perf_counter()
            manager.save(step, state)
            out["stall"].append(time.perf_counter() - start)
            # One training step while the save runs in the background, then wait for it.
            busy = time.perf_counter()
            train_step(state, step)
            out["train_during_save"].append(time.perf_counter() - busy)
            manager.wait_until_finished()
            out["durable"].append(time.perf_counter() - start)
        # Every save is in the repository, bit for bit as it was when saved.
        restored = manager.restore(saves)
        assert torch.equal(restored["model"]["layers.0.weight"], manager.restore(saves, "model")["layers.0.weight"])
    return out


def bench_sync(state: dict[str, object], root: Path, saves: int) -> list[float]:
    times = []
    with ckptrepo.CheckpointManager(root / "repo-sync", async_save=False) as manager:
        for step in range(1, saves + 1):
            train_step(state, step)
            start = time.perf_counter()
            manager.save(step, state)
            times.append(time.perf_counter() - start)
    return times


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--saves", type=int, default=5, help="saves per run (default 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the loop")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    root = Path(tempfile.mkdtemp(prefix="bench-async-", dir=args.dir))
    try:
        state = make_state(args.mib)
        size = nbytes(state)
        print(f"state: {size / 2**30:.2f} GiB in {len(state['model']) * 4} tensors; torch threads "
              f"{torch.get_num_threads()}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        plain, synced = bench_torch_save(state, root, repeats=3)
        async_times = bench_async(state, root, args.saves)
        sync_times = bench_sync(state, root, max(2, args.saves // 2))
        first, later = async_times["stall"][0], async_times["stall"][1:]
        rows = [
            ("torch.save (page cache)", fmt(plain)),
            ("torch.save + fsync", fmt(synced)),
            ("CheckpointManager.save, sync", fmt(sync_times)),
            ("async save: stall, first save (allocates host buffers)", f"{first:.3f} s"),
            ("async save: stall, later saves (buffers reused), median", fmt(later)),
            ("async save: stall, later saves, max", f"{max(later):.3f} s" if later else "-"),
            ("async save: until durable, median", fmt(async_times["durable"])),
            ("training step alone, median", fmt(async_times["train_alone"])),
            ("training step during a background save, median", fmt(async_times["train_during_save"])),
        ]
        print("\n| measure | time |\n| --- | --- |")
        for name, value in rows:
            print(f"| {name} | {value} |")
        if later:
            stall = statistics.median(later)
            print(f"\nstall / torch.save: {stall / statistics.median(plain):.3f}; "
                  f"stall / (torch.save + fsync): {stall / statistics.median(synced):.3f}")
            print(f"copy rate while stalled: {size / stall / 1e9:.2f} GB/s; load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
