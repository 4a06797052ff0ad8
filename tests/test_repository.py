"""Repository behaviour: revisions, steps, tags, branches, errors, and the index as a cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ckptrepo
from ckptrepo.errors import InvalidRefNameError, RefExistsError, RepositoryError, RevisionError


def _state(value: float) -> dict:
    return {"w": np.full(100, value, dtype=np.float32), "step_info": {"lr": value}}


def test_init_refuses_existing_and_open_refuses_missing(tmp_path: Path) -> None:
    ckptrepo.init(tmp_path / "r")
    with pytest.raises(RepositoryError, match="exists already"):
        ckptrepo.init(tmp_path / "r")
    with pytest.raises(RepositoryError, match="no ckptrepo repository"):
        ckptrepo.open(tmp_path / "nothing")


def test_revisions_resolve_in_every_form(repo: ckptrepo.Repository) -> None:
    c1 = repo.commit(_state(1), step=100)
    c2 = repo.commit(_state(2), step=200, tags=["best"])
    repo.branch("exp", "steps/100")
    c3 = repo.commit(_state(3), step=300, branch="exp")
    assert repo.resolve("latest").id == c2.id == repo.resolve("HEAD").id
    assert repo.resolve("best").id == c2.id
    assert repo.resolve("exp").id == c3.id
    assert repo.resolve("steps/100").id == c1.id
    assert repo.resolve("exp/steps/300").id == c3.id
    assert repo.resolve(c1.id[:8]).id == c1.id
    assert repo.resolve("latest~1").id == c1.id
    assert repo.resolve("exp~1").id == c1.id
    with pytest.raises(RevisionError, match="has no step 5"):
        repo.resolve("steps/5")
    with pytest.raises(RevisionError, match="unknown revision"):
        repo.resolve("nope")
    with pytest.raises(RevisionError, match="first-parent ancestors"):
        repo.resolve("latest~5")


def test_ambiguous_revision_lists_candidates(repo: ckptrepo.Repository) -> None:
    c1 = repo.commit(_state(1), step=1)
    c2 = repo.commit(_state(2), step=2)
    repo.tag("same", c1.id)
    repo.branch("same", c2.id)
    with pytest.raises(RevisionError, match="ambiguous.*tag same.*branch same"):
        repo.resolve("same")


def test_steps_are_per_branch_and_not_replaced_silently(repo: ckptrepo.Repository) -> None:
    repo.commit(_state(1), step=10)
    with pytest.raises(RefExistsError, match="already has step 10"):
        repo.commit(_state(2), step=10)
    replaced = repo.commit(_state(2), step=10, replace=True)
    assert repo.resolve("steps/10").id == replaced.id
    repo.commit(_state(3), step=10, branch="other")
    assert repo.steps() == [10] and repo.steps("other") == [10]
    assert repo.latest_step() == 10


def test_best_step_by_metric(repo: ckptrepo.Repository) -> None:
    for step, loss in [(1, 0.9), (2, 0.3), (3, float("nan")), (4, 0.5)]:
        repo.commit(_state(step), step=step, metrics={"loss": loss, "acc": 1 - loss})
    assert repo.best_step("loss") == 2
    assert repo.best_step("acc", mode="max") == 2
    assert repo.best_step("missing") is None


def test_tags_are_immutable_unless_forced(repo: ckptrepo.Repository) -> None:
    c1 = repo.commit(_state(1), step=1)
    c2 = repo.commit(_state(2), step=2)
    repo.tag("keep", c1.id)
    with pytest.raises(RefExistsError):
        repo.tag("keep", c2.id)
    repo.tag("keep", c2.id, force=True)
    assert repo.tags() == {"keep": c2.id}
    repo.untag("keep")
    assert repo.tags() == {}
    with pytest.raises(InvalidRefNameError):
        repo.tag("../evil")


def test_log_is_newest_first_with_limit(repo: ckptrepo.Repository) -> None:
    ids = [repo.commit(_state(i), step=i, message=f"m{i}").id for i in range(4)]
    log = repo.log()
    assert [c.id for c in log] == ids[::-1]
    assert [c.message for c in repo.log(limit=2)] == ["m3", "m2"]


def test_unsupported_value_names_key_path_before_writing(repo: ckptrepo.Repository) -> None:
    before = sorted(p for p in Path(repo.location, "objects").rglob("*") if p.is_file())
    with pytest.raises(TypeError, match=r"'model/layers/1/act'.*set"):
        repo.commit({"model": {"layers": [np.zeros(3), {"act": {1, 2}}]}})
    with pytest.raises(TypeError, match="keys must be str or int"):
        repo.commit({"a": {(1, 2): 3}})
    with pytest.raises(TypeError, match="object"):
        repo.commit({"a": np.array(["x"], dtype=object)})
    after = sorted(p for p in Path(repo.location, "objects").rglob("*") if p.is_file())
    assert before == after


def test_pickle_only_when_asked_on_both_ends(repo: ckptrepo.Repository) -> None:
    value = {"obj": complex(1, 2)}
    with pytest.raises(TypeError):
        repo.commit(value)
    commit = repo.commit(value, allow_pickle=True)
    with pytest.raises(TypeError, match="allow_pickle=True"):
        repo.checkout(commit.id).to_dict()
    assert repo.checkout(commit.id).to_dict(allow_pickle=True) == value


def test_lazy_entry_reads_only_its_chunks(repo: ckptrepo.Repository) -> None:
    commit = repo.commit({"a": np.arange(1000), "b": np.ones(1000)})  # 8 KB each: objects
    snap = repo.checkout(commit.id)
    b_chunk = snap.entry("b").chunks[0].id
    a_chunk = snap.entry("a").chunks[0].id
    os.remove(Path(repo.location, "objects", a_chunk[:2], a_chunk[2:]))
    assert snap["b"].tolist() == [1.0] * 1000  # b still loads
    assert b_chunk != a_chunk
    with pytest.raises(ckptrepo.ObjectNotFoundError):
        snap["a"]


def test_deleted_index_is_rebuilt(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "r")
    first = repo.commit(_state(1), step=1)
    repo.close()
    shutil.rmtree(tmp_path / "r" / "cache" / "index")
    reopened = ckptrepo.open(tmp_path / "r")
    again = reopened.commit(_state(1), step=2)
    assert again.stats.new_chunks == 0
    assert again.manifest_id == first.manifest_id
    np.testing.assert_array_equal(reopened.checkout(step=1)["w"], _state(1)["w"])


def test_commit_to_new_branch_forks_from_current_tip(repo: ckptrepo.Repository) -> None:
    base = repo.commit(_state(1), step=1)
    forked = repo.commit(_state(2), step=1, branch="run2")
    assert forked.parents == (base.id,)
    assert repo.branches() == {"main": base.id, "run2": forked.id}
    repo.switch("run2")
    assert repo.resolve("latest").id == forked.id


def test_corrupt_object_is_detected_on_read(repo: ckptrepo.Repository) -> None:
    commit = repo.commit({"a": np.arange(1000, dtype=np.int64)})
    chunk = repo.checkout(commit.id).entry("a").chunks[0].id
    path = Path(repo.location, "objects", chunk[:2], chunk[2:])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ckptrepo.ObjectCorruptError):
        repo.checkout(commit.id)["a"]


def test_checkout_refuses_non_empty_destination(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    commit = repo.commit({"a": 1})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "x").write_text("mine")
    with pytest.raises(RepositoryError, match="not an empty directory"):
        repo.checkout(commit.id).to_directory(dest)
    assert (dest / "x").read_text() == "mine"


def test_as_directory_is_removed_afterwards(repo: ckptrepo.Repository) -> None:
    commit = repo.commit({"a": np.arange(3)})
    with repo.checkout(commit.id).as_directory() as d:
        assert (d / "ckptrepo-checkpoint.json").exists()
        kept = d
    assert not kept.exists()
