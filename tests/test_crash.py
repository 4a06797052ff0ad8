"""SIGKILL at random instants: a worker process commits, prunes, collects garbage or pushes
in a loop and is killed without warning; after every kill the repository (and the remote) is
consistent, ``fsck`` is clean, every commit the worker reported done is in the history, and
every reported commit whose data is retained checks out bit-exact.

``CKPT_CRASH_ITERATIONS`` sets the kills per test (default 80; benchmarks use thousands), and
``CKPT_CRASH_SEED`` the random seed (printed, to replay a failure).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_fixtures import SMALL_CHUNKS, Worker, assert_same, committed, env_int, make_state

import ckptrepo
from ckptrepo.refs import step_ref

KILLS = env_int("CKPT_CRASH_ITERATIONS", 80)
# A fresh repository every so many kills keeps each fsck small (history grows with commits).
KILLS_PER_REPOSITORY = 10
SEED = env_int("CKPT_CRASH_SEED", random.SystemRandom().randrange(1 << 30))
# The longest a worker runs before it is killed: several operations' worth.
MAX_DELAY_S = 0.25


def _phase(lines: list[str]) -> str:
    """What the worker was doing when it died: the last operation it began and did not end."""
    for line in reversed(lines):
        word, _, rest = line.partition(" ")
        if word == "begin":
            return rest
        if word in ("end", "done"):
            return "between operations"
    return "starting"


def _next_step(repo: ckptrepo.Repository, branch: str) -> int:
    latest = repo.latest_step(branch)
    return 0 if latest is None else latest + 1


def committing(root: Path, seed: int, branch: str = "main") -> Callable[[Callable[[str], None]], None]:
    def body(report: Callable[[str], None]) -> None:
        repo = ckptrepo.open(root)
        step = _next_step(repo, branch)
        while True:
            report("begin commit")
            commit = repo.commit(make_state(seed, step), step=step, branch=branch, metrics={"loss": 1 / (step + 1)})
            report(f"done {branch} {step} {commit.id}")
            step += 1

    return body


def churning(root: Path, seed: int) -> Callable[[Callable[[str], None]], None]:
    """Commit four steps, prune to the last one, collect garbage; again and again."""

    def body(report: Callable[[str], None]) -> None:
        repo = ckptrepo.open(root)
        step = _next_step(repo, "main")
        while True:
            for _ in range(4):
                report("begin commit")
                commit = repo.commit(make_state(seed, step), step=step)
                report(f"done main {step} {commit.id}")
                step += 1
            report("begin prune")
            repo.prune(keep_last=1)
            report("end prune")
            report("begin gc")
            repo.gc(grace_seconds=0)
            report("end gc")

    return body


def remote_of(root: Path) -> Path:
    return root.with_name(f"{root.name}-remote")


def pushing(root: Path, seed: int) -> Callable[[Callable[[str], None]], None]:
    def body(report: Callable[[str], None]) -> None:
        remote = remote_of(root)
        repo = ckptrepo.open(root)
        step = _next_step(repo, "main")
        while True:
            report("begin commit")
            commit = repo.commit(make_state(seed, step), step=step)
            report(f"done main {step} {commit.id}")
            step += 1
            report("begin push")
            repo.push(str(remote))
            report(f"pushed {commit.id}")

    return body


class Ledger:
    """What the workers reported, checked against the repository after every kill."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.done: dict[str, tuple[str, int]] = {}  # commit id -> (branch, step)
        self.verified: set[str] = set()
        self.pushed: set[str] = set()  # verified bit-exact on the remote
        self.phases: Counter[str] = Counter()

    def record(self, worker: Worker) -> None:
        self.phases[_phase(worker.lines)] += 1
        for branch, step, commit_id in committed(worker.lines):
            self.done[commit_id] = (branch, step)

    def check(self, repo: ckptrepo.Repository, *, bit_exact_all: bool = False) -> None:
        report = repo.fsck()
        assert report.ok, [str(p) for p in report.problems]
        history: set[str] = set()
        for branch in repo.branches():
            history |= {c.id for c in repo.log(branch)}
        lost = set(self.done) - history
        assert not lost, f"commits reported done but not in the history: {sorted(lost)[:3]}"
        for commit_id, (branch, step) in self.done.items():
            if commit_id in self.verified and not bit_exact_all:
                continue
            if repo.refs.get(step_ref(branch, step)) != commit_id:
                continue  # pruned: its data is gone by design, its document stays in the log
            assert_same(repo.checkout(commit_id).to_dict(), make_state(self.seed, step))
            self.verified.add(commit_id)


