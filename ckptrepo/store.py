"""The object store: content-addressed objects over a backend, verified on every read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .codec import (
    PREFIX_SIZE,
    CodingPolicy,
    Header,
    canonical_json,
    decode_payload,
    encode_object,
    encode_payload,
    parse_header,
    parse_prefix,
    split_object,
    xor_bytes,
)
from .errors import (
    FormatError,
    KeyNotFoundError,
    ObjectCorruptError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from .ids import ObjectId, hash_hex
from .index import ChunkIndex
from .validation import parse_json

OBJECTS_PREFIX = "objects"
# A delta is decoded by reading its base; the writer keeps chains at most this deep.
MAX_DELTA_DEPTH = 16


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
        self, backend: Backend, index: ChunkIndex | None, policy: CodingPolicy | None = None
    ) -> None:
        self.backend = backend
        self.index = index
        self.policy = policy or CodingPolicy()

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

    def put(
        self,
        kind: str,
        data: bytes | memoryview,
        *,
        itemsize: int = 1,
        object_id: ObjectId | None = None,
        base: ObjectId | None = None,
    ) -> PutResult:
        """Store ``data`` unless the store has it. ``base`` offers a delta base (same length)."""
        object_id = object_id or ObjectId(hash_hex(data))
        if self.has(object_id):
            return PutResult(object_id, new=False, stored_bytes=0)
        coding, payload = encode_payload(data, self.policy, itemsize)
        if base is not None and base != object_id:
            coding, payload = self._maybe_delta(data, base, itemsize, coding, payload)
        parts = encode_object(kind, payload, len(data), coding)
        blob = b"".join(parts)
        try:
            self.backend.write(object_key(object_id), blob, create_only=True)
        except PreconditionFailedError:
            # Someone stored the same content first; objects are immutable, so that is fine.
            return PutResult(object_id, new=False, stored_bytes=0)
        if self.index is not None:
            self.index.add(object_id, len(blob), len(data))
        return PutResult(object_id, new=True, stored_bytes=len(blob))

    def _maybe_delta(
        self,
        data: bytes | memoryview,
        base: ObjectId,
        itemsize: int,
        coding: dict[str, Any],
        payload: bytes | memoryview,
    ) -> tuple[dict[str, Any], bytes | memoryview]:
        try:
            depth = self.delta_depth(base)
            base_data = self.get(base)
        except (ObjectNotFoundError, ObjectCorruptError, FormatError):
            return coding, payload
        if depth + 1 > self.policy.max_delta_chain or len(base_data) != len(data):
            return coding, payload
        delta_coding, delta_payload = encode_payload(xor_bytes(data, base_data), self.policy, itemsize)
        if len(delta_payload) < len(payload):
            return {"codec": "xor", "base": base.hex, "inner": delta_coding}, delta_payload
        return coding, payload

    def put_document(self, document: dict[str, Any]) -> PutResult:
        kind = document.get("kind")
        if not isinstance(kind, str):
            raise FormatError("document has no kind")
        return self.put(kind, canonical_json(document))

    # --- reading -------------------------------------------------------------------------

    def _read_blob(self, object_id: ObjectId) -> bytes:
        try:
            return self.backend.read(object_key(object_id))
        except KeyNotFoundError:
            raise ObjectNotFoundError(object_id.hex, self.backend.location) from None

    def header(self, object_id: ObjectId) -> Header:
        key = object_key(object_id)
        try:
            prefix = self.backend.read(key, 0, PREFIX_SIZE)
            hlen = parse_prefix(prefix)
            return parse_header(self.backend.read(key, PREFIX_SIZE, hlen))
        except KeyNotFoundError:
            raise ObjectNotFoundError(object_id.hex, self.backend.location) from None
        except FormatError as exc:
            raise FormatError(f"object {object_id.hex}: {exc}") from None

    def delta_depth(self, object_id: ObjectId) -> int:
        depth = 0
        header = self.header(object_id)
        while header.base is not None:
            depth += 1
            if depth > MAX_DELTA_DEPTH:
                raise FormatError(f"object {object_id.hex}: delta chain longer than {MAX_DELTA_DEPTH}")
            header = self.header(ObjectId(header.base))
        return depth

    def get(
        self, object_id: ObjectId, *, kind: str | None = None, expected_size: int | None = None,
        _depth: int = 0,
    ) -> bytes:
        """The decoded content of ``object_id``, verified against its id."""
        blob = self._read_blob(object_id)
        try:
            header, payload = split_object(blob)
            if kind is not None and header.kind != kind:
                raise FormatError(f"is a {header.kind}, expected a {kind}")
            if expected_size is not None and header.size != expected_size:
                raise FormatError(f"holds {header.size} bytes, expected {expected_size}")
            if _depth > MAX_DELTA_DEPTH:
                raise FormatError(f"delta chain longer than {MAX_DELTA_DEPTH}")

            def load_base(base_hex: str) -> bytes:
                return self.get(ObjectId(base_hex), expected_size=None, _depth=_depth + 1)

            data = decode_payload(header.coding, payload, header.size, load_base)
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
        """Store an object file received from elsewhere (a remote) as it is, after checking
        that it decodes to content hashing to ``object_id``; return the decoded content too.

        A delta's base must already be readable through ``load_base`` (default: this store).
        Nothing is written when the check fails (ObjectCorruptError).
        """
        loader = load_base or (lambda base: self.get(base))
        try:
            header, payload = split_object(blob)
            if kind is not None and header.kind != kind:
                raise FormatError(f"is a {header.kind}, expected a {kind}")
            data = decode_payload(header.coding, payload, header.size, lambda b: loader(ObjectId(b)))
        except FormatError as exc:
            raise ObjectCorruptError(object_id.hex, "undecodable", str(exc)) from None
        actual = hash_hex(data)
        if actual != object_id.hex:
            raise ObjectCorruptError(object_id.hex, actual)
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
