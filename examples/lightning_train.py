"""Lightning with checkpoints in a ckptrepo repository: one plugin, ModelCheckpoint unchanged.

    python examples/lightning_train.py [WORK_DIR]

Fits a tiny model for 4 epochs keeping the best 2 checkpoints by val_loss plus last.ckpt,
resumes from "last" for 2 more epochs, and shows what the repository holds.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import ckptrepo
from ckptrepo.integrations.lightning import RepoCheckpointIO


class Regressor(lightning.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain numbers: stored without pickle
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, _index):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _index):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = (x[:, :3].sum(dim=1, keepdim=True) > 0).float()
    dataset = TensorDataset(x, y)
    return DataLoader(dataset, batch_size=64, shuffle=False), DataLoader(dataset, batch_size=256)


def fit(io: RepoCheckpointIO, checkpoints: Path, epochs: int, ckpt_path: str | None) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_epochs=epochs,
        plugins=[io],  # the only change from a stock Trainer
        callbacks=[ModelCheckpoint(dirpath=checkpoints, monitor="val_loss", save_top_k=2, save_last=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(Regressor(), *data(), ckpt_path=ckpt_path)
    return trainer


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ckpt-lightning-"))
    repo = ckptrepo.init(work / "repo")
    io = RepoCheckpointIO(repo)
    checkpoints = work / "checkpoints"

    first = fit(io, checkpoints, epochs=4, ckpt_path=None)
    print(f"best checkpoint: {Path(first.checkpoint_callback.best_model_path).name}")  # type: ignore[union-attr]
    second = fit(io, checkpoints, epochs=6, ckpt_path="last")  # resumes at epoch 4
    print(f"resumed and trained to global step {second.global_step}")

    print(f"\n{checkpoints} (pointer files, a few hundred bytes each):")
    for name in sorted(os.listdir(checkpoints)):
        print(f"  {name:24s} {(checkpoints / name).stat().st_size} bytes")
    print(f"\nrepository {repo.location}: steps {repo.steps()}")
    for commit in repo.log(limit=4):
        stats = commit.stats
        print(f"  {commit.id.short}  step {commit.step:3d}  val_loss {commit.metrics.get('val_loss', float('nan')):.4f}"
              f"  {commit.message:40s} new {stats.stored_bytes} B, {stats.reused_chunks} chunks reused")
    restored = io.load_checkpoint(checkpoints / "last.ckpt")
    model = Regressor(**restored["hyper_parameters"])
    model.load_state_dict(restored["state_dict"])
    print(f"\nlast.ckpt: epoch {restored['epoch']}, global step {restored['global_step']}, "
          f"hyper-parameters {restored['hyper_parameters']}")
    repo.close()


if __name__ == "__main__":
    main()
