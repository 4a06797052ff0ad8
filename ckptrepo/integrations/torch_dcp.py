"""torch.distributed.checkpoint storage backed by a ckptrepo repository.

``dcp.save(state_dict, storage_writer=StorageWriter(repo, step=N))`` writes one commit: every
rank stores the chunks of the tensor shards it was planned to write, in parallel, straight
into the shared repository (content-addressed, so writers never collide and a shard that did
not change is not stored again); the ranks' results travel to the coordinator through DCP's
own collectives, and the coordinator commits one manifest. The step's ref moves only in that
commit, after every rank's chunks are durable: a save that fails on any rank leaves no step.

``dcp.load(state_dict, storage_reader=StorageReader(repo, step=N))`` reads it back, on any
world size and sharding that DCP can reshard to (each rank reads only the chunks it needs).

The committed manifest is a dict checkpoint::

    {"dcp_metadata": str (JSON),                 the checkpoint's DCP metadata, no pickle
     "tensors": {fqn: {"@0,512": tensor, ...}},  each saved shard, keyed by its offsets
     "values": {fqn: value},                     non-tensor values, in ckptrepo's value model
     "pickled": {fqn: bytes}}                    only with allow_pickle=True (see below)

DCP hands non-tensor values (an int step, a list, a scheduler's state) to storage as
``torch.save`` bytes. The writer loads them back with ``torch.load(weights_only=True)`` and
stores the value itself, so no pickle reaches the repository; on load the reader gives DCP a
fresh ``torch.save`` of that value. A value that only pickle can hold is refused with a
TypeError naming it, unless both writer and reader pass ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader as _DcpStorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..datapath import ChunkWriter
from ..errors import CkptRepoError, FormatError, RefExistsError, RepositoryError
from ..objects import ChunkRef, Entry, Manifest
from ..refs import branch_ref, step_ref, validate_name
from ..repository import Repository
from ..repository import init as init_repository
from ..repository import open as open_repository
from ..snapshot import Snapshot
from ..values import escape_key, flatten, iter_leaf_paths, join_path, leaf_of, unflatten

METADATA_KEY = "dcp_metadata"
FORMAT_NAME = "ckptrepo.dcp"
_NO_KEYS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StoredShard:
    """What a rank wrote for one tensor shard (sent to the coordinator in its WriteResult)."""

    chunks: tuple[tuple[Any, ...], ...]  # each as ChunkRef.to_json gives it: id, size[, inline]
    size: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A non-tensor value: the value itself, or (with allow_pickle) DCP's torch.save bytes."""

    value: Any
    pickled: bool


def _offset_key(offsets: Iterable[int]) -> str:
    return "@" + ",".join(str(int(o)) for o in offsets)


def tensor_path(fqn: str, offsets: Iterable[int]) -> str:
    """The manifest path of the shard of ``fqn`` that starts at ``offsets``."""
    return join_path(join_path("tensors", escape_key(fqn, _NO_KEYS)), escape_key(_offset_key(offsets), _NO_KEYS))


def _open(repo_or_path: Repository | str | os.PathLike[str], create: bool) -> Repository:
    if isinstance(repo_or_path, Repository):
        return repo_or_path
    try:
        return open_repository(repo_or_path)
    except RepositoryError:
        if not create:
            raise
        try:
            return init_repository(repo_or_path)
        except RepositoryError:
            return open_repository(repo_or_path)  # another rank created it first


def _names_a_step(checkpoint_id: str | os.PathLike[str]) -> bool:
    try:
        return _step_from(checkpoint_id) is not None
    except ValueError:
        return False


def _step_from(checkpoint_id: Any) -> int | None:
    if checkpoint_id is None:
        return None
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool) and checkpoint_id >= 0:
        return checkpoint_id
    text = os.fspath(checkpoint_id) if isinstance(checkpoint_id, os.PathLike) else checkpoint_id
    if isinstance(text, str) and text.isdigit():
        return int(text)
    raise ValueError(f"checkpoint_id for ckptrepo storage is a step number, not {checkpoint_id!r}")


