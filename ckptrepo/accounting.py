"""Where the bytes go: logical and stored sizes of a commit or of the whole repository.

Every object is counted once, at its stored size (the size of its object file, as
:meth:`ObjectStore.stored_size` reports it), so the figures add up to what the store holds:

- a chunk the manifest holds inline has no object file: ``inline`` counts those chunks and
  their content, with no stored bytes of their own (they are part of the manifest's);
- a chunk coded as a delta (``xor``) needs its base to be read; the bases a set of chunks
  needs, beyond the chunks themselves, are counted as ``delta_bases``;
- for the repository, every stored object falls in exactly one of: chunks some live
  manifest names, delta bases those need, commits and manifests (``metadata``), and
  ``unreferenced`` objects that nothing live needs (what ``gc`` would delete). The four add
  up to the bytes under ``objects/``;
- per commit (oldest first), each object is attributed to the first commit that needs it, so
  the per-commit figures add up to the live total; per top-level key likewise, a chunk's
  delta bases going with the chunk.

What is live is what :mod:`ckptrepo.reachability` marks, the one definition gc, fsck and sync
share: every commit reachable from a ref, and the data (manifest, chunks, delta bases) of the
retained ones; a pruned commit keeps only its commit document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from .codec import Header
from .errors import FormatError, ObjectNotFoundError, RepositoryError
from .ids import ObjectId
from .objects import Commit, Manifest
from .reachability import Marking, mark

if TYPE_CHECKING:
    from .repository import Repository

METADATA_CODEC = "metadata"
UNREADABLE_CODEC = "unreadable"


@dataclass(frozen=True, slots=True)
class Usage:
    """A set of objects: how many, their decoded (logical) bytes, their stored bytes."""

    objects: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.objects + other.objects,
            self.logical_bytes + other.logical_bytes,
            self.stored_bytes + other.stored_bytes,
        )


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """The entries under one top-level key (``model``, ``optimizer``, a top directory).

    ``chunks`` counts each chunk (with the delta bases it brings) under the first key that
    names it, so the keys add up. For a commit, ``not_in_parent`` counts the key's own chunks
    the parent lacks (bases aside), and ``unique`` the part of ``chunks`` no other live commit
    needs.
    """

    key: str
    entries: int
    logical_bytes: int
    chunks: Usage
    not_in_parent: Usage = Usage()
    unique: Usage = Usage()


@dataclass(frozen=True, slots=True)
class CommitUsage:
    commit: ObjectId
    step: int | None
    branch: str
    parent: ObjectId | None
    logical_bytes: int  # the sum of its entries' sizes
    chunks: Usage  # the distinct chunks its manifest names and the store holds
    inline: Usage  # the distinct chunks its manifest holds itself (stored bytes: 0)
    delta_bases: Usage  # other chunks those are coded against
    metadata: Usage  # its manifest and commit objects
    unique: Usage  # of all these, the objects no other reachable commit needs
    shared_with_parent: Usage  # its chunks the parent also names
    not_in_parent: Usage
    newly_stored_bytes: int  # as recorded when it was committed
    missing: int  # objects it needs that the store lacks (a shallow clone, damage)
    codings: dict[str, Usage]
    keys: dict[str, KeyUsage] | None = None

    @property
    def stored_bytes(self) -> int:
        """Every stored byte it takes to read this commit."""
        return self.chunks.stored_bytes + self.delta_bases.stored_bytes + self.metadata.stored_bytes

    @property
    def unique_bytes(self) -> int:
        return self.unique.stored_bytes

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes per byte of distinct chunk content (repeats within the commit)."""
        return _ratio(self.logical_bytes, self.chunks.logical_bytes + self.inline.logical_bytes)

    @property
    def compression_ratio(self) -> float:
        """Distinct chunk content per stored chunk byte (delta bases counted as cost)."""
        return _ratio(self.chunks.logical_bytes, self.chunks.stored_bytes + self.delta_bases.stored_bytes)


