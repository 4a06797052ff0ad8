"""fsck: check a repository, say precisely what is wrong, and repair what can be repaired.

The structure check follows the retention model of :mod:`ckptrepo.reachability`: every ref
names a readable commit, every commit reachable through parents is readable, and every
*retained* commit has a valid manifest whose chunks are present, with headers that parse, sizes
that match the manifest and delta chains that are bounded and complete. A pruned commit's
missing data is not a problem: that is what pruning is for. ``read_data`` also decodes every
live chunk and checks it hashes to its id.

Each problem names the object, and the commits, refs and checkpoint keys it damages. Leftovers
of crashed processes (temporary files, lock files of dead processes) are listed apart: they are
harmless and never make a report fail.

``repair`` takes the exclusive lock and then rebuilds the index, removes those leftovers,
moves damaged objects aside to ``quarantine/`` (so that a later commit of the same content, or a
fetch, can store a good copy), and asks ``ckptrepo.sync.fetch_objects`` to fetch damaged and
missing objects from the remotes when that function exists.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import TEMP_MARKER
from .backends.lockfile import is_stale
from .codec import Header
from .config import CONFIG_KEY, Config
from .errors import (
    CkptRepoError,
    FormatError,
    KeyNotFoundError,
    ObjectCorruptError,
    ObjectNotFoundError,
)
from .gc import exclusive_lock
from .ids import ObjectId
from .reachability import CORRUPT, INVALID, MISSING, Gap, Marking, mark
from .store import MAX_DELTA_DEPTH, object_key

if TYPE_CHECKING:
    from .repository import Repository

# A temporary file this old, seen under the exclusive lock, belongs to no running write.
TEMP_GRACE_SECONDS = 10.0
QUARANTINE_PREFIX = "quarantine"
_TOO_DEEP = MAX_DELTA_DEPTH + 1

PROBLEM_KINDS = {
    "config": "config.yaml is missing or invalid",
    "head": "HEAD does not name a valid branch",
    "bad-ref": "a key under refs/ that does not name a commit",
    "step-ref": "a step ref names a commit of another branch or step",
    "missing-object": "an object the repository needs is not stored",
    "corrupt-object": "stored bytes do not decode to content that hashes to their id",
    "invalid-document": "a commit or manifest that is not a valid document of its kind",
    "size-mismatch": "a chunk's size differs from what a manifest says",
    "delta-chain": "a delta chain longer than the limit, or a cycle",
    "stale-index": "the index claims objects the store does not hold",
}
_GAP_KINDS = {MISSING: "missing-object", CORRUPT: "corrupt-object", INVALID: "invalid-document"}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong, with what it damages."""

    kind: str  # a key of PROBLEM_KINDS
    message: str
    object_id: str | None = None
    key: str | None = None  # the storage key involved, when it is not an object
    commits: tuple[str, ...] = ()  # commits whose data or history it damages
    refs: tuple[str, ...] = ()  # refs naming those commits
    paths: tuple[str, ...] = ()  # checkpoint keys (entry paths) it damages
    role: str | None = None  # what the object is to the repository: commit, manifest, chunk, base
    named_by: str | None = None  # the ref key or object id that names it

    def __str__(self) -> str:
        parts = [self.message]
        if self.paths:
            shown = ", ".join(self.paths[:5]) + (f" and {len(self.paths) - 5} more" if len(self.paths) > 5 else "")
            parts.append(f"keys: {shown}")
        if self.commits:
            parts.append(f"commits: {', '.join(c[:12] for c in self.commits[:5])}"
                         + (f" and {len(self.commits) - 5} more" if len(self.commits) > 5 else ""))
        if self.refs:
            parts.append(f"refs: {', '.join(self.refs[:5])}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "message": self.message, "object": self.object_id, "key": self.key,
            "commits": list(self.commits), "refs": list(self.refs), "paths": list(self.paths),
            "role": self.role, "named_by": self.named_by,
        }