# --- writing -------------------------------------------------------------------------------


class StorageWriter(_DcpStorageWriter):
    """Writes a DCP checkpoint as one commit (``step`` on ``branch``) of a repository.

    Every rank makes its own writer with the same arguments; a path is opened in each process
    (and created if missing). ``checkpoint_id`` passed to ``dcp.save`` sets the step.
    """

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        *,
        step: int | None = None,
        branch: str | None = None,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        meta: Mapping[str, Any] | None = None,
        replace: bool = False,
        allow_pickle: bool = False,
        create: bool = True,
    ) -> None:
        super().__init__()
        self._location = repo_or_path
        self._repo: Repository | None = repo_or_path if isinstance(repo_or_path, Repository) else None
        self.step = _step_from(step)
        self.branch = validate_name(branch, "branch") if branch is not None else None
        self.message = message
        self.metrics = dict(metrics or {})
        self.meta = dict(meta or {})
        self.replace = replace
        self.allow_pickle = allow_pickle
        self.create = create
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._lock: Any = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = _open(self._location, self.create)
        return self._repo

    def _branch(self) -> str:
        return self.branch or self.repo.current_branch

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._release_lock()
        if checkpoint_id is not None:
            self.step = _step_from(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise ValueError("ckptrepo's StorageWriter commits once for all ranks: use_collectives must stay True")
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Runs on the coordinator before any rank writes: refuse an existing step now, and
        # hold a shared repository lock until the commit, so gc cannot take the ranks' chunks.
        branch = self._branch()
        if self.step is not None and not self.replace and self.repo.refs.get(step_ref(branch, self.step)) is not None:
            raise RefExistsError(f"branch {branch} already has step {self.step} (pass replace=True to replace it)")
        self._release_lock()
        if self.repo.lock is not None:
            lock = self.repo.shared_lock()
            lock.__enter__()
            # A save that fails on some rank never reaches finish(): the lock then goes with
            # this writer (or at the next save), not with the process.
            self._lock = weakref.finalize(self, lock.__exit__, None, None, None)
        return [dataclasses.replace(plan, storage_data=branch) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        repo = self.repo
        branch = plan.storage_data if isinstance(plan.storage_data, str) else self._branch()
        parent = _tip_manifest(repo, branch)
        with ChunkWriter(repo.store, repo.pool, inline_max=repo.config.chunking.inline_max_size) as writer:
            results = self._write_items(plan, planner, parent, writer)
            writer.publish()  # this rank's chunks are durable when write_data returns
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_items(
        self, plan: SavePlan, planner: SavePlanner, parent: Manifest | None, writer: ChunkWriter
    ) -> list[WriteResult]:
        chunk_size = self.repo.config.chunking.tensor_chunk_size
        results: list[WriteResult] = []
        pending = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                if not isinstance(data, io.BytesIO):
                    raise FormatError(f"DCP gave a {type(data).__name__} for the value {item.index.fqn!r}")
                stored = _value_from_bytes(data, item.index.fqn, self.allow_pickle)
                results.append(WriteResult(index=item.index, size_in_bytes=data.getbuffer().nbytes, storage_data=stored))
                continue
            if not isinstance(data, torch.Tensor):
                raise FormatError(f"DCP gave a {type(data).__name__} for the tensor {item.index.fqn!r}")
            tensor = data.detach()
            leaf = leaf_of(tensor, item.index.fqn)  # copied to contiguous host memory if needed
            assert leaf.data is not None
            offsets = item.index.offset if item.index.offset is not None else ()
            bases = None if parent is None else parent.delta_bases(
                tensor_path(item.index.fqn, offsets), "tensor", leaf.entry["dtype"], len(leaf.data)
            )
            chunks = writer.write_fixed(leaf.data, chunk_size, leaf.itemsize, bases, leaf.entry["dtype"])
            pending.append((item, leaf, chunks))
        for item, leaf, chunks in pending:
            refs = writer.resolve(chunks)
            shard = StoredShard(
                chunks=tuple(tuple(r.to_json()) for r in refs), size=sum(r.size for r in refs),
                dtype=leaf.entry["dtype"], shape=tuple(leaf.entry["shape"]),
            )
            results.append(WriteResult(index=item.index, size_in_bytes=shard.size, storage_data=shard))
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            manifest = self._manifest(metadata, [r for rank in results for r in rank])
            self.repo.commit_manifest(
                manifest, step=self.step, branch=self._branch(), message=self.message or "torch.distributed.checkpoint",
                metrics=self.metrics, meta={**self.meta, FORMAT_NAME: {"version": 1, "save_id": self.save_id}},
                replace=self.replace,
            )
        finally:
            self._release_lock()

    def _manifest(self, metadata: Metadata, results: list[WriteResult]) -> Manifest:
        shards: dict[str, StoredShard] = {}
        values: dict[str, Any] = {}
        pickled: dict[str, bytes] = {}
        for result in results:
            stored = result.storage_data
            if isinstance(stored, StoredShard):
                offsets = result.index.offset if result.index.offset is not None else ()
                shards[tensor_path(result.index.fqn, offsets)] = stored
            elif isinstance(stored, StoredValue):
                (pickled if stored.pickled else values)[result.index.fqn] = stored.value
            else:
                raise FormatError(f"unexpected write result for {result.index.fqn}: {type(stored).__name__}")
        document = _metadata_document(metadata, values, pickled)
        skeleton: dict[str, Any] = {METADATA_KEY: json.dumps(document, sort_keys=True)}
        tensors: dict[str, dict[str, None]] = {}
        for fqn, info in metadata.state_dict_metadata.items():
            if isinstance(info, TensorStorageMetadata):
                tensors[fqn] = {_offset_key(chunk.offsets): None for chunk in info.chunks}
        if tensors:
            skeleton["tensors"] = tensors
        if values:
            skeleton["values"] = values
        if pickled:
            skeleton["pickled"] = pickled
        tree, leaves = flatten(skeleton)
        with ChunkWriter(
            self.repo.store, self.repo.pool, inline_max=self.repo.config.chunking.inline_max_size
        ) as writer:
            chunk_size = self.repo.config.chunking.tensor_chunk_size
            entries: dict[str, Entry] = {}
            pending = []
            for leaf in leaves:
                shard = shards.get(leaf.path)
                if shard is not None:
                    chunks = tuple(ChunkRef.from_json(leaf.path, list(c)) for c in shard.chunks)
                    meta = {"framework": "torch", "dtype": shard.dtype, "shape": list(shard.shape)}
                    entries[leaf.path] = Entry(kind="tensor", size=shard.size, chunks=chunks, meta=meta)
                elif leaf.path.startswith("tensors/"):
                    raise FormatError(f"no rank wrote the shard {leaf.path} that the DCP metadata lists")
                elif leaf.data is None:
                    entries[leaf.path] = Entry(kind=leaf.entry["kind"], meta=_meta(leaf.entry))
                else:
                    written = writer.write_fixed(leaf.data, chunk_size, leaf.itemsize, dtype=leaf.entry.get("dtype"))
                    pending.append((leaf, written))
            for leaf, written in pending:
                assert leaf.data is not None
                entries[leaf.path] = Entry(
                    kind=leaf.entry["kind"], size=len(leaf.data), chunks=writer.resolve(written), meta=_meta(leaf.entry)
                )
            writer.publish()
        return Manifest(type="dict", entries={path: entries[path] for path in iter_leaf_paths(tree)}, tree=tree)

    def _release_lock(self) -> None:
        release, self._lock = self._lock, None
        if release is not None:
            release()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=None if self.step is None else str(self.step), save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _names_a_step(checkpoint_id)


def _meta(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "kind"}


def _tip_manifest(repo: Repository, branch: str) -> Manifest | None:
    tip = repo.refs.get(branch_ref(branch))
    if tip is None:
        return None
    try:
        return repo.load_manifest(repo.load_commit(tip).manifest_id)
    except CkptRepoError:
        return None  # a damaged parent costs only the delta, never the save


def _value_from_bytes(data: io.BytesIO, fqn: str, allow_pickle: bool) -> StoredValue:
    raw = bytes(data.getbuffer())
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
        flatten({"value": value})
    except Exception as exc:  # noqa: BLE001 - anything only pickle can hold
        if allow_pickle:
            return StoredValue(raw, pickled=True)
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it holds a {found.group(1)}" if found else str(exc).splitlines()[0]
        raise TypeError(
            f"cannot save {fqn!r} without pickle: {what}. Store it as tensors, numbers, strings, "
            "lists or dicts, or pass allow_pickle=True to both StorageWriter and StorageReader"
        ) from None
    return StoredValue(value, pickled=False)


# --- metadata as JSON ----------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _metadata_document(metadata: Metadata, values: Mapping[str, Any], pickled: Mapping[str, bytes]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for fqn, info in metadata.state_dict_metadata.items():
        if isinstance(info, TensorStorageMetadata):
            entries[fqn] = {
                "type": "tensor",
                "dtype": _dtype_name(info.properties.dtype),
                "requires_grad": bool(info.properties.requires_grad),
                "size": list(info.size),
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), "path": tensor_path(fqn, c.offsets)}
                    for c in info.chunks
                ],
            }
        elif isinstance(info, BytesStorageMetadata):
            if fqn in values:
                entries[fqn] = {"type": "value"}
            elif fqn in pickled:
                entries[fqn] = {"type": "pickled"}
            else:
                raise FormatError(f"no rank wrote the value {fqn!r} that the DCP metadata lists")
        else:
            raise TypeError(f"DCP metadata of {fqn!r} is a {type(info).__name__}, which ckptrepo cannot store")
    return {
        "format": FORMAT_NAME,
        "version": 1,
        "dcp_version": metadata.version,
        "state_dict_metadata": entries,
        "planner_data": _planner_data_json(metadata.planner_data),
    }


