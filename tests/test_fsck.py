"""fsck: a clean repository passes; each kind of damage is reported precisely (which object,
which commits, refs and keys); repair restores what can be restored."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_fixtures import SMALL_CHUNKS, Worker, assert_same, make_state

import ckptrepo
from ckptrepo.cli import main
from ckptrepo.codec import encode_object
from ckptrepo.ids import ObjectId
from ckptrepo.refs import branch_ref, step_ref
from ckptrepo.store import object_key


@pytest.fixture
def history(tmp_path: Path) -> ckptrepo.Repository:
    repo = ckptrepo.init(tmp_path / "repo", config=SMALL_CHUNKS)
    for step in range(4):
        repo.commit(make_state(7, step), step=step, metrics={"loss": 4.0 - step})
    repo.tag("best", "steps/3")
    yield repo
    repo.close()


def _file(repo: ckptrepo.Repository, object_id: str) -> Path:
    return Path(repo.location) / object_key(ObjectId(object_id))


def _chunk_of(repo: ckptrepo.Repository, rev: str, path: str, index: int = 0) -> ObjectId:
    snap = repo.checkout(rev)
    return snap.manifest.entries[path].chunks[index].id


def _kinds(report) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(p.kind for p in report.problems)


def test_clean_repository_passes_with_read_data(history: ckptrepo.Repository, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (tree / "link").symlink_to("sub/data.bin")
    history.commit(tree, branch="files")
    report = history.fsck(read_data=True)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.checked.commits == 5 and report.checked.retained_commits == 5
    assert report.checked.verified_objects == report.checked.chunks > 10
    assert report.checked.verified_bytes > 4 * (1 << 18)


def test_missing_chunk_names_object_commits_refs_and_keys(history: ckptrepo.Repository) -> None:
    chunk = _chunk_of(history, "steps/3", "optimizer/state/0/exp_avg")
    _file(history, chunk).unlink()
    report = history.fsck()
    assert not report.ok
    (problem,) = [p for p in report.problems if p.kind == "missing-object"]
    assert problem.object_id == chunk
    assert problem.paths == ("optimizer/state/0/exp_avg",)
    tip = history.resolve("steps/3").id
    assert problem.commits == (tip,)
    assert set(problem.refs) == {"main/steps/3", "branch main", "tag best"}
    assert chunk in str(problem) and "optimizer/state/0/exp_avg" in str(problem)


def test_corrupt_chunk_is_found_by_read_data_with_its_keys(history: ckptrepo.Repository) -> None:
    chunk = _chunk_of(history, "steps/1", "optimizer/state/0/exp_avg")
    path = _file(history, chunk)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(bytes(data))
    assert history.fsck().ok  # the header still parses: only reading the data can tell
    report = history.fsck(read_data=True)
    (problem,) = report.problems
    assert problem.kind == "corrupt-object" and problem.object_id == chunk
    assert problem.paths == ("optimizer/state/0/exp_avg",)
    assert problem.commits == (history.resolve("steps/1").id,)


def _delta_pair(repo: ckptrepo.Repository) -> tuple[ObjectId, ObjectId]:
    """A chunk stored as a delta, and its base."""
    for object_id in repo.store.ids():
        header = repo.store.header(object_id)
        if header.base is not None:
            return object_id, ObjectId(header.base)
    raise AssertionError("no delta-coded chunk in the repository")


def test_damaged_delta_base_names_every_key_built_on_it(history: ckptrepo.Repository) -> None:
    delta, base = _delta_pair(history)
    users = {
        c.id for c in history.log() if base in history.load_manifest(c.manifest_id).chunk_ids()
        or delta in history.load_manifest(c.manifest_id).chunk_ids()
    }
    _file(history, base).unlink()
    report = history.fsck()
    assert _kinds(report) == ["missing-object", "stale-index"]  # deleted behind the index's back
    (problem,) = [p for p in report.problems if p.kind == "missing-object"]
    assert problem.object_id == base
    assert set(problem.commits) == users and len(users) >= 2
    assert "model/w" in problem.paths
    with pytest.raises(ckptrepo.CkptRepoError):
        history.store.get(delta)


def test_pruned_commits_missing_data_is_not_a_problem(history: ckptrepo.Repository) -> None:
    history.prune(keep_last=1)
    gc = history.gc(grace_seconds=0)
    assert gc.freed_objects > 0
    report = history.fsck(read_data=True)
    assert report.ok, report.problems
    assert report.checked.commits == 4 and report.checked.retained_commits == 1
    assert len(history.log()) == 4  # history stays complete


def test_bad_refs_are_reported(history: ckptrepo.Repository) -> None:
    root = Path(history.location)
    (root / "refs" / "tags" / "garbage").write_text("not a commit id\n")
    (root / "refs" / "tags" / "ghost").write_text("ab" * 32 + "\n")
    step0 = history.resolve("steps/0").id
    (root / "refs" / "steps" / "main" / "99").write_text(step0 + "\n")
    (root / "refs" / "steps" / "main" / "x1").write_text(step0 + "\n")
    report = history.fsck()
    by_key = {p.key or p.object_id: p for p in report.problems}
    assert by_key["refs/tags/garbage"].kind == "bad-ref"
    assert by_key["refs/steps/main/x1"].kind == "bad-ref"
    assert by_key["ab" * 32].kind == "missing-object" and by_key["ab" * 32].refs == ("tag ghost",)
    step_problem = by_key["refs/steps/main/99"]
    assert step_problem.kind == "step-ref" and "step 0 of branch main" in step_problem.message
    with pytest.raises(ckptrepo.RepositoryError, match="gc refused"):
        history.gc(grace_seconds=0)


def test_invalid_documents_are_refused_with_the_field(history: ckptrepo.Repository) -> None:
    chunk = _chunk_of(history, "latest", "model/w")
    bad_manifest = history.store.put_document({
        "kind": "manifest", "format": 1, "type": "directory",
        "entries": {"f": {"kind": "file", "size": -5, "chunks": [[chunk, 10]], "executable": False}},
    }).id
    commit = history.load_commit(history.resolve_id("latest"))
    doc = commit.to_document() | {"manifest": bad_manifest.hex, "parents": [], "step": None}
    bad_commit = history.store.put_document(doc).id
    history.refs.update(branch_ref("evil"), bad_commit, None)
    report = history.fsck()
    (problem,) = report.problems
    assert problem.kind == "invalid-document" and problem.object_id == bad_manifest
    assert "entries/f" in problem.message and problem.commits == (bad_commit,)
    assert problem.refs == ("branch evil",)


def test_bad_config_and_head_are_reported(history: ckptrepo.Repository) -> None:
    root = Path(history.location)
    config = (root / "config.yaml").read_text()
    (root / "config.yaml").write_text(re.sub(r"level: -?\d+", "level: 99", config))
    (root / "HEAD").write_text("../../etc\n")
    kinds = {p.kind: p for p in history.fsck().problems}
    assert "compression/level" in kinds["config"].message
    assert kinds["head"].key == "HEAD"


def test_size_mismatch_and_delta_cycle_are_reported(history: ckptrepo.Repository) -> None:
    # Two chunks whose headers name each other as delta base: decoding would never end.
    a, b = ObjectId("aa" * 32), ObjectId("bb" * 32)
    for me, other in ((a, b), (b, a)):
        coding = {"codec": "xor", "base": other.hex, "inner": {"codec": "raw"}}
        history.backend.write(object_key(me), b"".join(encode_object("chunk", b"x" * 8, 8, coding)))
    real = _chunk_of(history, "latest", "model/b")
    manifest = history.store.put_document({
        "kind": "manifest", "format": 1, "type": "directory",
        "entries": {
            "loop": {"kind": "file", "size": 8, "chunks": [[a.hex, 8]], "executable": False},
            "short": {"kind": "file", "size": 4, "chunks": [[real.hex, 4]], "executable": False},
        },
    }).id
    doc = history.load_commit(history.resolve_id("latest")).to_document() | {
        "manifest": manifest.hex, "parents": [], "step": None,
    }
    history.refs.update(branch_ref("crafted"), history.store.put_document(doc).id, None)
    report = history.fsck(read_data=True)
    kinds = {p.kind: p for p in report.problems}
    assert set(kinds) == {"delta-chain", "size-mismatch"}, report.problems
    assert kinds["delta-chain"].object_id == a and kinds["delta-chain"].paths == ("loop",)
    assert kinds["size-mismatch"].object_id == real and kinds["size-mismatch"].paths == ("short",)


def test_stale_index_is_reported_and_rebuilt(history: ckptrepo.Repository) -> None:
    history.prune(keep_last=1)
    unreachable = next(iter(set(history.store.ids()) - ckptrepo.maintenance.live_objects(history)))
    assert history.store.index.get(unreachable) is not None
    _file(history, unreachable).unlink()  # removed behind the index's back
    report = history.fsck()
    (problem,) = report.problems
    assert problem.kind == "stale-index" and problem.object_id == unreachable
    repaired = history.fsck(repair=True)
    assert repaired.ok and any("rebuilt the index" in r for r in repaired.repairs)
    assert history.store.index.get(unreachable) is None


def test_leftovers_are_listed_not_problems_and_repair_removes_them(history: ckptrepo.Repository) -> None:
    root = Path(history.location)
    temp = root / "objects" / "ab" / ".cdef.tmp-0123456789abcdef"
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"half an object")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    fresh = root / "refs" / "tags" / ".x.tmp-fresh"
    fresh.write_bytes(b"a write in flight")

    def take_shared_lock_and_die(report):  # type: ignore[no-untyped-def]
        repo = ckptrepo.open(root)
        held = repo.lock.shared()
        held.__enter__()
        report("locked")
        os._exit(0)  # dies holding it: the file stays, the kernel drops the flock

    Worker.start(take_shared_lock_and_die).wait()
    (stale_lock,) = (root / "locks").glob("shared-*")
    report = history.fsck()
    assert report.ok
    assert report.temp_files == (str(temp),)
    assert report.stale_locks == (str(stale_lock),)
    repaired = history.fsck(repair=True)
    assert repaired.ok and repaired.temp_files == () and repaired.stale_locks == ()
    assert not temp.exists() and not stale_lock.exists()
    assert fresh.exists()  # young: it may belong to a write that is still running
    assert any(str(temp) in r for r in repaired.repairs)
    assert any(str(stale_lock) in r for r in repaired.repairs)


def test_repair_sets_damaged_chunk_aside_and_a_recommit_heals_it(history: ckptrepo.Repository) -> None:
    chunk = _chunk_of(history, "steps/3", "optimizer/state/0/exp_avg")
    path = _file(history, chunk)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = history.fsck(read_data=True, repair=True)
    assert not report.ok
    (problem,) = report.problems
    assert problem.kind == "missing-object" and problem.object_id == chunk
    assert any(f"moved damaged object {chunk}" in r for r in report.repairs)
    assert any("no remote" in r for r in report.repairs)
    (kept,) = (Path(history.location) / "quarantine").iterdir()
    assert kept.read_bytes() == bytes(data)
    # Committing the same content stores a good copy of the chunk: the old commit is whole again.
    history.commit(make_state(7, 3), step=30)
    assert history.fsck(read_data=True).ok
    assert_same(history.checkout("steps/3").to_dict(), make_state(7, 3))


def test_cli_fsck_exit_codes_and_json(history: ckptrepo.Repository, capsys: pytest.CaptureFixture[str]) -> None:
    root = history.location
    assert main(["-C", root, "fsck", "--read-data"]) == 0
    assert "ok" in capsys.readouterr().out
    chunk = _chunk_of(history, "steps/2", "model/b")
    _file(history, chunk).unlink()
    assert main(["-C", root, "fsck", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    (problem,) = [p for p in doc["problems"] if p["kind"] == "missing-object"]
    assert problem["object"] == chunk
    assert problem["paths"] == ["model/b"]
    assert main(["-C", root, "fsck"]) == 1
    out = capsys.readouterr().out
    assert f"problem: missing-object: chunk {chunk} is missing" in out and "keys: model/b" in out


def test_tag_refuses_a_commit_whose_data_was_pruned(history: ckptrepo.Repository) -> None:
    old = history.resolve("steps/0").id
    history.prune(keep_last=1)
    history.gc(grace_seconds=0)
    with pytest.raises(ckptrepo.RevisionError, match="pruned"):
        history.tag("old", old)
    with pytest.raises(ckptrepo.RevisionError, match="pruned"):
        history.branch("old", old)
    # A name that is taken is the first problem, for branches as for tags (found by the
    # stateful test: branch("main", <pruned commit>) said "pruned" instead).
    with pytest.raises(ckptrepo.RefExistsError, match="branch main exists"):
        history.branch("main", old)
    history.tag("kept")
    with pytest.raises(ckptrepo.RefExistsError, match="tag kept exists"):
        history.tag("kept", old)
    assert history.fsck().ok


def test_step_none_commits_keep_their_data(history: ckptrepo.Repository) -> None:
    unstepped = history.commit({"x": np.arange(5)})
    history.commit(make_state(7, 9), step=9)
    history.prune(keep_last=1)
    history.gc(grace_seconds=0)
    assert history.fsck(read_data=True).ok
    assert_same(history.checkout(unstepped.id).to_dict(), {"x": np.arange(5)})
    assert history.refs.get(step_ref("main", 2)) is None
    assert history.refs.get(step_ref("main", 3)) is not None  # tagged "best": kept
    assert_same(history.checkout("best").to_dict(), make_state(7, 3))


def test_repair_fetches_damaged_and_missing_objects_from_a_remote(history: ckptrepo.Repository, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    history.add_remote("origin", str(remote))
    history.push("origin")
    damaged = _chunk_of(history, "steps/3", "optimizer/state/0/exp_avg")
    path = _file(history, damaged)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    lost = _chunk_of(history, "steps/2", "model/b")
    history.store.delete(lost)
    before = history.fsck(read_data=True)
    assert {p.object_id for p in before.problems} == {damaged, lost}
    report = history.fsck(read_data=True, repair=True)
    assert report.ok, [str(p) for p in report.problems]
    assert any(f"fetched {damaged}" in r for r in report.repairs)
    assert any(f"fetched {lost}" in r for r in report.repairs)
    for step in range(4):
        assert_same(history.checkout(f"steps/{step}").to_dict(), make_state(7, step))


def test_a_shallow_clone_is_clean(history: ckptrepo.Repository, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    history.push(str(remote))
    clone = ckptrepo.clone(str(remote), tmp_path / "shallow", depth=1)
    assert len(clone.log()) == 1
    report = clone.fsck(read_data=True)
    assert report.ok, [str(p) for p in report.problems]
    clone.gc(grace_seconds=0)
    assert clone.fsck(read_data=True).ok
    clone.close()


def test_repair_fetches_a_delta_whose_header_names_a_phantom_base(history: ckptrepo.Repository, tmp_path: Path) -> None:
    history.push(str(tmp_path / "remote"))
    history.add_remote("origin", str(tmp_path / "remote"))
    delta, base = _delta_pair(history)
    path = _file(history, delta)
    blob = path.read_bytes()
    position = blob.index(base.hex.encode()) + 5
    damaged = bytearray(blob)
    damaged[position] = ord("0") if blob[position] != ord("0") else ord("1")
    path.write_bytes(bytes(damaged))
    (problem,) = history.fsck().problems
    assert problem.kind == "missing-object" and problem.role == "base" and problem.named_by == delta
    report = history.fsck(read_data=True, repair=True)
    assert report.ok, [str(p) for p in report.problems]
    assert any(f"moved {delta}" in r for r in report.repairs)
    assert history.store.get(delta)
