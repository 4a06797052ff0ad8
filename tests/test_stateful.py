"""A hypothesis state machine drives the repository (commit, tag, branch, prune, gc, checkout)
against a plain in-memory model and checks after every step that they agree: refs, steps,
history, what can be checked out (bit-exact) and what gc has taken, and that fsck is clean.

``CKPT_STATEFUL_EXAMPLES`` sets how many runs hypothesis tries (default 25).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from reliability_fixtures import assert_same, env_int

import ckptrepo
from ckptrepo.config import Chunking, Config

NAMES = st.sampled_from(["main", "exp", "dev"])
TAGS = st.sampled_from(["best", "v1", "v2"])


@dataclass
class ModelCommit:
    id: str
    branch: str
    step: int | None
    state: dict
    parent: str | None


@dataclass
class Model:
    # In the order they were made: commit ids hash a timestamp, so rules draw from this order
    # (never sorted ids), or hypothesis could not replay a failing sequence.
    commits: dict[str, ModelCommit] = field(default_factory=dict)
    tips: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    steps: dict[tuple[str, int], str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    collected: set[str] = field(default_factory=set)  # commits whose data gc took

    def retained(self) -> set[str]:
        kept = set(self.tips.values()) | set(self.steps.values()) | set(self.tags.values())
        return kept | {c.id for c in self.commits.values() if c.step is None}

    def history(self, branch: str) -> list[str]:
        out, current = [], self.tips.get(branch)
        while current is not None:
            out.append(current)
            current = self.commits[current].parent
        return out


# Long enough for two chunks of 64 KiB, each large enough for context coding to pay.
_DRIFT_LENGTH = {0: 0, 10: 10, 3000: 40_000}
_WALK = np.random.default_rng(0).standard_normal((2, 40_000)).astype(np.float32)


class RepositoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ckpt-stateful-"))
        config = Config(chunking=Chunking(tensor_chunk_size=65536))
        self.repo = ckptrepo.init(self.tmp / "repo", config=config)
        self.model = Model()
        self.counter = 0

    def teardown(self) -> None:
        self.repo.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _state(self, size: int) -> dict:
        self.counter += 1  # every state unique: no two commits share a manifest
        rng = np.random.default_rng(self.counter)
        # A bf16 weight that drifts from commit to commit, as in training: its chunks are
        # context-coded deltas (with their base's moves) whose bases gc and prune must keep.
        length = _DRIFT_LENGTH[size]
        drift = (_WALK[0, :length] + self.counter * 2e-3 * _WALK[1, :length]).astype(ml_dtypes.bfloat16)
        return {
            "w": rng.standard_normal(size).astype(np.float32), "h": drift, "n": self.counter, "tag": f"s{self.counter}"
        }

    # --- rules -------------------------------------------------------------------------

    @rule(branch=NAMES, with_step=st.booleans(), size=st.sampled_from([0, 10, 3000]))
    def commit(self, branch: str, with_step: bool, size: int) -> None:
        model = self.model
        if branch != "main" and branch not in model.tips:
            branch = "main"
        existing = [s for b, s in model.steps if b == branch]
        step = (max(existing, default=-1) + 1) if with_step else None
        state = self._state(size)
        commit = self.repo.commit(state, step=step, branch=branch)
        parent = model.tips.get(branch) or model.tips.get("main")
        assert commit.parents == ((parent,) if parent else ())
        model.commits[commit.id] = ModelCommit(commit.id, branch, step, state, parent)
        model.tips[branch] = commit.id
        if step is not None:
            model.steps[(branch, step)] = commit.id

    @precondition(lambda self: self.model.steps)
    @rule(data=st.data())
    def recommit_existing_step_is_refused(self, data: st.DataObject) -> None:
        branch, step = data.draw(st.sampled_from(sorted(self.model.steps)))
        with pytest.raises(ckptrepo.RefExistsError):
            self.repo.commit({"x": 1}, step=step, branch=branch)

    @precondition(lambda self: self.model.commits)
    @rule(name=TAGS, data=st.data())
    def tag(self, name: str, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(list(self.model.commits)))
        if name in self.model.tags:
            with pytest.raises(ckptrepo.RefExistsError):
                self.repo.tag(name, target)
        elif target in self.model.collected:
            with pytest.raises(ckptrepo.RevisionError, match="pruned"):
                self.repo.tag(name, target)
        else:
            self.repo.tag(name, target)
            self.model.tags[name] = target

    @precondition(lambda self: self.model.tags)
    @rule(data=st.data())
    def untag(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.tags)))
        self.repo.untag(name)
        del self.model.tags[name]

    @precondition(lambda self: self.model.commits)
    @rule(name=NAMES, data=st.data())
    def branch(self, name: str, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(list(self.model.commits)))
        if name in self.model.tips:
            with pytest.raises(ckptrepo.RefExistsError):
                self.repo.branch(name, target)
        elif target in self.model.collected:
            with pytest.raises(ckptrepo.RevisionError, match="pruned"):
                self.repo.branch(name, target)
        else:
            self.repo.branch(name, target)
            self.model.tips[name] = target

    @precondition(lambda self: self.model.steps)
    @rule(keep_last=st.integers(1, 3), only=st.one_of(st.none(), NAMES), keep_tagged=st.booleans())
    def prune(self, keep_last: int, only: str | None, keep_tagged: bool) -> None:
        model = self.model
        protected = set(model.tips.values()) | (set(model.tags.values()) if keep_tagged else set())
        expected_removed = set()
        for branch in {b for b, _ in model.steps}:
            if only is not None and branch != only:
                continue
            steps = sorted(s for b, s in model.steps if b == branch)
            for step in steps[:-keep_last]:
                if model.steps[(branch, step)] not in protected:
                    expected_removed.add((branch, step))
        report = self.repo.prune(keep_last=keep_last, branch=only, keep_tagged=keep_tagged)
        assert {(r.branch, r.step) for r in report.removed} == expected_removed
        for key in expected_removed:
            del model.steps[key]

    @rule()
    def gc(self) -> None:
        self.repo.gc(grace_seconds=0)
        retained = self.model.retained()
        self.model.collected |= set(self.model.commits) - retained

    @precondition(lambda self: self.model.commits)
    @rule(data=st.data())
    def checkout(self, data: st.DataObject) -> None:
        commit_id = data.draw(st.sampled_from(list(self.model.commits)))
        if commit_id in self.model.collected and commit_id not in self.model.retained():
            with pytest.raises(ckptrepo.ObjectNotFoundError):
                self.repo.checkout(commit_id).to_dict()
        else:
            assert_same(self.repo.checkout(commit_id).to_dict(), self.model.commits[commit_id].state)

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def refs_agree(self) -> None:
        assert self.repo.branches() == self.model.tips
        assert self.repo.tags() == self.model.tags
        for branch in self.model.tips:
            expected = {s: c for (b, s), c in self.model.steps.items() if b == branch}
            assert self.repo.refs.steps(branch) == expected
            assert [c.id for c in self.repo.log(branch)] == self.model.history(branch)

    @invariant()
    def repository_is_clean(self) -> None:
        report = self.repo.fsck()
        assert report.ok, [str(p) for p in report.problems]


RepositoryMachine.TestCase.settings = settings(
    max_examples=env_int("CKPT_STATEFUL_EXAMPLES", 25), stateful_step_count=25, deadline=None,
)
test_repository_against_model = RepositoryMachine.TestCase