def _planner_data_json(planner_data: Any) -> Any:
    # DefaultSavePlanner records, per flattened key, the path of keys it came from.
    if planner_data is None:
        return None
    if isinstance(planner_data, Mapping) and all(
        isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, (str, int)) for p in v)
        for k, v in planner_data.items()
    ):
        return {"paths": {k: list(v) for k, v in planner_data.items()}}
    raise TypeError(
        f"the save planner's data ({type(planner_data).__name__}) cannot be stored without pickle; "
        "ckptrepo supports the default planners"
    )


def _planner_data_from(document: Any) -> Any:
    if document is None:
        return None
    return {k: tuple(v) for k, v in document["paths"].items()}


# --- reading -------------------------------------------------------------------------------


class StorageReader(_DcpStorageReader):
    """Reads a DCP checkpoint committed by :class:`StorageWriter`: ``rev``, or ``step`` on
    ``branch`` (default: the latest commit of the current branch). A ``checkpoint_id`` given
    to ``dcp.load`` is a step number."""

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        rev: str | None = None,
        *,
        step: int | None = None,
        branch: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self._location = repo_or_path
        self._repo: Repository | None = repo_or_path if isinstance(repo_or_path, Repository) else None
        self.rev = rev
        self.step = _step_from(step)
        self.branch = branch
        self.allow_pickle = allow_pickle
        self.storage_data: dict[MetadataIndex, tuple[str, str]] = {}
        self._snapshot: Snapshot | None = None
        self.load_id = uuid.uuid4().hex

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = _open(self._location, create=False)
        return self._repo

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        self._snapshot = None
        if checkpoint_id is not None:
            self.step = _step_from(checkpoint_id)
            self.rev = None
        self.load_id = uuid.uuid4().hex

    def _snap(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = self.repo.checkout(self.rev, step=self.step, branch=self.branch)
        return self._snapshot

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        snap = self._snap()
        if snap.is_directory or METADATA_KEY not in snap.manifest.entries:
            raise FormatError(f"commit {snap.id.short} is not a torch.distributed.checkpoint commit (no {METADATA_KEY})")
        document = json.loads(snap.get(METADATA_KEY))
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME or document.get("version") != 1:
            raise FormatError(f"commit {snap.id.short}: {METADATA_KEY} is not {FORMAT_NAME} version 1")
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, tuple[str, str]] = {}
        for fqn, info in document["state_dict_metadata"].items():
            if info["type"] == "tensor":
                dtype = getattr(torch, info["dtype"], None)
                if not isinstance(dtype, torch.dtype):
                    raise FormatError(f"{METADATA_KEY}: {fqn} has unknown dtype {info['dtype']!r}")
                chunks = []
                for chunk in info["chunks"]:
                    offsets = torch.Size(chunk["offsets"])
                    chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk["sizes"])))
                    storage[MetadataIndex(fqn, offsets)] = ("tensor", chunk["path"])
                state[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype, requires_grad=bool(info["requires_grad"])),
                    size=torch.Size(info["size"]),
                    chunks=chunks,
                )
            elif info["type"] in ("value", "pickled"):
                state[fqn] = BytesStorageMetadata()
                storage[MetadataIndex(fqn)] = (info["type"], fqn)
            else:
                raise FormatError(f"{METADATA_KEY}: {fqn} has unknown type {info['type']!r}")
        return Metadata(
            state_dict_metadata=state,
            planner_data=_planner_data_from(document.get("planner_data")),
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=str(snap.id), load_id=self.load_id),
            version=document.get("dcp_version"),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if metadata.storage_data is None:
            raise FormatError("DCP metadata without storage data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        snap = self._snap()
        by_source: dict[tuple[str, str], list[Any]] = {}
        for item in plan.items:
            by_source.setdefault(self.storage_data[item.storage_index], []).append(item)
        for (kind, key), items in by_source.items():
            if kind == "tensor":
                stored = snap.get(key, framework="torch")
                for item in items:
                    source = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != source.size():
                        raise FormatError(f"shard {key}: expected {tuple(target.size())}, stored {tuple(source.size())}")
                    target.copy_(source)
                    planner.commit_tensor(item, target)
            else:
                data = self._value_bytes(snap, kind, key)
                for item in items:
                    if item.type != LoadItemType.BYTE_IO:
                        raise FormatError(f"{key} holds a value, but DCP asks for a tensor")
                    planner.load_bytes(item, io.BytesIO(data))
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _value_bytes(self, snap: Snapshot, kind: str, fqn: str) -> bytes:
        if kind == "pickled":
            if not self.allow_pickle:
                raise TypeError(
                    f"{fqn!r} was saved with pickle; pass allow_pickle=True to StorageReader to load it "
                    "(only for checkpoints you trust: unpickling can run code)"
                )
            return bytes(snap.get(_subtree_path("pickled", fqn)))
        value = _read_subtree(snap, "values", fqn)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # a fresh serialisation of a plain value for DCP's planner
        return buffer.getvalue()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _names_a_step(checkpoint_id)


def _child(tree: Any, key: str, where: str) -> Any:
    if isinstance(tree, dict) and len(tree) == 1:
        ((kind, pairs),) = tree.items()
        if kind in ("dict", "ordered_dict"):
            for name, child in pairs:
                if name == key:
                    return child
    raise FormatError(f"{where}: no {key!r} in the manifest tree")


def _subtree_path(group: str, fqn: str) -> str:
    return join_path(group, escape_key(fqn, _NO_KEYS))


def _read_subtree(snap: Snapshot, group: str, fqn: str) -> Any:
    child = _child(_child(snap.manifest.tree, group, f"commit {snap.id.short}"), fqn, f"commit {snap.id.short}")
    prefix = _subtree_path(group, fqn)
    values = {path: snap.get(path, framework=None) for path in iter_leaf_paths(child, prefix)}
    return unflatten(child, values, prefix)
