"""A commit's chunks are staged as hidden temporary files and published together before the
manifest names them: a commit that fails leaves neither temporary files nor objects, and a
chunk another writer stored meanwhile is not counted twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckptrepo
from ckptrepo.backends.local import LocalBackend
from ckptrepo.datapath import ChunkWriter
from ckptrepo.errors import BackendError


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}": rng.standard_normal(40_000).astype(np.float32) for i in range(12)}


def test_a_commit_failing_while_staging_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    first = repo.commit(_state(1), step=1)
    before = set(repo.store.ids())
    real_stage = LocalBackend.stage
    calls = []

    def failing_stage(self: LocalBackend, key: str, data: bytes | memoryview) -> object:
        calls.append(key)
        if len(calls) == 5:
            raise BackendError(f"injected failure staging {key}")
        return real_stage(self, key, data)

    monkeypatch.setattr(LocalBackend, "stage", failing_stage)
    with pytest.raises(BackendError, match="injected failure"):
        repo.commit(_state(2), step=2)
    assert len(calls) >= 5
    assert set(repo.store.ids()) == before  # nothing of the failed commit became an object
    assert list(repo.backend.temp_files()) == []  # and nothing of it was left behind
    assert repo.log()[0].id == first.id
    assert repo.fsck(read_data=True).ok


def test_a_commit_failing_while_publishing_keeps_the_store_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    first = repo.commit(_state(1), step=1)

    def failing_link(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ckptrepo.backends.local.os.link", failing_link)
    with pytest.raises(BackendError, match="publishing"):
        repo.commit(_state(2), step=2)
    monkeypatch.undo()
    assert list(repo.backend.temp_files()) == []
    assert [c.id for c in repo.log()] == [first.id]
    np.testing.assert_array_equal(repo.checkout(step=1).to_dict()["layer3"], _state(1)["layer3"])
    assert repo.fsck(read_data=True).ok
    repo.commit(_state(2), step=2)  # and the next attempt works
    assert repo.fsck(read_data=True).ok


def test_chunks_are_invisible_until_published_and_counted_once(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    data = np.arange(300_000, dtype=np.float32)
    with ChunkWriter(repo.store, repo.pool) as writer:
        refs = writer.resolve(writer.write_fixed(memoryview(data.view(np.uint8)), 256 << 10, 4))
        assert refs and not any(repo.store.has(r.id) for r in refs)
        staged_bytes = writer.stats.stored_bytes
        assert staged_bytes > 0
        # Another writer stores one of the same chunks first (as a second process would).
        other = refs[0]
        piece = memoryview(data.view(np.uint8))[: other.size]
        assert repo.store.put("chunk", piece, itemsize=4).new
        writer.publish()
    assert all(repo.store.has(r.id) for r in refs)
    assert writer.stats.stored_bytes < staged_bytes
    assert list(repo.backend.temp_files()) == []
    assert repo.fsck(read_data=True).ok
