"""ckptrepo.Checkpoint: the Ray AIR Checkpoint surface and the round trips Ray documents."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import assert_same, checkpoints, directory_trees, read_tree, write_tree

import ckptrepo
from ckptrepo import Checkpoint
from ckptrepo.checkpoint import ADDITIONAL_FILES_KEY, EXTRA_DIR, FS_CHECKPOINT_KEY
from ckptrepo.errors import PathSafetyError


def memory_uri() -> str:
    return f"memory://ckpt-{uuid.uuid4().hex}/checkpoint"


def test_ray_docstring_example(tmp_path: Path) -> None:
    checkpoint_data = {"data": 123}
    checkpoint = Checkpoint.from_dict(checkpoint_data)
    path = checkpoint.to_directory()
    try:
        checkpoint = Checkpoint.from_directory(path)
        recovered_data = checkpoint.to_dict()
        assert recovered_data == checkpoint_data
    finally:
        import shutil

        shutil.rmtree(path)


@settings(max_examples=40, deadline=None)
@given(data=checkpoints(with_torch=True))
def test_dict_directory_dict(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    root = tmp_path_factory.mktemp("ray")
    path = Checkpoint.from_dict(data).to_directory(root / "d")
    assert_same(Checkpoint.from_directory(path).to_dict(), data)


@settings(max_examples=25, deadline=None)
@given(data=checkpoints(with_torch=True))
def test_dict_uri_dict(data: dict) -> None:
    uri = Checkpoint.from_dict(data).to_uri(memory_uri())
    assert_same(Checkpoint.from_uri(uri).to_dict(), data)


@settings(max_examples=40, deadline=None)
@given(tree=directory_trees())
def test_directory_dict_directory(tmp_path_factory: pytest.TempPathFactory, tree: dict) -> None:
    root = tmp_path_factory.mktemp("ray")
    write_tree(root / "src", tree)
    as_dict = Checkpoint.from_directory(root / "src").to_dict()
    Checkpoint.from_dict(as_dict).to_directory(root / "out")
    assert read_tree(root / "out") == read_tree(root / "src")


@settings(max_examples=20, deadline=None)
@given(tree=directory_trees())
def test_directory_uri_directory(tmp_path_factory: pytest.TempPathFactory, tree: dict) -> None:
    root = tmp_path_factory.mktemp("ray")
    write_tree(root / "src", tree)
    uri = Checkpoint.from_directory(root / "src").to_uri(memory_uri())
    Checkpoint.from_uri(uri).to_directory(root / "out")
    assert read_tree(root / "out") == read_tree(root / "src")


def test_key_added_to_a_directory_checkpoint_survives(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"model.bin": b"weights", "conf/a.json": b"{}"})
    data = Checkpoint.from_directory(tmp_path / "src").to_dict()
    data["foo"] = "bar"
    data["scale"] = torch.tensor([1.5, 2.5])
    path = Checkpoint.from_dict(data).to_directory(tmp_path / "out")
    assert (Path(path) / EXTRA_DIR).is_dir()
    again = Checkpoint.from_directory(path).to_dict()
    assert again["foo"] == "bar"
    assert_same(again["scale"], data["scale"])
    assert again[FS_CHECKPOINT_KEY]["files"] == {"model.bin": b"weights", "conf/a.json": b"{}"}
    # ... and the next directory is the same again.
    Checkpoint.from_dict(again).to_directory(tmp_path / "out2")
    assert read_tree(tmp_path / "out2") == read_tree(tmp_path / "out")


def test_file_added_to_a_dict_checkpoint_survives(tmp_path: Path) -> None:
    data = {"w": np.arange(6.0).reshape(2, 3), "epoch": 3}
    path = Path(Checkpoint.from_dict(data).to_directory(tmp_path / "d"))
    (path / "notes.txt").write_text("added by hand")
    (path / "extra").mkdir()
    (path / "extra" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (path / "extra" / "run.sh").chmod(0o755)
    as_dict = Checkpoint.from_directory(path).to_dict()
    assert set(as_dict[ADDITIONAL_FILES_KEY]["files"]) == {"notes.txt", "extra/run.sh"}
    assert_same({k: v for k, v in as_dict.items() if k != ADDITIONAL_FILES_KEY}, data)
    out = Path(Checkpoint.from_dict(as_dict).to_directory(tmp_path / "again"))
    assert (out / "notes.txt").read_text() == "added by hand"
    assert os.access(out / "extra" / "run.sh", os.X_OK)
    assert read_tree(out) == read_tree(path)


def test_a_dict_directory_commits_to_the_same_manifest(tmp_path: Path, repo: ckptrepo.Repository) -> None:
    data = {"model": {"w": torch.randn(3, 3)}, "step": 7}
    path = Checkpoint.from_dict(data).to_directory(tmp_path / "d")
    assert repo.commit(path).manifest_id == repo.commit(data).manifest_id


def test_as_directory(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"x"})
    local = Checkpoint.from_directory(tmp_path / "src")
    with local.as_directory() as d:
        assert Path(d) == (tmp_path / "src").absolute()
    assert (tmp_path / "src" / "a").exists()  # a checkpoint's own directory is never removed
    with Checkpoint.from_dict({"x": np.ones(2)}).as_directory() as d:
        temp = Path(d)
        assert (temp / "ckptrepo-checkpoint.json").exists()
    assert not temp.exists()


def test_repository_versions(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    data = {"w": torch.arange(4.0), "meta": {"name": "run"}}
    commit = Checkpoint.from_dict(data).to_repo(repo, step=1, message="from Ray")
    checkpoint = Checkpoint.from_repo(repo, step=1)
    assert checkpoint.get_internal_representation()[0] == "snapshot"
    assert_same(checkpoint.to_dict(), data)
    Checkpoint.from_repo(repo, commit.id.hex).to_directory(tmp_path / "d")
    assert_same(Checkpoint.from_directory(tmp_path / "d").to_dict(), data)
    write_tree(tmp_path / "tree", {"f": b"1", "g": ("exec", b"2")})
    tree_commit = Checkpoint.from_directory(tmp_path / "tree").to_repo(repo, step=2)
    assert repo.checkout(tree_commit.id.hex).is_directory
    Checkpoint.from_repo(repo, step=2).to_directory(tmp_path / "tree2")
    assert read_tree(tmp_path / "tree2") == read_tree(tmp_path / "tree")
    assert Checkpoint.from_repo(repo, step=2).to_dict()[FS_CHECKPOINT_KEY]["executable"] == ["g"]


def test_properties_and_errors(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"x"})
    local = Checkpoint.from_directory(tmp_path / "src")
    assert local.path == str((tmp_path / "src").absolute())
    assert local.uri == f"file://{(tmp_path / 'src').absolute()}"
    assert Checkpoint.from_uri(f"file://{tmp_path / 'src'}").get_internal_representation()[0] == "local_path"
    in_memory = Checkpoint.from_dict({"a": 1})
    assert in_memory.path is None and in_memory.uri is None
    with pytest.raises(TypeError):
        os.fspath(in_memory)
    with pytest.raises(FileNotFoundError):
        Checkpoint.from_directory(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        Checkpoint.from_directory(tmp_path / "src" / "a")
    with pytest.raises(FileNotFoundError):
        Checkpoint.from_uri("memory://nothing-here/at-all")
    with pytest.raises(TypeError, match="w/0"):
        Checkpoint.from_dict({"w": [object()]})
    with pytest.raises(TypeError):
        Checkpoint.from_dict([1, 2])  # type: ignore[arg-type]
    write_tree(tmp_path / "full", {"b": b"y"})
    with pytest.raises(ckptrepo.RepositoryError, match="not an empty directory"):
        in_memory.to_directory(tmp_path / "full")


@given(name=st.sampled_from(["../escape", "/abs", "a/../../b"]))
def test_a_packed_tree_cannot_write_outside(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    root = tmp_path_factory.mktemp("ray")
    bad = {FS_CHECKPOINT_KEY: {"files": {name: b"x"}, "executable": [], "symlinks": {}, "empty_dirs": []}}
    with pytest.raises(PathSafetyError):
        Checkpoint.from_dict(bad).to_directory(root / "out")
    evil_link = {FS_CHECKPOINT_KEY: {"files": {}, "executable": [], "symlinks": {"l": "../../etc"}, "empty_dirs": []}}
    with pytest.raises(PathSafetyError):
        Checkpoint.from_dict(evil_link).to_directory(root / "out2")
    assert not (root.parent / "escape").exists()
