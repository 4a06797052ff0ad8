"""Several processes at once: committers on one branch and on several, gc running while they
commit, and the lock files under contention (stale ones included). Every commit reported done
stays reachable, no ref update is lost, gc never removes what a finished commit needs, and no
two holders ever share an exclusive lock.

``CKPT_CONCURRENT_COMMITS`` sets the commits per worker (default 8).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from reliability_fixtures import SMALL_CHUNKS, Worker, assert_same, committed, env_int, make_state

import ckptrepo
from ckptrepo.backends.lockfile import LockFile, owner_text
from ckptrepo.locking import RepoLock
from ckptrepo.refs import branch_ref, step_ref

COMMITS = env_int("CKPT_CONCURRENT_COMMITS", 8)
WORKERS = 4


def _committer(root: Path, seed: int, branch: str, first_step: int, count: int) -> Callable:
    def body(report: Callable[[str], None]) -> None:
        repo = ckptrepo.open(root)
        repo.lock.timeout = 120
        for step in range(first_step, first_step + count):
            commit = repo.commit(make_state(seed, step), step=step, branch=branch)
            report(f"done {branch} {step} {commit.id}")

    return body


def _run_all(bodies: list[Callable]) -> list[tuple[str, int, str]]:
    workers = [Worker.start(body) for body in bodies]
    done: list[tuple[str, int, str]] = []
    for worker in workers:
        done += committed(worker.wait(timeout=300))
        assert worker.status == 0
    return done


def _check_all_kept(root: Path, done: list[tuple[str, int, str]], seed: int) -> None:
    with ckptrepo.open(root) as repo:
        assert repo.fsck(read_data=True).ok
        for branch in {b for b, _, _ in done}:
            history = [c.id for c in repo.log(branch)]
            reported = [cid for b, _, cid in done if b == branch]
            assert set(reported) <= set(history), "a commit reported done is not on its branch"
            assert len(history) == len(set(history))
        for branch, step, commit_id in done:
            assert repo.refs.get(step_ref(branch, step)) == commit_id
            assert_same(repo.checkout(commit_id).to_dict(), make_state(seed, step))


def test_many_committers_on_one_branch_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    ckptrepo.init(root, config=SMALL_CHUNKS).close()
    done = _run_all([_committer(root, 11, "main", 1000 * w, COMMITS) for w in range(WORKERS)])
    assert len(done) == WORKERS * COMMITS
    with ckptrepo.open(root) as repo:
        history = repo.log("main")
        # Every commit is on the one first-parent line: none was dropped by a lost race.
        assert len(history) == WORKERS * COMMITS
        assert all(c.parents == (p.id,) for c, p in zip(history, history[1:]))
    _check_all_kept(root, done, 11)
    print(f"\nRELIABILITY concurrent commits on one branch: {len(done)} of {len(done)} kept")


def test_committers_on_different_branches(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    with ckptrepo.init(root, config=SMALL_CHUNKS) as repo:
        base = repo.commit(make_state(12, 0), step=0)
        for w in range(WORKERS):
            repo.branch(f"b{w}", base.id)
    done = _run_all([_committer(root, 12, f"b{w}", 1 + 100 * w, COMMITS) for w in range(WORKERS)])
    with ckptrepo.open(root) as repo:
        for w in range(WORKERS):
            assert len(repo.log(f"b{w}")) == COMMITS + 1
            assert repo.refs.get(branch_ref(f"b{w}")) == [c for b, _, c in done if b == f"b{w}"][-1]
    _check_all_kept(root, done, 12)
    print(f"\nRELIABILITY concurrent commits on {WORKERS} branches: {len(done)} of {len(done)} kept")


def test_gc_while_committing_never_removes_what_a_commit_needs(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    seed = 13
    with ckptrepo.init(root, config=SMALL_CHUNKS) as repo:
        # The states the committers will write are already stored, as garbage: a commit that
        # reuses a chunk gc is about to sweep is exactly the race the locks must prevent.
        for w in range(2):
            for step in range(100 * w, 100 * w + COMMITS):
                commit = repo.commit(make_state(seed, step), step=step, branch="scratch" if step else None)
                repo.refs.update(step_ref(commit.branch, step), None, commit.id)
        for name, tip in repo.branches().items():
            repo.refs.update(branch_ref(name), None, tip)

    def collector(report: Callable[[str], None]) -> None:
        repo = ckptrepo.open(root)
        repo.lock.timeout = 120
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (root / "stop").exists():
            freed = repo.gc(grace_seconds=0).freed_objects
            report(f"gc {freed}")
            time.sleep(0.02)  # back to back, gc would take the repository from every waiter

    gc_worker = Worker.start(collector)
    done = _run_all([_committer(root, seed, f"c{w}", 100 * w, COMMITS) for w in range(2)])
    (root / "stop").touch()
    runs = [int(line.split()[1]) for line in gc_worker.wait(timeout=120) if line.startswith("gc ")]
    assert len(runs) >= 3 and sum(runs) > 0
    _check_all_kept(root, done, seed)
    print(f"\nRELIABILITY gc during commits: {len(runs)} gc runs freed {sum(runs)} objects; "
          f"{len(done)} of {len(done)} commits kept and bit-exact")


def _contend(path: Path, counter: Path, rounds: int) -> Callable:
    """Increment a number in ``counter`` under the lock, slowly: any overlap loses an update."""

    def body(report: Callable[[str], None]) -> None:
        for _ in range(rounds):
            lock = LockFile(path, timeout=60)
            lock.acquire()
            try:
                value = int(counter.read_text())
                time.sleep(0.0005)
                counter.write_text(str(value + 1))
            finally:
                lock.release()
        report("finished")

    return body


def test_lock_file_excludes_and_a_stale_one_is_broken_once(tmp_path: Path) -> None:
    path = tmp_path / "the.lock"
    counter = tmp_path / "counter"
    counter.write_text("0")
    # A lock left by a process that died: the file is there, nobody holds its flock.
    path.write_text(owner_text().replace(str(os.getpid()), "999999"))
    workers = [Worker.start(_contend(path, counter, 50)) for _ in range(6)]
    for worker in workers:
        assert worker.wait(timeout=120) == ["finished"]
    assert int(counter.read_text()) == 6 * 50
    assert not path.exists()


def test_shared_and_exclusive_repository_locks(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    journal = tmp_path / "journal"

    def note(text: str) -> None:
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{text}\n".encode())  # O_APPEND: each line lands whole, in order
        finally:
            os.close(fd)

    def user(exclusive: bool) -> Callable:
        def body(report: Callable[[str], None]) -> None:
            lock = RepoLock(locks, timeout=120)
            for _ in range(15):
                with lock.exclusive() if exclusive else lock.shared():
                    note("X+" if exclusive else "S+")
                    time.sleep(0.003 if exclusive else 0.002)
                    note("X-" if exclusive else "S-")
            report("finished")

        return body

    workers = [Worker.start(user(exclusive=w < 2)) for w in range(6)]
    for worker in workers:
        assert worker.wait(timeout=300) == ["finished"]
    shared = exclusive = 0
    lines = journal.read_text().split()
    for line in lines:
        shared += {"S+": 1, "S-": -1}.get(line, 0)
        exclusive += {"X+": 1, "X-": -1}.get(line, 0)
        assert exclusive <= 1 and not (exclusive and shared), "an exclusive lock was shared"
    assert len(lines) == 2 * 15 * 6
    assert list(locks.iterdir()) == []


def test_network_filesystems_are_recognised(tmp_path: Path) -> None:
    """LMDB must not live on a network filesystem: the mount table says where that is."""
    from ckptrepo.backends.local import filesystem_type, network_filesystem

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:41 / /mnt/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2\n"
        "41 40 0:42 / /mnt/shared/local\\040disk rw shared:21 - ext4 /dev/vdb rw\n"
        "42 22 0:43 / /mnt/lustre rw - lustre 10.0.0.1@tcp:/fs rw\n"
    )
    assert network_filesystem("/mnt/shared/team/repo", mountinfo)
    assert filesystem_type("/mnt/shared/local disk/repo", mountinfo) == "ext4"  # nested mount
    assert network_filesystem("/mnt/lustre/ckpt", mountinfo)
    assert not network_filesystem("/home/me/repo", mountinfo)
    assert filesystem_type("/anything", tmp_path / "missing") is None
