"""The cyclic collector is paused while a commit or a checkout builds its many small objects,
and comes back exactly as it was found."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptrepo
from ckptrepo.gcpause import paused_gc


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the automatic collections that start while the test runs."""
    seen: list[int] = []

    def on_collect(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(on_collect)
    try:
        yield seen
    finally:
        gc.callbacks.remove(on_collect)


def test_the_collector_is_off_inside_and_back_on_after() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off() -> None:
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_inside_still_turns_it_back_on() -> None:
    with pytest.raises(KeyError), paused_gc():
        raise KeyError("boom")
    assert gc.isenabled()


def test_overlapping_pauses_in_threads_end_with_the_last() -> None:
    first_in, first_may_leave = threading.Event(), threading.Event()
    states: list[bool] = []

    def first() -> None:
        with paused_gc():
            first_in.set()
            first_may_leave.wait(10)
        states.append(gc.isenabled())  # the second is still inside

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(10)
    with paused_gc():
        first_may_leave.set()
        thread.join(10)
        assert states == [False]
    assert gc.isenabled()


def _many_small_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.bias": rng.standard_normal(16, dtype=np.float32) for i in range(3000)}


def test_commit_and_checkout_start_no_collection_inside(tmp_path: Path, collections: list[int]) -> None:
    state = _many_small_tensors(0)
    with ckptrepo.init(tmp_path / "repo") as repo:
        gc.collect()
        collections.clear()
        commit = repo.commit(state, step=1)
        restored = repo.checkout(commit.id).to_dict()
        # At most the one collection each that was held back, run as the pause ends.
        assert len(collections) <= 2
    assert restored.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)
    # With the collector on, fewer new objects than a commit makes start several collections.
    collections.clear()
    made = [{"i": i} for i in range(5000)]
    assert len(collections) > 2 and made