@dataclass(frozen=True, slots=True)
class Checked:
    refs: int = 0
    commits: int = 0
    retained_commits: int = 0
    manifests: int = 0
    chunks: int = 0  # chunks and delta bases whose headers were checked
    verified_objects: int = 0  # decoded and hashed (read_data)
    verified_bytes: int = 0
    unreachable_objects: int = 0  # present, kept by no ref: gc reclaims them

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class FsckReport:
    problems: list[Problem]
    checked: Checked
    read_data: bool
    temp_files: tuple[str, ...] = ()  # leftovers of interrupted writes
    stale_locks: tuple[str, ...] = ()  # lock files of processes that are gone
    repairs: tuple[str, ...] = ()  # what repair did

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "read_data": self.read_data,
            "problems": [p.to_json() for p in self.problems],
            "checked": self.checked.to_json(),
            "temp_files": list(self.temp_files),
            "stale_locks": list(self.stale_locks),
            "repairs": list(self.repairs),
        }


def fsck(repo: Repository, *, read_data: bool = False, repair: bool = False) -> FsckReport:
    if not repair:
        return check(repo, read_data=read_data)
    repo._writable()
    # Taking the exclusive lock clears stale shared locks on its way: note them first.
    stale = repo.lock.stale() if repo.lock is not None else []
    with exclusive_lock(repo):
        return _repair(repo, read_data, stale)


# --- the check -----------------------------------------------------------------------------


def check(repo: Repository, *, read_data: bool = False) -> FsckReport:
    problems: list[Problem] = []
    problems += _check_config(repo)
    marking = mark(repo)
    impact = _Impact(marking)
    for bad in marking.bad_refs:
        problems.append(Problem("bad-ref", f"ref {bad.key}: {bad.reason}", key=bad.key))
    problems += [impact.gap_problem(gap) for gap in marking.gaps]
    problems += _check_step_refs(marking)
    problems += _check_sizes(marking, impact)
    depths, unknown = _delta_depths(marking.headers)
    problems += _check_chains(marking, depths, unknown, impact)
    verified = (0, 0)
    if read_data:
        found, verified = _verify_data(repo, marking, depths, impact)
        problems += found
    index_claims = repo.store.index.ids() if repo.store.index is not None else []
    present = set(repo.store.ids())  # listed after the index: a commit stores, then indexes
    problems += _check_index(repo, index_claims, present)
    checked = Checked(
        refs=len(marking.refs), commits=len(marking.commits), retained_commits=len(marking.retained),
        manifests=len(marking.manifests), chunks=len(marking.headers), verified_objects=verified[0],
        verified_bytes=verified[1], unreachable_objects=len(present - marking.live),
    )
    return FsckReport(
        problems=problems, checked=checked, read_data=read_data,
        temp_files=tuple(str(p) for p in dead_temp_files(repo)),
        stale_locks=tuple(str(p) for p in (repo.lock.stale() if repo.lock is not None else [])),
    )


def _check_config(repo: Repository) -> list[Problem]:
    out = []
    try:
        Config.load(repo.backend.read(CONFIG_KEY), CONFIG_KEY)
    except KeyNotFoundError:
        out.append(Problem("config", f"{CONFIG_KEY} is missing", key=CONFIG_KEY))
    except CkptRepoError as exc:
        out.append(Problem("config", str(exc), key=CONFIG_KEY))
    try:
        repo.refs.current_branch()
    except CkptRepoError as exc:
        out.append(Problem("head", f"HEAD: {exc}", key="HEAD"))
    return out


