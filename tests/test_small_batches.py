"""Small entries are read several to a pool task, gathered from across the manifest: every
entry still comes back whole and in order whatever the mix and the window, and a damaged
object is reported."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptrepo
from ckptrepo.datapath import _BATCHED_ENTRY_BYTES, ChunkReader
from ckptrepo.errors import CkptRepoError


class CountingPool:
    """The repository's pool, counting the tasks given to it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.tasks = 0

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        self.tasks += 1
        return self.pool.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Any) -> Any:
        return self.pool.map(fn, *iterables)

    def shutdown(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait)


def _small_state(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{i:03d}": rng.standard_normal(int(rng.integers(1, 4000))).astype(np.float32) for i in range(count)}


@pytest.fixture
def repo(tmp_path: Path) -> ckptrepo.Repository:
    return ckptrepo.init(tmp_path / "repo")


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 2000), st.integers(_BATCHED_ENTRY_BYTES - 4, _BATCHED_ENTRY_BYTES + 4), st.just(300_000)),
        min_size=1, max_size=30,
    ),
    window=st.sampled_from([1, 5000, 600_000, 256 << 20]),
)
def test_entries_come_back_in_order_whatever_the_mix_and_window(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], window: int
) -> None:
    rng = np.random.default_rng(len(sizes) * 7919 + window)
    state = {f"e{i:02d}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    with ckptrepo.init(tmp_path_factory.mktemp("repo") / "r") as repo:
        repo.commit(state, step=1)
        manifest = repo.checkout(step=1).manifest
        entries = [(p, e) for p, e in manifest.entries.items() if e.chunked]
        read = list(ChunkReader(repo.store, repo.pool).read_entries(entries, window_bytes=window))
    assert [p for p, _ in read] == [p for p, _ in entries]
    for path, data in read:
        assert bytes(data) == state[path].tobytes()


def test_small_tensors_share_tasks_and_come_back_whole(repo: ckptrepo.Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _small_state(300)
    for i in range(0, 300, 10):  # small ones between large ones, as in a model
        state[f"t{i:03d}big"] = np.arange(300_000, dtype=np.float32) + i
    repo.commit(state, step=1)
    counting = CountingPool(repo.pool)  # (reading .pool starts the repository's pool)
    monkeypatch.setattr(repo, "_pool", counting)
    back = repo.checkout(step=1).to_dict()
    assert counting.tasks < 60  # 300 small tensors and 30 large: a task each would be 330
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value)


def test_reading_small_entries_reports_a_damaged_one(repo: ckptrepo.Repository) -> None:
    state = _small_state(50, seed=3)
    repo.commit(state, step=1)
    manifest = repo.checkout(step=1).manifest
    victim = manifest.entries["t017"].chunks[0].id
    path = Path(repo.location) / "objects" / victim.hex[:2] / victim.hex[2:]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    entries = [(p, e) for p, e in manifest.entries.items() if e.chunked]
    reader = ChunkReader(repo.store, repo.pool)
    with pytest.raises(CkptRepoError):
        dict(reader.read_entries(entries))
    # Without the damaged one, the others read back whole.
    healthy = [(p, e) for p, e in entries if p != "t017" and e.chunks[0].id != victim]
    for path_name, data in reader.read_entries(healthy):
        np.testing.assert_array_equal(np.frombuffer(data, dtype=np.float32), state[path_name])
