"""ckptrepo quickstart: train a small torch model, commit a checkpoint every step, then look
at the log, the dedup statistics, a diff between two steps and a checkout.

    python examples/quickstart.py [REPO_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import ckptrepo


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ckpt-quickstart-"))
    repo = ckptrepo.init(root / "repo")
    print(f"repository: {repo.location}\n")

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1000, 64),   # frozen below: its chunks are shared by every commit
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 8, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 10),
    )
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, 1000, (256, 8))
    labels = torch.randint(0, 10, (256,))

    for step in range(1, 6):
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        commit = repo.commit(state, step=step, metrics={"loss": loss.item()}, message=f"step {step}")
        s = commit.stats
        print(
            f"step {step}: loss {loss.item():.4f}  commit {commit.id[:12]}  "
            f"{human(s.logical_bytes)} logical, {human(s.stored_bytes)} newly stored, "
            f"{s.new_chunks} new / {s.reused_chunks} reused chunks"
        )

    repo.tag("best", f"steps/{repo.best_step('loss')}")
    print("\nlog (newest first):")
    for c in repo.log():
        print(f"  {c.id[:12]}  step {c.step}  loss {c.metrics['loss']:.4f}  {c.message}")

    logical = sum(c.stats.logical_bytes for c in repo.log())
    stored = sum(p.stat().st_size for p in Path(repo.location, "objects").rglob("*") if p.is_file())
    print(f"\n5 checkpoints: {human(logical)} logical, {human(stored)} on disk ({logical / stored:.1f}x smaller)")

    diff = repo.diff("steps/1", "steps/5", numeric=True)
    print("\ndiff steps/1 -> steps/5:")
    for entry in diff.entries:
        if entry.status == "modified" and entry.numeric is not None:
            print(f"  {entry.path:<32} modified   rel_l2 {entry.numeric.rel_l2:.3e}")
        elif entry.status != "unchanged" or entry.path.startswith("model/0"):
            print(f"  {entry.path:<32} {entry.status}")

    snap = repo.checkout("best")
    restored = snap.to_dict()
    model.load_state_dict(restored["model"])
    optimizer.load_state_dict(restored["optimizer"])
    print(f"\nchecked out tag 'best' (step {snap.step}) and loaded it into the model and optimizer")
    out = snap.to_directory(root / "best-checkpoint")
    print(f"as files: {sorted(p.name for p in out.iterdir())}")
    report = repo.fsck(read_data=True)
    print(f"fsck --read-data: {'clean' if report.ok else report.problems}")


if __name__ == "__main__":
    main()
