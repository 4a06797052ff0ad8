"""Reclaiming space: ``prune`` drops step refs by a retention policy, ``gc`` sweeps the objects
that no ref keeps any more (the retention model is in :mod:`ckptrepo.reachability`).

gc is mark and sweep under the repository's exclusive lock, so no commit runs meanwhile. On top
of that, objects younger than a grace period are never swept: a commit writes its chunks and
manifest before any ref names them, and a store without locks (an object store reached by
another machine) has only the grace period to protect such a commit. gc refuses to sweep when
the mark phase could not read something it needed to follow (a corrupt commit or manifest hides
what it references); ``ckpt fsck`` says what and ``ckpt fsck --repair`` clears what it can.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RefConflictError, RepositoryError
from .ids import ObjectId
from .reachability import mark, read_refs
from .refs import step_ref
from .store import object_key

if TYPE_CHECKING:
    from .repository import Repository

DEFAULT_GRACE_SECONDS = 900.0
# Deleting in batches lets the index forget a batch (and reach the disk) before the files go.
_SWEEP_BATCH = 1024


# --- gc ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcReport:
    dry_run: bool
    grace_seconds: float
    live_objects: int  # objects the refs keep
    unreachable_objects: int  # present objects no ref keeps
    freed_objects: int  # swept (with dry_run: would be swept)
    freed_bytes: int
    young_objects: int  # unreachable but inside the grace period: kept this time
    young_bytes: int
    freed: tuple[ObjectId, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "grace_seconds": self.grace_seconds,
            "live_objects": self.live_objects,
            "unreachable_objects": self.unreachable_objects,
            "freed_objects": self.freed_objects,
            "freed_bytes": self.freed_bytes,
            "young_objects": self.young_objects,
            "young_bytes": self.young_bytes,
        }


def exclusive_lock(repo: Repository, skip: bool = False) -> AbstractContextManager[None]:
    """The repository's exclusive lock (none for stores without locks, or when ``skip``)."""
    return nullcontext() if skip else repo.exclusive_lock()


def grace_period(repo: Repository, grace_seconds: float | None) -> float:
    if grace_seconds is None:
        grace_seconds = repo.config.retention.get("gc_grace_seconds", DEFAULT_GRACE_SECONDS)
    grace = float(grace_seconds)
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace_seconds must be a number >= 0, not {grace_seconds!r}")
    return grace


def gc(repo: Repository, *, dry_run: bool = False, grace_seconds: float | None = None) -> GcReport:
    """Delete every object that no ref keeps and that is older than the grace period."""
    grace = grace_period(repo, grace_seconds)
    if not dry_run:
        repo._writable()
    with exclusive_lock(repo, skip=dry_run):
        marking = mark(repo)
        if not marking.complete:
            reasons = "; ".join(marking.blockers()[:3])
            raise RepositoryError(
                f"gc refused: the repository has damage that hides what it references ({reasons}); "
                "run `ckpt fsck` to see it all and `ckpt fsck --repair` to clear what can be cleared"
            )
        now = time.time()
        doomed: list[tuple[ObjectId, int]] = []
        young = young_bytes = unreachable = 0
        for object_id in repo.store.ids():
            if object_id in marking.live:
                continue
            stat = repo.backend.stat(object_key(object_id))
            if stat is None:
                continue
            unreachable += 1
            if now - stat.mtime < grace:
                young += 1
                young_bytes += stat.size
            else:
                doomed.append((object_id, stat.size))
        # A store without locks may have gained refs while we looked: keep what they need.
        records, _bad = read_refs(repo)
        new_roots = {r.target for r in records} - {r.target for r in marking.refs}
        if new_roots and doomed:
            needed = mark(repo, new_roots).live
            doomed = [(oid, size) for oid, size in doomed if oid not in needed]
        if not dry_run:
            _sweep(repo, [oid for oid, _ in doomed])
            if repo.store.index is not None:
                repo.store.index.ensure_reserve()  # spent if the disk was full: room again now
    return GcReport(
        dry_run=dry_run, grace_seconds=grace, live_objects=len(marking.live),
        unreachable_objects=unreachable, freed_objects=len(doomed),
        freed_bytes=sum(size for _, size in doomed), young_objects=young, young_bytes=young_bytes,
        freed=tuple(oid for oid, _ in doomed),
    )


def _sweep(repo: Repository, doomed: list[ObjectId]) -> None:
    index = repo.store.index
    for start in range(0, len(doomed), _SWEEP_BATCH):
        batch = doomed[start : start + _SWEEP_BATCH]
        if index is not None:
            # The index forgets first, durably: were it to claim a deleted object, a commit
            # would reuse a chunk that is gone.
            for object_id in batch:
                index.remove(object_id)
            index.sync()
        for object_id in batch:
            repo.backend.delete(object_key(object_id))


