"""A full disk and a read-only filesystem: a clear error, nothing committed half-way, the
repository still clean, and gc able to free space even on a full disk.

The disk is a 4 MiB tmpfs (``mount -t tmpfs``, which needs root); where mounting is not
permitted the tests are skipped with that reason. The read-only case remounts it read-only.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from reliability_fixtures import assert_same

import ckptrepo
from ckptrepo.config import Chunking, Config
from ckptrepo.errors import BackendError, CkptRepoError
from ckptrepo.ids import hash_hex

SMALL = Config(chunking=Chunking(tensor_chunk_size=16 << 10))


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a disk-full test needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _noise(seed: int, size: int) -> dict:
    return {"data": np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8), "seed": seed}


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _failed_at(message: str, chunks: set[str]) -> str:
    """Which write the disk refused: a chunk, a document (manifest, commit), a ref, a lock."""
    found = re.search(r"objects/([0-9a-f]{2})/([0-9a-f]{62})", message)
    if found:
        return "chunk" if found[1] + found[2] in chunks else "document"
    for part in ("refs", "locks", "index"):
        if f"/{part}" in message or f"the {part}" in message:
            return part
    return message


def test_disk_full_fails_cleanly_at_every_point(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        repo = ckptrepo.init(disk / "repo", config=SMALL)
        kept = {0: _noise(0, 200_000)}
        repo.commit(kept[0], step=0)
        where: Counter[str] = Counter()
        # Commits sized around what is left fail at ever different points: a chunk, the
        # manifest or commit document, a ref, a lock file. Each fails whole or succeeds whole.
        for attempt in range(1, 90):
            repo.gc(grace_seconds=0)  # what the last failure left goes
            size = int(_free(disk) * (0.70 + 0.0012 * attempt))
            state = _noise(attempt, size)
            history = [c.id for c in repo.log()]
            try:
                repo.commit(state, step=attempt)
            except BackendError as exc:
                assert "No space left on device" in str(exc)
                chunks = {hash_hex(state["data"][o : o + (16 << 10)]) for o in range(0, size, 16 << 10)}
                where[_failed_at(str(exc), chunks)] += 1
                assert [c.id for c in repo.log()] == history  # nothing committed half-way
                assert repo.steps() == sorted(kept)  # and no step taken
            else:
                where["committed"] += 1
                kept[attempt] = state
                repo.prune(keep_last=1)
                kept = {s: v for s, v in kept.items() if s in repo.steps()}
            report = repo.fsck()
            assert report.ok, [str(p) for p in report.problems]
            assert report.temp_files == ()  # failed writes removed their temporary files
        print(f"\nRELIABILITY disk full: {dict(where)}")
        assert where["committed"] >= 5 and where["chunk"] >= 3
        assert len(set(where) - {"committed", "chunk"}) >= 1  # failures after the chunks too
        for step, state in kept.items():
            assert_same(repo.checkout(step=step).to_dict(), state)
        assert repo.fsck(read_data=True).ok
        repo.close()


def test_gc_frees_space_on_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        repo = ckptrepo.init(disk / "repo", config=SMALL)
        step = 0
        with pytest.raises(BackendError, match="No space left"):
            while True:  # fill the disk with checkpoints
                repo.commit(_noise(step, 300_000), step=step)
                step += 1
        assert step >= 3
        full = _used(disk)
        repo.prune(keep_last=1)
        report = repo.gc(grace_seconds=0)  # the index must forget before files go: needs room
        assert report.freed_objects > 0 and _used(disk) < full - 500_000
        assert repo.fsck(read_data=True).ok
        repo.commit(_noise(99, 300_000), step=99)
        assert_same(repo.checkout(step=99).to_dict(), _noise(99, 300_000))
        assert_same(repo.checkout(step=step - 1).to_dict(), _noise(step - 1, 300_000))
        repo.close()


def test_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="16m") as disk:
        root = disk / "repo"
        with ckptrepo.init(root, config=SMALL) as repo:
            first = repo.commit(_noise(1, 100_000), step=1)
        done = _mount("-o", "remount,ro", str(disk))
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
        try:
            with ckptrepo.open(root) as repo:  # opens, without its index cache
                assert_same(repo.checkout("latest").to_dict(), _noise(1, 100_000))
                assert repo.fsck(read_data=True).ok
                attempts = {
                    "commit": lambda: repo.commit(_noise(2, 1000), step=2),
                    "tag": lambda: repo.tag("t"),
                    "branch": lambda: repo.branch("b"),
                    "switch": lambda: repo.switch("other"),
                    "prune": lambda: repo.prune(keep_last=1),
                    "gc": lambda: repo.gc(grace_seconds=0),
                    "repair": lambda: repo.fsck(repair=True),
                }
                for name, attempt in attempts.items():
                    with pytest.raises(CkptRepoError, match="Read-only file system"):
                        attempt()
                        pytest.fail(f"{name} wrote to a read-only filesystem")
        finally:
            assert _mount("-o", "remount,rw", str(disk)).returncode == 0
        with ckptrepo.open(root) as repo:
            assert repo.fsck().ok and [c.id for c in repo.log()] == [first.id]
            repo.commit(_noise(3, 1000), step=3)
            assert repo.fsck(read_data=True).ok
