"""Which objects a repository needs: the one definition of "live" that gc, fsck and sync share.

Retention model:

- Refs are the roots: every ``refs/branches/*``, ``refs/tags/*`` and ``refs/steps/*/*``.
- A commit's *document* is live when it is reachable from a root through parents, so ``log``
  always shows the whole history (down to the commits a shallow clone lists as its edge).
- A commit's *data* (its manifest, the chunks the manifest lists, and recursively the delta
  bases named in those chunks' headers) is live only when the commit is *retained*: it is the
  target of some ref, or it has no step (``step is None``: nothing can prune it).

``prune`` deletes step refs; ``gc`` then sweeps what this module no longer marks. A pruned
commit keeps its document (history stays complete) but loses its data.

Marking never fails on a damaged repository: what it cannot use is recorded as a :class:`Gap`:
"missing" (not stored), "corrupt" (stored bytes that do not decode to their id, or a header that
does not parse) or "invalid" (verified content that is not a valid document of its kind). A
present object that cannot be read hides the references it holds, so sweeping is only safe when
:attr:`Marking.complete` is true; fsck reports the gaps precisely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .codec import Header
from .errors import (
    FormatError,
    InvalidRefNameError,
    KeyNotFoundError,
    ObjectCorruptError,
    ObjectNotFoundError,
)
from .ids import ObjectId
from .objects import Commit, Manifest
from .refs import Ref

if TYPE_CHECKING:
    from .repository import Repository

REFS_PREFIX = "refs"

MISSING = "missing"
CORRUPT = "corrupt"
INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class RefRecord:
    """A ref as found on storage."""

    key: str  # storage key, e.g. refs/steps/main/100
    ref: Ref
    target: ObjectId

    @property
    def name(self) -> str:
        return str(self.ref)


@dataclass(frozen=True, slots=True)
class BadRef:
    """A key under refs/ that does not name a commit (bad name, bad content)."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Gap:
    """An object the repository needs but cannot use."""

    object_id: ObjectId
    role: str  # "commit" | "manifest" | "chunk" | "base"
    state: str  # MISSING | CORRUPT | INVALID
    detail: str
    needed_by: str  # the ref key, commit, manifest or chunk id that names the object


@dataclass(frozen=True, slots=True)
class Marking:
    """The result of one mark phase over a repository."""

    refs: tuple[RefRecord, ...]
    bad_refs: tuple[BadRef, ...]
    commits: Mapping[ObjectId, Commit]  # every readable commit reachable from the roots
    retained: frozenset[ObjectId]  # commits whose data is live
    manifests: Mapping[ObjectId, Manifest]  # readable manifests of retained commits
    headers: Mapping[ObjectId, Header]  # readable headers of live chunks and delta bases
    live: frozenset[ObjectId]  # every object id the repository needs, present or not
    gaps: tuple[Gap, ...]

    @property
    def complete(self) -> bool:
        """True when every root was understood and every present live object could be read,
        so nothing live can hide among the unmarked objects (the condition for sweeping)."""
        return not self.bad_refs and all(g.state == MISSING for g in self.gaps)

    def blockers(self) -> list[str]:
        """Why the marking is incomplete, one line each."""
        lines = [f"ref {b.key}: {b.reason}" for b in self.bad_refs]
        lines += [
            f"{g.role} {g.object_id.hex} (named by {g.needed_by}) is {g.state}: {g.detail}"
            for g in self.gaps
            if g.state != MISSING
        ]
        return lines


def read_refs(repo: Repository) -> tuple[list[RefRecord], list[BadRef]]:
    """Every ref on storage, read afresh (never from a cached listing), and the bad ones."""
    records: list[RefRecord] = []
    bad: list[BadRef] = []
    for key in sorted(repo.backend.list(REFS_PREFIX)):
        try:
            ref = parse_ref_key(key)
        except (InvalidRefNameError, FormatError) as exc:
            bad.append(BadRef(key, str(exc)))
            continue
        try:
            raw = repo.backend.read(key)
        except KeyNotFoundError:
            continue  # deleted between the listing and the read
        except FormatError as exc:
            bad.append(BadRef(key, str(exc)))
            continue
        try:
            target = ObjectId(raw.decode("ascii").strip())
        except (UnicodeDecodeError, FormatError):
            bad.append(BadRef(key, f"does not hold a commit id (holds {raw[:80]!r})"))
            continue
        records.append(RefRecord(key, ref, target))
    return records, bad