class _Impact:
    """Who is hurt by a damaged object: commits, refs and entry paths."""

    def __init__(self, marking: Marking) -> None:
        self.marking = marking
        self.dependents: dict[ObjectId, set[ObjectId]] = defaultdict(set)
        for object_id, header in marking.headers.items():
            if header.base is not None:
                try:
                    self.dependents[ObjectId(header.base)].add(object_id)
                except FormatError:
                    continue
        self.commits_of_manifest: dict[ObjectId, list[ObjectId]] = defaultdict(list)
        for commit_id in sorted(marking.retained):
            commit = marking.commits.get(commit_id)
            if commit is not None:
                self.commits_of_manifest[commit.manifest_id].append(commit_id)
        self._users: dict[ObjectId, list[tuple[ObjectId, str]]] | None = None

    def users(self) -> dict[ObjectId, list[tuple[ObjectId, str]]]:
        if self._users is None:
            users: dict[ObjectId, list[tuple[ObjectId, str]]] = defaultdict(list)
            for manifest_id, manifest in self.marking.manifests.items():
                for path, entry in manifest.entries.items():
                    for chunk in {c.id for c in entry.stored_chunks}:
                        users[chunk].append((manifest_id, path))
            self._users = users
        return self._users

    def refs_of(self, commits: Iterable[str]) -> tuple[str, ...]:
        wanted = set(commits)
        return tuple(r.name for r in self.marking.refs if r.target.hex in wanted)

    def of_chunks(self, object_ids: Iterable[ObjectId]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(commits, paths) damaged by these chunks, through every delta built on them."""
        closure: set[ObjectId] = set()
        stack = list(object_ids)
        while stack:
            current = stack.pop()
            if current in closure:
                continue
            closure.add(current)
            stack.extend(self.dependents.get(current, ()))
        users = self.users()
        commits: set[str] = set()
        paths: set[str] = set()
        for chunk in closure:
            for manifest_id, path in users.get(chunk, ()):
                paths.add(path)
                commits.update(c.hex for c in self.commits_of_manifest.get(manifest_id, ()))
        return tuple(sorted(commits)), tuple(sorted(paths))

    def gap_problem(self, gap: Gap) -> Problem:
        what = {MISSING: "is missing", CORRUPT: "is corrupt", INVALID: "is not a valid document"}[gap.state]
        detail = "" if gap.state == MISSING else f": {gap.detail}"
        message = f"{gap.role} {gap.object_id.hex} {what}{detail} (named by {gap.needed_by})"
        kind = _GAP_KINDS[gap.state]
        if gap.role == "commit":
            commits = tuple(sorted({gap.object_id.hex} | ({gap.needed_by} if _is_hex(gap.needed_by) else set())))
            refs = self.refs_of(commits) or ((gap.needed_by,) if gap.needed_by.startswith("refs/") else ())
            return Problem(kind, message, object_id=gap.object_id.hex, commits=commits, refs=refs,
                           role=gap.role, named_by=gap.needed_by)
        if gap.role == "manifest":
            commits = tuple(c.hex for c in self.commits_of_manifest.get(gap.object_id, ()))
            return Problem(kind, message, object_id=gap.object_id.hex, commits=commits,
                           refs=self.refs_of(commits), paths=("*",), role=gap.role, named_by=gap.needed_by)
        commits, paths = self.of_chunks([gap.object_id])
        return Problem(kind, message, object_id=gap.object_id.hex, commits=commits,
                       refs=self.refs_of(commits), paths=paths, role=gap.role, named_by=gap.needed_by)


def _is_hex(text: str) -> bool:
    try:
        ObjectId(text)
    except FormatError:
        return False
    return True


def _check_step_refs(marking: Marking) -> list[Problem]:
    out = []
    for record in marking.refs:
        if record.ref.kind != "steps":
            continue
        commit = marking.commits.get(record.target)
        if commit is not None and (commit.branch, commit.step) != (record.ref.name, record.ref.step):
            out.append(Problem(
                "step-ref",
                f"{record.key} names commit {record.target.hex}, which is step {commit.step} "
                f"of branch {commit.branch}",
                key=record.key, commits=(record.target.hex,), refs=(record.name,),
            ))
    return out


def _check_sizes(marking: Marking, impact: _Impact) -> list[Problem]:
    """Entries that claim a chunk size its header contradicts (only those entries are hurt)."""
    wrong: dict[tuple[ObjectId, int], list[tuple[ObjectId, str]]] = defaultdict(list)
    for manifest_id, manifest in marking.manifests.items():
        for path, entry in manifest.entries.items():
            for chunk in entry.chunks:
                header = marking.headers.get(chunk.id)
                if header is not None and header.size != chunk.size:
                    wrong[(chunk.id, chunk.size)].append((manifest_id, path))
    out = []
    for (chunk_id, claimed), users in sorted(wrong.items()):
        commits = tuple(sorted({c.hex for m, _ in users for c in impact.commits_of_manifest.get(m, ())}))
        out.append(Problem(
            "size-mismatch",
            f"chunk {chunk_id.hex} holds {marking.headers[chunk_id].size} bytes but a manifest says {claimed}",
            object_id=chunk_id.hex, commits=commits, refs=impact.refs_of(commits),
            paths=tuple(sorted({path for _, path in users})),
        ))
    return out


def _delta_depths(headers: Mapping[ObjectId, Header]) -> tuple[dict[ObjectId, int], set[ObjectId]]:
    """How many bases each object's decoding reads (_TOO_DEEP for over-long chains and
    cycles), and the objects whose chain runs into a base whose header is unknown (missing or
    damaged: a gap); those count that base as a full object."""
    depth: dict[ObjectId, int] = {}
    unknown: set[ObjectId] = set()
    for start in headers:
        chain: list[ObjectId] = []
        on_chain: set[ObjectId] = set()
        current: ObjectId | None = start
        blind = False
        while True:
            if current is None:
                tail = -1  # the chain ended on a full object
                break
            if current in depth:
                tail, blind = depth[current], current in unknown
                break
            if current in on_chain or len(chain) > MAX_DELTA_DEPTH:
                tail = _TOO_DEEP
                break
            header = headers.get(current)
            if header is None:
                tail, blind = 0, True
                break
            chain.append(current)
            on_chain.add(current)
            try:
                current = None if header.base is None else ObjectId(header.base)
            except FormatError:
                current, blind = None, True
        for offset, object_id in enumerate(reversed(chain)):
            depth[object_id] = min(_TOO_DEEP, tail + 1 + offset)
            if blind:
                unknown.add(object_id)
    return depth, unknown


def _check_chains(
    marking: Marking, depths: dict[ObjectId, int], unknown: set[ObjectId], impact: _Impact
) -> list[Problem]:
    listed = {c for m in marking.manifests.values() for c in m.chunk_ids()}
    out = []
    for object_id in sorted(marking.headers):
        actual = depths.get(object_id, 0)
        claimed = marking.headers[object_id].coding.get("depth")
        if object_id in listed and actual > MAX_DELTA_DEPTH:
            detail = f"its delta chain is longer than {MAX_DELTA_DEPTH} or loops"
        elif claimed is not None and object_id not in unknown and actual <= MAX_DELTA_DEPTH and claimed != actual:
            # The writer trusts the recorded depth when it picks delta bases.
            detail = f"its header claims a delta depth of {claimed!r}, its chain is {actual} deep"
        else:
            continue
        commits, paths = impact.of_chunks([object_id])
        out.append(Problem(
            "delta-chain", f"chunk {object_id.hex}: {detail}",
            object_id=object_id.hex, commits=commits, refs=impact.refs_of(commits), paths=paths,
        ))
    return out


def _verify_data(
    repo: Repository, marking: Marking, depths: dict[ObjectId, int], impact: _Impact
) -> tuple[list[Problem], tuple[int, int]]:
    """Decode and hash every live chunk, bases before the deltas built on them. A delta whose
    base is damaged is not reported again: the base's problem already names its keys."""
    damaged = {g.object_id for g in marking.gaps}
    damaged |= {oid for oid, d in depths.items() if d > MAX_DELTA_DEPTH}
    by_depth: dict[int, list[ObjectId]] = defaultdict(list)
    for object_id in marking.headers:
        if object_id not in damaged:
            by_depth[depths.get(object_id, 0)].append(object_id)

    def verify(object_id: ObjectId) -> str | None:
        try:
            repo.store.get(object_id, kind="chunk")
        except (ObjectCorruptError, FormatError, ObjectNotFoundError) as exc:
            return str(exc)
        return None

    problems: list[Problem] = []
    count = size = 0
    for level in sorted(by_depth):
        todo = []
        for object_id in sorted(by_depth[level]):
            base = marking.headers[object_id].base
            if base is not None and base in damaged:
                damaged.add(object_id)
            else:
                todo.append(object_id)
        for object_id, error in zip(todo, repo.pool.map(verify, todo)):
            if error is None:
                count += 1
                size += marking.headers[object_id].size
                continue
            damaged.add(object_id)
            commits, paths = impact.of_chunks([object_id])
            problems.append(Problem(
                "corrupt-object", f"chunk {object_id.hex} does not verify: {error}",
                object_id=object_id.hex, commits=commits, refs=impact.refs_of(commits), paths=paths,
            ))
    return problems, (count, size)


