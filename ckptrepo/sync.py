"""Push, fetch, pull and clone: moving objects and refs between two repositories.

Both sides have the same layout, so a transfer copies object files as they are stored (coded,
compressed, delta-coded) and moves refs last:

- **What moves.** The objects the refs being sent need, as :func:`ckptrepo.reachability.mark`
  defines them: commit documents through parents; for retained commits (ref targets, and
  commits without a step) the manifest, its chunks and, recursively, their delta bases.
- **Only what is missing.** Ref values are compared first: an up-to-date push costs one listing
  of ``refs/`` and a read per ref. Otherwise the needed objects are checked against the other
  side (a stat each for a few, one listing of ``objects/`` for many) and only the missing are
  sent, many at once (``transfers`` threads, 16 by default).
- **Order.** Chunks by delta depth (a base before the deltas coded against it), then manifests,
  then commits (parents first), then refs. A remote branch moves by compare-and-swap from the
  value read at the start, so of two pushers one wins and the other gets "remote moved, pull
  first"; its objects stay, unreferenced and harmless. An interrupted transfer leaves refs
  where they were; running it again sends only what is still missing.
- **Trust.** Every object fetched is decoded and checked against its id before it is stored;
  a remote serving wrong bytes is reported with the object id and the remote, and nothing of
  it is stored. A remote object whose size differs from ours (a write cut short on a store
  without atomic writes) is downloaded, checked, and replaced only if broken.
- **Remote-tracking state.** After each fetch or push, ``remotes/<name>.json`` in the local
  repository records the remote's URI, when, and its refs as last seen
  (``{"refs/branches/main": "<commit id>", ...}``). It is informational: every transfer asks
  the remote afresh.
- **Shallow clones.** ``clone(depth=N)`` fetches N commits from each branch tip (``rev=REV``:
  that revision, by default alone); the commits whose parents were left out are listed in the
  ``shallow`` key, where ``log`` and ``~K`` stop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .backends.base import Backend, list_sizes
from .codec import split_object
from .config import Remote
from .errors import (
    CkptRepoError,
    FormatError,
    InvalidRefNameError,
    KeyNotFoundError,
    ObjectCorruptError,
    ObjectNotFoundError,
    PreconditionFailedError,
    RefConflictError,
    RemoteError,
    RepositoryError,
)
from .ids import ObjectId
from .objects import Commit, Manifest
from .reachability import MISSING, mark, parse_ref_key
from .refs import Ref, RefStore, branch_ref, validate_name
from .remote import (
    DEFAULT_TRANSFERS,
    check_options,
    check_uri,
    is_remote_uri,
    local_path,
    open_backend,
    read_config,
    write_skeleton,
)
from .repository import SHALLOW_KEY, Repository
from .repository import init as init_repository
from .revisions import resolve_revision
from .store import OBJECTS_PREFIX, ObjectStore, key_to_id, object_key
from .validation import parse_json

TRACKING_PREFIX = "remotes"
# Up to this many objects are looked up one stat each; more, with one listing of objects/.
STAT_LOOKUP_LIMIT = 64
# Decoded chunks kept while fetching, so a delta's base is not decoded again from disk.
DECODED_CACHE_BYTES = 256 << 20
_REF_ORDER = {"branches": 0, "steps": 1, "tags": 2}


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefUpdate:
    ref: Ref
    old: ObjectId | None
    new: ObjectId | None

    def to_json(self) -> dict[str, str | None]:
        return {"ref": self.ref.key, "old": self.old, "new": self.new}


@dataclass(frozen=True, slots=True)
class PushReport:
    remote: str
    objects_sent: int
    bytes_sent: int
    objects_present: int  # needed objects the remote had already
    refs_updated: tuple[RefUpdate, ...]
    seconds: float

    @property
    def up_to_date(self) -> bool:
        return not self.refs_updated

    def to_json(self) -> dict[str, Any]:
        return {"remote": self.remote, "objects_sent": self.objects_sent, "bytes_sent": self.bytes_sent,
                "objects_present": self.objects_present, "seconds": round(self.seconds, 3),
                "refs_updated": [u.to_json() for u in self.refs_updated]}


@dataclass(frozen=True, slots=True)
class FetchReport:
    remote: str
    objects_received: int
    bytes_received: int
    refs: tuple[RefUpdate, ...]  # how the remote's refs changed since the last fetch
    shallow: tuple[ObjectId, ...]  # commits whose parents were left out (depth)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"remote": self.remote, "objects_received": self.objects_received,
                "bytes_received": self.bytes_received, "seconds": round(self.seconds, 3),
                "refs": [u.to_json() for u in self.refs], "shallow": list(self.shallow)}


@dataclass(frozen=True, slots=True)
class PullReport:
    fetch: FetchReport
    refs_updated: tuple[RefUpdate, ...]  # local refs created or fast-forwarded

    def to_json(self) -> dict[str, Any]:
        return {"fetch": self.fetch.to_json(), "refs_updated": [u.to_json() for u in self.refs_updated]}


@dataclass(frozen=True, slots=True)
class TransferProgress:
    operation: str  # "push" | "fetch"
    objects_done: int
    objects_total: int
    bytes_done: int
    bytes_total: int | None  # None while still discovering what to fetch


ProgressCallback = Callable[[TransferProgress], None]


@dataclass
class Endpoint:
    """The other side of a transfer: a backend, and the name it goes by in reports."""

    name: str | None  # the remote's name in config.yaml; None for a bare URI
    uri: str
    backend: Backend
    transfers: int = DEFAULT_TRANSFERS

    @classmethod
    def open(cls, name: str | None, uri: str, options: Mapping[str, Any] | None = None) -> Endpoint:
        options = check_options(options)
        return cls(name, uri, open_backend(uri, options), int(options.get("transfers", DEFAULT_TRANSFERS)))

    @property
    def label(self) -> str:
        return f"remote {self.name} ({self.uri})" if self.name else self.uri

    def close(self) -> None:
        self.backend.close()


def connect(repo: Repository, remote: str | None) -> Endpoint:
    """The endpoint for a remote of ``repo`` by name (default: ``origin``, or the only one),
    or for a bare URI."""
    remotes = repo.config.remotes
    if remote is not None and ("://" in remote or remote.startswith(("/", "."))):
        return Endpoint.open(None, check_uri(remote))
    if remote is None:
        if "origin" in remotes:
            remote = "origin"
        elif len(remotes) == 1:
            remote = next(iter(remotes))
        elif not remotes:
            raise RemoteError("this repository has no remote; add one with `ckpt remote add NAME URI`")
        else:
            raise RemoteError(f"which remote? this repository has {', '.join(sorted(remotes))}")
    if remote not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise RemoteError(f"no remote named {remote!r} (known: {known})")
    entry = remotes[remote]
    return Endpoint.open(remote, entry.uri, entry.options)


# --- remotes in config.yaml ------------------------------------------------------------------


def add_remote(repo: Repository, name: str, uri: str, options: Mapping[str, Any] | None = None) -> None:
    """Record remote ``name`` at ``uri`` in config.yaml. Options (e.g. ``endpoint_url``) are
    stored; credentials are refused (they come from the environment or fsspec's config)."""
    repo._writable()
    validate_name(name, "remote")
    if name in repo.config.remotes:
        raise RepositoryError(f"remote {name} exists already ({repo.config.remotes[name].uri})")
    checked = check_options(options, f"options of remote {name}")
    repo.save_config(repo.config.with_remote(name, Remote(uri=check_uri(uri), options=checked)))


def remove_remote(repo: Repository, name: str) -> None:
    repo._writable()
    if name not in repo.config.remotes:
        raise RemoteError(f"no remote named {name!r}")
    repo.save_config(repo.config.with_remote(name, None))
    repo.backend.delete(_tracking_key(name))


def _tracking_key(name: str) -> str:
    return f"{TRACKING_PREFIX}/{validate_name(name, 'remote')}.json"


def tracking_refs(repo: Repository, name: str) -> dict[Ref, ObjectId]:
    """The refs of remote ``name`` as last fetched or pushed (empty if never)."""
    try:
        raw = repo.backend.read(_tracking_key(name))
    except KeyNotFoundError:
        return {}
    doc = parse_json(raw, _tracking_key(name))
    refs = doc.get("refs") if isinstance(doc, dict) else None
    if not isinstance(refs, dict):
        raise FormatError(f"{_tracking_key(name)}: no refs mapping")
    return {parse_ref_key(key): ObjectId(value) for key, value in refs.items()}


def _record_tracking(repo: Repository, endpoint: Endpoint, refs: Mapping[Ref, ObjectId], *, merge: bool) -> None:
    if endpoint.name is None or repo.read_only:
        return
    current = tracking_refs(repo, endpoint.name) if merge else {}
    current.update(refs)
    doc = {
        "uri": endpoint.uri,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "refs": {ref.key: target.hex for ref, target in sorted(current.items(), key=lambda kv: kv[0].key)},
    }
    repo.backend.write(_tracking_key(endpoint.name), json.dumps(doc, indent=1, sort_keys=True).encode())


# --- shared helpers ------------------------------------------------------------------------


def read_refs(backend: Backend, pool: ThreadPoolExecutor, where: str) -> dict[Ref, ObjectId]:
    """Every branch, tag and step ref on ``backend``, read afresh and in parallel."""
    keys = []
    for key in backend.list("refs"):
        try:
            keys.append((key, parse_ref_key(key)))
        except (FormatError, InvalidRefNameError):
            continue  # not a ref of this format (a stray file); never followed

    def read(key: str) -> bytes | None:
        try:
            return backend.read(key)
        except KeyNotFoundError:
            return None  # deleted between the listing and the read

    found: dict[Ref, ObjectId] = {}
    for (key, ref), raw in zip(keys, pool.map(read, [k for k, _ in keys])):
        if raw is None:
            continue
        try:
            found[ref] = ObjectId(raw.decode("ascii").strip())
        except (UnicodeDecodeError, FormatError):
            raise RemoteError(f"{where}: ref {key} does not hold a commit id ({raw[:80]!r})") from None
    return found


def _ordered(updates: Iterable[RefUpdate]) -> list[RefUpdate]:
    return sorted(updates, key=lambda u: (_REF_ORDER[u.ref.kind], u.ref.key))


@contextmanager
def _transfer(repo: Repository, endpoint: Endpoint) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(endpoint.transfers, thread_name_prefix="ckptrepo-sync")
    try:
        with repo.shared_lock():  # gc must not sweep what a transfer reads or just stored
            yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def is_ancestor(repo: Repository, ancestor: ObjectId, descendant: ObjectId) -> bool:
    """True if ``ancestor`` is ``descendant`` or reachable from it through parents."""
    shallow = repo.shallow_commits()
    seen: set[ObjectId] = set()
    stack = [descendant]
    while stack:
        current = stack.pop()
        if current == ancestor:
            return True
        if current in seen or not repo.store.has(current):
            continue
        seen.add(current)
        if current not in shallow:
            stack.extend(repo.load_commit(current).parents)
    return False


def _parents_first(commits: Mapping[ObjectId, Commit]) -> list[ObjectId]:
    order: list[ObjectId] = []
    done: set[ObjectId] = set()
    for root in sorted(commits):
        stack: list[tuple[ObjectId, bool]] = [(root, False)]
        while stack:
            current, expanded = stack.pop()
            if current in done:
                continue
            if expanded:
                done.add(current)
                order.append(current)
                continue
            stack.append((current, True))
            stack.extend((p, False) for p in commits[current].parents if p in commits and p not in done)
    return order


class _Meter:
    """Counts what a transfer has done and reports it, at most ten times a second."""

    def __init__(self, operation: str, callback: ProgressCallback | None) -> None:
        self.operation = operation
        self.callback = callback
        self.objects_done = self.objects_total = self.bytes_done = 0
        self.bytes_total: int | None = None
        self._lock = threading.Lock()
        self._last = 0.0

    def expect(self, objects: int, nbytes: int | None = None) -> None:
        with self._lock:
            self.objects_total += objects
            if nbytes is not None:
                self.bytes_total = (self.bytes_total or 0) + nbytes
        self._emit(force=True)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.objects_done += 1
            self.bytes_done += nbytes
        self._emit()

    def _emit(self, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self.callback(TransferProgress(self.operation, self.objects_done, self.objects_total,
                                       self.bytes_done, self.bytes_total))

    def finish(self) -> None:
        self._emit(force=True)


def _run_all(pool: ThreadPoolExecutor, fn: Callable[[ObjectId], Any], ids: Iterable[ObjectId]) -> list[Any]:
    """``fn`` over ``ids`` in the pool; on the first failure, the rest is cancelled and the
    failure raised once the work already running has finished (every write is all-or-nothing,
    and nothing may still be writing, to a spill directory say, when the caller cleans up)."""
    futures = [pool.submit(fn, object_id) for object_id in ids]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)
        raise


# --- push --------------------------------------------------------------------------------------


def push(repo: Repository, remote: str | None = None, refs: Iterable[str] | None = None, *,
         progress: ProgressCallback | None = None) -> PushReport:
    """Send ``refs`` (branch or tag names; default: every branch, tag and step) and what they
    need to ``remote``. A remote ref moves only by fast-forward, and last."""
    endpoint = connect(repo, remote)
    try:
        return push_to(repo, endpoint, refs, progress=progress)
    finally:
        endpoint.close()


def push_to(repo: Repository, endpoint: Endpoint, refs: Iterable[str] | None = None, *,
            progress: ProgressCallback | None = None) -> PushReport:
    start = time.monotonic()
    local = _select_refs(repo, refs)
    with _transfer(repo, endpoint) as pool:
        _ensure_remote_repository(repo, endpoint)
        remote_refs = read_refs(endpoint.backend, pool, endpoint.label)
        updates = _plan_push(repo, endpoint, local, remote_refs)
        if not updates:
            _record_tracking(repo, endpoint, remote_refs, merge=False)
            return PushReport(endpoint.label, 0, 0, 0, (), time.monotonic() - start)
        waves = _push_waves(repo, [u.new for u in updates if u.new is not None])
        needed = [object_id for wave in waves for object_id in wave]
        missing = _missing_on_remote(repo, endpoint, pool, needed)
        meter = _Meter("push", progress)
        sizes = {object_id: repo.store.stored_size(object_id) for object_id in missing}
        meter.expect(len(missing), sum(sizes.values()))
        sent_bytes = 0
        for wave in waves:
            todo = [object_id for object_id in wave if object_id in missing]
            sent_bytes += sum(_run_all(pool, lambda oid: _send_object(repo, endpoint, oid, missing[oid], meter), todo))
        meter.finish()
        applied: list[RefUpdate] = []
        try:
            _move_remote_refs(endpoint, updates, applied)
        finally:
            remote_refs.update({u.ref: u.new for u in applied if u.new is not None})
            _record_tracking(repo, endpoint, remote_refs, merge=False)
    return PushReport(endpoint.label, len(missing), sent_bytes, len(needed) - len(missing),
                      tuple(applied), time.monotonic() - start)


def _select_refs(repo: Repository, names: Iterable[str] | None) -> dict[Ref, ObjectId]:
    branches = repo.refs.branches()
    tags = repo.refs.tags()
    steps = repo.refs.all_steps()
    if names is None:
        selected_branches, selected_tags = set(branches), set(tags)
    else:
        selected_branches, selected_tags = set(), set()
        for name in names:
            if name in branches:
                selected_branches.add(name)
            elif name in tags:
                selected_tags.add(name)
            else:
                raise RepositoryError(f"cannot push {name!r}: no branch or tag of that name")
    out: dict[Ref, ObjectId] = {Ref("branches", b): branches[b] for b in selected_branches}
    out.update({Ref("tags", t): tags[t] for t in selected_tags})
    out.update({Ref("steps", b, s): c for (b, s), c in steps.items() if b in selected_branches})
    return out


def _ensure_remote_repository(repo: Repository, endpoint: Endpoint) -> None:
    """A push to an empty location creates the repository there, with this one's chunking
    and compression settings and no remotes."""
    try:
        read_config(endpoint.backend, endpoint.uri)
        return
    except RepositoryError:
        pass
    if next(iter(endpoint.backend.list()), None) is not None:
        raise RemoteError(f"{endpoint.label}: not a repository and not empty; refusing to push there")
    try:
        write_skeleton(endpoint.backend, repo.config, repo.refs.current_branch())
    except PreconditionFailedError:
        pass  # another pusher created it first


def _plan_push(repo: Repository, endpoint: Endpoint, local: Mapping[Ref, ObjectId],
               remote_refs: Mapping[Ref, ObjectId]) -> list[RefUpdate]:
    updates = []
    for ref, new in local.items():
        old = remote_refs.get(ref)
        if old == new:
            continue
        if old is not None and ref.kind == "branches":
            if not repo.store.has(old) or not is_ancestor(repo, old, new):
                raise RemoteError(
                    f"{endpoint.label}: branch {ref.name} is at {old.short} there, which the local "
                    f"branch ({new.short}) does not contain: remote moved, pull first"
                )
        elif old is not None:
            raise RemoteError(
                f"{endpoint.label}: {ref} is {old.short} there but {new.short} here: remote moved, "
                "pull first (tags and steps never move)"
            )
        updates.append(RefUpdate(ref, old, new))
    return _ordered(updates)


def _push_waves(repo: Repository, roots: list[ObjectId]) -> list[list[ObjectId]]:
    """What ``roots`` need, in sending order: chunks by delta depth, manifests, commits."""
    marking = mark(repo, roots)
    shallow = {c.hex for c in repo.shallow_commits()}
    gaps = [g for g in marking.gaps
            if not (g.role == "commit" and g.state == MISSING and g.needed_by in shallow)]
    if gaps:
        listing = "; ".join(f"{g.role} {g.object_id.short} ({g.state}: {g.detail})" for g in gaps[:3])
        raise RepositoryError(f"cannot push: the local repository lacks objects the refs need: {listing}"
                              f"{' …' if len(gaps) > 3 else ''}; run `ckpt fsck`")
    depth: dict[ObjectId, int] = {}

    def depth_of(object_id: ObjectId) -> int:
        chain = []
        current: ObjectId | None = object_id
        while current is not None and current not in depth:
            chain.append(current)
            base = marking.headers[current].base
            current = ObjectId(base) if base is not None else None
            if len(chain) > 64:
                raise RepositoryError(f"cannot push: delta chain of {object_id.short} does not end")
        level = depth[current] + 1 if current is not None else 0
        for item in reversed(chain):
            depth[item] = level
            level += 1
        return depth[object_id]

    by_depth: dict[int, list[ObjectId]] = {}
    for object_id in sorted(marking.headers):
        by_depth.setdefault(depth_of(object_id), []).append(object_id)
    waves = [by_depth[level] for level in sorted(by_depth)]
    waves.append(sorted(marking.manifests))
    waves.append(_parents_first(marking.commits))
    return waves


def _remote_sizes(endpoint: Endpoint, pool: ThreadPoolExecutor, ids: list[ObjectId]) -> dict[ObjectId, int]:
    """Which of ``ids`` the remote has, with their stored sizes: a stat each for a few, one
    listing of ``objects/`` for many."""
    if len(ids) <= STAT_LOOKUP_LIMIT:
        stats = list(pool.map(lambda oid: endpoint.backend.stat(object_key(oid)), ids))
        return {oid: s.size for oid, s in zip(ids, stats) if s is not None}
    wanted = set(ids)
    found = {}
    for key, size in list_sizes(endpoint.backend, OBJECTS_PREFIX).items():
        object_id = key_to_id(key)
        if object_id is not None and object_id in wanted:
            found[object_id] = size
    return found


def _missing_on_remote(repo: Repository, endpoint: Endpoint, pool: ThreadPoolExecutor,
                       needed: list[ObjectId]) -> dict[ObjectId, bool]:
    """The needed objects the remote lacks, each with True if a broken copy is there to replace."""
    remote_sizes = _remote_sizes(endpoint, pool, needed)
    missing: dict[ObjectId, bool] = {}
    suspects = []
    for object_id in needed:
        size = remote_sizes.get(object_id)
        if size is None:
            missing[object_id] = False
        elif size != repo.store.stored_size(object_id):
            suspects.append(object_id)
    for object_id, broken in zip(suspects, pool.map(lambda oid: _remote_copy_broken(repo, endpoint, oid), suspects)):
        if broken:
            missing[object_id] = True
    return missing


def _remote_copy_broken(repo: Repository, endpoint: Endpoint, object_id: ObjectId) -> bool:
    """A remote copy of another size may be another valid coding of the same content (another
    writer's); it is replaced only if it does not decode to its id."""
    try:
        blob = endpoint.backend.read(object_key(object_id))
        repo.store.decode_blob(object_id, blob)
    except KeyNotFoundError:
        return True
    except (ObjectCorruptError, FormatError, ObjectNotFoundError):
        return True
    return False


def _send_object(repo: Repository, endpoint: Endpoint, object_id: ObjectId, replace_broken: bool,
                 meter: _Meter) -> int:
    blob = repo.backend.read(object_key(object_id))
    try:
        endpoint.backend.write(object_key(object_id), blob, create_only=not replace_broken)
    except PreconditionFailedError:
        pass  # another pusher stored it meanwhile; objects are immutable
    meter.add(len(blob))
    return len(blob)


def _move_remote_refs(endpoint: Endpoint, updates: list[RefUpdate], applied: list[RefUpdate]) -> None:
    """Branches first: the branch's compare-and-swap is where two pushers are told apart, so a
    loser moves nothing. Steps and tags follow."""
    refs = RefStore(endpoint.backend)
    for update in updates:
        try:
            refs.update(update.ref, update.new, update.old)
        except RefConflictError as exc:
            done = f" (already updated: {', '.join(str(u.ref) for u in applied)})" if applied else ""
            raise RemoteError(f"{endpoint.label}: {exc}: remote moved, pull first{done}") from None
        applied.append(update)


# --- fetch ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fetched:
    report: FetchReport
    refs: dict[Ref, ObjectId]  # remote refs whose commits are now local


def fetch(repo: Repository, remote: str | None = None, *, progress: ProgressCallback | None = None) -> FetchReport:
    """Bring what the remote's refs need into this repository, verified; move no local ref."""
    endpoint = connect(repo, remote)
    try:
        return fetch_from(repo, endpoint, progress=progress)
    finally:
        endpoint.close()


def fetch_from(repo: Repository, endpoint: Endpoint, *, progress: ProgressCallback | None = None) -> FetchReport:
    return _fetch_all(repo, endpoint, progress).report


def _fetch_all(repo: Repository, endpoint: Endpoint, progress: ProgressCallback | None) -> _Fetched:
    repo._writable()
    read_config(endpoint.backend, endpoint.uri)
    with _transfer(repo, endpoint) as pool:
        remote_refs = read_refs(endpoint.backend, pool, endpoint.label)
        # A shallow repository stays shallow: it follows branch tips down to what it has, and
        # takes the tags and steps whose commits come along, as its clone did.
        shallow = bool(repo.shallow_commits())
        tips = {c for ref, c in remote_refs.items() if ref.kind == "branches" or not shallow}
        return _fetch(repo, endpoint, pool, tips, remote_refs, None, progress)


def _fetch(repo: Repository, endpoint: Endpoint, pool: ThreadPoolExecutor, tips: set[ObjectId],
           remote_refs: Mapping[Ref, ObjectId], depth: int | None, progress: ProgressCallback | None) -> _Fetched:
    start = time.monotonic()
    meter = _Meter("fetch", progress)
    commits, shallow = _fetch_commits(repo, endpoint, pool, tips, depth, meter)
    fetched_refs = {ref: c for ref, c in remote_refs.items() if c in commits or repo.store.has(c)}
    retained = set(fetched_refs.values()) | {cid for cid, (c, _) in commits.items() if c.step is None}
    manifests = _fetch_manifests(repo, endpoint, pool, retained, commits, meter)
    chunks = sorted({c for (m, _blob) in manifests.values() for c in m.chunk_ids() if not repo.store.has(c)})
    meter.expect(len(chunks))
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=_spill_root(repo)) as spill:
        _ChunkFetcher(repo, endpoint, pool, meter, Path(spill)).fetch(chunks)
    # Manifests after their chunks, commits after their manifests and parents: what is
    # present locally always has everything below it.
    _run_all(pool, lambda mid: _store_verified(repo, endpoint, mid, manifests[mid][1], "manifest"), sorted(manifests))
    if shallow:
        known = repo.shallow_commits() | shallow
        repo.backend.write(SHALLOW_KEY, "".join(f"{c.hex}\n" for c in sorted(known)).encode())
    for commit_id in _parents_first({cid: c for cid, (c, _) in commits.items()}):
        _store_verified(repo, endpoint, commit_id, commits[commit_id][1], "commit")
    meter.finish()
    received_bytes = meter.bytes_done
    previous = tracking_refs(repo, endpoint.name) if endpoint.name else {}
    changes = [RefUpdate(ref, previous.get(ref), new) for ref, new in remote_refs.items() if previous.get(ref) != new]
    changes += [RefUpdate(ref, old, None) for ref, old in previous.items() if ref not in remote_refs]
    _record_tracking(repo, endpoint, remote_refs, merge=False)
    report = FetchReport(endpoint.label, meter.objects_done, received_bytes, tuple(_ordered(changes)),
                         tuple(sorted(shallow)), time.monotonic() - start)
    return _Fetched(report, fetched_refs)


