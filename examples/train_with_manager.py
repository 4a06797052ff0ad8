"""A plain torch training loop with ckptrepo's CheckpointManager: async saves, one retention
policy, and resuming where the last run stopped.

    python examples/train_with_manager.py [REPO_DIR] [--steps N]

Run it twice with the same REPO_DIR: the second run resumes from the last durable step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import ckptrepo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", nargs="?", help="repository directory (default: a new temporary one)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    location = Path(args.repo) if args.repo else Path(tempfile.mkdtemp(prefix="ckpt-manager-")) / "repo"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = torch.randn(256, 32)
    targets = inputs[:, :4].sum(dim=1, keepdim=True)

    manager = ckptrepo.CheckpointManager(
        location,
        max_to_keep=3,  # the newest 3 steps ...
        best_fn="loss", keep_best=1,  # ... and the best one by loss ...
        keep_every=10,  # ... and every 10th ...
        item_max_to_keep={"optimizer": 2},  # ... but the optimizer state only in the newest 2
        save_interval_steps=2,
    )
    with manager:
        start = 0
        latest = manager.latest_step()
        if latest is not None:
            state = manager.restore(latest)  # protected from retention: the run resumed from it
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = latest + 1
            print(f"resumed from step {latest}")

        for step in range(start, start + args.steps):
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # Returns once the state is copied to host memory; the commit runs in the background.
            manager.save(
                step,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": {"step": step}},
                metrics={"loss": loss.item()},
            )
        manager.wait_until_finished()

        print(f"repository: {manager.directory}")
        print(f"steps kept: {manager.all_steps()}  (latest {manager.latest_step()}, best {manager.best_step()})")
        for step in manager.all_steps():
            items = sorted(manager.item_metadata(step))
            print(f"  step {step:3d}  loss {manager.metrics(step)['loss']:.4f}  items {items}")
        weights = manager.restore(items="model")  # reads only the model's entries
        model.load_state_dict(weights)
        print(f"restored the model of step {manager.latest_step()}: loss "
              f"{torch.nn.functional.mse_loss(model(inputs), targets).item():.4f}")
        stats = manager.repo.gc()  # frees what pruned steps and dropped items alone held (after the grace period)
        print(f"gc: {stats.freed_objects} objects freed now, {stats.young_objects} young ones wait for the grace period")


if __name__ == "__main__":
    main()