def _check_index(repo: Repository, claimed: list[ObjectId], present: set[ObjectId]) -> list[Problem]:
    index = repo.store.index
    if index is None:
        return []
    stale = [
        oid for oid in claimed
        if oid not in present and index.get(oid) is not None and repo.backend.stat(object_key(oid)) is None
    ]
    if not stale:
        return []
    shown = ", ".join(oid.hex for oid in stale[:3])
    return [Problem(
        "stale-index",
        f"the index claims {len(stale)} objects the store does not hold ({shown}…); a commit could "
        "reuse them as if present; `ckpt fsck --repair` rebuilds the index",
        object_id=stale[0].hex,
    )]


def dead_temp_files(repo: Repository) -> list[Path]:
    """Temporary files no running write owns: lock files of dead owners, and other temporary
    files older than TEMP_GRACE_SECONDS (only trusted under the exclusive lock)."""
    temp_files = getattr(repo.backend, "temp_files", None)
    if temp_files is None:
        return []
    now = time.time()
    dead = []
    for path in temp_files():
        if path.name.endswith(f"{TEMP_MARKER}lock"):
            if is_stale(path, stale_after=repo.lock.stale_after if repo.lock else 6 * 3600):
                dead.append(path)
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > TEMP_GRACE_SECONDS:
            dead.append(path)
    return dead