def _spill_root(repo: Repository) -> str | None:
    if repo.cache_dir is None:
        return None
    repo.cache_dir.mkdir(parents=True, exist_ok=True)
    return str(repo.cache_dir)


def _download(endpoint: Endpoint, object_id: ObjectId) -> bytes:
    try:
        return endpoint.backend.read(object_key(object_id))
    except KeyNotFoundError:
        raise RemoteError(f"{endpoint.label} lacks object {object_id.hex}, which its refs need: "
                          "the remote is incomplete") from None


@contextmanager
def _remote_object(endpoint: Endpoint, object_id: ObjectId) -> Iterator[None]:
    try:
        yield
    except (ObjectCorruptError, FormatError) as exc:
        raise RemoteError(f"{endpoint.label} served bad bytes for object {object_id.hex}: {exc}; "
                          "it was not stored") from exc
    except ObjectNotFoundError as exc:
        raise RemoteError(f"{endpoint.label}: object {object_id.hex} is coded against a base that "
                          f"is nowhere: {exc}") from exc


def _store_verified(repo: Repository, endpoint: Endpoint, object_id: ObjectId, blob: bytes, kind: str) -> None:
    with _remote_object(endpoint, object_id):
        repo.store.put_encoded(object_id, blob, kind=kind)


def _fetch_commits(repo: Repository, endpoint: Endpoint, pool: ThreadPoolExecutor, tips: set[ObjectId],
                   depth: int | None, meter: _Meter) -> tuple[dict[ObjectId, tuple[Commit, bytes]], set[ObjectId]]:
    """Commit documents missing here, breadth first from ``tips`` (a level at a time, in
    parallel), down to commits present here or ``depth`` levels; each one checked."""
    commits: dict[ObjectId, tuple[Commit, bytes]] = {}
    boundary: set[ObjectId] = set()
    frontier = sorted(t for t in tips if not repo.store.has(t))
    level = 1
    while frontier:
        meter.expect(len(frontier))
        blobs = _run_all(pool, lambda cid: _download(endpoint, cid), frontier)
        following: set[ObjectId] = set()
        for commit_id, blob in zip(frontier, blobs):
            with _remote_object(endpoint, commit_id):
                data = repo.store.decode_blob(commit_id, blob, kind="commit")
                commit = Commit.from_document(parse_json(data, f"commit {commit_id.hex}"))
            commits[commit_id] = (commit, blob)
            meter.add(len(blob))
            if depth is not None and level >= depth:
                boundary.add(commit_id)
                continue
            following.update(p for p in commit.parents if p not in commits and not repo.store.has(p))
        frontier = sorted(following - commits.keys())
        level += 1
    shallow = {cid for cid in boundary
               if any(p not in commits and not repo.store.has(p) for p in commits[cid][0].parents)}
    return commits, shallow


