"""RepoCheckpointIO with a real Lightning Trainer fitting a tiny model on CPU."""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from strategies import assert_same  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ckptrepo  # noqa: E402
from ckptrepo.integrations.lightning import Pointer, RepoCheckpointIO, apply_map_location  # noqa: E402
from ckptrepo.refs import tag_ref  # noqa: E402

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class TinyModel(lightning.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Seeded: which epochs make the top 2 by val_loss (and so get saved) must not vary.
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, _index):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _index):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)}


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def trainer(io: RepoCheckpointIO, epochs: int, dirpath: Path | None, **options) -> lightning.Trainer:  # type: ignore[no-untyped-def]
    callbacks = [ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)] if dirpath else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lightning.Trainer(
            max_epochs=epochs, callbacks=callbacks, plugins=[io], logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=dirpath is not None, accelerator="cpu", **options,
        )


def test_trainer_with_model_checkpoint(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    io = RepoCheckpointIO(repo)
    checkpoints = tmp_path / "checkpoints"
    model = TinyModel()
    first = trainer(io, 4, checkpoints)
    first.fit(model, *loaders())

    files = sorted(os.listdir(checkpoints))
    assert "last.ckpt" in files and len(files) == 3  # top 2 by val_loss, plus last
    callback = first.checkpoint_callback
    assert callback is not None and Path(callback.best_model_path).exists()
    kept_steps = set()
    for name in files:
        pointer = Pointer.decode((checkpoints / name).read_bytes(), name)
        assert pointer is not None and repo.refs.get(tag_ref(pointer.tag)) == pointer.commit
        kept_steps.add(pointer.step)
    # Evicted checkpoints lost their refs: the branch's steps are exactly the kept files' steps.
    assert set(repo.steps()) == kept_steps
    assert len(repo.tags()) == 3
    last = io.load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 16 and last["epoch"] == 3
    assert_same(dict(last["state_dict"]), {k: v for k, v in model.state_dict().items()})
    assert last["hyper_parameters"] == {"hidden": 8, "lr": 0.05}
    assert repo.resolve("steps/16").metrics["val_loss"] == pytest.approx(float(callback.current_score))

    # gc reclaims what the evicted checkpoints alone held.
    assert repo.gc(grace_seconds=0).freed_objects > 0
    io.load_checkpoint(callback.best_model_path)

    # Resume from "last": the loops, optimizer and scheduler come back.
    second = trainer(io, 6, checkpoints)
    second.fit(TinyModel(), *loaders(), ckpt_path="last")
    assert second.global_step == 24
    assert max(repo.steps()) == 24
    # Resume from a revision of the repository.
    third = trainer(io, 7, None)
    third.fit(TinyModel(), loaders()[0], ckpt_path="steps/24")
    assert third.global_step == 28
    repo.close()


def test_save_load_remove_without_a_trainer(tmp_path: Path) -> None:
    io = RepoCheckpointIO(tmp_path / "repo")
    state = {
        "state_dict": {"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "global_step": 5, "epoch": 0, "hyper_parameters": {"lr": 0.1, "layers": [1, 2]},
        "callbacks": {"ModelCheckpoint{...}": {"monitor": "val_acc", "current_score": torch.tensor(0.75)}},
    }
    path = tmp_path / "ckpts" / "epoch=0.ckpt"
    io.save_checkpoint(state, path, storage_options={"tags": ["first"], "message": "by hand"})
    commit = io.repo.resolve("first")
    assert commit.message == "by hand" and commit.step == 5 and commit.metrics == {"val_acc": 0.75}
    assert_same(io.load_checkpoint(path), state)
    assert_same(io.load_checkpoint("first"), state)

    # Saving again to the same path moves its tag; the old commit keeps its step only
    # because the user's tag "first" still names it.
    state["global_step"] = 6
    io.save_checkpoint(state, path)
    assert io.repo.steps() == [5, 6]
    io.save_checkpoint({**state, "global_step": 7}, tmp_path / "ckpts" / "other.ckpt")
    io.save_checkpoint({**state, "global_step": 8}, tmp_path / "ckpts" / "other.ckpt")
    assert io.repo.steps() == [5, 6, 8]  # step 7 had only the pointer that moved on
    assert io.load_checkpoint(path)["global_step"] == 6

    # map_location: a device, a string, a dict of locations, a function of (storage, location).
    moved = io.load_checkpoint(path, map_location="meta")
    assert moved["state_dict"]["w"].device.type == "meta"
    assert io.load_checkpoint(path, map_location={"cpu": "meta"})["state_dict"]["b"].device.type == "meta"
    assert io.load_checkpoint(path, map_location=lambda storage, loc: storage)["state_dict"]["w"].device.type == "cpu"
    assert apply_map_location({"t": (torch.ones(1),)}, torch.device("meta"))["t"][0].device.type == "meta"

    io.remove_checkpoint(path)
    assert not path.exists()
    assert io.repo.steps() == [5, 8] and list(io.repo.tags())[0] == "first"
    assert len(io.repo.tags()) == 2  # "first" and other.ckpt's tag
    io.remove_checkpoint(path)  # already gone: nothing to do
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(path)


def test_no_pickle_by_default_and_weights_only(tmp_path: Path) -> None:
    state = {"state_dict": {"w": torch.ones(2)}, "global_step": 1, "hyper_parameters": {"args": argparse.Namespace(lr=1)}}
    strict = RepoCheckpointIO(tmp_path / "strict")
    with pytest.raises(TypeError, match="hyper_parameters/args.*allow_pickle=True"):
        strict.save_checkpoint(state, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists() and strict.repo.steps() == []

    relaxed = RepoCheckpointIO(tmp_path / "relaxed", allow_pickle=True)
    relaxed.save_checkpoint(state, tmp_path / "b.ckpt")
    with pytest.raises(TypeError, match="allow_pickle"):
        relaxed.load_checkpoint(tmp_path / "b.ckpt", weights_only=True)
    loaded = relaxed.load_checkpoint(tmp_path / "b.ckpt", weights_only=False)
    assert loaded["hyper_parameters"]["args"] == argparse.Namespace(lr=1)
    # A plugin that does not allow pickle never unpickles, whatever the caller asks.
    reader = RepoCheckpointIO(relaxed.repo)
    with pytest.raises(TypeError, match="allow_pickle"):
        reader.load_checkpoint(tmp_path / "b.ckpt", weights_only=False)


def test_plain_torch_files_load_as_before(tmp_path: Path) -> None:
    io = RepoCheckpointIO(tmp_path / "repo")
    state = {"state_dict": {"w": torch.arange(3.0)}, "global_step": 2}
    torch.save(state, tmp_path / "old.ckpt")
    assert_same(io.load_checkpoint(tmp_path / "old.ckpt", weights_only=True), state)
    torch.save({"ns": argparse.Namespace(a=1)}, tmp_path / "objects.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only"):
        io.load_checkpoint(tmp_path / "objects.ckpt", weights_only=True)
    io.remove_checkpoint(tmp_path / "old.ckpt")
    assert not (tmp_path / "old.ckpt").exists()


def test_a_last_link_is_removed_alone(tmp_path: Path) -> None:
    io = RepoCheckpointIO(tmp_path / "repo")
    io.save_checkpoint({"global_step": 3, "w": torch.ones(1)}, tmp_path / "epoch=0.ckpt")
    os.symlink("epoch=0.ckpt", tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    assert io.repo.steps() == [3] and io.load_checkpoint(tmp_path / "epoch=0.ckpt")["global_step"] == 3


def test_example_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    example = Path(__file__).parent.parent / "examples" / "lightning_train.py"
    result = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed and trained to global step 48" in result.stdout
    assert "last.ckpt: epoch 5, global step 48" in result.stdout
