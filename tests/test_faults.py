"""Faults in storage: every single-byte flip in a stored object is detected on read and by
``fsck --read-data``; a backend that fails a write or returns short data never leaves the
repository inconsistent or hands back wrong bytes.

Sizes for longer runs (benchmarks): ``CKPT_FLIP_MASKS`` flips tried per byte position (default
1, a random non-zero XOR; 255 tries every other value), ``CKPT_FLIP_FSCK`` flips also checked
with a whole ``fsck --read-data`` (default 120, spread over every object; 0 means all).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from reliability_fixtures import assert_same, env_int

import ckptrepo
from ckptrepo.backends.base import BackendWrapper
from ckptrepo.backends.local import LocalBackend
from ckptrepo.codec import PREFIX_SIZE
from ckptrepo.config import CONFIG_KEY, Chunking, Config
from ckptrepo.errors import BackendError, CkptRepoError
from ckptrepo.ids import ObjectId, hash_hex
from ckptrepo.repository import Repository
from ckptrepo.store import object_key

# Every entry an object file (none inline), so that small states exercise the store.
TINY_CHUNKS = Config(chunking=Chunking(tensor_chunk_size=4096, inline_max_size=0))


def _states() -> list[dict]:
    """Two small steps whose objects use every coding: raw, zstd, byte planes (with raw and
    zstd planes), and deltas against the previous step."""
    rng = np.random.default_rng(5)
    weights = rng.standard_normal(512).astype(np.float16)
    drifted = weights.copy()
    drifted[::17] += 1
    counts = np.arange(256, dtype=np.int32)
    return [
        {"w": weights, "i": counts, "text": "hello world " * 60, "noise": rng.integers(0, 255, 700, dtype=np.uint8)},
        {"w": drifted, "i": counts + 1, "text": "hello world " * 60, "noise": rng.integers(0, 255, 700, dtype=np.uint8)},
    ]


@pytest.fixture
def small_repo(tmp_path: Path) -> ckptrepo.Repository:
    repo = ckptrepo.init(tmp_path / "repo", config=TINY_CHUNKS)
    for step, state in enumerate(_states()):
        repo.commit(state, step=step)
    yield repo
    repo.close()


def _coding(repo: ckptrepo.Repository, object_id: ObjectId) -> str:
    header = repo.store.header(object_id)
    codec = header.coding["codec"]
    if header.base is not None:
        codec += "+" + str(header.coding.get("inner", {}).get("codec"))
    return f"{header.kind}/{codec}"


def _flips(length: int, masks: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    for position in range(length):
        values = range(1, 256) if masks >= 255 else rng.sample(range(1, 256), masks)
        for mask in values:
            yield position, mask


def _read_after_flip(repo: ckptrepo.Repository, object_id: ObjectId) -> bool:
    """True if reading the flipped object fails; False if it decodes to exactly the content
    its id names (a flip that changed no decoded bit: zstd's unused frame-header bit, an
    equivalent entropy-table encoding). Wrong data coming back fails the test."""
    try:
        data = repo.store.get(object_id)
    except CkptRepoError:
        return True
    assert hash_hex(data) == object_id.hex, f"a flip in {object_id} returned wrong data"
    return False


def test_every_single_byte_flip_is_detected_or_changes_nothing(small_repo: ckptrepo.Repository) -> None:
    repo = small_repo
    rng = random.Random(1)
    masks = env_int("CKPT_FLIP_MASKS", 1)
    objects = sorted(repo.store.ids())
    codings = {oid: _coding(repo, oid) for oid in objects}
    # Every coding the writer uses is among the objects flipped.
    kinds = set(codings.values())
    assert {"commit", "manifest"} <= {k.split("/")[0] for k in kinds}
    assert {"raw", "zstd", "planes"} <= {k.split("/")[1].split("+")[0] for k in kinds}
    assert any("+" in k for k in kinds), "no delta-coded chunk to flip"
    detected: Counter[str] = Counter()
    benign: Counter[str] = Counter()
    for object_id in objects:
        path = Path(repo.location) / object_key(object_id)
        original = path.read_bytes()
        fd = os.open(path, os.O_RDWR)
        try:
            for position, mask in _flips(len(original), masks, rng):
                os.pwrite(fd, bytes([original[position] ^ mask]), position)
                if _read_after_flip(repo, object_id):
                    detected[codings[object_id]] += 1
                else:
                    benign[codings[object_id]] += 1
                os.pwrite(fd, original[position : position + 1], position)
        finally:
            os.close(fd)
    total = sum(detected.values()) + sum(benign.values())
    print(
        f"\nRELIABILITY single-byte flips: {total} in {len(objects)} objects; detected on read "
        f"{sum(detected.values())}; decoding to identical verified content {sum(benign.values())} "
        f"{dict(benign)}; detected by coding {dict(detected)}"
    )
    assert sum(benign.values()) <= total * 0.02
    assert repo.fsck(read_data=True).ok


def test_flips_are_reported_by_fsck_read_data(small_repo: ckptrepo.Repository) -> None:
    repo = small_repo
    rng = random.Random(2)
    positions: list[tuple[ObjectId, int]] = []
    for object_id in sorted(repo.store.ids()):
        size = (Path(repo.location) / object_key(object_id)).stat().st_size
        positions += [(object_id, p) for p in range(size)]
    wanted = env_int("CKPT_FLIP_FSCK", 120)
    if wanted and wanted < len(positions):
        # Always the prefix and first header bytes of every object, then a random spread.
        head = [(o, p) for o, p in positions if p < PREFIX_SIZE + 4]
        chosen = set(head)
        rest = [x for x in positions if x not in chosen]
        positions = head + rng.sample(rest, max(0, wanted - len(head)))
    reported = benign = 0
    for object_id, position in positions:
        path = Path(repo.location) / object_key(object_id)
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[position] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(flipped))
        try:
            report = repo.fsck(read_data=True)
            # Named as the damaged object, or as what names a phantom (a flipped base id).
            if any(object_id in (p.object_id, p.named_by) for p in report.problems):
                reported += 1
            else:
                assert report.ok, report.problems
                assert not _read_after_flip(repo, object_id), f"flip at {position} of {object_id} not reported"
                benign += 1
        finally:
            path.write_bytes(original)
    print(f"\nRELIABILITY flips checked with fsck --read-data: {len(positions)}; reported {reported}; "
          f"decoding to identical verified content {benign}")
    assert repo.fsck(read_data=True).ok


class FaultyBackend(BackendWrapper):
    """A LocalBackend that fails its Nth write, or returns reads cut short."""

    def __init__(self, inner: LocalBackend, *, fail_write: int | None = None, short_reads: bool = False) -> None:
        super().__init__(inner)
        self.fail_write = fail_write
        self.short_reads = short_reads
        self.writes = 0

    def _count_write(self, key: str) -> None:
        self.writes += 1
        if self.writes == self.fail_write:
            raise BackendError(f"injected failure writing {key}", transient=True)

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self._count_write(key)
        self.inner.write(key, data, create_only=create_only)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        self._count_write(key)
        self.inner.compare_and_swap(key, expected, new)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.read(key, offset, length)
        if self.short_reads and key.startswith("objects/") and len(data) > 8:
            return data[: len(data) - 3]
        return data


def _open_with(root: Path, backend: FaultyBackend) -> Repository:
    config = Config.load(backend.inner.read(CONFIG_KEY), CONFIG_KEY)
    return Repository(backend, config, cache_dir=root / "cache")


def test_a_failed_write_at_any_point_leaves_the_repository_clean(small_repo: ckptrepo.Repository) -> None:
    root = Path(small_repo.location)
    history = [c.id for c in small_repo.log()]
    state = {"w": np.arange(3000, dtype=np.float32), "s": "x" * 5000}
    counter = FaultyBackend(LocalBackend(root))
    probe = _open_with(root, counter)
    done = probe.commit(state, step=2, branch="probe")
    writes = counter.writes
    probe.close()
    assert writes >= 5
    small_repo.refs.update(ckptrepo.refs.branch_ref("probe"), None, done.id)
    small_repo.refs.update(ckptrepo.refs.step_ref("probe", 2), None, done.id)
    small_repo.gc(grace_seconds=0)
    baseline = set(small_repo.store.ids())
    for failing in range(1, writes + 1):
        faulty = _open_with(root, FaultyBackend(LocalBackend(root), fail_write=failing))
        with pytest.raises(BackendError, match="injected failure"):
            faulty.commit(state, step=100 + failing)
        faulty.close()
        assert small_repo.fsck().ok
        assert [c.id for c in small_repo.log()] == history
        assert small_repo.steps() == [0, 1]  # a step ref written before the failure is given back
        # What the failed commit wrote is garbage that gc sweeps, to the last object.
        small_repo.gc(grace_seconds=0)
        assert set(small_repo.store.ids()) == baseline
    after = small_repo.commit(state, step=999)
    assert_same(small_repo.checkout(after.id).to_dict(), state)
    assert small_repo.fsck(read_data=True).ok


def test_short_reads_are_never_taken_for_data(small_repo: ckptrepo.Repository) -> None:
    root = Path(small_repo.location)
    short = _open_with(root, FaultyBackend(LocalBackend(root), short_reads=True))
    with pytest.raises(CkptRepoError):
        short.checkout("latest").to_dict()
    report = short.fsck(read_data=True)
    assert not report.ok
    short.close()
    assert_same(small_repo.checkout("steps/1").to_dict(), _states()[1])