def _fetch_manifests(repo: Repository, endpoint: Endpoint, pool: ThreadPoolExecutor, retained: set[ObjectId],
                     commits: Mapping[ObjectId, tuple[Commit, bytes]], meter: _Meter) -> dict[ObjectId, tuple[Manifest, bytes]]:
    wanted: set[ObjectId] = set()
    for commit_id in retained:
        commit = commits[commit_id][0] if commit_id in commits else repo.load_commit(commit_id)
        if not repo.store.has(commit.manifest_id):
            wanted.add(commit.manifest_id)
    ordered = sorted(wanted)
    meter.expect(len(ordered))

    def get(manifest_id: ObjectId) -> tuple[Manifest, bytes]:
        blob = _download(endpoint, manifest_id)
        with _remote_object(endpoint, manifest_id):
            data = repo.store.decode_blob(manifest_id, blob, kind="manifest")
            manifest = Manifest.from_document(parse_json(data, f"manifest {manifest_id.hex}"))
        meter.add(len(blob))
        return manifest, blob

    return dict(zip(ordered, _run_all(pool, get, ordered)))


class _DecodedCache:
    """Recently decoded chunks (bounded), the likely delta bases of the next ones."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[ObjectId, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, object_id: ObjectId) -> bytes | None:
        with self._lock:
            data = self._items.get(object_id)
            if data is not None:
                self._items.move_to_end(object_id)
            return data

    def put(self, object_id: ObjectId, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if object_id in self._items:
                return
            self._items[object_id] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class _ChunkFetcher:
    """Downloads chunks in parallel and stores each once its delta base is here.

    A delta whose base is not here yet is set aside in a spill directory (not in memory) until
    the base arrives; a base that no manifest named is fetched in the next round. Bases that
    never arrive (a damaged remote, a cycle) end the fetch with an error naming them.
    """

    def __init__(self, repo: Repository, endpoint: Endpoint, pool: ThreadPoolExecutor, meter: _Meter,
                 spill: Path, kind: str | None = "chunk") -> None:
        self.kind = kind
        self.repo = repo
        self.endpoint = endpoint
        self.pool = pool
        self.meter = meter
        self.spill = spill
        self.decoded = _DecodedCache(DECODED_CACHE_BYTES)

    def fetch(self, chunk_ids: list[ObjectId]) -> None:
        waiting: dict[ObjectId, ObjectId] = {}  # a spilled delta -> the base it waits for
        requested = set(chunk_ids)
        todo = list(chunk_ids)
        while todo:
            for object_id, base in zip(todo, _run_all(self.pool, self._take, todo)):
                if base is not None:
                    waiting[object_id] = base
            while True:
                ready = [oid for oid, base in waiting.items() if self._here(base)]
                if not ready:
                    break
                for object_id in ready:
                    del waiting[object_id]
                _run_all(self.pool, self._store_spilled, ready)
            todo = sorted({b for b in waiting.values() if b not in waiting and b not in requested})
            requested.update(todo)
            self.meter.expect(len(todo))
        if waiting:
            object_id, base = next(iter(waiting.items()))
            raise RemoteError(f"{self.endpoint.label}: {len(waiting)} chunks are coded against bases that "
                              f"never arrive (e.g. {object_id.hex} needs {base.hex}); the remote is damaged")

    def _here(self, object_id: ObjectId) -> bool:
        return self.decoded.get(object_id) is not None or self.repo.store.has(object_id)

    def _take(self, object_id: ObjectId) -> ObjectId | None:
        """Fetch one chunk; store it, or set it aside and return the base it waits for."""
        blob = _download(self.endpoint, object_id)
        with _remote_object(self.endpoint, object_id):
            header, _payload = split_object(blob)
            base = ObjectId(header.base) if header.base is not None else None
        if base is not None and not self._here(base):
            (self.spill / object_id.hex).write_bytes(blob)
            return base
        self._store(object_id, blob)
        return None

    def _store_spilled(self, object_id: ObjectId) -> None:
        path = self.spill / object_id.hex
        self._store(object_id, path.read_bytes())
        path.unlink()

    def _store(self, object_id: ObjectId, blob: bytes) -> None:
        with _remote_object(self.endpoint, object_id):
            _result, data = self.repo.store.put_encoded(object_id, blob, kind=self.kind, load_base=self._base)
        self.decoded.put(object_id, data)
        self.meter.add(len(blob))

    def _base(self, object_id: ObjectId) -> bytes:
        data = self.decoded.get(object_id)
        return data if data is not None else self.repo.store.get(object_id)


def fetch_objects(repo: Repository, object_ids: Iterable[ObjectId]) -> set[ObjectId]:
    """Fetch single objects (and the delta bases they need), verified, from the configured
    remotes, ``origin`` first; return those now stored. fsck --repair uses it for damaged or
    missing objects, holding the exclusive lock itself, so no lock is taken here."""
    wanted = {ObjectId(o) for o in object_ids}
    names = sorted(repo.config.remotes, key=lambda n: (n != "origin", n))
    for name in names:
        todo = sorted(o for o in wanted if not repo.store.has(o))
        if not todo:
            break
        try:
            endpoint = connect(repo, name)
        except CkptRepoError:
            continue
        pool = ThreadPoolExecutor(endpoint.transfers, thread_name_prefix="ckptrepo-sync")
        try:
            present = sorted(_remote_sizes(endpoint, pool, todo))
            with tempfile.TemporaryDirectory(prefix="fetch-", dir=_spill_root(repo)) as spill:
                _ChunkFetcher(repo, endpoint, pool, _Meter("fetch", None), Path(spill), kind=None).fetch(present)
        except CkptRepoError:
            continue  # this remote is damaged or unreachable: try the next
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            endpoint.close()
    return {o for o in wanted if repo.store.has(o)}


# --- pull ------------------------------------------------------------------------------------------


def pull(repo: Repository, remote: str | None = None, *, progress: ProgressCallback | None = None) -> PullReport:
    """Fetch, then fast-forward local branches and create missing steps and tags. A branch
    that has diverged is an error, and then no local ref moves (the fetched objects stay)."""
    endpoint = connect(repo, remote)
    try:
        return pull_from(repo, endpoint, progress=progress)
    finally:
        endpoint.close()


def pull_from(repo: Repository, endpoint: Endpoint, *, progress: ProgressCallback | None = None) -> PullReport:
    fetched = _fetch_all(repo, endpoint, progress)
    updates = _fast_forward(repo, endpoint, fetched.refs)
    return PullReport(fetched.report, tuple(updates))


def _fast_forward(repo: Repository, endpoint: Endpoint, remote_refs: Mapping[Ref, ObjectId]) -> list[RefUpdate]:
    plan: list[RefUpdate] = []
    problems: list[str] = []
    for ref, new in remote_refs.items():
        old = repo.refs.get(ref)
        if old == new:
            continue
        if old is None:
            plan.append(RefUpdate(ref, None, new))
        elif ref.kind == "branches":
            if is_ancestor(repo, old, new):
                plan.append(RefUpdate(ref, old, new))
            elif not is_ancestor(repo, new, old):
                problems.append(f"branch {ref.name} has diverged ({old.short} here, {new.short} there)")
        else:
            problems.append(f"{ref} is {old.short} here but {new.short} there")
    if problems:
        raise RemoteError(f"pull from {endpoint.label} moved no local ref: {'; '.join(sorted(problems))}. "
                          "The fetched objects are kept; resolve it (e.g. commit on another branch) and pull again")
    # Steps and tags before branch tips, as a commit does; every object is stored already.
    ordered = sorted(plan, key=lambda u: (-_REF_ORDER[u.ref.kind], u.ref.key))
    for update in ordered:
        repo.refs.update(update.ref, update.new, update.old)
    return _ordered(plan)


# --- clone -------------------------------------------------------------------------------------


def clone(src_uri: str, dest: str | os.PathLike[str], depth: int | None = None, rev: str | None = None, *,
          options: Mapping[str, Any] | None = None, progress: ProgressCallback | None = None) -> Repository:
    """A new repository at ``dest`` holding what ``src_uri`` has, with it as remote ``origin``.

    ``depth=N``: only the last N commits of each branch (and the tags and steps among them).
    ``rev=REV``: only that revision (with ``depth``, N commits ending there); the local branch
    is REV if it names a branch, else the branch the commit was made on.
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be an integer >= 1, not {depth!r}")
    endpoint = Endpoint.open("origin", check_uri(os.fspath(src_uri)), options)
    try:
        remote_config = read_config(endpoint.backend, endpoint.uri)
        config = replace(remote_config, remotes={"origin": Remote(endpoint.uri, check_options(options))})
        dest_text = os.fspath(dest)
        created = is_remote_uri(dest_text) or not local_path(dest_text).exists()
        if not created and (not local_path(dest_text).is_dir() or any(local_path(dest_text).iterdir())):
            raise RepositoryError(f"cannot clone into {dest_text}: it exists and is not an empty directory")
        repo = init_repository(dest_text, config=config)
        try:
            _clone_into(repo, endpoint, depth, rev, progress)
        except BaseException:
            repo.close()
            if created and not is_remote_uri(dest_text):
                shutil.rmtree(local_path(dest_text), ignore_errors=True)
            raise
        return repo
    finally:
        endpoint.close()