@dataclass(frozen=True, slots=True)
class CommitShare:
    """One commit's line in the repository's account: the objects first needed by it."""

    commit: ObjectId
    step: int | None
    branch: str
    created: datetime
    retained: bool  # False once pruned: only its commit document is kept
    logical_bytes: int  # as recorded in the commit
    stored: Usage
    newly_stored_bytes: int


@dataclass(frozen=True, slots=True)
class RepositoryUsage:
    commits: tuple[CommitShare, ...]  # reachable commits, oldest first
    logical_bytes: int  # the sum over retained commits of their logical bytes
    chunks: Usage  # distinct stored chunks named by reachable manifests
    inline: Usage  # distinct chunks reachable manifests hold themselves (stored bytes: 0)
    delta_bases: Usage  # chunks named by none but needed to decode those
    metadata: Usage  # reachable manifests and commits
    unreferenced: Usage  # stored objects nothing reachable needs
    missing: int
    codings: dict[str, Usage]
    keys: dict[str, KeyUsage] | None = None

    @property
    def reachable_bytes(self) -> int:
        return self.chunks.stored_bytes + self.delta_bases.stored_bytes + self.metadata.stored_bytes

    @property
    def stored_bytes(self) -> int:
        """Every byte in the object store (the sum of the object files' sizes)."""
        return self.reachable_bytes + self.unreferenced.stored_bytes

    @property
    def dedup_ratio(self) -> float:
        return _ratio(self.logical_bytes, self.chunks.logical_bytes + self.inline.logical_bytes)

    @property
    def compression_ratio(self) -> float:
        return _ratio(self.chunks.logical_bytes, self.chunks.stored_bytes + self.delta_bases.stored_bytes)

    @property
    def ratio(self) -> float:
        """Logical bytes per reachable stored byte: dedup and compression together."""
        return _ratio(self.logical_bytes, self.reachable_bytes)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


# --- what the store says about objects -----------------------------------------------------


class _Catalog:
    """Stored size and header of objects, each looked up once (in the pool); headers the
    marking has read already are not read again."""

    def __init__(self, repo: Repository, headers: Mapping[ObjectId, Header]) -> None:
        self.repo = repo
        self.headers: dict[ObjectId, Header | None] = dict(headers)
        self.stored: dict[ObjectId, int | None] = {}

    def _probe(self, object_id: ObjectId) -> tuple[int | None, Header | None]:
        store = self.repo.store
        try:
            stored = store.stored_size(object_id)
            header = self.headers.get(object_id)
            if header is None:
                header = store.header(object_id)
        except ObjectNotFoundError:
            return None, None
        except FormatError:
            return stored, None  # unreadable: fsck says what is wrong with it
        return stored, header

    def load(self, ids: Iterable[ObjectId]) -> None:
        todo = sorted(i for i in set(ids) if i not in self.stored)
        for object_id, (stored, header) in zip(todo, self.repo.pool.map(self._probe, todo)):
            self.stored[object_id] = stored
            self.headers[object_id] = header

    def closure(self, ids: Iterable[ObjectId]) -> set[ObjectId]:
        """``ids`` and every delta base they need, transitively."""
        found: set[ObjectId] = set()
        frontier = set(ids)
        while frontier:
            self.load(frontier)
            found |= frontier
            bases = set()
            for object_id in frontier:
                header = self.headers.get(object_id)
                if header is not None and header.base is not None:
                    bases.add(ObjectId(header.base))
            frontier = bases - found
        return found

    def usage(self, ids: Iterable[ObjectId]) -> Usage:
        ids = set(ids)
        self.load(ids)
        objects = logical = stored = 0
        for object_id in ids:
            size = self.stored[object_id]
            if size is None:
                continue
            header = self.headers[object_id]
            objects += 1
            logical += header.size if header is not None else 0
            stored += size
        return Usage(objects, logical, stored)

    def missing(self, ids: Iterable[ObjectId]) -> int:
        ids = set(ids)
        self.load(ids)
        return sum(1 for i in ids if self.stored[i] is None)

    def codings(self, ids: Iterable[ObjectId]) -> dict[str, Usage]:
        by_codec: dict[str, set[ObjectId]] = {}
        for object_id in set(ids):
            header = self.headers.get(object_id)
            if header is None:
                codec = UNREADABLE_CODEC
            elif header.kind != "chunk":
                codec = METADATA_CODEC
            else:
                codec = header.label  # "planes", "zstd", "delta+planes", ...
            by_codec.setdefault(codec, set()).add(object_id)
        usages = {codec: self.usage(members) for codec, members in sorted(by_codec.items())}
        return {codec: usage for codec, usage in usages.items() if usage.objects}


