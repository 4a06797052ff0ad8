"""push, fetch, pull and clone over memory://, file:// and a real S3 server (moto through s3fs):
round trips, only-missing transfers, two pushers, interrupted and damaged transfers, a remote
serving wrong bytes, shallow and single-revision clones, remote bookkeeping and the CLI."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remote_fixtures import (
    SMALL_CHUNKS,
    CountingBackend,
    FaultyBackend,
    GatedBackend,
    make_history,
    same_state,
    training_state,
)
from s3_server import S3Server

import ckptrepo
from ckptrepo.backends.retrying import RetryingBackend
from ckptrepo.cli import main
from ckptrepo.errors import BackendError, RemoteError, RepositoryError
from ckptrepo.ids import ObjectId
from ckptrepo.refs import RefStore, branch_ref
from ckptrepo.remote import open_backend
from ckptrepo.store import OBJECTS_PREFIX, object_key
from ckptrepo.sync import Endpoint, fetch_objects, pull_from, push_to, tracking_refs


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Remote repositories keep their index and read cache under $XDG_CACHE_HOME.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _uri(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return f"memory://remote-{uuid.uuid4().hex}"
    if kind == "file":
        return f"file://{tmp_path / 'remote'}"
    return f"s3://{request.getfixturevalue('s3').new_bucket()}/team/repo"


@pytest.fixture(params=["memory", "file", "s3"])
def remote_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _uri(request.param, tmp_path, request)


@pytest.fixture(params=["memory", "s3"])
def object_store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _uri(request.param, tmp_path, request)


def _repo(path: Path) -> ckptrepo.Repository:
    return ckptrepo.init(path, config=SMALL_CHUNKS)


def _remote_object_count(uri: str) -> int:
    backend = open_backend(uri)
    try:
        return len(list(backend.list(OBJECTS_PREFIX)))
    finally:
        backend.close()


def _remote_refs(uri: str) -> dict[str, ObjectId]:
    backend = open_backend(uri)
    try:
        return RefStore(backend).branches()
    finally:
        backend.close()


def _every_object_verifies(repo: ckptrepo.Repository) -> int:
    count = 0
    for object_id in repo.store.ids():
        repo.store.get(object_id)
        count += 1
    return count


# --- round trips ---------------------------------------------------------------------------


def test_push_then_clone_round_trip(tmp_path: Path, remote_uri: str) -> None:
    repo = _repo(tmp_path / "a")
    make_history(repo, range(3))
    repo.tag("best", "steps/1")
    repo.add_remote("origin", remote_uri)

    report = repo.push()
    assert report.objects_sent == len(list(repo.store.ids())) and report.objects_present == 0
    assert {str(u.ref) for u in report.refs_updated} == {
        "branch main", "tag best", "main/steps/0", "main/steps/1", "main/steps/2"}
    again = repo.push()
    assert again.up_to_date and again.objects_sent == 0 and again.bytes_sent == 0

    clone = ckptrepo.clone(remote_uri, tmp_path / "b")
    assert clone.branches() == repo.branches() and clone.tags() == repo.tags()
    assert clone.steps() == [0, 1, 2] and clone.current_branch == "main"
    for step in range(3):
        assert same_state(clone.checkout(step=step).to_dict(), training_state(step))
    assert _every_object_verifies(clone) == len(list(repo.store.ids()))
    assert clone.config.remotes["origin"].uri == remote_uri
    assert tracking_refs(clone, "origin") == {ref: c for ref, c in tracking_refs(repo, "origin").items()}


def test_push_sends_only_what_the_remote_lacks(tmp_path: Path, object_store_uri: str) -> None:
    repo = _repo(tmp_path / "a")
    make_history(repo, range(2))
    repo.add_remote("origin", object_store_uri)
    repo.push()
    before = _remote_object_count(object_store_uri)

    commit = repo.commit(training_state(2), step=2)
    report = repo.push()
    # The new chunks, the manifest and the commit: nothing the remote had.
    assert report.objects_sent == commit.stats.new_chunks + 2
    assert report.bytes_sent == commit.stats.stored_bytes + repo.store.stored_size(commit.id)
    assert _remote_object_count(object_store_uri) == before + report.objects_sent


def test_pull_fast_forwards_and_a_diverged_branch_moves_nothing(tmp_path: Path, remote_uri: str) -> None:
    a = _repo(tmp_path / "a")
    make_history(a, range(2))
    a.add_remote("origin", remote_uri)
    a.push()
    b = ckptrepo.clone(remote_uri, tmp_path / "b")

    a.commit(training_state(2), step=2, tags=["v2"])
    a.push()
    report = b.pull()
    assert b.steps() == [0, 1, 2] and b.tags() == a.tags() and b.branches() == a.branches()
    assert {str(u.ref) for u in report.refs_updated} == {"branch main", "main/steps/2", "tag v2"}
    assert report.fetch.objects_received > 0
    assert not b.pull().refs_updated

    theirs = a.commit(training_state(3), step=3)
    a.push()
    mine = b.commit(training_state(30), step=30)
    with pytest.raises(RemoteError, match="diverged"):
        b.pull()
    assert b.refs.get(branch_ref("main")) == mine.id and b.steps() == [0, 1, 2, 30]
    assert b.store.has(theirs.id)  # fetched objects are kept
    with pytest.raises(RemoteError, match="pull first"):
        b.push()
    assert _remote_refs(remote_uri)["main"] == theirs.id


def test_fetch_moves_no_local_ref_and_records_the_remote(tmp_path: Path) -> None:
    uri = f"memory://remote-{uuid.uuid4().hex}"
    a = _repo(tmp_path / "a")
    make_history(a, range(2))
    a.add_remote("origin", uri)
    a.push()
    b = _repo(tmp_path / "b")
    b.add_remote("origin", uri)
    report = b.fetch()
    assert b.branches() == {} and report.objects_received == len(list(a.store.ids()))
    assert {str(u.ref) for u in report.refs} == {"branch main", "main/steps/0", "main/steps/1"}
    doc = json.loads((tmp_path / "b" / "remotes" / "origin.json").read_text())
    assert doc["uri"] == uri and doc["refs"]["refs/branches/main"] == a.branches()["main"]
    assert not b.fetch().objects_received


# --- two pushers -------------------------------------------------------------------------


def _two_clones(tmp_path: Path, uri: str) -> tuple[ckptrepo.Repository, ckptrepo.Repository]:
    origin = _repo(tmp_path / "origin")
    make_history(origin, range(1))
    origin.add_remote("origin", uri)
    origin.push()
    a = ckptrepo.clone(uri, tmp_path / "a")
    b = ckptrepo.clone(uri, tmp_path / "b")
    a.commit(training_state(1), step=1, message="a")
    b.commit(training_state(100), step=1, message="b")
    return a, b


def _race(pushes: dict[str, Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            outcome[name] = pushes[name]()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in pushes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcome


def test_two_pushers_at_the_same_instant_one_wins(tmp_path: Path) -> None:
    """memory:// writes conditionally under an exact lock: both pushers pass every check,
    upload everything and reach the branch's compare-and-swap together; one wins."""
    uri = f"memory://remote-{uuid.uuid4().hex}"
    a, b = _two_clones(tmp_path, uri)
    barrier = threading.Barrier(2, timeout=30)
    endpoints = {name: Endpoint("origin", uri, GatedBackend(open_backend(uri), lambda key: barrier.wait()))
                 for name in "ab"}
    outcome = _race({"a": lambda: push_to(a, endpoints["a"]), "b": lambda: push_to(b, endpoints["b"])})
    winners = [n for n, r in outcome.items() if not isinstance(r, Exception)]
    losers = [n for n, r in outcome.items() if isinstance(r, Exception)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(outcome[losers[0]], RemoteError) and "pull first" in str(outcome[losers[0]])
    winner, loser = (a, b) if winners == ["a"] else (b, a)
    assert _remote_refs(uri)["main"] == winner.branches()["main"]
    assert loser.steps() == [0, 1] and loser.store.has(loser.branches()["main"])  # nothing lost
    clone = ckptrepo.clone(uri, tmp_path / "check")
    assert clone.log()[0].message == winner.log()[0].message


def test_second_pusher_on_s3_is_refused_by_the_store(tmp_path: Path, s3: S3Server) -> None:
    """On S3 the loser reaches its conditional write only after the winner's landed: its
    compare-and-swap sees the ref moved and the store refuses the stale write."""
    uri = f"s3://{s3.new_bucket()}/repo"
    a, b = _two_clones(tmp_path, uri)
    both_planned = threading.Barrier(2, timeout=30)
    a_done = threading.Event()

    def gate_a(key: str) -> None:
        both_planned.wait()

    def gate_b(key: str) -> None:
        both_planned.wait()
        assert a_done.wait(timeout=30)

    def push_a() -> Any:
        try:
            return push_to(a, Endpoint("origin", uri, GatedBackend(open_backend(uri), gate_a)))
        finally:
            a_done.set()

    outcome = _race({"a": push_a, "b": lambda: push_to(b, Endpoint("origin", uri, GatedBackend(open_backend(uri), gate_b)))})
    assert not isinstance(outcome["a"], Exception), outcome["a"]
    assert isinstance(outcome["b"], RemoteError) and "remote moved, pull first" in str(outcome["b"])
    assert _remote_refs(uri)["main"] == a.branches()["main"]


# --- interrupted and damaged transfers ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["fail", "truncate"])
def test_interrupted_push_leaves_the_remote_consistent_and_resumes(
    tmp_path: Path, object_store_uri: str, mode: str
) -> None:
    repo = _repo(tmp_path / "a")
    make_history(repo, range(1))
    repo.add_remote("origin", object_store_uri)
    repo.push()
    refs_before = _remote_refs(object_store_uri)
    count_before = _remote_object_count(object_store_uri)
    make_history(repo, range(1, 4))

    faulty = FaultyBackend(open_backend(object_store_uri), fail_at=12, mode=mode)
    with pytest.raises(BackendError, match="injected"):
        push_to(repo, Endpoint("origin", object_store_uri, faulty))
    # No ref moved, and what the refs reach is whole: a clone of the remote is step 0.
    assert _remote_refs(object_store_uri) == refs_before
    partial = ckptrepo.clone(object_store_uri, tmp_path / "partial")
    assert partial.steps() == [0] and same_state(partial.checkout().to_dict(), training_state(0))
    written = _remote_object_count(object_store_uri) - count_before
    assert written == faulty.writes - (1 if mode == "fail" else 0)

    resumed = repo.push()
    # Only what was still missing went, plus the one object cut short (replaced).
    repaired = 1 if mode == "truncate" else 0
    assert resumed.objects_sent == _remote_object_count(object_store_uri) - count_before - written + repaired
    assert resumed.objects_present >= written - repaired
    clone = ckptrepo.clone(object_store_uri, tmp_path / "full")
    assert clone.steps() == [0, 1, 2, 3]
    for step in range(4):
        assert same_state(clone.checkout(step=step).to_dict(), training_state(step))
    _every_object_verifies(clone)


def test_interrupted_fetch_stores_nothing_unverified_and_resumes(tmp_path: Path) -> None:
    uri = f"memory://remote-{uuid.uuid4().hex}"
    a = _repo(tmp_path / "a")
    make_history(a, range(3))
    a.add_remote("origin", uri)
    a.push()
    b = _repo(tmp_path / "b")
    faulty = FaultyBackend(open_backend(uri), fail_at=20, mode="read")
    with pytest.raises(BackendError, match="injected"):
        pull_from(b, Endpoint("origin", uri, faulty))
    assert b.branches() == {} and b.steps() == []
    kept = set(b.store.ids())
    assert kept and not any(b.store.header(o).kind == "commit" for o in kept)  # commits come last
    _every_object_verifies(b)

    counting = CountingBackend(open_backend(uri))
    report = pull_from(b, Endpoint("origin", uri, counting))
    assert b.steps() == [0, 1, 2] and same_state(b.checkout().to_dict(), training_state(2))
    # Only what was still missing was downloaded again (and the small documents above it).
    assert report.fetch.objects_received == len(list(a.store.ids())) - len(kept)
    assert counting.counts["read"] < len(list(a.store.ids()))


def test_transient_write_failures_are_retried(tmp_path: Path) -> None:
    uri = f"memory://remote-{uuid.uuid4().hex}"
    repo = _repo(tmp_path / "a")
    make_history(repo, range(2))
    flaky = RetryingBackend(FaultyBackend(open_backend(uri), fail_at=5, mode="transient"), sleep=lambda s: None)
    report = push_to(repo, Endpoint("origin", uri, flaky))
    assert flaky.retries == 1 and report.objects_sent == len(list(repo.store.ids()))
    assert ckptrepo.clone(uri, tmp_path / "b").steps() == [0, 1]


def test_remote_serving_wrong_bytes_is_reported_and_nothing_is_stored(tmp_path: Path, object_store_uri: str) -> None:
    a = _repo(tmp_path / "a")
    commits = make_history(a, range(2))
    a.add_remote("origin", object_store_uri)
    a.push()
    victim = sorted(a.load_manifest(commits[1].manifest_id).chunk_ids())[0]
    backend = open_backend(object_store_uri)
    blob = bytearray(backend.read(object_key(victim)))
    blob[-10] ^= 0x40  # one flipped bit near the end of the payload
    backend.write(object_key(victim), bytes(blob))
    backend.close()

    b = _repo(tmp_path / "b")
    b.add_remote("origin", object_store_uri)
    with pytest.raises(RemoteError) as info:
        b.fetch()
    assert victim.hex in str(info.value) and object_store_uri in str(info.value)
    assert not b.store.has(victim) and b.branches() == {}
    assert not b.store.has(commits[1].id)  # nothing above the bad chunk was stored either
    with pytest.raises(RemoteError, match=victim.hex):
        ckptrepo.clone(object_store_uri, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_fetch_objects_restores_lost_objects(tmp_path: Path) -> None:
    uri = f"memory://remote-{uuid.uuid4().hex}"
    a = _repo(tmp_path / "a")
    commits = make_history(a, range(2))
    a.add_remote("origin", uri)
    a.push()
    b = ckptrepo.clone(uri, tmp_path / "b")
    lost = sorted(b.load_manifest(commits[1].manifest_id).chunk_ids())[:3]
    for object_id in lost:
        b.store.delete(object_id)
    assert fetch_objects(b, lost) == set(lost)
    assert same_state(b.checkout(step=1).to_dict(), training_state(1))


# --- shallow and single-revision clones ---------------------------------------------------------


def test_shallow_and_single_revision_clones_fetch_only_what_they_need(tmp_path: Path) -> None:
    uri = f"memory://remote-{uuid.uuid4().hex}"
    a = _repo(tmp_path / "a")
    commits = make_history(a, range(4))
    a.tag("first", "steps/1")
    a.add_remote("origin", uri)
    a.push()

    shallow = ckptrepo.clone(uri, tmp_path / "shallow", depth=1)
    tip = commits[3]
    assert shallow.steps() == [3] and shallow.tags() == {}
    assert [c.step for c in shallow.log()] == [3] and shallow.shallow_commits() == {tip.id}
    assert same_state(shallow.checkout().to_dict(), training_state(3))
    # The tip's chunks are deltas against step 2's: their bases come along, nothing else.
    manifest = a.load_manifest(tip.manifest_id)
    bases = {ObjectId(a.store.header(c).base) for c in manifest.chunk_ids() if a.store.header(c).base}
    assert bases, "the history is expected to hold delta-coded chunks"
    assert _closure_size(a, manifest, tip) <= len(list(shallow.store.ids())) < len(list(a.store.ids()))
    _every_object_verifies(shallow)

    one = ckptrepo.clone(uri, tmp_path / "one", rev="first")
    assert one.branches() == {"main": commits[1].id} and one.steps() == [1] and one.tags() == {"first": commits[1].id}
    assert one.current_branch == "main" and len(one.log()) == 1

    two = ckptrepo.clone(uri, tmp_path / "two", rev="steps/2", depth=2)
    assert two.steps() == [1, 2] and [c.step for c in two.log()] == [2, 1]

    a.commit(training_state(4), step=4)
    a.push()
    shallow.pull()
    assert shallow.steps() == [3, 4] and [c.step for c in shallow.log()] == [4, 3]


def _closure_size(repo: ckptrepo.Repository, manifest: Any, commit: Any) -> int:
    seen = {commit.id, commit.manifest_id}
    pending = list(manifest.chunk_ids())
    while pending:
        object_id = pending.pop()
        if object_id in seen:
            continue
        seen.add(object_id)
        base = repo.store.header(object_id).base
        if base:
            pending.append(ObjectId(base))
    return len(seen)


def test_clone_refuses_a_non_empty_destination_and_a_missing_repository(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    uri = f"memory://remote-{uuid.uuid4().hex}"
    with pytest.raises(RepositoryError, match="no ckptrepo repository"):
        ckptrepo.clone(uri, tmp_path / "new")
    a = _repo(tmp_path / "a")
    make_history(a, range(1))
    a.add_remote("origin", uri)
    a.push()
    with pytest.raises(RepositoryError, match="not an empty directory"):
        ckptrepo.clone(uri, tmp_path / "busy")
    assert (tmp_path / "busy" / "file").read_text() == "x"


# --- remotes in config.yaml ---------------------------------------------------------------------


def test_remote_options_are_stored_but_credentials_never(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "a")
    repo.add_remote("origin", "s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000", transfers=8)
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert config["remotes"]["origin"] == {"uri": "s3://bucket/prefix",
                                           "options": {"endpoint_url": "http://127.0.0.1:9000", "transfers": 8}}
    for bad in ({"key": "AKIA"}, {"secret": "x"}, {"client_kwargs": {"aws_secret_access_key": "x"}},
                {"token": "x"}, {"endpoint_url": "http://user:pw@host:9000"}):
        with pytest.raises(RepositoryError, match="credential|user or password"):
            repo.add_remote("other", "s3://bucket/prefix", **bad)
    with pytest.raises(RepositoryError, match="user or password"):
        repo.add_remote("other", "s3://AKIA:secret@bucket/prefix")
    with pytest.raises(RepositoryError, match="exists already"):
        repo.add_remote("origin", "s3://bucket/other")
    with pytest.raises(RepositoryError, match="unknown protocol"):
        repo.add_remote("other", "nosuch://bucket")
    with pytest.raises(RepositoryError, match="transfers"):
        repo.add_remote("other", "s3://bucket/x", transfers=0)
    assert repo.remotes() == {"origin": "s3://bucket/prefix"}
    assert "secret" not in (tmp_path / "a" / "config.yaml").read_text()


def test_remote_repository_config_names_no_remotes(tmp_path: Path, s3: S3Server) -> None:
    uri = f"s3://{s3.new_bucket()}/repo"
    repo = _repo(tmp_path / "a")
    make_history(repo, range(1))
    repo.add_remote("origin", uri, endpoint_url=s3.endpoint_url)
    repo.push()
    remote_config = yaml.safe_load(s3.filesystem().cat_file(f"{uri[5:]}/config.yaml"))
    assert "remotes" not in remote_config
    assert remote_config["chunking"]["tensor_chunk_size"] == SMALL_CHUNKS.chunking.tensor_chunk_size


def test_no_remote_is_a_clear_error(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "a")
    with pytest.raises(RemoteError, match="no remote"):
        repo.push()
    repo.add_remote("one", "memory://x1")
    repo.add_remote("two", "memory://x2")
    with pytest.raises(RemoteError, match="which remote"):
        repo.push()
    with pytest.raises(RemoteError, match="no remote named 'three'"):
        repo.fetch("three")


# --- command line ----------------------------------------------------------------------------------


def test_cli_remote_push_clone_pull(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"file://{tmp_path / 'remote'}"
    a = _repo(tmp_path / "a")
    make_history(a, range(2))
    a.close()
    assert main(["-C", str(tmp_path / "a"), "remote", "add", "origin", uri, "-o", "transfers=4"]) == 0
    assert main(["-C", str(tmp_path / "a"), "remote", "-v"]) == 0
    out = capsys.readouterr().out
    assert f"origin\t{uri}" in out and "transfers = 4" in out
    assert main(["-C", str(tmp_path / "a"), "push"]) == 0
    assert "pushed to remote origin" in capsys.readouterr().out
    assert main(["-C", str(tmp_path / "a"), "push", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objects_sent"] == 0
    assert main(["clone", uri, str(tmp_path / "b"), "--depth", "1"]) == 0
    assert "(shallow)" in capsys.readouterr().out

    a = ckptrepo.open(tmp_path / "a")
    a.commit(training_state(2), step=2)
    a.close()
    assert main(["-C", str(tmp_path / "a"), "push", "origin"]) == 0
    capsys.readouterr()
    assert main(["-C", str(tmp_path / "b"), "pull", "--json"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert {u["ref"] for u in pulled["refs_updated"]} == {"refs/branches/main", "refs/steps/main/2"}
    assert main(["-C", str(tmp_path / "b"), "fetch"]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert main(["-C", str(tmp_path / "b"), "push", "nowhere"]) == 1
    assert "no remote named 'nowhere'" in capsys.readouterr().err
    assert main(["-C", str(tmp_path / "a"), "remote", "add", "x", "s3://b/p", "-o", "secret=abc"]) == 1
    assert "credential" in capsys.readouterr().err


def test_push_refuses_a_location_holding_something_else(tmp_path: Path) -> None:
    other = tmp_path / "not-a-repo"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    repo = _repo(tmp_path / "a")
    make_history(repo, range(1))
    repo.add_remote("origin", str(other))
    with pytest.raises(RemoteError, match="not a repository and not empty"):
        repo.push()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["main", "dev"]), st.booleans()), min_size=1, max_size=6),
       push_after=st.sets(st.integers(0, 5)))
def test_any_history_pushed_in_any_pieces_clones_whole(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bool]], push_after: set[int]
) -> None:
    import numpy as np

    root = tmp_path_factory.mktemp("history")
    uri = f"memory://remote-{uuid.uuid4().hex}"
    repo = _repo(root / "a")
    repo.add_remote("origin", uri)
    states = {}
    for i, (branch, tagged) in enumerate(ops):
        state = {"w": np.random.default_rng(i).standard_normal(3000).astype(np.float32), "i": i}
        commit = repo.commit(state, step=i, branch=branch, tags=[f"t{i}"] if tagged else [])
        states[commit.id] = state
        if i in push_after:
            repo.push()
    repo.push()
    clone = ckptrepo.clone(uri, root / "b")
    assert clone.branches() == repo.branches() and clone.tags() == repo.tags()
    assert clone.refs.all_steps() == repo.refs.all_steps()
    for commit_id, state in states.items():
        got = clone.checkout(commit_id).to_dict()
        assert got["i"] == state["i"] and np.array_equal(got["w"], state["w"])
    assert set(clone.store.ids()) == set(repo.store.ids())
    _every_object_verifies(clone)
    repo.close()
    clone.close()


def test_a_failed_transfer_raises_only_once_running_work_is_done() -> None:
    # Fetch workers write into a spill directory the caller removes when the error reaches
    # it: a worker still running then made that removal fail ("Directory not empty").
    from concurrent.futures import ThreadPoolExecutor

    from ckptrepo.sync import _run_all

    started = threading.Event()
    finished = threading.Event()

    def work(object_id: ObjectId) -> None:
        if object_id == ObjectId("00" * 32):
            started.wait(10)
            raise BackendError("injected failure")
        started.set()
        threading.Event().wait(0.3)
        finished.set()

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(BackendError, match="injected"):
            _run_all(pool, work, [ObjectId("00" * 32), ObjectId("11" * 32)])
        assert finished.is_set()  # checked before the pool's own shutdown waits for it
