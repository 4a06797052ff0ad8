"""The repository facade: composes the object store, refs, index and data path."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import Backend
from .backends.local import LocalBackend, network_filesystem
from .codec import canonical_json
from .config import CONFIG_KEY, Config
from .datapath import ChunkReader, ChunkWriter, default_workers
from .dictdir import MARKER, entry_slice, parse_safetensors_header, read_marker
from .errors import (
    CkptRepoError,
    FormatError,
    KeyNotFoundError,
    ObjectNotFoundError,
    RefConflictError,
    RefExistsError,
    RepositoryError,
    RevisionError,
)
from .gcpause import paused_gc
from .ids import ObjectId
from .index import ChunkIndex, IndexUnavailableError
from .locking import RepoLock
from .objects import INLINE_FORMAT_VERSION, Commit, CommitStats, Entry, Manifest, check_metrics, now_utc
from .refs import RefStore, branch_ref, step_ref, tag_ref, validate_name
from .revisions import resolve_revision
from .store import OBJECTS_PREFIX, ObjectStore, key_to_id
from .trees import open_source
from .values import Leaf, flatten

if TYPE_CHECKING:
    from .snapshot import Snapshot

_COMMIT_RETRIES = 20
_MANIFEST_MEMO = 4
# Written by a shallow clone (ckptrepo.sync): the commits whose parents were not fetched.
SHALLOW_KEY = "shallow"


@dataclass(frozen=True, slots=True)
class _CommitRequest:
    """What a commit was asked for, validated."""

    branch: str
    step: int | None
    message: str
    metrics: dict[str, float]
    tags: tuple[str, ...]
    meta: dict[str, Any]
    replace: bool


class Repository:
    """A ckptrepo repository. Create one with :func:`ckptrepo.init` or :func:`ckptrepo.open`."""

    def __init__(self, backend: Backend, config: Config, *, cache_dir: Path | None, read_only: bool = False) -> None:
        self.backend = backend
        self.config = config
        self.read_only = read_only
        self.cache_dir = cache_dir
        index = ChunkIndex(cache_dir / "index") if cache_dir is not None else None
        self.store = ObjectStore(backend, index, config.compression)
        self.refs = RefStore(backend)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._manifests: dict[ObjectId, Manifest] = {}
        local_root = Path(backend.location) if backend.capabilities.local else None
        self.lock = RepoLock(local_root / "locks") if local_root is not None else None
        if index is not None:
            try:
                if not index.ready:
                    self.store.rebuild_index()
            except IndexUnavailableError:
                # A read-only (or full) filesystem: the repository still opens, without the
                # cache; every presence check then asks the store itself.
                index.close()
                self.store.index = None

    # --- plumbing ------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def pool(self) -> ThreadPoolExecutor:
        # A pool does not survive fork(); a child process makes its own.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(default_workers(), thread_name_prefix="ckptrepo")
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        if self.store.index is not None:
            self.store.index.close()
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ckptrepo.Repository at {self.location}>"

    def shared_lock(self) -> AbstractContextManager[None]:
        """Held while writing objects that no ref names yet, so gc cannot sweep them.
        Repositories on object stores have no lock files: none is taken there."""
        return self.lock.shared() if self.lock is not None else nullcontext()

    def exclusive_lock(self) -> AbstractContextManager[None]:
        """Held by gc and prune: waits until no writer holds the shared lock."""
        return self.lock.exclusive() if self.lock is not None else nullcontext()

    def _writable(self) -> None:
        if self.read_only:
            raise RepositoryError(f"{self.location} is opened read-only")

    def save_config(self, config: Config) -> None:
        self._writable()
        self.backend.write(CONFIG_KEY, config.dump())
        self.config = config

    # --- reading objects -----------------------------------------------------------------

    def load_commit(self, commit_id: ObjectId) -> Commit:
        return Commit.from_document(self.store.get_document(commit_id, "commit"))

    @paused_gc()
    def load_manifest(self, manifest_id: ObjectId) -> Manifest:
        # Manifests are immutable and named by their hash, so a parsed one stays valid; the
        # next commit's parent is nearly always the last one written or read here, and
        # validating a large manifest costs more than hashing its checkpoint.
        cached = self._manifests.get(manifest_id)
        # Only while it is still stored (one index lookup): after gc collected a pruned
        # commit's data, a checkout of it must fail here too, even when every chunk of the
        # manifest is inline and nothing else would be read.
        if cached is not None and self.store.has(manifest_id):
            return cached
        manifest = Manifest.from_document(self.store.get_document(manifest_id, "manifest"))
        self._remember_manifest(manifest_id, manifest)
        return manifest

    def _remember_manifest(self, manifest_id: ObjectId, manifest: Manifest) -> None:
        self._manifests[manifest_id] = manifest
        while len(self._manifests) > _MANIFEST_MEMO:
            self._manifests.pop(next(iter(self._manifests)))

    def _find_commits(self, prefix: str) -> list[ObjectId]:
        found = []
        for key in self.backend.list(f"{OBJECTS_PREFIX}/{prefix[:2]}"):
            object_id = key_to_id(key)
            if object_id is not None and object_id.startswith(prefix):
                try:
                    if self.store.header(object_id).kind == "commit":
                        found.append(object_id)
                except CkptRepoError:
                    continue
        return found

    def _first_parent(self, commit_id: ObjectId) -> ObjectId | None:
        parents = self.load_commit(commit_id).parents
        return parents[0] if parents and commit_id not in self.shallow_commits() else None

    def shallow_commits(self) -> frozenset[ObjectId]:
        """Commits whose parents a shallow clone left out (key ``shallow``: one id a line)."""
        try:
            raw = self.backend.read(SHALLOW_KEY)
        except KeyNotFoundError:
            return frozenset()
        return frozenset(ObjectId(line) for line in raw.decode("ascii", "replace").split())

    def resolve_id(self, rev: str) -> ObjectId:
        return resolve_revision(rev, self.refs, self._find_commits, self._first_parent)

    def resolve(self, rev: str) -> Commit:
        """The commit a revision names (SPEC section 3)."""
        return self.load_commit(self.resolve_id(rev))

    # --- commit --------------------------------------------------------------------------

    @paused_gc()
    def commit(
        self,
        source: Any,
        *,
        step: int | None = None,
        branch: str | None = None,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        tags: Iterable[str] = (),
        meta: Mapping[str, Any] | None = None,
        replace: bool = False,
        allow_pickle: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Commit:
        """Commit a dict checkpoint (a Mapping) or a directory (a path or fsspec URI).

        Everything is validated before anything is written; the branch ref moves last.
        ``progress(n)`` is called from worker threads as each ``n`` bytes are stored.
        """
        request = self._prepare(step, branch, message, metrics, tags, meta, replace)
        leaves = None
        if isinstance(source, Mapping):
            tree, leaves = flatten(source, allow_pickle=allow_pickle)
        with self.shared_lock():
            tip, parent = self._tip_and_parent(request.branch)
            parent_manifest = self._parent_manifest(parent)
            with ChunkWriter(
                self.store, self.pool, on_progress=progress, inline_max=self.config.chunking.inline_max_size
            ) as writer:
                if leaves is not None:
                    manifest = self._build_dict(writer, tree, leaves, parent_manifest)
                else:
                    manifest = self._build_directory(writer, source, parent_manifest)
                writer.publish()  # the chunks are durable before the manifest names them
            commit = self._record(request, tip, parent, manifest, _stats(manifest, writer))
        for tag in request.tags:
            self.refs.create(tag_ref(tag), commit.id)
        return commit

    def commit_manifest(
        self,
        manifest: Manifest,
        *,
        step: int | None = None,
        branch: str | None = None,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        meta: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Commit:
        """Commit a manifest whose chunks are already stored, e.g. by the ranks of a
        torch.distributed.checkpoint save (ckptrepo.integrations.torch_dcp). Every chunk it
        lists must be present; the refs move as in :meth:`commit`."""
        request = self._prepare(step, branch, message, metrics, (), meta, replace)
        manifest = Manifest.from_document(manifest.to_document())  # schema-checked like any read
        with self.shared_lock():
            for chunk_id in sorted(manifest.chunk_ids()):
                if not self.store.has(chunk_id):
                    raise ObjectNotFoundError(chunk_id.hex, self.location)
            tip, parent = self._tip_and_parent(request.branch)
            return self._record(request, tip, parent, manifest, CommitStats(logical_bytes=manifest.logical_bytes))

    def _prepare(
        self,
        step: Any,
        branch: str | None,
        message: Any,
        metrics: Mapping[str, float] | None,
        tags: Iterable[str],
        meta: Mapping[str, Any] | None,
        replace: bool,
    ) -> _CommitRequest:
        """Validate what a commit was asked for, before anything is written."""
        self._writable()
        request = _CommitRequest(
            branch=validate_name(branch or self.refs.current_branch(), "branch"),
            step=_check_step(step),
            message=message,
            metrics=check_metrics(metrics),
            tags=tuple(validate_name(t, "tag") for t in tags),
            meta=dict(meta or {}),
            replace=replace,
        )
        try:
            canonical_json(request.meta)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"commit meta must be JSON-serialisable: {exc}") from None
        if not isinstance(message, str):
            raise TypeError("commit message must be a str")
        for tag in request.tags:
            if self.refs.get(tag_ref(tag)) is not None:
                raise RefExistsError(f"tag {tag} exists already")
        if request.step is not None and not replace and self.refs.get(step_ref(request.branch, request.step)):
            raise RefExistsError(
                f"branch {request.branch} already has step {request.step} (pass replace=True to replace it)"
            )
        return request

    def _tip_and_parent(self, branch: str) -> tuple[ObjectId | None, ObjectId | None]:
        """The branch's tip, and the new commit's parent: the tip, or for a new branch the
        current branch's tip (a new branch forks from where the user is)."""
        tip = self.refs.get(branch_ref(branch))
        if tip is None and branch != self.refs.current_branch():
            return None, self.refs.get(branch_ref(self.refs.current_branch()))
        return tip, tip

    def _record(
        self,
        request: _CommitRequest,
        tip: ObjectId | None,
        parent: ObjectId | None,
        manifest: Manifest,
        data_stats: CommitStats,
    ) -> Commit:
        """Store the manifest and the commit, then move the refs (see :meth:`_publish`)."""
        put = self.store.put_document(manifest.to_document())
        self._remember_manifest(put.id, manifest)
        stats = dataclasses.replace(data_stats, stored_bytes=data_stats.stored_bytes + put.stored_bytes)
        commit = Commit(
            manifest_id=put.id,
            parents=(parent,) if parent is not None else (),
            branch=request.branch, step=request.step, message=request.message, metrics=request.metrics,
            meta=request.meta, created=now_utc(), stats=stats,
        )
        return self._publish(commit, tip, request.replace)

    def _publish(self, commit: Commit, expected_tip: ObjectId | None, replace: bool) -> Commit:
        """Store the commit, then move the step ref and the branch ref by compare-and-swap.

        If another process moved the branch meanwhile, the commit is re-parented onto the new
        tip and tried again: two committers to one branch never lose a commit silently.
        """
        branch = commit.branch
        step_current = self.refs.get(step_ref(branch, commit.step)) if commit.step is not None else None
        if step_current is not None and not replace:
            raise RefExistsError(f"branch {branch} already has step {commit.step}")
        original_step = step_current
        try:
            for _attempt in range(_COMMIT_RETRIES):
                self.store.put_document(commit.to_document())
                if commit.step is not None:
                    self.refs.update(step_ref(branch, commit.step), commit.id, step_current)
                    step_current = commit.id
                try:
                    self.refs.update(branch_ref(branch), commit.id, expected_tip)
                    return commit
                except RefConflictError:
                    expected_tip = self.refs.get(branch_ref(branch))
                    commit = _reparent(commit, expected_tip)
            raise RefConflictError(f"branch {branch} kept moving; gave up after {_COMMIT_RETRIES} tries")
        except BaseException:
            # The branch did not move (disk full, interrupted): give the step back, so that
            # committing it again works. If that fails too, the step names a whole commit
            # that is not on the branch; `replace=True` takes it over.
            if commit.step is not None and step_current != original_step:
                try:
                    self.refs.update(step_ref(branch, commit.step), original_step, step_current)
                except CkptRepoError:
                    pass
            raise

    def _parent_manifest(self, parent: ObjectId | None) -> Manifest | None:
        if parent is None:
            return None
        try:
            return self.load_manifest(self.load_commit(parent).manifest_id)
        except CkptRepoError:
            return None  # a pruned or damaged parent only costs the delta, never the commit

    def _build_dict(self, writer: ChunkWriter, tree: Any, leaves: list[Leaf], parent: Manifest | None) -> Manifest:
        chunk_size = self.config.chunking.tensor_chunk_size
        pending = []
        for leaf in leaves:
            if leaf.data is None:
                continue
            bases = _delta_bases(parent, leaf.path, leaf.entry, len(leaf.data))
            pending.append(
                (leaf, writer.write_fixed(leaf.data, chunk_size, leaf.itemsize, bases, leaf.entry.get("dtype")))
            )
        chunked = {leaf.path: writer.resolve(chunks) for leaf, chunks in pending}
        entries = {}
        for leaf in leaves:
            if leaf.data is None:
                entries[leaf.path] = Entry(kind=leaf.entry["kind"], meta=_meta(leaf.entry))
            else:
                entries[leaf.path] = Entry(
                    kind=leaf.entry["kind"], size=len(leaf.data), chunks=chunked[leaf.path], meta=_meta(leaf.entry)
                )
        return Manifest(type="dict", entries=entries, tree=tree)

    def _build_directory(self, writer: ChunkWriter, location: Any, parent: Manifest | None) -> Manifest:
        if not isinstance(location, (str, os.PathLike)):
            raise TypeError(
                f"cannot commit a {type(location).__name__}: pass a mapping (dict checkpoint) "
                "or a directory path or URI"
            )
        source = open_source(location)
        items = source.items()
        paths = {item.path for item in items}
        if MARKER in paths:
            return self._import_dict_directory(writer, source, items, parent)
        entries: dict[str, Entry] = {}
        for item in items:
            if item.kind == "file":
                with source.open(item.path) as data:
                    chunks = writer.resolve(writer.write_cdc(data, self.config.chunking))
                entries[item.path] = Entry("file", item.size, chunks, {"executable": item.executable})
            elif item.kind == "symlink":
                entries[item.path] = Entry("symlink", meta={"target": item.target})
            else:
                entries[item.path] = Entry("dir")
        return Manifest(type="directory", entries=dict(sorted(entries.items())))

    def _import_dict_directory(
        self, writer: ChunkWriter, source: Any, items: list[Any], parent: Manifest | None
    ) -> Manifest:
        """A directory written by ``to_directory`` of a dict checkpoint commits back as that
        dict checkpoint: the same manifest, the same chunks."""
        marker = read_marker(source.read_bytes(MARKER))
        raw_entries: dict[str, Any] = marker["entries"]
        by_file: dict[str, list[str]] = {}
        for path, raw in raw_entries.items():
            if not isinstance(raw, dict):
                raise FormatError(f"{MARKER}: entry {path} is not an object")
            if "file" in raw:
                by_file.setdefault(str(raw["file"]), []).append(path)
        listed = {item.path for item in items if item.kind == "file"}
        extra = listed - set(by_file) - {MARKER}
        if extra:
            raise RepositoryError(
                f"{MARKER} is present but the directory also holds {sorted(extra)[:3]}: "
                "remove them or the marker to commit it as plain files"
            )
        chunk_size = self.config.chunking.tensor_chunk_size
        documents: dict[str, Any] = {}
        for name, paths in by_file.items():
            with source.open(name) as data:
                header, start = parse_safetensors_header(data, name)
                for path in paths:
                    begin, end = entry_slice(header, start, len(data), path, name)
                    raw = {k: v for k, v in raw_entries[path].items() if k != "file"}
                    itemsize = _itemsize(raw, end - begin)
                    bases = _delta_bases(parent, path, raw, end - begin)
                    refs = writer.resolve(
                        writer.write_fixed(data[begin:end], chunk_size, itemsize, bases, raw.get("dtype"))
                    )
                    raw["size"] = end - begin
                    raw["chunks"] = [r.to_json() for r in refs]
                    documents[path] = raw
        for path, raw in raw_entries.items():
            documents.setdefault(path, raw)
        # The format that admits inline chunks; the manifest's own encoding says 1 when it
        # has none, as for a dict commit.
        doc = {
            "kind": "manifest", "format": INLINE_FORMAT_VERSION, "type": "dict", "tree": marker.get("tree"),
            "entries": documents,
        }
        return Manifest.from_document(doc)

    # --- views ---------------------------------------------------------------------------

    def checkout(self, rev: str | None = None, *, step: int | None = None, branch: str | None = None) -> Snapshot:
        """A lazy view of one version: ``rev``, or ``step`` on ``branch``, or the branch's tip."""
        from .snapshot import Snapshot

        commit_id = self._select(rev, step=step, branch=branch)
        commit = self.load_commit(commit_id)
        return Snapshot(self, commit_id, commit, self.load_manifest(commit.manifest_id))

    def _select(self, rev: str | None, *, step: int | None, branch: str | None) -> ObjectId:
        if rev is not None:
            if step is not None or branch is not None:
                raise RevisionError("give either a revision or step/branch, not both")
            return self.resolve_id(rev)
        branch = validate_name(branch or self.refs.current_branch(), "branch")
        if step is not None:
            found = self.refs.get(step_ref(branch, _check_step(step)))  # type: ignore[arg-type]
            if found is None:
                raise RevisionError(f"branch {branch} has no step {step}")
            return found
        tip = self.refs.get(branch_ref(branch))
        if tip is None:
            raise RevisionError(f"branch {branch} has no commits yet")
        return tip

    def reader(self) -> ChunkReader:
        return ChunkReader(self.store, self.pool)

    # --- history -------------------------------------------------------------------------

    def log(self, branch: str | None = None, limit: int | None = None) -> list[Commit]:
        """Commits of ``branch`` (default: the current one), newest first, by first parent."""
        branch = validate_name(branch or self.refs.current_branch(), "branch")
        out: list[Commit] = []
        current = self.refs.get(branch_ref(branch))
        shallow = self.shallow_commits()
        while current is not None and (limit is None or len(out) < limit):
            commit = self.load_commit(current)
            out.append(commit)
            current = commit.parents[0] if commit.parents and current not in shallow else None
        return out

    # --- refs ----------------------------------------------------------------------------

    def tag(self, name: str, rev: str = "latest", *, force: bool = False) -> Commit:
        self._writable()
        target = self.resolve_id(rev)
        ref = tag_ref(validate_name(name, "tag"))
        current = self.refs.get(ref)
        if current is not None and not force:
            raise RefExistsError(f"tag {name} exists already (on {current.short}); pass force=True to move it")
        with self.shared_lock():  # gc must not sweep the data between the check and the ref
            commit = self._with_data(target, f"tag {name}")
            self.refs.update(ref, target, current)
        return commit

    def untag(self, name: str) -> None:
        self._writable()
        ref = tag_ref(validate_name(name, "tag"))
        current = self.refs.get(ref)
        if current is None:
            raise RevisionError(f"no tag {name}")
        self.refs.update(ref, None, current)

    def tags(self) -> dict[str, ObjectId]:
        return self.refs.tags()

    def branch(self, name: str, rev: str = "latest") -> Commit:
        """Create branch ``name`` at ``rev``."""
        self._writable()
        target = self.resolve_id(rev)
        ref = branch_ref(validate_name(name, "branch"))
        current = self.refs.get(ref)
        if current is not None:
            # Said before anything about the target, as for tags: the name is the first problem.
            raise RefExistsError(f"branch {name} exists already (at {current.short})")
        with self.shared_lock():  # gc must not sweep the data between the check and the ref
            commit = self._with_data(target, f"branch {name}")
            self.refs.create(ref, target)
        return commit

    def _with_data(self, commit_id: ObjectId, what: str) -> Commit:
        """The commit, if its data is still stored: a ref to a pruned commit would name
        nothing that can be checked out (see docs/reliability.md, retention)."""
        commit = self.load_commit(commit_id)
        if not self.store.has(commit.manifest_id):
            raise RevisionError(
                f"cannot create {what} at {commit_id.short}: its data was pruned and collected"
            )
        return commit

    def branches(self) -> dict[str, ObjectId]:
        return self.refs.branches()

    @property
    def current_branch(self) -> str:
        return self.refs.current_branch()

    def switch(self, branch: str) -> None:
        """Make ``branch`` the current branch (where ``latest`` and new commits go)."""
        self._writable()
        self.refs.set_current_branch(branch)

    # --- steps ---------------------------------------------------------------------------

    def steps(self, branch: str | None = None) -> list[int]:
        return list(self.refs.steps(branch or self.refs.current_branch()))

    def latest_step(self, branch: str | None = None) -> int | None:
        steps = self.steps(branch)
        return steps[-1] if steps else None

    def best_step(self, metric: str, mode: str = "min", branch: str | None = None) -> int | None:
        """The step whose commit recorded the best value of ``metric`` (nan never wins)."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        best: tuple[float, int] | None = None
        for step, commit_id in self.refs.steps(branch or self.refs.current_branch()).items():
            value = self.load_commit(commit_id).metrics.get(metric)
            if value is None or math.isnan(value):
                continue
            key = value if mode == "min" else -value
            if best is None or key < best[0]:
                best = (key, step)
        return None if best is None else best[1]

    # --- maintenance, comparison and sync live in their own modules ------------------------

    def diff(self, rev_a: str, rev_b: str, *, numeric: bool = False) -> Any:
        from .diff import diff

        return diff(self, rev_a, rev_b, numeric=numeric)

    def du(self, rev: str | None = None, *, by_key: bool = False) -> Any:
        from .accounting import du

        return du(self, rev, by_key=by_key)

    def fsck(self, *, read_data: bool = False, repair: bool = False) -> Any:
        from .maintenance import fsck

        return fsck(self, read_data=read_data, repair=repair)

    def gc(self, *, dry_run: bool = False, grace_seconds: float | None = None) -> Any:
        from .maintenance import gc

        return gc(self, dry_run=dry_run, grace_seconds=grace_seconds)

    def prune(
        self, *, keep_last: int | None = None, keep_best: Any = None, keep_every: int | None = None,
        keep_tagged: bool = True, branch: str | None = None, dry_run: bool = False,
    ) -> Any:
        from .maintenance import prune

        return prune(self, keep_last=keep_last, keep_best=keep_best, keep_every=keep_every,
                     keep_tagged=keep_tagged, branch=branch, dry_run=dry_run)


    def add_remote(self, name: str, uri: str, **options: Any) -> None:
        from .sync import add_remote

        add_remote(self, name, uri, options)

    def remotes(self) -> dict[str, str]:
        return {name: remote.uri for name, remote in self.config.remotes.items()}

    def push(self, remote: str | None = None, *, refs: Iterable[str] | None = None) -> Any:
        from .sync import push

        return push(self, remote, refs=refs)

    def pull(self, remote: str | None = None) -> Any:
        from .sync import pull

        return pull(self, remote)

    def fetch(self, remote: str | None = None) -> Any:
        from .sync import fetch

        return fetch(self, remote)


# --- helpers -------------------------------------------------------------------------------


def _reparent(commit: Commit, parent: ObjectId | None) -> Commit:
    return dataclasses.replace(commit, parents=(parent,) if parent is not None else ())


def _check_step(step: Any) -> int | None:
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        try:
            import numpy as np

            if isinstance(step, np.integer) and step >= 0:
                return int(step)
        except ImportError:
            pass
        raise TypeError(f"step must be an int >= 0, not {step!r}")
    return int(step)


def _meta(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "kind"}


def _itemsize(raw: Mapping[str, Any], size: int) -> int:
    """Element size of a tensor entry (it only steers the coding, never a chunk's id)."""
    if raw.get("kind") != "tensor" or not isinstance(raw.get("shape"), list):
        return 1
    count = math.prod(raw["shape"])
    return max(1, size // count) if count else 1


def _delta_bases(parent: Manifest | None, path: str, entry: Mapping[str, Any], size: int) -> list[ObjectId] | None:
    if parent is None:
        return None
    return parent.delta_bases(path, entry.get("kind"), entry.get("dtype"), size)


def _stats(manifest: Manifest, writer: ChunkWriter) -> CommitStats:
    return CommitStats(
        logical_bytes=manifest.logical_bytes,
        stored_bytes=writer.stats.stored_bytes,
        new_chunks=writer.stats.new_chunks,
        reused_chunks=writer.stats.reused_chunks,
    )


# --- opening -------------------------------------------------------------------------------


def _local_root(path_or_uri: str | os.PathLike[str]) -> Path | None:
    text = os.fspath(path_or_uri)
    if "://" not in text:
        return Path(text).absolute()
    if text.startswith("file://"):
        return Path(text.removeprefix("file://")).absolute()
    return None


def init(path_or_uri: str | os.PathLike[str], *, config: Config | None = None) -> Repository:
    """Create a new repository; error if one exists there."""
    root = _local_root(path_or_uri)
    if root is None:
        from .remote import init_remote

        return init_remote(os.fspath(path_or_uri), config=config)
    if (root / CONFIG_KEY).exists():
        raise RepositoryError(f"a repository exists already at {root}")
    if root.exists() and not root.is_dir():
        raise RepositoryError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(root)
    config = config or Config()
    for sub in ("objects", "refs/branches", "refs/tags", "refs/steps", "locks", "cache"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    backend.write("HEAD", b"main\n")
    # config.yaml last: its presence is what makes this directory a repository.
    backend.write(CONFIG_KEY, config.dump(), create_only=True)
    return Repository(backend, config, cache_dir=_cache_dir(root))


def open(path_or_uri: str | os.PathLike[str], *, read_only: bool = False) -> Repository:  # noqa: A001
    """Open an existing repository; a clear error if there is none."""
    root = _local_root(path_or_uri)
    if root is None:
        from .remote import open_remote

        return open_remote(os.fspath(path_or_uri), read_only=read_only)
    backend = LocalBackend(root)
    try:
        raw = backend.read(CONFIG_KEY)
    except KeyNotFoundError:
        raise RepositoryError(f"no ckptrepo repository at {root} (run `ckpt init {root}` to create one)") from None
    config = Config.load(raw, str(root / CONFIG_KEY))
    return Repository(backend, config, cache_dir=_cache_dir(root), read_only=read_only)


def clone(
    src_uri: str, dest: str | os.PathLike[str], *, depth: int | None = None, rev: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Repository:
    """Copy a remote repository into a new local one at ``dest`` (``options``: the remote's
    filesystem options, e.g. ``endpoint_url``, kept for remote ``origin``)."""
    from .sync import clone as clone_repository

    return clone_repository(src_uri, dest, depth=depth, rev=rev, options=options)


def _cache_dir(root: Path) -> Path | None:
    """Where the LMDB index lives: inside the repository, unless that is on a network
    filesystem, where LMDB must never be (other machines would see a stale cache); there every
    presence check asks the store itself. Also refuses lock and cache directories that a
    repository copied from a stranger has linked to somewhere outside it."""
    real = root.resolve()
    for sub in ("locks", "cache", "cache/index"):
        target = (root / sub).resolve()
        if target != real and real not in target.parents:
            raise RepositoryError(f"{root / sub} leads outside the repository (to {target}); refusing to use it")
    return None if network_filesystem(root) else root / "cache"


def remove_index(repo_root: str | os.PathLike[str]) -> None:
    """Delete the local index cache (it is rebuilt on the next open)."""
    shutil.rmtree(Path(repo_root) / "cache" / "index", ignore_errors=True)