# --- history -------------------------------------------------------------------------------


def _oldest_first(commits: Mapping[ObjectId, Commit]) -> list[tuple[ObjectId, Commit]]:
    return sorted(commits.items(), key=lambda item: (item[1].created, item[0]))


def top_key(path: str) -> str:
    """The first segment of an entry path: ``model`` of ``model/0.weight``."""
    return path.split("/", 1)[0]


def _chunks_by_key(manifest: Manifest) -> dict[str, list[ObjectId]]:
    """Each chunk id under the first top-level key that names it, in manifest order."""
    seen: set[ObjectId] = set()
    out: dict[str, list[ObjectId]] = {}
    for path, entry in manifest.entries.items():
        bucket = out.setdefault(top_key(path), [])
        for chunk in entry.stored_chunks:
            if chunk.id not in seen:
                seen.add(chunk.id)
                bucket.append(chunk.id)
    return out


def _inline_usage(manifests: Iterable[Manifest]) -> Usage:
    """The distinct inline chunks of ``manifests``: their count and content; no stored bytes,
    as the manifests' own objects hold them."""
    sizes = {c.id: c.size for m in manifests for e in m.entries.values() for c in e.chunks if c.inline is not None}
    return Usage(len(sizes), sum(sizes.values()), 0)


def _entries_by_key(manifest: Manifest) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for path, entry in manifest.entries.items():
        count, size = out.get(top_key(path), (0, 0))
        out[top_key(path)] = (count + 1, size + entry.size)
    return out


def _manifest_of(repo: Repository, marking: Marking, commit: Commit) -> Manifest | None:
    found = marking.manifests.get(commit.manifest_id)
    if found is not None:
        return found
    try:
        return repo.load_manifest(commit.manifest_id)
    except ObjectNotFoundError:
        return None


# --- du ------------------------------------------------------------------------------------


def du(repo: Repository, rev: str | None = None, *, by_key: bool = False) -> CommitUsage | RepositoryUsage:
    """The account of commit ``rev``, or of the whole repository when ``rev`` is None."""
    if rev is None:
        return repository_usage(repo, by_key=by_key)
    return commit_usage(repo, rev, by_key=by_key)