def parse_ref_key(key: str) -> Ref:
    """The :class:`Ref` a storage key under ``refs/`` stands for; FormatError if none."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == REFS_PREFIX and parts[1] in ("branches", "tags"):
        return Ref(parts[1], parts[2])
    if len(parts) == 4 and parts[:2] == [REFS_PREFIX, "steps"]:
        step = parts[3]
        if step.isascii() and step.isdigit() and (step == "0" or not step.startswith("0")):
            return Ref("steps", parts[2], int(step))
        raise FormatError(f"{key}: the step {step!r} is not a decimal number")
    raise FormatError(f"{key}: not a ref (refs/branches/NAME, refs/tags/NAME or refs/steps/BRANCH/N)")


def mark(repo: Repository, roots: Iterable[ObjectId] | None = None) -> Marking:
    """Mark everything the repository needs, from ``roots`` (commit ids; default: every ref).

    Explicit roots are treated as ref targets (retained). Sync passes the targets of the refs it
    is about to push, and gets exactly what the other side will need.
    """
    if roots is None:
        records, bad = read_refs(repo)
        root_ids = [r.target for r in records]
    else:
        records, bad = [], []
        root_ids = [ObjectId(r) for r in roots]
    gaps: list[Gap] = []

    commits: dict[ObjectId, Commit] = {}
    needed_by: dict[ObjectId, str] = {}
    for record in records:
        needed_by.setdefault(record.target, record.key)
    for root in root_ids:
        needed_by.setdefault(root, "root")
    # A shallow clone left these commits' parents out on purpose: the walk stops there.
    shallow = repo.shallow_commits()
    seen: set[ObjectId] = set()
    stack = list(dict.fromkeys(root_ids))
    while stack:
        commit_id = stack.pop()
        if commit_id in seen:
            continue
        seen.add(commit_id)
        commit = _load(repo, commit_id, "commit", needed_by.get(commit_id, "?"), gaps)
        if commit is None:
            continue
        commits[commit_id] = commit
        if commit_id in shallow:
            continue
        for parent in commit.parents:
            needed_by.setdefault(parent, commit_id.hex)
            if parent not in seen:
                stack.append(parent)

    targets = set(root_ids)
    retained = frozenset(c for c in seen if c in targets or (c in commits and commits[c].step is None))

    manifests: dict[ObjectId, Manifest] = {}
    manifest_ids: set[ObjectId] = set()
    chunk_ids: dict[ObjectId, str] = {}
    for commit_id in sorted(retained):
        commit = commits.get(commit_id)
        if commit is None:
            continue
        manifest_id = commit.manifest_id
        manifest_ids.add(manifest_id)
        if manifest_id in manifests:
            continue
        manifest = _load(repo, manifest_id, "manifest", commit_id.hex, gaps)
        if manifest is None:
            continue
        manifests[manifest_id] = manifest
        for chunk in manifest.chunk_ids():
            chunk_ids.setdefault(chunk, manifest_id.hex)

    headers: dict[ObjectId, Header] = {}
    pending = dict(chunk_ids)
    role = "chunk"
    visited: set[ObjectId] = set()
    while pending:
        visited.update(pending)
        found = _headers(repo, pending, role, gaps)
        headers.update(found)
        bases: dict[ObjectId, str] = {}
        for object_id, header in found.items():
            base = _base_of(header, object_id, gaps)
            if base is not None and base not in visited:
                bases.setdefault(base, object_id.hex)
        pending, role = bases, "base"

    live = frozenset(seen | manifest_ids | visited)
    unique_gaps = tuple({(g.object_id, g.role): g for g in gaps}.values())
    return Marking(
        refs=tuple(records), bad_refs=tuple(bad), commits=commits, retained=retained,
        manifests=manifests, headers=headers, live=live, gaps=unique_gaps,
    )


def live_objects(repo: Repository, roots: Iterable[ObjectId] | None = None) -> set[ObjectId]:
    """Every object id needed to keep ``roots`` (default: every ref) whole, present or not."""
    return set(mark(repo, roots).live)


# --- helpers -------------------------------------------------------------------------------


def _load(repo: Repository, object_id: ObjectId, role: str, needed_by: str, gaps: list[Gap]):  # type: ignore[no-untyped-def]
    # Straight from the store, never from the repository's memo of parsed manifests: fsck
    # must see what is stored now.
    try:
        document = repo.store.get_document(object_id, role)
        return Commit.from_document(document) if role == "commit" else Manifest.from_document(document)
    except ObjectNotFoundError:
        gaps.append(Gap(object_id, role, MISSING, "not in the store", needed_by))
    except ObjectCorruptError as exc:
        gaps.append(Gap(object_id, role, CORRUPT, str(exc), needed_by))
    except FormatError as exc:
        gaps.append(Gap(object_id, role, INVALID, str(exc), needed_by))
    return None


def _headers(
    repo: Repository, wanted: Mapping[ObjectId, str], role: str, gaps: list[Gap]
) -> dict[ObjectId, Header]:
    """Headers of ``wanted`` (read in the pool: on object stores each is a round trip)."""

    def read(object_id: ObjectId) -> Header | Gap:
        try:
            header = repo.store.header(object_id)
        except ObjectNotFoundError:
            return Gap(object_id, role, MISSING, "not in the store", wanted[object_id])
        except FormatError as exc:
            return Gap(object_id, role, CORRUPT, str(exc), wanted[object_id])
        if header.kind != "chunk":
            return Gap(object_id, role, CORRUPT, f"is a {header.kind}, not a chunk", wanted[object_id])
        return header

    ids = sorted(wanted)
    results = list(repo.pool.map(read, ids)) if len(ids) > 16 else [read(i) for i in ids]
    found: dict[ObjectId, Header] = {}
    for object_id, result in zip(ids, results):
        if isinstance(result, Gap):
            gaps.append(result)
        else:
            found[object_id] = result
    return found


def _base_of(header: Header, object_id: ObjectId, gaps: list[Gap]) -> ObjectId | None:
    if header.base is None:
        return None
    try:
        return ObjectId(header.base)
    except FormatError:
        gaps.append(Gap(object_id, "chunk", CORRUPT, f"its delta base {header.base!r} is not an id", "its header"))
        return None