# --- prune ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeepBest:
    """Keep the ``count`` steps with the best ``metric`` (``mode`` "min" or "max")."""

    metric: str
    mode: str
    count: int

    @classmethod
    def parse(cls, value: Any) -> KeepBest:
        """From ``"loss:min:3"``, ``("loss", "min", 3)`` or a KeepBest."""
        if isinstance(value, KeepBest):
            return value
        if isinstance(value, str):
            # rsplit: a metric name may itself hold ':' (e.g. "val:loss:min:3").
            parts = value.rsplit(":", 2)
            if len(parts) != 3:
                raise ValueError(f"keep_best {value!r}: expected METRIC:min|max:K")
            metric, mode, count = parts
        elif isinstance(value, (tuple, list)) and len(value) == 3:
            metric, mode, count = value
        else:
            raise ValueError(f"keep_best {value!r}: expected 'METRIC:min|max:K' or (metric, mode, k)")
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"keep_best {value!r}: the metric name is empty")
        if mode not in ("min", "max"):
            raise ValueError(f"keep_best {value!r}: the mode must be min or max, not {mode!r}")
        try:
            k = int(count)
        except (TypeError, ValueError):
            raise ValueError(f"keep_best {value!r}: K must be an integer, not {count!r}") from None
        if k < 1:
            raise ValueError(f"keep_best {value!r}: K must be at least 1")
        return cls(metric, mode, k)


@dataclass(frozen=True, slots=True)
class StepRecord:
    branch: str
    step: int
    commit: ObjectId

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "step": self.step, "commit": self.commit.hex}


@dataclass(frozen=True, slots=True)
class PruneReport:
    dry_run: bool
    removed: tuple[StepRecord, ...]  # step refs deleted (with dry_run: that would be)
    kept: tuple[StepRecord, ...]
    conflicts: tuple[StepRecord, ...]  # moved while we pruned; left as they are

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": [r.to_json() for r in self.removed],
            "kept": [r.to_json() for r in self.kept],
            "conflicts": [r.to_json() for r in self.conflicts],
        }


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: KeepBest | None = None
    keep_every: int | None = None
    keep_tagged: bool = True

    @classmethod
    def build(
        cls, keep_last: Any, keep_best: Any, keep_every: Any, keep_tagged: bool,
        defaults: Mapping[str, Any],
    ) -> RetentionPolicy:
        if keep_last is None and keep_best is None and keep_every is None:
            keep_last, keep_best, keep_every = (defaults.get(k) for k in ("keep_last", "keep_best", "keep_every"))
        if keep_last is None and keep_best is None and keep_every is None:
            raise ValueError(
                "prune needs a rule: keep_last, keep_best or keep_every "
                "(or retention defaults in config.yaml)"
            )
        return cls(
            keep_last=_positive("keep_last", keep_last),
            keep_best=None if keep_best is None else KeepBest.parse(keep_best),
            keep_every=_positive("keep_every", keep_every),
            keep_tagged=bool(keep_tagged),
        )

    def keep(self, steps: Mapping[int, ObjectId], metric_of: Any) -> set[int]:
        """The steps of one branch this policy keeps (the newest always)."""
        ordered = sorted(steps)
        kept = {ordered[-1]} if ordered else set()
        if self.keep_last:
            kept.update(ordered[-self.keep_last :])
        if self.keep_every:
            kept.update(s for s in ordered if s % self.keep_every == 0)
        if self.keep_best is not None:
            best = self.keep_best
            scored = []
            for step in ordered:
                value = metric_of(steps[step], best.metric)
                if value is not None and not math.isnan(value):
                    scored.append((value if best.mode == "min" else -value, step))
            kept.update(step for _, step in sorted(scored)[: best.count])
        return kept


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
    return value


def prune(
    repo: Repository, *, keep_last: int | None = None, keep_best: Any = None,
    keep_every: int | None = None, keep_tagged: bool = True, branch: str | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Delete the step refs the policy does not keep, on ``branch`` (default: every branch).

    Never deleted: the newest step of a branch, a step whose commit is a branch tip, and (with
    ``keep_tagged``) a tagged one. Commits stay in the history; ``gc`` then frees their data.
    """
    policy = RetentionPolicy.build(keep_last, keep_best, keep_every, keep_tagged, repo.config.retention)
    if not dry_run:
        repo._writable()
    with exclusive_lock(repo, skip=dry_run):
        by_branch = _steps_by_branch(repo, branch)
        protected = set(repo.refs.branches().values())
        if policy.keep_tagged:
            protected |= set(repo.refs.tags().values())
        # Decide everything first: a commit that cannot be read stops prune before any change.
        kept: list[StepRecord] = []
        doomed: list[StepRecord] = []
        for name, steps in sorted(by_branch.items()):
            keep = policy.keep(steps, lambda cid, metric: _metric(repo, cid, metric))
            for step, commit_id in steps.items():
                record = StepRecord(name, step, commit_id)
                (kept if step in keep or commit_id in protected else doomed).append(record)
        removed: list[StepRecord] = []
        conflicts: list[StepRecord] = []
        for record in doomed:
            if not dry_run:
                try:
                    repo.refs.update(step_ref(record.branch, record.step), None, record.commit)
                except RefConflictError:
                    conflicts.append(record)
                    continue
            removed.append(record)
    return PruneReport(dry_run, tuple(removed), tuple(kept), tuple(conflicts))


def _steps_by_branch(repo: Repository, branch: str | None) -> dict[str, dict[int, ObjectId]]:
    if branch is not None:
        return {branch: repo.refs.steps(branch)}
    grouped: dict[str, dict[int, ObjectId]] = {}
    for (name, step), commit_id in sorted(repo.refs.all_steps().items()):
        grouped.setdefault(name, {})[step] = commit_id
    return grouped


def _metric(repo: Repository, commit_id: ObjectId, metric: str) -> float | None:
    value = repo.load_commit(commit_id).metrics.get(metric)
    return None if value is None else float(value)

