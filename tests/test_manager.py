"""CheckpointManager: Orbax's manager over a repository, with async saves and retention."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from manager_fixtures import expected_state, gated_repository
from strategies import assert_same, checkpoints

import ckptrepo
from ckptrepo import CheckpointManager
from ckptrepo.errors import BackendError, RefExistsError, RepositoryError, RevisionError
from ckptrepo.manager import HostStager, LeafMetadata, RetentionPolicy, best_steps

FIXTURES = Path(__file__).with_name("manager_fixtures.py")


def model_state(seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": {"epoch": 1, "index": seed}}


# --- save and restore ----------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_named_items_round_trip_bit_exact(tmp_path: Path, async_save: bool) -> None:
    state = model_state(0)
    with CheckpointManager(tmp_path / "repo", async_save=async_save) as manager:
        assert manager.save(3, state, metrics={"loss": 0.5})
        manager.wait_until_finished()
        assert manager.all_steps() == [3]
        assert_same(manager.restore(3), state)
        assert_same(manager.restore(), state)
        assert_same(manager.restore(3, items="model"), state["model"])
        assert_same(manager.restore(3, items=["loader", "optimizer"]), {"loader": state["loader"], "optimizer": state["optimizer"]})
        assert manager.metrics(3) == {"loss": 0.5}
    # The commit is an ordinary dict checkpoint: the repository gives the same dict back.
    repo = ckptrepo.open(tmp_path / "repo")
    assert_same(repo.checkout(step=3).to_dict(), state)
    repo.close()


def test_single_state_comes_back_in_its_own_shape(tmp_path: Path) -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with CheckpointManager(tmp_path / "repo") as manager:
        manager.save(1, tensor)
        manager.save(2, [tensor, 5])
        assert_same(manager.restore(1), tensor)
        assert_same(manager.restore(2), [tensor, 5])
        metadata = manager.item_metadata(1)
        assert metadata == LeafMetadata(kind="tensor", dtype="float32", shape=(3, 4), nbytes=48, framework="torch")


@settings(max_examples=25, deadline=None)
@given(state=checkpoints(with_torch=True), async_save=st.booleans())
def test_any_checkpoint_round_trips(tmp_path_factory: pytest.TempPathFactory, state: dict, async_save: bool) -> None:
    root = tmp_path_factory.mktemp("manager")
    with CheckpointManager(root / "repo", async_save=async_save) as manager:
        manager.save(0, state)
        assert_same(manager.restore(0), state)


def test_restoring_one_item_reads_only_that_item(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    state = {"model": {"w": rng.standard_normal(5000)}, "optimizer": {"m": rng.standard_normal(5000)}}
    with CheckpointManager(tmp_path / "repo", async_save=False) as manager:
        manager.save(1, state)
        snap = manager.repo.checkout(step=1)
        for chunk in snap.entry("optimizer/m").chunks:
            manager.repo.store.delete(chunk.id)  # the optimizer's data is gone
        assert_same(manager.restore(1, items="model"), state["model"])
        with pytest.raises(ckptrepo.ObjectNotFoundError):
            manager.restore(1, items="optimizer")


def test_item_names_are_checked(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo", item_names=("model", "optimizer")) as manager:
        with pytest.raises(ValueError, match="optimzer"):
            manager.save(1, {"model": {"w": np.zeros(2)}, "optimzer": {}})
        with pytest.raises(TypeError):
            manager.save(1, np.zeros(3))
        manager.save(1, {"model": {"w": np.zeros(2)}})
        with pytest.raises(KeyError, match="optimizer"):
            manager.restore(1, items="optimizer")


def test_a_bad_value_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo") as manager:
        objects_before = set(manager.repo.store.ids())
        with pytest.raises(TypeError, match="model/layer"):
            manager.save(1, {"model": {"layer": object()}, "w": torch.zeros(1000)})
        with pytest.raises(TypeError, match="model/table.*dtype object"):
            manager.save(1, {"model": {"table": np.array([object(), 1], dtype=object)}})
        manager.wait_until_finished()
        assert manager.all_steps() == []
        assert set(manager.repo.store.ids()) == objects_before


def test_saving_an_existing_step_is_refused(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo") as manager:
        manager.save(5, {"w": np.ones(3)})
        assert not manager.save(5, {"w": np.zeros(3)})  # should_save says no
        with pytest.raises(RefExistsError):
            manager.save(5, {"w": np.zeros(3)}, force=True)
        assert_same(manager.restore(5), {"w": np.ones(3)})


def test_should_save_interval_and_listed_steps(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo", save_interval_steps=10, save_on_steps=[15]) as manager:
        assert [s for s in range(0, 31) if manager.should_save(s)] == [0, 10, 15, 20, 30]
        assert not manager.save(7, {"x": 1})
        assert manager.save(7, {"x": 1}, force=True)
        assert manager.save(10, {"x": 2})
        assert not manager.should_save(9) and not manager.should_save(10)
        manager.wait_until_finished()
        assert manager.all_steps() == [7, 10]


def test_metrics_delete_and_best_step(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo", best_fn="accuracy", best_mode="max") as manager:
        for step, accuracy in [(1, 0.5), (2, 0.9), (3, math.nan), (4, 0.7)]:
            manager.save(step, {"x": step}, metrics={"accuracy": accuracy})
        manager.wait_until_finished()
        assert manager.best_step() == 2
        assert manager.metrics(1) == {"accuracy": 0.5}
        assert math.isnan(manager.metrics(3)["accuracy"])
        assert manager.metrics(99) is None
        manager.delete(2)
        assert manager.all_steps() == [1, 3, 4]
        assert manager.best_step() == 4
        with pytest.raises(RevisionError):
            manager.delete(2)
        with pytest.raises(RevisionError):
            manager.restore(2)
    with pytest.raises(ValueError, match="metrics are required"):
        CheckpointManager(tmp_path / "other", best_fn="loss").save(1, {"x": 1})


def test_closed_manager_refuses_work(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "repo")
    manager.save(1, {"x": 1})
    manager.close()
    manager.close()  # twice is fine
    with pytest.raises(RepositoryError, match="closed"):
        manager.all_steps()
    reopened = CheckpointManager(tmp_path / "repo", create=False)
    assert reopened.all_steps() == [1]
    reopened.close()
    with pytest.raises(RepositoryError):
        CheckpointManager(tmp_path / "missing", create=False)


# --- async saves ---------------------------------------------------------------------------


def test_async_step_appears_only_when_durable_and_keeps_the_snapshot(tmp_path: Path) -> None:
    repo, backend = gated_repository(tmp_path / "repo")
    manager = CheckpointManager(repo)
    weights = torch.arange(100_000, dtype=torch.float32)
    manager.save(1, {"w": weights})
    manager.wait_until_finished()

    backend.gate.clear()
    weights += 1  # the state at step 2
    started = time.perf_counter()
    assert manager.save(2, {"w": weights})
    stall = time.perf_counter() - started
    weights.mul_(-1)  # the training loop goes on at once
    assert backend.blocked.wait(10)
    assert manager.all_steps() == [1] and manager.latest_step() == 1  # step 2 is not durable yet
    backend.gate.set()
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
    assert torch.equal(manager.restore(2)["w"], torch.arange(100_000, dtype=torch.float32) + 1)
    assert stall < 5
    manager.close()


def test_background_error_surfaces_at_the_next_call_once(tmp_path: Path) -> None:
    repo, backend = gated_repository(tmp_path / "repo")
    manager = CheckpointManager(repo)
    manager.save(1, {"w": np.arange(10.0)})
    manager.wait_until_finished()
    backend.fail = True
    assert manager.save(2, {"w": np.arange(20.0)})  # accepted: the failure is in the background
    with pytest.raises(BackendError, match="injected"):
        for _ in range(200):  # the next call raises once the background save has failed
            manager.check_for_errors()
            time.sleep(0.02)
    backend.fail = False
    assert manager.all_steps() == [1]  # the failed step never appeared
    manager.check_for_errors()  # raised once, not again
    manager.save(3, {"w": np.arange(30.0)})
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 3]
    manager.close()


def test_background_error_is_raised_by_the_next_save(tmp_path: Path) -> None:
    repo, backend = gated_repository(tmp_path / "repo")
    manager = CheckpointManager(repo)
    backend.fail = True
    manager.save(1, {"w": np.arange(10.0)})
    with pytest.raises(BackendError):
        manager.save(2, {"w": np.arange(10.0)})
    backend.fail = False
    manager.save(2, {"w": np.arange(10.0)})  # raised once; the manager goes on
    manager.close()
    assert CheckpointManager(repo).all_steps() == [2]


def test_close_raises_a_pending_background_error(tmp_path: Path) -> None:
    repo, backend = gated_repository(tmp_path / "repo")
    manager = CheckpointManager(repo)
    backend.fail = True
    manager.save(1, {"w": np.arange(10.0)})
    with pytest.raises(BackendError):
        manager.close()
    backend.fail = False


def test_host_buffers_are_reused_between_saves() -> None:
    stager = HostStager()
    state = {"a": torch.randn(64, 64), "b": np.arange(10.0), "c": [torch.ones(3, dtype=torch.bfloat16)]}
    first = stager.stage(state)
    pointer = first["a"].data_ptr()
    state["a"].add_(1)
    second = stager.stage(state)
    assert second["a"].data_ptr() == pointer  # same memory, new content
    assert torch.equal(second["a"], state["a"]) and second["a"].data_ptr() != state["a"].data_ptr()
    assert_same(second["c"], state["c"])
    state["a"] = torch.randn(32, 64)  # a new shape gets a new buffer
    assert stager.stage(state)["a"].shape == (32, 64)


def test_staged_copies_shared_between_threads_are_whole_and_independent() -> None:
    """Large leaves are copied in pieces by two threads; every byte arrives, including the
    tail of a piece, non-contiguous sources and values mixed between tensors."""
    stager = HostStager()
    big = torch.randn(5 * (1 << 20) + 3)  # 20 MiB + 12 bytes: three pieces, the last short
    state = {
        "big": big,
        "half": torch.randn(4096, 4096, dtype=torch.float32).to(torch.bfloat16),
        "strided": torch.randn(64, 64).t(),  # not contiguous: copied by torch on this thread
        "array": np.random.default_rng(0).standard_normal(3 << 20),
        "small": [torch.arange(7), 5, "text"],
    }
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
                for k, v in state.items()}
    for _ in range(2):  # the second stage reuses the buffers and the helper thread
        staged = stager.stage(state)
        for value in (big, state["half"], state["strided"]):
            value.add_(1)  # the training loop moves on at once
        state["array"] += 1
        assert torch.equal(staged["big"], expected["big"])
        assert torch.equal(staged["half"], expected["half"])
        assert torch.equal(staged["strided"], expected["strided"])
        assert np.array_equal(staged["array"], expected["array"])
        assert torch.equal(staged["small"][0], torch.arange(7)) and staged["small"][1:] == [5, "text"]
        expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
                    for k, v in state.items()}
    stager.release()


def test_a_stage_refused_midway_leaves_the_copying_threads_ready() -> None:
    """The helper copies pieces while the state is still walked; a value refused after them
    raises its TypeError once the copies in flight are done, and the next stage works."""
    stager = HostStager()
    big = torch.randn(5 * (1 << 20))
    with pytest.raises(TypeError, match="bad"):
        stager.stage({"big": big, "bad": object()})
    staged = stager.stage({"big": big})
    big.add_(1)
    assert torch.equal(staged["big"] + 1, big)
    stager.release()


# --- retention -----------------------------------------------------------------------------


def test_retention_union_of_last_best_every_tagged_and_resumed(tmp_path: Path) -> None:
    repo = ckptrepo.init(tmp_path / "repo")
    losses = {s: 1.0 + ((s * 7) % 11) / 10 for s in range(1, 31)}
    losses[4] = 0.1  # the best, early
    manager = CheckpointManager(
        repo, max_to_keep=2, best_fn="loss", keep_best=1, keep_every=10, async_save=False
    )
    for step in range(1, 13):
        manager.save(step, {"w": np.full(4, step)}, metrics={"loss": losses[step]})
        if step == 6:
            repo.tag("keep-me", f"steps/{step}")
    assert manager.all_steps() == [4, 6, 10, 11, 12]
    manager.restore(11)  # the run resumes from 11: it stays while this manager lives
    for step in range(13, 18):
        manager.save(step, {"w": np.full(4, step)}, metrics={"loss": losses[step]})
    assert manager.all_steps() == [4, 6, 10, 11, 16, 17]
    manager.close()


def test_newest_step_is_never_dropped_for_a_better_old_one(tmp_path: Path) -> None:
    # Orbax with max_to_keep=1 and best_fn deletes a new, worse step at once; here the kept
    # set is the union, so the newest step (the one to resume from) always stays.
    with CheckpointManager(tmp_path / "repo", max_to_keep=1, best_fn="loss", keep_best=1, async_save=False) as m:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.9)]:
            m.save(step, {"x": step}, metrics={"loss": loss})
            assert m.latest_step() == step
        assert m.all_steps() == [1, 3]
        assert m.best_step() == 1


def test_per_item_retention_keeps_optimizer_for_the_last_two_steps(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "repo", item_max_to_keep={"optimizer": 2}) as manager:
        states = {step: model_state(step) for step in range(1, 6)}
        for step, state in states.items():
            manager.save(step, state)
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2, 3, 4, 5]
        for step, state in states.items():
            restored = manager.restore(step)
            if step >= 4:
                assert_same(restored, state)
            else:
                assert set(restored) == {"model", "loader"}
                assert_same(restored["model"], state["model"])
                with pytest.raises(KeyError, match="optimizer"):
                    manager.restore(step, items="optimizer")
        metadata = manager.item_metadata(1)
        assert set(metadata) == {"model", "loader"}
        # Space: gc frees the optimizer states no step keeps any more.
        report = manager.repo.gc(grace_seconds=0)
        assert report.freed_objects > 0
        for step, state in states.items():
            assert_same(manager.restore(step, items="model"), state["model"])
        assert_same(manager.restore(5), states[5])


def test_pruned_steps_are_reclaimed_by_gc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with CheckpointManager(tmp_path / "repo", max_to_keep=2, async_save=False) as manager:
        for step in range(6):
            manager.save(step, {"w": rng.standard_normal(20_000)})
        assert manager.all_steps() == [4, 5]
        before = sum(1 for _ in manager.repo.store.ids())
        report = manager.repo.gc(grace_seconds=0)
        assert report.freed_objects > 0
        assert sum(1 for _ in manager.repo.store.ids()) == before - report.freed_objects
        manager.restore(4)
        manager.restore(5)


def test_policy_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(max_to_keep=0)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_every=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(item_max_to_keep={"optimizer": 0})
    with pytest.raises(ValueError, match="best_fn"):
        CheckpointManager(tmp_path / "repo", keep_best=2)
    with pytest.raises(ValueError, match="item_names"):
        CheckpointManager(tmp_path / "repo", item_names=["model"], item_max_to_keep={"optimizer": 1})


@settings(max_examples=200, deadline=None)
@given(
    steps=st.sets(st.integers(0, 60), max_size=25),
    max_to_keep=st.none() | st.integers(1, 5),
    keep_every=st.none() | st.integers(1, 20),
    keep_best=st.none() | st.integers(1, 4),
    mode=st.sampled_from(["min", "max"]),
    seed=st.integers(0, 1000),
)
def test_kept_steps_is_exactly_the_union(
    steps: set[int], max_to_keep: int | None, keep_every: int | None, keep_best: int | None, mode: str, seed: int
) -> None:
    rnd = random.Random(seed)
    scores = {s: rnd.choice([rnd.random(), math.nan]) for s in steps if rnd.random() < 0.8}
    protected = {s for s in steps if rnd.random() < 0.1} | {999}
    policy = RetentionPolicy(max_to_keep=max_to_keep, keep_every=keep_every, keep_best=keep_best)
    kept = policy.kept_steps(steps, scores=scores, best_mode=mode, protected=protected)
    ordered = sorted(steps)
    assert kept <= steps
    if not policy.prunes_steps:
        assert kept == steps
        return
    expected = set(ordered[-1:]) | (protected & steps)
    if max_to_keep:
        expected |= set(ordered[-max_to_keep:])
    if keep_every:
        expected |= {s for s in steps if s % keep_every == 0}
    if keep_best:
        finite = [s for s in scores if not math.isnan(scores[s])]
        ranked = sorted(finite, key=lambda s: (scores[s] if mode == "min" else -scores[s], -s))
        expected |= set(ranked[:keep_best])
    assert kept == expected


@settings(max_examples=100, deadline=None)
@given(kept=st.sets(st.integers(0, 40), max_size=12), count=st.integers(1, 4), frozen=st.sets(st.integers(0, 40)))
def test_items_to_drop_keeps_the_newest_k(kept: set[int], count: int, frozen: set[int]) -> None:
    policy = RetentionPolicy(item_max_to_keep={"optimizer": count})
    items = {s: {"model", "optimizer"} for s in kept}
    drops = policy.items_to_drop(items, frozen=frozen)
    newest = set(sorted(kept)[-count:])
    assert set(drops) == kept - newest - frozen
    assert all(names == {"optimizer"} for names in drops.values())


def test_best_steps_ignores_nan_and_prefers_newer_on_ties() -> None:
    assert best_steps({1: 0.5, 2: 0.5, 3: math.nan, 4: 0.7}, 1, "min") == [2]
    assert best_steps({1: 0.5, 2: 0.5, 3: math.nan, 4: 0.7}, 2, "max") == [4, 2]
    with pytest.raises(ValueError):
        best_steps({}, 1, "best")


# --- a killed training process -------------------------------------------------------------


def _run_training(repo: Path, steps: int, resume: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES.parent), *sys.path]))
    return subprocess.Popen(
        [sys.executable, str(FIXTURES), str(repo), str(steps), "resume" if resume else "fresh"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _check_every_step(repo_path: Path) -> list[int]:
    with CheckpointManager(repo_path, create=False, async_save=False) as manager:
        steps = manager.all_steps()
        for step in steps:
            restored = manager.restore(step)
            expected = expected_state(step)
            assert_same(restored["model"], expected["model"])
            assert restored["step"] == step
            if "optimizer" in restored:
                assert_same(restored["optimizer"], expected["optimizer"])
        return steps


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_training_resumes_from_the_last_durable_step(tmp_path: Path, seed: int) -> None:
    repo_path = tmp_path / "repo"
    process = _run_training(repo_path, steps=1000, resume=False)
    saved = 0
    assert process.stdout is not None
    while saved < 3 + seed:
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else "training exited early"
        saved += line.startswith("saved ")
    time.sleep(random.Random(seed).uniform(0.0, 0.3))  # kill it somewhere in a save
    process.send_signal(signal.SIGKILL)
    process.wait()

    steps = _check_every_step(repo_path)  # every listed step is whole, bit for bit
    assert steps, "no durable step before the kill"
    latest = steps[-1]

    resumed = _run_training(repo_path, steps=3, resume=True)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert out.splitlines()[0] == f"resumed {latest}"
    # Retention kept the last 3 and the step the run resumed from; the optimizer state only
    # in the newest 2.
    assert _check_every_step(repo_path) == [latest, latest + 1, latest + 2, latest + 3]
    repo = ckptrepo.open(repo_path)
    try:
        with_optimizer = [s for s in repo.steps() if "optimizer/m" in repo.checkout(step=s).keys()]
        assert with_optimizer == [latest + 2, latest + 3]
        assert repo.fsck().ok
    finally:
        repo.close()


def test_example_trains_and_resumes(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "train_with_manager.py"
    repo = tmp_path / "repo"
    first = subprocess.run([sys.executable, str(example), str(repo), "--steps", "12"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "steps kept:" in first.stdout
    second = subprocess.run([sys.executable, str(example), str(repo), "--steps", "4"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed from step 10" in second.stdout
