"""repo.du: logical and stored bytes per commit and for the repository, adding up to the disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from history_fixtures import FROZEN, TRAINED, fine_tune, objects_on_disk, small_chunk_repo

import ckptrepo
from ckptrepo.accounting import CommitUsage, RepositoryUsage, Usage
from ckptrepo.codec import CodingPolicy
from ckptrepo.config import Chunking, Config
from ckptrepo.refs import branch_ref
from ckptrepo.store import object_key


def file_size(repo: ckptrepo.Repository, object_id: str) -> int:
    return os.path.getsize(Path(repo.location) / object_key(object_id))


def sizes(repo: ckptrepo.Repository, ids: set[str]) -> int:
    return sum(file_size(repo, i) for i in ids)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> ckptrepo.Repository:
    repo = small_chunk_repo(tmp_path_factory.mktemp("du") / "repo")
    fine_tune(repo, steps=4, lr=1e-3)
    yield repo
    repo.close()


def test_repository_figures_add_up_to_the_disk(tuned: ckptrepo.Repository) -> None:
    usage = tuned.du()
    assert isinstance(usage, RepositoryUsage)
    on_disk = objects_on_disk(Path(tuned.location))
    assert usage.stored_bytes == on_disk
    assert usage.unreferenced == Usage() and usage.missing == 0
    # Each object at the first commit that needs it: the commits add up to what is live.
    assert sum(c.stored.stored_bytes for c in usage.commits) == usage.reachable_bytes == on_disk
    assert sum(c.stored.objects for c in usage.commits) == len(list(tuned.store.ids()))
    assert sum(u.stored_bytes for u in usage.codings.values()) == on_disk
    # Fine-tuning from the parent: later chunks are coded as deltas against it.
    assert sum(u.objects for name, u in usage.codings.items() if name.startswith("delta")) > 0
    assert usage.logical_bytes == sum(c.stats.logical_bytes for c in tuned.log())
    assert usage.dedup_ratio > 1 and usage.ratio > 1
    assert [c.step for c in usage.commits] == [1, 2, 3, 4]


def test_by_key_adds_up(tuned: ckptrepo.Repository) -> None:
    usage = tuned.du(by_key=True)
    assert set(usage.keys) == {"model", "optimizer", "step"}
    keyed = sum(k.chunks.stored_bytes for k in usage.keys.values())
    assert keyed + usage.metadata.stored_bytes == usage.reachable_bytes
    assert usage.keys["model"].entries == 4 * 6
    # Adam keeps two moments per trained parameter: the optimizer outweighs the model.
    assert usage.keys["optimizer"].logical_bytes > usage.keys["model"].logical_bytes


def test_commit_figures(tuned: ckptrepo.Repository) -> None:
    usage = tuned.du("steps/3", by_key=True)
    assert isinstance(usage, CommitUsage)
    commit = tuned.resolve("steps/3")
    manifest = tuned.load_manifest(commit.manifest_id)
    parent = tuned.load_manifest(tuned.resolve("steps/2").manifest_id)
    own = manifest.chunk_ids()
    assert usage.logical_bytes == commit.stats.logical_bytes == manifest.logical_bytes
    assert usage.chunks == Usage(len(own), sum(tuned.store.header(i).size for i in own), sizes(tuned, own))
    assert usage.metadata.stored_bytes == sizes(tuned, {commit.id, commit.manifest_id})
    assert usage.stored_bytes == usage.chunks.stored_bytes + usage.delta_bases.stored_bytes + usage.metadata.stored_bytes
    # The frozen layer's chunks are the parent's; the trained layers' are not.
    frozen = {c.id for p in FROZEN for c in manifest.entries[p].chunks}
    trained = {c.id for p in TRAINED for c in manifest.entries[p].chunks}
    shared = own & parent.chunk_ids()
    assert frozen <= shared and not trained & shared
    assert usage.shared_with_parent.stored_bytes == sizes(tuned, shared)
    assert usage.not_in_parent.stored_bytes == sizes(tuned, own - shared)
    # Step 4 codes its trained chunks against these: they are not unique to step 3.
    assert usage.unique.stored_bytes < usage.not_in_parent.stored_bytes + usage.metadata.stored_bytes
    assert usage.delta_bases.objects > 0
    keyed = sum(k.chunks.stored_bytes for k in usage.keys.values())
    assert keyed == usage.chunks.stored_bytes + usage.delta_bases.stored_bytes
    assert usage.keys["model"].not_in_parent.stored_bytes == sizes(tuned, trained)


def test_unique_bytes_by_hand(tmp_path: Path) -> None:
    # No delta coding: every chunk stands alone, so "unique" is easy to tell by hand.
    config = Config(chunking=Chunking(tensor_chunk_size=4096), compression=CodingPolicy(delta=False))
    repo = ckptrepo.init(tmp_path / "repo", config=config)
    x = np.arange(3000, dtype=np.float32)
    y = np.ones(2000, dtype=np.float64)
    first = repo.commit({"x": x, "y": y}, step=1)
    second = repo.commit({"x": x, "y": y * 2}, step=2)
    y_chunks = {c.id for c in repo.load_manifest(second.manifest_id).entries["y"].chunks}
    mine = y_chunks | {second.id, second.manifest_id}
    usage = repo.du("steps/2")
    assert usage.unique == Usage(len(mine), usage.unique.logical_bytes, sizes(repo, mine))
    assert usage.delta_bases == Usage()
    assert repo.du("latest").unique == usage.unique
    # The first commit alone needs its y and its documents; its x is shared.
    first_y = {c.id for c in repo.load_manifest(first.manifest_id).entries["y"].chunks}
    assert repo.du("steps/1").unique.stored_bytes == sizes(repo, first_y | {first.id, first.manifest_id})
    # A single-commit repository: everything is unique to it.
    solo = ckptrepo.init(tmp_path / "solo", config=config)
    solo.commit({"x": x})
    alone = solo.du("latest")
    assert alone.unique.stored_bytes == alone.stored_bytes == objects_on_disk(tmp_path / "solo")


def test_unreferenced_and_missing_objects(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    fine_tune(repo, steps=2)
    repo.branch("scratch", "steps/1")
    dropped = repo.commit({"only-here": np.full(5000, 7, dtype=np.int64)}, branch="scratch")
    stray = repo.store.put("chunk", b"nothing names this chunk" * 100).id
    # Delete the branch: its commit and the chunks only it named are now garbage.
    repo.refs.update(branch_ref("scratch"), None, dropped.id)
    usage = repo.du()
    dropped_ids = {dropped.id, dropped.manifest_id} | repo.load_manifest(dropped.manifest_id).chunk_ids()
    assert usage.unreferenced.stored_bytes == sizes(repo, dropped_ids | {stray})
    assert usage.stored_bytes == objects_on_disk(Path(repo.location))
    assert usage.reachable_bytes + usage.unreferenced.stored_bytes == usage.stored_bytes

    manifest = repo.load_manifest(repo.resolve("steps/2").manifest_id)
    victim = next(iter(manifest.entries["model/2.weight"].chunks)).id
    (Path(repo.location) / object_key(victim)).unlink()
    assert repo.du().missing >= 1
    assert repo.du("steps/2").missing >= 1


def test_errors(tuned: ckptrepo.Repository) -> None:
    with pytest.raises(ckptrepo.RevisionError):
        tuned.du("steps/999")


def test_prune_then_gc(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    fine_tune(repo, steps=4, lr=1e-3)
    repo.prune(keep_last=1)
    usage = repo.du()
    assert [c.retained for c in usage.commits] == [False, False, False, True]
    # Pruned commits keep their commit document; their other data waits for gc.
    assert all(c.stored.objects == 1 for c in usage.commits[:3])
    assert usage.unreferenced.objects > 0
    assert usage.stored_bytes == objects_on_disk(tmp_path / "repo")
    # The last step's deltas still need the chunks of step 3 they were coded against.
    assert usage.delta_bases.objects > 0
    assert usage.logical_bytes == repo.resolve("latest").stats.logical_bytes

    repo.gc(grace_seconds=0)
    after = repo.du()
    assert after.unreferenced == Usage()
    assert after.stored_bytes == after.reachable_bytes == objects_on_disk(tmp_path / "repo")
    assert after.reachable_bytes == usage.reachable_bytes
    latest = repo.du("latest")
    assert latest.delta_bases == usage.delta_bases and latest.missing == 0
    with pytest.raises(ckptrepo.RepositoryError, match="pruned"):
        repo.du(usage.commits[0].commit)