# --- repair --------------------------------------------------------------------------------


def _repair(repo: Repository, read_data: bool, stale_locks: list[Path]) -> FsckReport:
    repairs: list[str] = []
    if repo.store.index is not None:
        count = repo.store.rebuild_index()
        repairs.append(f"rebuilt the index from the store ({count} objects)")
    for path in dead_temp_files(repo):
        path.unlink(missing_ok=True)
        repairs.append(f"removed leftover temporary file {path}")
    if repo.lock is not None:
        removed = set(repo.lock.remove_stale()) | {p for p in stale_locks if not p.exists()}
        repairs += [f"removed stale lock {path}" for path in sorted(removed)]
    report = check(repo, read_data=read_data)
    damaged = {ObjectId(p.object_id) for p in report.problems if p.kind == "corrupt-object" and p.object_id}
    missing = {ObjectId(p.object_id) for p in report.problems if p.kind == "missing-object" and p.object_id}
    for object_id in sorted(damaged):
        key = quarantine(repo, object_id)
        if key is not None:
            repairs.append(f"moved damaged object {object_id.hex} to {key}")
    changed = bool(damaged)
    if damaged | missing:
        fetched, note = _refetch(repo, damaged | missing)
        repairs += [f"fetched {oid.hex} from a remote" for oid in sorted(fetched)]
        changed = changed or bool(fetched)
        # A missing base that no remote has may be a phantom: the delta naming it can have a
        # damaged header. Set that delta aside and fetch it whole (with its real base).
        suspects = {
            ObjectId(p.named_by) for p in report.problems
            if p.kind == "missing-object" and p.role == "base" and p.named_by and _is_hex(p.named_by)
            and p.object_id and ObjectId(p.object_id) not in fetched and repo.store.has(ObjectId(p.named_by))
        }
        if suspects and repo.config.remotes:
            for object_id in sorted(suspects):
                key = quarantine(repo, object_id)
                if key is not None:
                    repairs.append(f"moved {object_id.hex}, a delta whose base is nowhere, to {key}")
            again, note = _refetch(repo, suspects)
            repairs += [f"fetched {oid.hex} from a remote" for oid in sorted(again)]
            changed = True
        if note:
            repairs.append(note)
    if changed:
        report = check(repo, read_data=read_data)
    return replace(report, repairs=tuple(repairs))


def quarantine(repo: Repository, object_id: ObjectId) -> str | None:
    """Move a damaged object out of ``objects/`` (kept for inspection); None if it is gone."""
    try:
        blob = repo.backend.read(object_key(object_id))
    except KeyNotFoundError:
        return None
    key = f"{QUARANTINE_PREFIX}/{object_id.hex}-{time.time_ns()}"
    repo.backend.write(key, blob)
    repo.store.delete(object_id)
    return key


def _refetch(repo: Repository, wanted: set[ObjectId]) -> tuple[set[ObjectId], str]:
    if not repo.config.remotes:
        return set(), f"{len(wanted)} damaged or missing objects left: no remote is configured to fetch them from"
    try:
        from .sync import fetch_objects
    except ImportError:
        return set(), f"{len(wanted)} damaged or missing objects left: this ckptrepo cannot fetch single objects"
    fetched = set(fetch_objects(repo, wanted))
    left = len(wanted - fetched)
    return fetched, (f"{left} damaged or missing objects are on no remote" if left else "")
