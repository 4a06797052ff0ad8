"""A torch.distributed worker for tests/test_torch_dcp.py (run as a script, one process per
rank, gloo on 127.0.0.1): a save that fails on one rank, a sharded save, and a load with
another sharding."""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import ckptrepo
from ckptrepo.integrations.torch_dcp import StorageReader, StorageWriter

warnings.filterwarnings("ignore")


def full_state() -> dict[str, object]:
    """The unsharded values every test compares against."""
    generator = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w": torch.arange(48, dtype=torch.float32).reshape(8, 6),
            "emb": torch.randn(10, 4, generator=generator),
            "bias": torch.arange(6, dtype=torch.float64),
        },
        "step": 7,
        "sched": {"last_epoch": 3, "lrs": [0.1, 0.01]},
    }


class Opaque:
    """A value only pickle could store."""


def main(path: str, rank: int, world: int, port: int) -> None:
    # One Repository per process, shared by every writer and reader of this rank.
    repo = ckptrepo.open(path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = full_state()
    model = full["model"]
    report: dict[str, object] = {"rank": rank}

    # 1. A save that fails on rank 1 only leaves no step, and no lock behind.
    bad: dict[str, object] = {"w": distribute_tensor(model["w"], mesh, [Shard(0)])}
    if rank == 1:
        bad["only_on_rank_1"] = Opaque()
    writer = StorageWriter(repo, step=3)
    try:
        dcp.save(bad, storage_writer=writer)
        report["failed_save"] = "did not fail"
    except BaseException as exc:  # noqa: BLE001 - DCP raises CheckpointException (a BaseException)
        report["failed_save"] = "TypeError" if "without pickle" in str(exc) else repr(exc)[:300]
    del writer
    gc.collect()
    dist.barrier()
    locks = [p.name for p in repo.lock.dir.iterdir()] if repo.lock is not None else []
    report["after_failure"] = {"steps": repo.steps(), "locks": locks}

    # 2. A sharded save: each rank writes its shards, rank 0 commits.
    state = {
        "model": {
            "w": distribute_tensor(model["w"], mesh, [Shard(0)]),
            "emb": distribute_tensor(model["emb"], mesh, [Shard(1)]),
            "bias": model["bias"].clone(),
        },
        "step": full["step"],
        "sched": full["sched"],
    }
    dcp.save(state, storage_writer=StorageWriter(repo, step=1, message="sharded"))
    dist.barrier()

    # 3. Load with another sharding on the same two ranks.
    target = {
        "model": {
            "w": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)]),
            "emb": distribute_tensor(torch.zeros(10, 4), mesh, [Replicate()]),
            "bias": torch.zeros(6, dtype=torch.float64),
        },
        "step": 0,
        "sched": {"last_epoch": 0, "lrs": []},
    }
    dcp.load(target, storage_reader=StorageReader(repo, step=1))
    loaded = target["model"]
    report["w_equal"] = bool(torch.equal(loaded["w"].full_tensor(), model["w"]))
    report["emb_equal"] = bool(torch.equal(loaded["emb"].full_tensor(), model["emb"]))
    report["bias_equal"] = bool(torch.equal(loaded["bias"], model["bias"]))
    report["values"] = [target["step"], target["sched"]]
    dist.barrier()
    dist.destroy_process_group()
    repo.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