def commit_usage(repo: Repository, rev: str, *, by_key: bool = False) -> CommitUsage:
    commit_id = repo.resolve_id(rev)
    commit = repo.load_commit(commit_id)
    marking = mark(repo)
    catalog = _Catalog(repo, marking.headers)
    manifest = _manifest_of(repo, marking, commit)
    # (a manifest parsed earlier may be remembered in memory after gc deleted it)
    if manifest is None or not repo.store.has(commit.manifest_id):
        raise RepositoryError(
            f"commit {commit_id.short}: its manifest {commit.manifest_id.short} is not in the store "
            "(its data was pruned and collected, or this is a shallow clone)"
        )
    own = manifest.chunk_ids()
    needed = catalog.closure(own)
    metadata = {commit_id, commit.manifest_id}

    # Everything the other live commits need, to tell what only this one needs.
    others: set[ObjectId] = set(marking.commits) - {commit_id}
    other_chunks: set[ObjectId] = set()
    for other_id in marking.retained - {commit_id}:
        other = marking.commits.get(other_id)
        if other is None:
            continue
        others.add(other.manifest_id)
        other_manifest = marking.manifests.get(other.manifest_id)
        if other_manifest is not None:
            other_chunks |= other_manifest.chunk_ids()
    others |= catalog.closure(other_chunks)
    unique = (needed | metadata) - others

    parent_id = commit.parents[0] if commit.parents else None
    parent_chunks: set[ObjectId] = set()
    if parent_id is not None:
        parent = marking.commits.get(parent_id)
        parent_manifest = _manifest_of(repo, marking, parent) if parent is not None else None
        if parent_manifest is not None:
            parent_chunks = parent_manifest.chunk_ids()

    keys = None
    if by_key:
        keys = {}
        entries = _entries_by_key(manifest)
        taken: set[ObjectId] = set()
        for key, chunk_ids in _chunks_by_key(manifest).items():
            with_bases = catalog.closure(chunk_ids) - taken
            taken |= with_bases
            count, size = entries[key]
            keys[key] = KeyUsage(
                key, count, size,
                chunks=catalog.usage(with_bases),
                not_in_parent=catalog.usage(set(chunk_ids) - parent_chunks),
                unique=catalog.usage(with_bases & unique),
            )

    return CommitUsage(
        commit=commit_id,
        step=commit.step,
        branch=commit.branch,
        parent=parent_id,
        logical_bytes=manifest.logical_bytes,
        chunks=catalog.usage(own),
        inline=_inline_usage([manifest]),
        delta_bases=catalog.usage(needed - own),
        metadata=catalog.usage(metadata),
        unique=catalog.usage(unique),
        shared_with_parent=catalog.usage(own & parent_chunks),
        not_in_parent=catalog.usage(own - parent_chunks),
        newly_stored_bytes=commit.stats.stored_bytes,
        missing=catalog.missing(needed | metadata),
        codings=catalog.codings(needed | metadata),
        keys=keys,
    )


def repository_usage(repo: Repository, *, by_key: bool = False) -> RepositoryUsage:
    marking = mark(repo)
    catalog = _Catalog(repo, marking.headers)
    commits = _oldest_first(marking.commits)
    referenced: set[ObjectId] = set()
    for live_manifest in marking.manifests.values():
        referenced |= live_manifest.chunk_ids()
    chunk_like = catalog.closure(referenced)
    metadata = set(marking.live) - chunk_like

    # Each object goes to the first commit (and, within it, the first key) that needs it.
    seen: set[ObjectId] = set()
    shares = []
    keys: dict[str, KeyUsage] = {}
    for commit_id, commit in commits:
        first = {commit_id}
        retained = commit_id in marking.retained
        manifest = marking.manifests.get(commit.manifest_id) if retained else None
        if retained:
            first.add(commit.manifest_id)
        first -= seen
        seen |= first
        if manifest is not None:
            entries = _entries_by_key(manifest)
            for key, chunk_ids in _chunks_by_key(manifest).items():
                new = catalog.closure(chunk_ids) - seen
                seen |= new
                first |= new
                if by_key:
                    count, size = entries[key]
                    old = keys.get(key, KeyUsage(key, 0, 0, Usage()))
                    keys[key] = KeyUsage(
                        key, old.entries + count, old.logical_bytes + size, old.chunks + catalog.usage(new)
                    )
        shares.append(CommitShare(
            commit_id, commit.step, commit.branch, commit.created, retained,
            commit.stats.logical_bytes, catalog.usage(first), commit.stats.stored_bytes,
        ))

    garbage = set(repo.store.ids()) - set(marking.live)
    return RepositoryUsage(
        commits=tuple(shares),
        logical_bytes=sum(s.logical_bytes for s in shares if s.retained),
        chunks=catalog.usage(referenced),
        inline=_inline_usage(marking.manifests.values()),
        delta_bases=catalog.usage(chunk_like - referenced),
        metadata=catalog.usage(metadata),
        unreferenced=catalog.usage(garbage),
        missing=catalog.missing(marking.live),
        codings=catalog.codings(chunk_like | metadata),
        keys=dict(sorted(keys.items(), key=lambda kv: -kv[1].chunks.stored_bytes)) if by_key else None,
    )