def _clone_into(repo: Repository, endpoint: Endpoint, depth: int | None, rev: str | None,
                progress: ProgressCallback | None) -> None:
    with _transfer(repo, endpoint) as pool:
        remote_refs = read_refs(endpoint.backend, pool, endpoint.label)
        head = RefStore(endpoint.backend).current_branch()
        branch_to_check_out: str | None = None
        if rev is not None:
            target = _resolve_remote(endpoint, rev)
            tips = {target}
            depth = depth or 1
            if _is_name(rev) and remote_refs.get(branch_ref(rev)) == target:
                branch_to_check_out = rev
        elif depth is not None:
            tips = {c for ref, c in remote_refs.items() if ref.kind == "branches"}
        else:
            tips = set(remote_refs.values())
        fetched = _fetch(repo, endpoint, pool, tips, remote_refs, depth, progress)
    for ref, target in sorted(fetched.refs.items(), key=lambda kv: (-_REF_ORDER[kv[0].kind], kv[0].key)):
        repo.refs.update(ref, target, None)
    if rev is not None:
        if branch_to_check_out is None:
            branch_to_check_out = repo.load_commit(target).branch
            if repo.refs.get(branch_ref(branch_to_check_out)) is None:
                repo.refs.update(branch_ref(branch_to_check_out), target, None)
    else:
        branches = repo.refs.branches()
        branch_to_check_out = head if head in branches or not branches else next(iter(branches))
    repo.refs.set_current_branch(branch_to_check_out)


def _is_name(text: str) -> bool:
    try:
        validate_name(text)
    except InvalidRefNameError:
        return False
    return True


def _resolve_remote(endpoint: Endpoint, rev: str) -> ObjectId:
    """A revision (SPEC section 3) resolved against the remote's refs and objects."""
    store = ObjectStore(endpoint.backend, None)

    def find_commits(prefix: str) -> list[ObjectId]:
        found = []
        for key in endpoint.backend.list(f"{OBJECTS_PREFIX}/{prefix[:2]}"):
            object_id = key_to_id(key)
            if object_id is not None and object_id.startswith(prefix):
                try:
                    if store.header(object_id).kind == "commit":
                        found.append(object_id)
                except CkptRepoError:
                    continue
        return found

    def first_parent(commit_id: ObjectId) -> ObjectId | None:
        with _remote_object(endpoint, commit_id):
            parents = Commit.from_document(store.get_document(commit_id, "commit")).parents
        return parents[0] if parents else None

    return resolve_revision(rev, RefStore(endpoint.backend), find_commits, first_parent)
