"""The four round-trip guarantees of SPEC section 5, each a property over generated cases."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_same, checkpoints, directory_trees, read_tree, write_tree

import ckptrepo

_counter = itertools.count()


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> ckptrepo.Repository:
    repo = ckptrepo.init(tmp_path_factory.mktemp("roundtrip") / "repo")
    yield repo
    repo.close()


def _fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ckpt-rt-")) / "out"


@given(checkpoints())
def test_dict_commit_to_dict_is_identity(shared_repo: ckptrepo.Repository, checkpoint: dict) -> None:
    commit = shared_repo.commit(checkpoint)
    assert_same(shared_repo.checkout(commit.id).to_dict(), checkpoint)


@given(checkpoints())
def test_dict_to_directory_commits_back_to_same_manifest(shared_repo: ckptrepo.Repository, checkpoint: dict) -> None:
    commit = shared_repo.commit(checkpoint)
    out = shared_repo.checkout(commit.id).to_directory(_fresh_dir())
    again = shared_repo.commit(str(out))
    assert again.manifest_id == commit.manifest_id
    assert again.stats.new_chunks == 0


@given(directory_trees())
def test_directory_round_trip_is_byte_exact(shared_repo: ckptrepo.Repository, tree: dict) -> None:
    src = _fresh_dir()
    write_tree(src, tree)
    commit = shared_repo.commit(str(src))
    out = shared_repo.checkout(commit.id).to_directory(_fresh_dir())
    assert read_tree(out) == read_tree(src)


@given(st.one_of(directory_trees(), checkpoints(with_torch=False)))
def test_to_uri_commits_back_to_same_manifest(shared_repo: ckptrepo.Repository, source: dict) -> None:
    if source and all(isinstance(k, str) for k in source) and _looks_like_tree(source):
        src = _fresh_dir()
        write_tree(src, source)
        commit = shared_repo.commit(str(src))
    else:
        commit = shared_repo.commit(source)
    uri = f"memory://roundtrip/{next(_counter)}"
    shared_repo.checkout(commit.id).to_uri(uri)
    again = shared_repo.commit(uri)
    assert again.manifest_id == commit.manifest_id
    fsspec.filesystem("memory").rm(uri.removeprefix("memory://"), recursive=True)


def _looks_like_tree(value: dict) -> bool:
    return all(isinstance(v, bytes) or (isinstance(v, tuple) and v and v[0] in ("exec", "dir", "link")) for v in value.values())


def test_torch_training_state_round_trips_bit_exactly(repo: ckptrepo.Repository) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for n in range(3):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": n}
        commit = repo.commit(state, step=n, metrics={"loss": loss.item()})
        restored = repo.checkout(commit.id).to_dict()
        assert_same(restored, state)
    # The restored state loads into fresh objects.
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    fresh.load_state_dict(restored["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(restored["optimizer"])
    assert repo.steps() == [0, 1, 2]


def test_unchanged_state_adds_no_chunk(repo: ckptrepo.Repository) -> None:
    state = {"w": torch.randn(1000, 100), "b": torch.zeros(100, dtype=torch.bfloat16)}
    first = repo.commit(state, step=1)
    second = repo.commit(state, step=2)
    assert first.stats.new_chunks > 0
    assert second.stats.new_chunks == 0 and second.stats.reused_chunks == first.stats.new_chunks
    assert second.manifest_id == first.manifest_id


def test_checkout_torch_and_numpy_frameworks(repo: ckptrepo.Repository) -> None:
    import numpy as np

    commit = repo.commit({"t": torch.arange(6, dtype=torch.int32).reshape(2, 3), "a": np.ones(3)})
    as_torch = repo.checkout(commit.id).to_dict("torch")
    as_numpy = repo.checkout(commit.id).to_dict("numpy")
    assert isinstance(as_torch["a"], torch.Tensor) and isinstance(as_numpy["t"], np.ndarray)
    assert as_numpy["t"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_large_tensor_spans_many_chunks(tmp_path: Path) -> None:
    from ckptrepo.config import Chunking, Config

    repo = ckptrepo.init(tmp_path / "r", config=Config(chunking=Chunking(tensor_chunk_size=1 << 16)))
    tensor = torch.randn(300_000)
    commit = repo.commit({"big": tensor})
    entry = repo.checkout(commit.id).entry("big")
    assert len(entry.chunks) == (tensor.numel() * 4 + (1 << 16) - 1) // (1 << 16)
    assert torch.equal(repo.checkout(commit.id)["big"], tensor)