def _kill_loop(tmp_path: Path, make_body: Callable[[Path, int], Callable], label: str,
               remote: bool = False, targets: dict[str, float] | None = None, kills: int = KILLS) -> Ledger:
    """``kills`` workers killed at random: half at a random instant, half (when ``targets``
    are given) up to ``targets[operation]`` seconds after they begin one of those operations."""
    rng = random.Random(SEED)
    ledger = Ledger(SEED % 1000)
    root = tmp_path / "repo-0"
    for kill in range(kills):
        if kill % KILLS_PER_REPOSITORY == 0:
            root = tmp_path / f"repo-{kill}"
            ckptrepo.init(root, config=SMALL_CHUNKS).close()
            if remote:
                ckptrepo.init(remote_of(root)).close()
            ledger.done.clear()
        worker = Worker.start(make_body(root, ledger.seed))
        if targets and kill % 2:
            operation = rng.choice(sorted(targets))
            worker.kill_after(rng.uniform(0, targets[operation]), once=f"begin {operation}")
        else:
            worker.kill_after(rng.uniform(0, MAX_DELAY_S))
        ledger.record(worker)
        with ckptrepo.open(root) as repo:
            ledger.check(repo)
        if remote:
            _check_remote(root, ledger)
    with ckptrepo.open(root) as repo:
        ledger.check(repo, bit_exact_all=True)
        assert repo.fsck(read_data=True).ok
        repo.gc(grace_seconds=0)  # what the killed workers left behind goes
        assert repo.fsck(read_data=True).ok
        _age_temp_files(repo)
        repaired = repo.fsck(repair=True)
        assert repaired.ok and repaired.temp_files == () and repaired.stale_locks == ()
    print(f"\nRELIABILITY {label}: {kills} kills survived (seed {SEED}); killed during {dict(ledger.phases)}; "
          f"{len(ledger.verified)} reported commits verified bit-exact")
    return ledger


def _age_temp_files(repo: ckptrepo.Repository) -> None:
    """Let time pass for the leftovers of killed writes (repair spares young ones)."""
    then = time.time() - 3600
    for path in repo.backend.temp_files():
        os.utime(path, (then, then))


def test_kills_during_commit(tmp_path: Path) -> None:
    ledger = _kill_loop(tmp_path, lambda root, seed: committing(root, seed), "commit")
    assert ledger.phases["commit"] >= KILLS // 3
    assert ledger.verified


def test_kills_during_prune_and_gc(tmp_path: Path) -> None:
    ledger = _kill_loop(tmp_path, lambda root, seed: churning(root, seed), "commit/prune/gc",
                        targets={"prune": 0.003, "gc": 0.03})
    assert ledger.phases["gc"] >= KILLS // 8 and ledger.phases["prune"] >= KILLS // 16


def _check_remote(root: Path, ledger: Ledger) -> None:
    """The remote is consistent, and what it holds is whole and bit-exact."""
    with ckptrepo.open(remote_of(root)) as pushed:
        report = pushed.fsck()
        assert report.ok, [str(p) for p in report.problems]
        for commit in pushed.log():
            if pushed.refs.get(step_ref("main", commit.step)) == commit.id and commit.id not in ledger.pushed:
                assert_same(pushed.checkout(commit.id).to_dict(), make_state(ledger.seed, commit.step))
                ledger.pushed.add(commit.id)


def test_kills_during_push(tmp_path: Path) -> None:
    ledger = _kill_loop(tmp_path, pushing, "commit/push", remote=True, targets={"push": 0.03},
                        kills=max(10, KILLS // 2))
    assert ledger.phases["push"] >= KILLS // 8 and ledger.pushed


@pytest.mark.parametrize("phase", ["commit", "gc"])
def test_a_killed_lock_holder_never_blocks_the_next(tmp_path: Path, phase: str) -> None:
    """Killed while holding the shared (commit) or exclusive (gc) lock: the next process
    goes ahead at once, without waiting for a timeout."""
    root = tmp_path / "repo"
    with ckptrepo.init(root, config=SMALL_CHUNKS) as repo:
        for step in range(3):
            repo.commit(make_state(1, step), step=step)
        repo.prune(keep_last=1)

    def hold(report: Callable[[str], None]) -> None:
        repo = ckptrepo.open(root)
        lock = repo.lock.shared() if phase == "commit" else repo.lock.exclusive()
        with lock:
            report("holding")
            os.kill(os.getpid(), 9)

    worker = Worker.start(hold)
    worker.wait()
    assert worker.lines == ["holding"]
    assert list((root / "locks").iterdir())  # the dead holder's lock file is still there
    with ckptrepo.open(root) as repo:
        repo.lock.timeout = 2.0  # a stale lock must not make us wait anywhere near this
        repo.gc(grace_seconds=0)
        repo.commit(make_state(1, 9), step=9)
        assert repo.fsck(read_data=True).ok
