"""torch.distributed.checkpoint through ckptrepo: two processes on gloo (127.0.0.1), a save
that fails on one rank, resharding on load, and loading on another world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_fixtures import full_state
from strategies import assert_same
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import ckptrepo
from ckptrepo.errors import FormatError, RefExistsError
from ckptrepo.integrations.torch_dcp import StorageReader, StorageWriter, tensor_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORKER = Path(__file__).with_name("dcp_fixtures.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(repo: Path, world: int = 2) -> list[dict]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent), *sys.path]))
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(repo), str(rank), str(world), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for rank in range(world)
    ]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_two_processes_save_shards_and_reshard_on_load(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    ckptrepo.init(path).close()
    reports = run_ranks(path)
    full = full_state()
    for report in reports:
        # The save that failed on rank 1 left no step and no lock, on every rank.
        assert report["failed_save"] == "TypeError", report
        assert report["after_failure"] == {"steps": [], "locks": []}
        assert report["w_equal"] and report["emb_equal"] and report["bias_equal"], report
        assert report["values"] == [full["step"], {"last_epoch": 3, "lrs": [0.1, 0.01]}]

    repo = ckptrepo.open(path)
    try:
        assert repo.steps() == [1]
        commit = repo.resolve("steps/1")
        assert commit.message == "sharded"
        snap = repo.checkout(step=1)
        # One entry per rank's shard: w split by rows, emb by columns.
        assert tensor_path("model.w", [0, 0]) in snap.keys() and tensor_path("model.w", [4, 0]) in snap.keys()
        assert tensor_path("model.emb", [0, 2]) in snap.keys()
        assert torch.equal(snap[tensor_path("model.w", [4, 0])], full["model"]["w"][4:])

        # World size 1: the whole state, from the two ranks' shards.
        target = {
            "model": {"w": torch.zeros(8, 6), "emb": torch.zeros(10, 4), "bias": torch.zeros(6, dtype=torch.float64)},
            "step": 0,
            "sched": {"last_epoch": 0, "lrs": []},
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, storage_reader=StorageReader(repo, step=1))
        assert_same(target, full)
    finally:
        repo.close()


def test_single_process_round_trip_and_errors(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "epoch": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=StorageWriter(repo), checkpoint_id=10)
        assert repo.steps() == [10]
        with pytest.raises(BaseException, match="already has step 10"):
            dcp.save(state, storage_writer=StorageWriter(repo), checkpoint_id=10)
        dcp.save(state, storage_writer=StorageWriter(repo, step=10, replace=True))

        # The documented DCP way: full state dicts from get_state_dict, loaded in place.
        fresh = torch.nn.Linear(5, 3)
        fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.1)
        fresh_model_state, fresh_optimizer_state = get_state_dict(fresh, fresh_optimizer)
        target = {"model": fresh_model_state, "optimizer": fresh_optimizer_state, "epoch": 0}
        dcp.load(target, storage_reader=StorageReader(repo), checkpoint_id=10)
        set_state_dict(fresh, fresh_optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    assert_same(fresh.state_dict(), model.state_dict())
    assert target["epoch"] == 2
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(
        fresh_optimizer.state[fresh_optimizer.param_groups[0]["params"][0]]["momentum_buffer"],
        optimizer.state[optimizer.param_groups[0]["params"][0]]["momentum_buffer"],
    )
    # Saving the same state again stores no new chunk: the repository's dedup applies.
    objects = set(repo.store.ids())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=StorageWriter(repo, step=11))
    new = set(repo.store.ids()) - objects
    assert all(repo.store.header(object_id).kind != "chunk" for object_id in new)

    repo.commit({"not": "dcp"}, step=12)
    with pytest.raises(BaseException, match="not a torch.distributed.checkpoint commit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, storage_reader=StorageReader(repo, step=12))
    assert issubclass(FormatError, ckptrepo.CkptRepoError) and issubclass(RefExistsError, ckptrepo.CkptRepoError)
    repo.close()


def test_example_runs(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "dcp_two_process.py"
    result = subprocess.run([sys.executable, str(example), str(tmp_path / "repo")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps [10, 20]" in result.stdout and "matches the 2-rank training" in result.stdout


def test_commit_manifest_needs_every_chunk_present(repo: ckptrepo.Repository) -> None:
    from ckptrepo.ids import ObjectId
    from ckptrepo.objects import ChunkRef, Entry, Manifest

    missing = ObjectId("ab" * 32)
    manifest = Manifest(
        type="dict",
        entries={"w": Entry("tensor", 8, (ChunkRef(missing, 8),), {"framework": "torch", "dtype": "float32", "shape": [2]})},
        tree={"dict": [["w", None]]},
    )
    with pytest.raises(ckptrepo.ObjectNotFoundError):
        repo.commit_manifest(manifest, step=1)
    assert repo.steps() == [] and repo.branches() == {}
    present = repo.commit({"w": torch.zeros(2)}, step=1)
    same = repo.commit_manifest(repo.load_manifest(present.manifest_id), step=2, message="again")
    assert same.manifest_id == present.manifest_id and repo.steps() == [1, 2]
    assert same.parents == (present.id,)
