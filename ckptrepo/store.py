"""The object store: content-addressed objects over a backend, verified on every read."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Backend, StagingBackend, read_whole
from .backends.local import aligned_buffer
from .basecache import BaseCache
from .codec import MAX_DELTA_DEPTH as MAX_DELTA_DEPTH  # re-exported: fsck bounds chains by it
from .codec import (
    PREFIX_SIZE,
    CodingPolicy,
    DeltaBase,
    Header,
    canonical_json,
    decode_into,
    decode_payload,
    encode_chunk,
    object_file,
    parse_header,
    parse_prefix,
    split_object,
)
from .errors import (
    CkptRepoError,
    FormatError,
    KeyNotFoundError,
    ObjectCorruptError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from .frames import Buffer, zstd_decompress
from .ids import ObjectId, hash_hex
from .index import ChunkIndex
from .objects import ChunkRef
from .validation import parse_json

OBJECTS_PREFIX = "objects"
# One read of this many bytes gets an object's prefix and header in all but odd cases.
_HEADER_READ = 4096
# Decoded chunks kept in memory as delta bases for the next commit (see basecache.py).
DEFAULT_BASE_CACHE_BYTES = 512 << 20
# A base missing from that cache is decoded from storage only if its chain is this short.
_UNCACHED_BASE_MAX_DEPTH = 1
# Object files up to this size are assembled (or read) in a buffer each thread keeps.
_BLOB_BUFFER_MAX = 32 << 20
_REUSED_LEVELS = 2


class _BlobBuffers(threading.local):
    """Where a thread assembles the object files it writes, or reads those it decodes: one
    buffer per delta level (a delta's payload is still in use while its base is decoded).
    Backends are done with what they are given when ``write`` returns, and a decoded object
    needs its file no longer, so the buffer serves the thread's next object: a fresh buffer
    per chunk would cost a page fault for every 4 KiB of every chunk. The buffers start on a
    page, so a local backend's direct write takes them as they are. Only the first
    ``_REUSED_LEVELS`` levels keep theirs, so a thread holds at most a few chunks' worth."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}

    def getter(self, level: int) -> Callable[[int], np.ndarray]:
        def get(size: int) -> np.ndarray:
            if size > _BLOB_BUFFER_MAX or level >= _REUSED_LEVELS:
                return np.empty(size, dtype=np.uint8)
            array = self.arrays.get(level)
            if array is None:
                # Mapped at the largest size at once: only the pages touched take memory, and
                # a buffer grown to each larger object in turn cost a fresh page for every
                # 4 KiB of it (the coded sizes of a commit's chunks vary by a few bytes).
                array = self.arrays[level] = aligned_buffer(_BLOB_BUFFER_MAX)
            return array[:size]

        return get


def _check_depth(header: Header, chain: int) -> None:
    # The depth in a delta's header only steers writers, but a damaged one must not pass.
    claimed = header.coding.get("depth") if header.codec == "delta" else None
    if claimed is not None and claimed != chain:
        raise FormatError(f"header claims delta depth {claimed!r}, its chain is {chain} deep")


def object_key(object_id: ObjectId) -> str:
    return f"{OBJECTS_PREFIX}/{object_id.hex[:2]}/{object_id.hex[2:]}"


def key_to_id(key: str) -> ObjectId | None:
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != OBJECTS_PREFIX:
        return None
    try:
        return ObjectId(parts[1] + parts[2])
    except FormatError:
        return None


@dataclass(frozen=True, slots=True)
class PutResult:
    id: ObjectId
    new: bool
    stored_bytes: int  # bytes written now; 0 when the object was there already


class ObjectStore:
    def __init__(
        self, backend: Backend, index: ChunkIndex | None, policy: CodingPolicy | None = None,
        *, base_cache_bytes: int = DEFAULT_BASE_CACHE_BYTES,
    ) -> None:
        self.backend = backend
        self.index = index
        self.policy = policy or CodingPolicy()
        self.base_cache = BaseCache(base_cache_bytes)
        self._writing = _BlobBuffers()
        self._reading = _BlobBuffers()

    # --- presence ------------------------------------------------------------------------

    def has(self, object_id: ObjectId) -> bool:
        if self.index is not None and self.index.get(object_id) is not None:
            return True
        stat = self.backend.stat(object_key(object_id))
        if stat is None:
            return False
        if self.index is not None:
            self.index.add(object_id, stat.size, 0)
        return True

    def ids(self) -> Iterator[ObjectId]:
        for key in self.backend.list(OBJECTS_PREFIX):
            object_id = key_to_id(key)
            if object_id is not None:
                yield object_id

    def rebuild_index(self) -> int:
        """Fill the index from a listing of the store; return how many objects it holds."""
        assert self.index is not None
        self.index.clear()
        batch: list[tuple[ObjectId, int, int]] = []
        count = 0
        for key in self.backend.list(OBJECTS_PREFIX):
            object_id = key_to_id(key)
            stat = self.backend.stat(key) if object_id is not None else None
            if object_id is None or stat is None:
                continue
            batch.append((object_id, stat.size, 0))
            count += 1
            if len(batch) >= 4096:
                self.index.add_many(batch)
                batch.clear()
        self.index.add_many(batch)
        self.index.mark_ready()
        return count

    # --- writing -------------------------------------------------------------------------

    def batch(self) -> WriteBatch:
        """A batch for the chunks of one commit (see :class:`WriteBatch`)."""
        return WriteBatch(self)

    def put(
        self,
        kind: str,
        data: Buffer,
        *,
        itemsize: int = 1,
        object_id: ObjectId | None = None,
        base: ObjectId | None = None,
        remember: bool = False,
        batch: WriteBatch | None = None,
        dtype: str | None = None,
    ) -> PutResult:
        """Store ``data`` unless the store has it.

        ``itemsize`` (element size) and ``dtype`` (a manifest's name) steer the coding; ``base`` offers a delta base, the chunk
        at the same place in the parent commit; ``remember`` keeps the content in memory (within
        the base cache's budget) as a delta base for the next commit. With ``batch``, the
        object is durable and visible only once the batch is published.
        """
        object_id = object_id or ObjectId(hash_hex(data))
        if self.has(object_id):
            return PutResult(object_id, new=False, stored_bytes=0)
        if batch is not None and not batch.claim(object_id):
            return PutResult(object_id, new=False, stored_bytes=0)  # the batch holds it already
        delta_base = None
        if base is not None and base != object_id and self.policy.delta:
            delta_base = self._delta_base(base, len(data))
        encoded = encode_chunk(data, self.policy, itemsize, delta_base, dtype)
        blob = object_file(kind, encoded, self._writing.getter(0))
        if batch is not None and batch.staging:
            batch.stage(object_id, blob, len(data))
        else:
            try:
                self.backend.write(object_key(object_id), blob, create_only=True)
            except PreconditionFailedError:
                # Someone stored the same content first; objects are immutable, so that is fine.
                return PutResult(object_id, new=False, stored_bytes=0)
            if self.index is not None:
                self.index.add(object_id, len(blob), len(data))
        if delta_base is not None and encoded.coding.get("base") == delta_base.id:
            # This chunk takes its base's place for the next commit.
            self.base_cache.discard(ObjectId(delta_base.id))
        if remember:
            depth = encoded.coding.get("depth", 0) if encoded.coding.get("codec") == "delta" else 0
            self.base_cache.add(object_id, data, depth, encoded.moves)
        return PutResult(object_id, new=True, stored_bytes=len(blob))

    def _delta_base(self, base: ObjectId, size: int) -> DeltaBase | None:
        """``base``'s content and depth if it can serve as a delta base of ``size`` bytes.

        A base that cannot be read costs the delta, never the commit.
        """
        cached = self.base_cache.get(base)
        if cached is not None:
            # Still stored? fsck --repair may have set it aside since: a delta on it would
            # then be undecodable.
            if len(cached.content) != size or not self.has(base):
                return None
            return DeltaBase(base.hex, cached.content, cached.depth, cached.moves)
        try:
            header = self.header(base)
            if header.kind != "chunk" or header.size != size:
                return None
            claimed = header.depth if header.depth is not None else self.delta_depth(base)
            if claimed + 1 > self.policy.max_delta_chain:
                return None  # no use decoding it: the new chunk would be full anyway
            if claimed > _UNCACHED_BASE_MAX_DEPTH:
                # Decoding a long chain for every chunk would make the commit slower than the
                # saving is worth; a full object restarts the chain (only chunks beyond the
                # base cache's budget get here).
                return None
            out = np.empty(size, dtype=np.uint8)  # decoded over: no need to zero it first
            depth, moves = self._get_into(base, out.data, "chunk", want_moves=True)
        except CkptRepoError:
            return None
        return DeltaBase(base.hex, out, depth, moves)

    def put_document(self, document: dict[str, Any]) -> PutResult:
        kind = document.get("kind")
        if not isinstance(kind, str):
            raise FormatError("document has no kind")
        return self.put(kind, canonical_json(document))

    # --- reading -------------------------------------------------------------------------

    def _read_blob(
        self, object_id: ObjectId, allocate: Callable[[int], np.ndarray] | None = None
    ) -> bytes | memoryview:
        """The object file of ``object_id``: new bytes, or read into ``allocate(size)`` (or
        mapped) where the backend can (see ``read_whole``)."""
        key = object_key(object_id)
        try:
            return self.backend.read(key) if allocate is None else read_whole(self.backend, key, allocate)
        except KeyNotFoundError:
            raise ObjectNotFoundError(object_id.hex, self.backend.location) from None

    def header(self, object_id: ObjectId) -> Header:
        key = object_key(object_id)
        try:
            head = self.backend.read(key, 0, _HEADER_READ)
            hlen = parse_prefix(head[:PREFIX_SIZE])
            raw = head[PREFIX_SIZE : PREFIX_SIZE + hlen]
            if len(raw) < hlen and len(head) == _HEADER_READ:
                raw = self.backend.read(key, PREFIX_SIZE, hlen)
            if len(raw) < hlen:
                raise FormatError("object file is truncated inside its header")
            return parse_header(raw)
        except KeyNotFoundError:
            raise ObjectNotFoundError(object_id.hex, self.backend.location) from None
        except FormatError as exc:
            raise FormatError(f"object {object_id.hex}: {exc}") from None

    def delta_depth(self, object_id: ObjectId) -> int:
        """Deltas from ``object_id`` down to a full object: one header read where the header
        records its depth, a walk over the bases for objects of early versions."""
        depth = 0
        header = self.header(object_id)
        while header.base is not None:
            if header.depth is not None:
                return depth + header.depth
            depth += 1
            if depth > MAX_DELTA_DEPTH:
                raise FormatError(f"object {object_id.hex}: delta chain longer than {MAX_DELTA_DEPTH}")
            header = self.header(ObjectId(header.base))
        return depth

    def _parse(
        self, object_id: ObjectId, blob: Buffer, kind: str | None, expected_size: int | None
    ) -> tuple[Header, memoryview]:
        header, payload = split_object(blob)
        if kind is not None and header.kind != kind:
            raise FormatError(f"is a {header.kind}, expected a {kind}")
        if expected_size is not None and header.size != expected_size:
            raise FormatError(f"holds {header.size} bytes, expected {expected_size}")
        return header, payload

    def _decode_into(
        self, object_id: ObjectId, out: memoryview, kind: str | None, level: int, want_moves: bool = False
    ) -> tuple[int, np.ndarray | None]:
        """Decode ``object_id`` into ``out`` without checking its hash (the caller checks the
        content it finally asked for, which covers every base on the way). Returns the depth
        of the delta chain actually followed, and the moves if asked (see ``decode_into``)."""
        if level > MAX_DELTA_DEPTH:
            raise FormatError(f"delta chain longer than {MAX_DELTA_DEPTH}")
        blob = self._read_blob(object_id, self._reading.getter(level))
        header, payload = self._parse(object_id, blob, kind, len(out))
        return self._decode_parsed(header, payload, out, level, want_moves)

    def _decode_parsed(
        self, header: Header, payload: memoryview, out: memoryview, level: int, want_moves: bool = False
    ) -> tuple[int, np.ndarray | None]:
        """Decode a parsed object at chain ``level``, its bases from this store."""
        chain = 0

        def base_into(base_hex: str, view: memoryview, base_moves: bool) -> np.ndarray | None:
            nonlocal chain
            depth, moves = self._decode_into(ObjectId(base_hex), view, "chunk", level + 1, base_moves)
            chain = 1 + depth
            return moves

        moves = decode_into(header.coding, payload, out, base_into, want_moves)
        _check_depth(header, chain)
        return chain, moves

    def _get_into(
        self, object_id: ObjectId, out: memoryview, kind: str | None, want_moves: bool = False
    ) -> tuple[int, np.ndarray | None]:
        try:
            depth, moves = self._decode_into(object_id, out, kind, 0, want_moves)
        except FormatError as exc:
            raise ObjectCorruptError(object_id.hex, "undecodable", str(exc)) from None
        actual = hash_hex(out)
        if actual != object_id.hex:
            raise ObjectCorruptError(object_id.hex, actual)
        return depth, moves

    def get_into(self, object_id: ObjectId, out: memoryview, *, kind: str | None = None) -> int:
        """Decode ``object_id`` straight into ``out`` (exactly its size), verified against its
        id; returns the depth of its delta chain. The fast path of checkouts."""
        return self._get_into(object_id, out, kind)[0]

    def get_with_moves(self, object_id: ObjectId) -> tuple[bytearray, np.ndarray | None]:
        """The verified content of a chunk and its moves (None unless it is a 2-byte delta):
        what a context-coded child needs of its base."""
        out = bytearray(self.header(object_id).size)  # bounded by parse_header
        _depth, moves = self._get_into(object_id, memoryview(out), "chunk", want_moves=True)
        return out, moves

    def chunk_into(self, chunk: ChunkRef, out: memoryview) -> None:
        """A manifest's chunk into ``out``: copied where the manifest holds it inline (checked
        against its id when the manifest was read), else decoded and verified."""
        if chunk.inline is not None:
            out[:] = chunk.inline
        else:
            self.get_into(chunk.id, out, kind="chunk")

    def chunk(self, chunk: ChunkRef) -> bytes:
        """A manifest's chunk, as :meth:`chunk_into` reads it."""
        if chunk.inline is not None:
            return chunk.inline
        return self.get(chunk.id, kind="chunk", expected_size=chunk.size)

    def get(
        self, object_id: ObjectId, *, kind: str | None = None, expected_size: int | None = None
    ) -> bytes:
        """The decoded content of ``object_id``, verified against its id."""
        blob = self._read_blob(object_id)
        try:
            header, payload = self._parse(object_id, blob, kind, expected_size)
            codec = header.coding.get("codec")
            if codec == "zstd":
                data = zstd_decompress(payload, header.size)
            elif codec == "raw":
                if len(payload) != header.size:
                    raise FormatError(f"raw payload holds {len(payload)} bytes, expected {header.size}")
                data = bytes(payload)
            else:
                out = bytearray(header.size)
                self._decode_parsed(header, payload, memoryview(out), 0)
                data = bytes(out)
        except FormatError as exc:
            raise ObjectCorruptError(object_id.hex, "undecodable", str(exc)) from None
        actual = hash_hex(data)
        if actual != object_id.hex:
            raise ObjectCorruptError(object_id.hex, actual)
        return data

    def decode_blob(
        self,
        object_id: ObjectId,
        blob: bytes,
        *,
        kind: str | None = None,
        load_base: Callable[[ObjectId], bytes] | None = None,
    ) -> bytes:
        """The content of an object file received from elsewhere (a remote), checked to hash
        to ``object_id``; ObjectCorruptError if it does not. A delta's base must be readable
        through ``load_base`` (default: this store); a base whose moves a context-coded delta
        reads must be in this store."""
        loader = load_base or (lambda base: self.get(base))

        def base_of(base_hex: str, want_moves: bool) -> tuple[Buffer, np.ndarray | None]:
            if want_moves:
                return self.get_with_moves(ObjectId(base_hex))
            return loader(ObjectId(base_hex)), None

        try:
            header, payload = split_object(blob)
            if kind is not None and header.kind != kind:
                raise FormatError(f"is a {header.kind}, expected a {kind}")
            data = decode_payload(header.coding, payload, header.size, base_of)
        except FormatError as exc:
            raise ObjectCorruptError(object_id.hex, "undecodable", str(exc)) from None
        actual = hash_hex(data)
        if actual != object_id.hex:
            raise ObjectCorruptError(object_id.hex, actual)
        return data

    def put_encoded(
        self,
        object_id: ObjectId,
        blob: bytes,
        *,
        kind: str | None = None,
        load_base: Callable[[ObjectId], bytes] | None = None,
    ) -> tuple[PutResult, bytes]:
        """Store an object file as it is, after :meth:`decode_blob` checked it; return the
        decoded content too. Nothing is written when the check fails."""
        data = self.decode_blob(object_id, blob, kind=kind, load_base=load_base)
        if self.has(object_id):
            return PutResult(object_id, new=False, stored_bytes=0), data
        try:
            self.backend.write(object_key(object_id), blob, create_only=True)
        except PreconditionFailedError:
            return PutResult(object_id, new=False, stored_bytes=0), data
        if self.index is not None:
            self.index.add(object_id, len(blob), len(data))
        return PutResult(object_id, new=True, stored_bytes=len(blob)), data

    def get_document(self, object_id: ObjectId, kind: str) -> dict[str, Any]:
        document = parse_json(self.get(object_id, kind=kind), f"{kind} {object_id.hex}")
        if not isinstance(document, dict) or document.get("kind") != kind:
            raise FormatError(f"{kind} {object_id.hex}: not a {kind} document")
        return document

    def stored_size(self, object_id: ObjectId) -> int:
        if self.index is not None:
            entry = self.index.get(object_id)
            if entry is not None:
                return entry[0]
        stat = self.backend.stat(object_key(object_id))
        if stat is None:
            raise ObjectNotFoundError(object_id.hex, self.backend.location)
        return stat.size

    def delete(self, object_id: ObjectId) -> None:
        # The index forgets first: a cache that claimed a deleted object would let a commit
        # reuse a chunk that is gone.
        if self.index is not None:
            self.index.remove(object_id)
        self.backend.delete(object_key(object_id))


class WriteBatch:
    """The chunks of one commit, made durable and visible together.

    On a backend that can stage writes (a local disk), each chunk goes to a temporary file as
    it is coded, and :meth:`publish` syncs them all, then names them: one fsync pass over a
    commit's chunks costs about a quarter less than an fsync after each write, because the
    filesystem commits its journal once for many files. The commit publishes the batch before
    it writes the manifest that names the chunks, so a crash before that leaves only
    temporary files (fsck --repair removes them) and never a named object with unsynced
    bytes. Other backends write each chunk at once, and publish has nothing to do.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._stager = store.backend if isinstance(store.backend, StagingBackend) else None
        self._claimed: set[ObjectId] = set()
        self._staged: list[tuple[ObjectId, Any, int, int]] = []  # id, staged write, stored, size
        self._closed = False
        self._lock = threading.Lock()

    def claim(self, object_id: ObjectId) -> bool:
        """True the first time ``object_id`` is offered: the caller then stores it."""
        with self._lock:
            if object_id in self._claimed:
                return False
            self._claimed.add(object_id)
            return True

    @property
    def staging(self) -> bool:
        """Whether chunks are staged (else each is written outright and publish is empty)."""
        return self._stager is not None

    def stage(self, object_id: ObjectId, blob: memoryview, size: int) -> None:
        """Stage the object file ``blob`` of ``object_id`` (``size`` decoded bytes)."""
        assert self._stager is not None, "stage() on a backend that cannot stage"  # a bug
        staged = self._stager.stage(object_key(object_id), blob)
        with self._lock:
            if not self._closed:
                self._staged.append((object_id, staged, len(blob), size))
                return
        self._stager.discard([staged])  # staged after the batch was dropped

    def publish(self, map_fn: Callable[..., Any] = map) -> int:
        """Make every staged chunk durable and visible; returns the stored bytes of those
        another writer had stored meanwhile (counted as new when staged, they were not)."""
        with self._lock:
            staged, self._staged = self._staged, []
        if not staged or self._stager is None:
            return 0
        created = self._stager.publish([s for _, s, _, _ in staged], map_fn)
        if self.store.index is not None:
            self.store.index.add_many(
                (object_id, stored, size) for (object_id, _, stored, size), new in zip(staged, created) if new
            )
        return sum(stored for (_, _, stored, _), new in zip(staged, created) if not new)

    def discard(self) -> None:
        """Drop what was staged and not published (the commit failed), and whatever is
        staged from now on."""
        with self._lock:
            staged, self._staged = self._staged, []
            self._closed = True
        if staged and self._stager is not None:
            self._stager.discard([s for _, s, _, _ in staged])
