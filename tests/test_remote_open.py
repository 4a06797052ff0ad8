"""Repositories used in place on a real S3 server (moto through s3fs): opened read-only with no
local copy (lazy, chunks fetched on demand into a bounded cache), created and committed to
directly, and checkpoints written to and committed from s3:// URIs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from remote_fixtures import SMALL_CHUNKS, make_history, same_state, training_state
from s3_server import S3Server

import ckptrepo
from ckptrepo.errors import RepositoryError


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def pushed(tmp_path: Path, s3: S3Server) -> tuple[str, list[ckptrepo.Commit]]:
    uri = f"s3://{s3.new_bucket()}/runs/exp1"
    repo = ckptrepo.init(tmp_path / "local", config=SMALL_CHUNKS)
    commits = make_history(repo, range(3))
    repo.add_remote("origin", uri)
    repo.push()
    repo.close()
    return uri, commits


def test_lazy_read_only_open_reads_only_what_is_asked(tmp_path: Path, pushed: tuple[str, list[ckptrepo.Commit]]) -> None:
    uri, commits = pushed
    repo = ckptrepo.open(uri, read_only=True)
    try:
        assert repo.steps() == [0, 1, 2] and repo.resolve("latest").id == commits[2].id
        snap = repo.checkout(step=1)
        weights = snap["model/w"]
        assert np.array_equal(weights, training_state(1)["model"]["w"])
        entry = snap.entry("model/w")
        cache = tmp_path / "xdg" / "ckptrepo"
        cached = [p for p in cache.rglob("objects/*/*") if p.is_file()]
        # That entry's chunks (and their delta bases), the commit and the manifest: not the rest.
        manifest = repo.load_manifest(commits[1].manifest_id)
        assert len(entry.chunks) + 2 <= len(cached) < len(manifest.chunk_ids()) + 2 + len(entry.chunks)
        assert same_state(snap.to_dict(), training_state(1))
        with pytest.raises(RepositoryError, match="read-only"):
            repo.commit(training_state(9), step=9)
    finally:
        repo.close()
    # Nothing but the cache directory was written on this machine.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "xdg"]


def test_read_cache_is_bounded(tmp_path: Path, pushed: tuple[str, list[ckptrepo.Commit]]) -> None:
    from ckptrepo.remote import open_remote

    uri, _commits = pushed
    repo = open_remote(uri, read_only=True, cache_bytes=64 << 10)
    try:
        for step in range(3):
            assert same_state(repo.checkout(step=step).to_dict(), training_state(step))
        cache_files = [p for p in (tmp_path / "xdg").rglob("objects/*/*") if p.is_file()]
        assert sum(p.stat().st_size for p in cache_files) <= 64 << 10
        assert repo.backend.cached_bytes <= 64 << 10
    finally:
        repo.close()


def test_open_twice_in_one_process(pushed: tuple[str, list[ckptrepo.Commit]]) -> None:
    uri, commits = pushed
    first = ckptrepo.open(uri, read_only=True)
    second = ckptrepo.open(uri, read_only=True)  # LMDB allows one handle: this one goes without
    try:
        assert first.resolve("steps/2").id == second.resolve("steps/2").id == commits[2].id
        assert same_state(second.checkout().to_dict(), training_state(2))
    finally:
        first.close()
        second.close()


def test_init_commit_and_reopen_directly_on_s3(s3: S3Server) -> None:
    uri = f"s3://{s3.new_bucket()}/direct"
    repo = ckptrepo.init(uri, config=SMALL_CHUNKS)
    with pytest.raises(RepositoryError, match="exists already"):
        ckptrepo.init(uri)
    make_history(repo, range(2))
    repo.tag("v1")
    repo.close()
    again = ckptrepo.open(uri)
    try:
        assert again.steps() == [0, 1] and again.tags() == {"v1": again.resolve("steps/1").id}
        assert [c.step for c in again.log()] == [1, 0]
        second = again.commit(training_state(2), step=2)
        assert second.stats.new_chunks > 0 and second.parents == (again.resolve("steps/1").id,)
        assert same_state(again.checkout(step=2).to_dict(), training_state(2))
    finally:
        again.close()


def test_open_where_there_is_no_repository(s3: S3Server) -> None:
    with pytest.raises(RepositoryError, match="no ckptrepo repository"):
        ckptrepo.open(f"s3://{s3.new_bucket()}/nothing-here")


def test_snapshot_to_s3_uri_and_commit_from_it(tmp_path: Path, s3: S3Server) -> None:
    bucket = s3.new_bucket()
    repo = ckptrepo.init(tmp_path / "repo", config=SMALL_CHUNKS)
    state = training_state(5)
    dict_commit = repo.commit(state, step=5)
    repo.checkout(step=5).to_uri(f"s3://{bucket}/export/dict")
    back = repo.commit(f"s3://{bucket}/export/dict", step=6)
    assert back.manifest_id == dict_commit.manifest_id and back.stats.new_chunks == 0

    tree = tmp_path / "tree"
    (tree / "sub" / "empty").mkdir(parents=True)
    (tree / "weights.bin").write_bytes(os.urandom(200_000))
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "link").symlink_to("../weights.bin")
    dir_commit = repo.commit(tree, step=7)
    repo.checkout(step=7).to_uri(f"s3://{bucket}/export/tree")
    assert s3.filesystem().exists(f"{bucket}/export/tree/weights.bin")
    from_s3 = repo.commit(f"s3://{bucket}/export/tree", step=8)
    assert from_s3.manifest_id == dir_commit.manifest_id
    out = tmp_path / "out"
    repo.checkout(step=8).to_directory(out)
    assert (out / "weights.bin").read_bytes() == (tree / "weights.bin").read_bytes()
    assert os.readlink(out / "sub" / "link") == "../weights.bin" and (out / "sub" / "empty").is_dir()
    assert os.access(out / "run.sh", os.X_OK)
    repo.close()


def test_lock_object_protocol_against_the_s3_server(tmp_path: Path, s3: S3Server) -> None:
    """A store without If-Match: refs move under lock objects; sync works the same."""
    uri = f"s3://{s3.new_bucket()}/locked-{uuid.uuid4().hex[:6]}"
    a = ckptrepo.init(tmp_path / "a", config=SMALL_CHUNKS)
    make_history(a, range(2))
    a.add_remote("origin", uri, conditional_writes="create-only")
    a.push()
    a.commit(training_state(2), step=2)
    report = a.push()
    assert report.refs_updated and report.refs_updated[0].old is not None
    listing = s3.filesystem().find(uri[5:])
    assert not [k for k in listing if ".tmp-" in k]  # every lock object was released
    b = ckptrepo.clone(uri, tmp_path / "b", options={"conditional_writes": "create-only"})
    assert b.steps() == [0, 1, 2]
