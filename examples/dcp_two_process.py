"""torch.distributed.checkpoint with two processes writing into one ckptrepo repository.

    python examples/dcp_two_process.py [REPO_DIR]

Two ranks (gloo on 127.0.0.1) hold a model whose weights are sharded by rows (DTensor), train
it for a few steps and save with ``dcp.save``: each rank writes its own shards into the
repository, rank 0 commits one manifest, and the step appears once both ranks' data is
durable. Then this (single) process loads the whole model back: another world size, resharded
by DCP.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckptrepo
from ckptrepo.integrations.torch_dcp import StorageReader, StorageWriter

WORLD = 2
STEPS = (10, 20)


def initial_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"encoder": torch.randn(256, 128, generator=generator), "head": torch.randn(16, 128, generator=generator)}


def worker(rank: int, repo_path: str, port: int) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    repo = ckptrepo.open(repo_path)  # each rank opens the shared repository itself
    weights = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in initial_weights().items()}
    for step in range(1, max(STEPS) + 1):
        with torch.no_grad():  # a stand-in for an optimizer step on this rank's shard
            for tensor in weights.values():
                tensor.mul_(0.99)
        if step in STEPS:
            state = {"model": weights, "trainer": {"step": step, "lr": 0.01}}
            dcp.save(state, storage_writer=StorageWriter(repo, step=step, message=f"step {step} from {WORLD} ranks"))
    dist.barrier()
    repo.close()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    location = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ckpt-dcp-")) / "repo"
    ckptrepo.init(location).close()
    mp.spawn(worker, args=(str(location), free_port()), nprocs=WORLD, join=True)

    repo = ckptrepo.open(location)
    print(f"repository {repo.location}: steps {repo.steps()}")
    snap = repo.checkout(step=max(STEPS))
    for key in snap.keys():
        if key.startswith("tensors/"):
            print(f"  {key:32s} {tuple(snap.entry(key).shape)}")  # one entry per rank's shard
    print(f"  step 20 stored {repo.resolve('steps/20').stats.logical_bytes} logical bytes")

    # Load on one process (world size 1): DCP reassembles the full tensors from both shards.
    target = {"model": {name: torch.zeros_like(t) for name, t in initial_weights().items()},
              "trainer": {"step": 0, "lr": 0.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=StorageReader(repo, step=max(STEPS)))
    expected = {name: t * 0.99 ** max(STEPS) for name, t in initial_weights().items()}
    for name, tensor in target["model"].items():
        assert torch.allclose(tensor, expected[name]), name
    print(f"loaded on 1 process: trainer state {target['trainer']}, encoder {tuple(target['model']['encoder'].shape)}"
          " matches the 2-rank training")
    repo.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
