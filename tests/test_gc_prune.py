"""gc and prune: what they keep, what they free, and that the repository stays whole."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_fixtures import SMALL_CHUNKS, Worker, assert_same, make_state

import ckptrepo
from ckptrepo.cli import main
from ckptrepo.config import Config
from ckptrepo.ids import ObjectId
from ckptrepo.maintenance import KeepBest, live_objects, mark
from ckptrepo.store import object_key


def _age(repo: ckptrepo.Repository, seconds: float) -> None:
    """Make every object look ``seconds`` old (past any grace period)."""
    then = time.time() - seconds
    for object_id in repo.store.ids():
        os.utime(Path(repo.location) / object_key(object_id), (then, then))


@pytest.fixture
def trained(tmp_path: Path) -> ckptrepo.Repository:
    repo = ckptrepo.init(tmp_path / "repo", config=SMALL_CHUNKS)
    losses = [5.0, 3.0, float("nan"), 1.0, 4.0, 2.0, 6.0, 7.0]
    for step, loss in enumerate(losses):
        repo.commit(make_state(3, step * 10), step=step * 10, metrics={"loss": loss})
    yield repo
    repo.close()


def _steps(repo: ckptrepo.Repository, branch: str = "main") -> list[int]:
    return repo.steps(branch)


def test_gc_frees_what_an_interrupted_commit_left_and_dry_run_only_reports(trained: ckptrepo.Repository) -> None:
    orphans = [trained.store.put("chunk", os.urandom(5000)).id for _ in range(3)]
    _age(trained, 3600)
    before = set(trained.store.ids())
    dry = trained.gc(dry_run=True)
    assert set(dry.freed) == set(orphans) and dry.freed_objects == 3 and dry.dry_run
    assert dry.freed_bytes == sum(trained.store.stored_size(o) for o in orphans)
    assert set(trained.store.ids()) == before
    done = trained.gc()
    assert set(done.freed) == set(orphans) and done.freed_bytes == dry.freed_bytes
    assert set(trained.store.ids()) == before - set(orphans)
    for orphan in orphans:
        assert trained.store.index.get(orphan) is None and not trained.store.has(orphan)
    assert trained.fsck(read_data=True).ok


def test_grace_period_keeps_young_unreferenced_objects(tmp_path: Path) -> None:
    config = Config(retention={"gc_grace_seconds": 120})
    repo = ckptrepo.init(tmp_path / "r", config=config)
    repo.commit({"x": np.arange(10)})
    young = repo.store.put("chunk", b"in flight" * 100).id
    report = repo.gc()
    assert report.grace_seconds == 120 and report.young_objects == 1 and report.freed_objects == 0
    assert repo.store.has(young)
    assert repo.gc(grace_seconds=0).freed == (young,)
    with pytest.raises(ValueError, match="grace_seconds"):
        repo.gc(grace_seconds=-1)


def test_keep_last_keeps_newest_and_tips(trained: ckptrepo.Repository) -> None:
    report = trained.prune(keep_last=2)
    assert _steps(trained) == [60, 70]
    assert [r.step for r in report.removed] == [0, 10, 20, 30, 40, 50]
    assert [r.step for r in report.kept] == [60, 70]


def test_keep_every_and_keep_best_and_their_union(trained: ckptrepo.Repository) -> None:
    dry = trained.prune(keep_every=30, keep_best="loss:min:2", dry_run=True)
    assert _steps(trained) == [0, 10, 20, 30, 40, 50, 60, 70]  # a dry run changes nothing
    # every 30: 0, 30, 60; best two losses: 30 (1.0), 50 (2.0); nan never wins; newest: 70.
    assert sorted(r.step for r in dry.kept) == [0, 30, 50, 60, 70]
    trained.prune(keep_every=30, keep_best=("loss", "min", 2))
    assert _steps(trained) == [0, 30, 50, 60, 70]
    trained.prune(keep_best=KeepBest("loss", "max", 2))
    assert _steps(trained) == [60, 70]  # the two largest losses: 7.0 and 6.0


def test_tags_and_branch_tips_are_kept(trained: ckptrepo.Repository) -> None:
    trained.tag("keep-me", "steps/10")
    trained.branch("exp", "steps/20")
    trained.prune(keep_last=1)
    assert _steps(trained) == [10, 20, 70]
    trained.prune(keep_last=1, keep_tagged=False)
    assert _steps(trained) == [20, 70]
    assert trained.fsck(read_data=True).ok


def test_prune_only_the_branch_asked(trained: ckptrepo.Repository) -> None:
    trained.branch("exp", "latest")
    for step in (100, 110, 120):
        trained.commit(make_state(4, step), step=step, branch="exp")
    trained.prune(keep_last=1, branch="exp")
    assert _steps(trained, "exp") == [120]
    assert len(_steps(trained)) == 8
    trained.prune(keep_last=1)
    assert _steps(trained) == [70] and _steps(trained, "exp") == [120]


def test_prune_rules_are_validated_and_config_defaults_apply(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "r", config=Config(retention={"keep_last": 1}))
    for step in range(3):
        repo.commit({"x": np.arange(3) + step}, step=step)
    with pytest.raises(ValueError, match="keep_last"):
        repo.prune(keep_last=0)
    with pytest.raises(ValueError, match="METRIC"):
        repo.prune(keep_best="loss")
    with pytest.raises(ValueError, match="min or max"):
        repo.prune(keep_best="loss:best:1")
    repo.prune()  # keep_last: 1 from config.yaml
    assert repo.steps() == [2]
    bare = ckptrepo.init(tmp_path / "bare")
    with pytest.raises(ValueError, match="prune needs a rule"):
        bare.prune()


def test_prune_then_gc_reclaims_space_and_everything_kept_is_whole(trained: ckptrepo.Repository) -> None:
    history = [c.id for c in trained.log()]
    pruned_commit = trained.resolve("steps/20").id
    size_before = sum(trained.store.stored_size(o) for o in trained.store.ids())
    trained.prune(keep_last=2)
    report = trained.gc(grace_seconds=0)
    size_after = sum(trained.store.stored_size(o) for o in trained.store.ids())
    assert report.freed_objects > 0 and report.freed_bytes == size_before - size_after
    assert size_after < size_before * 0.6
    assert trained.fsck(read_data=True).ok
    assert [c.id for c in trained.log()] == history  # the history stays complete
    for step in (60, 70):
        assert_same(trained.checkout(step=step).to_dict(), make_state(3, step))
    with pytest.raises(ckptrepo.RevisionError, match="no step 20"):
        trained.checkout(step=20)
    with pytest.raises(ckptrepo.ObjectNotFoundError):
        trained.checkout(pruned_commit)
    # Nothing freed is claimed by the index: committing the pruned state stores it anew.
    again = trained.commit(make_state(3, 20), step=200)
    assert again.stats.new_chunks > 0
    assert_same(trained.checkout(step=200).to_dict(), make_state(3, 20))
    assert trained.fsck(read_data=True).ok


def test_delta_bases_of_pruned_commits_stay(trained: ckptrepo.Repository) -> None:
    tip = trained.checkout("latest")
    deltas = [c.id for e in tip.manifest.entries.values() for c in e.chunks
              if trained.store.header(c.id).base is not None]
    assert deltas, "the weights should be stored as deltas against the parent"
    trained.prune(keep_last=1)
    trained.gc(grace_seconds=0)
    for chunk in deltas:
        assert trained.store.has(ObjectId(trained.store.header(chunk).base))
    assert_same(trained.checkout("latest").to_dict(), make_state(3, 70))
    assert trained.fsck(read_data=True).ok


def test_gc_refuses_when_a_commit_is_unreadable(trained: ckptrepo.Repository) -> None:
    commit = trained.resolve("steps/30").id
    path = Path(trained.location) / object_key(commit)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckptrepo.RepositoryError, match=f"gc refused.*commit {commit}.*corrupt"):
        trained.gc(grace_seconds=0)


def test_gc_waits_for_running_commits(trained: ckptrepo.Repository) -> None:
    root = Path(trained.location)

    def hold_shared_lock(report):  # type: ignore[no-untyped-def]
        repo = ckptrepo.open(root)
        with repo.lock.shared():
            report("holding")
            time.sleep(0.8)
        report("released")

    worker = Worker.start(hold_shared_lock)
    while not worker.lines:
        worker._drain(0.05)
    started = time.monotonic()
    trained.gc(grace_seconds=0)
    waited = time.monotonic() - started
    worker.wait()
    assert waited > 0.4


def test_live_objects_from_chosen_roots(trained: ckptrepo.Repository) -> None:
    tip = trained.resolve("latest")
    only_tip = live_objects(trained, [tip.id])
    everything = live_objects(trained)
    manifest = trained.load_manifest(tip.manifest_id)
    assert tip.manifest_id in only_tip and manifest.chunk_ids() <= only_tip
    assert only_tip < everything
    commits = {c.id for c in trained.log()}
    assert commits <= only_tip  # every ancestor's document, for a complete history
    older = trained.resolve("steps/0")
    assert older.manifest_id not in only_tip  # ... but not their data
    assert mark(trained).complete


def test_cli_prune_and_gc(trained: ckptrepo.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    root = trained.location
    assert main(["-C", root, "prune", "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove main/steps/0" in out and "would remove 6 steps, kept 2" in out
    assert main(["-C", root, "prune", "--keep-best", "loss:min:1", "--keep-last", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(r["step"] for r in doc["kept"]) == [30, 70]
    assert main(["-C", root, "gc", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["freed_objects"] == 0 and dry["young_objects"] > 0  # all younger than 900 s
    assert main(["-C", root, "gc", "--grace", "0"]) == 0
    assert f"freed {dry['young_objects']} objects" in capsys.readouterr().out
    assert main(["-C", root, "prune", "--keep-best", "loss:low:1"]) == 1
    assert "min or max" in capsys.readouterr().err
    assert main(["-C", root, "fsck", "--read-data"]) == 0
