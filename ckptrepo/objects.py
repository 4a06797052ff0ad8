"""Manifests and commits: immutable values with one canonical JSON encoding each.

A document's id is the blake3 of its canonical JSON (sorted keys, no spaces, UTF-8), and its
``kind`` field is part of what is hashed. Documents are validated against the JSON Schemas in
``schemas/`` when decoded, so a bad field is refused with its path.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .codec import MAX_OBJECT_SIZE, canonical_json
from .errors import FormatError
from .ids import ObjectId, hash_hex
from .validation import validate
from .values import iter_leaf_paths

FORMAT_VERSION = 1
# Format 2 adds inline chunks. A manifest without any is still written as format 1, so its
# id, and what any reader of format 1 makes of it, stay as they were.
INLINE_FORMAT_VERSION = 2
# Bounds checked before anything is allocated for what a document claims.
MAX_ENTRIES = 1_000_000
MAX_ENTRY_SIZE = 1 << 44
# The most an inline chunk may hold, whatever a repository's config says.
MAX_INLINE_SIZE = 64 << 10


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk of an entry: its id (the blake3 of its content) and size. An inline chunk
    also carries its content, which the manifest holds instead of an object file: a small
    tensor then costs no file, no write and no request of its own (docs/format.md)."""

    id: ObjectId
    size: int
    inline: bytes | None = None

    def to_json(self) -> list[Any]:
        if self.inline is None:
            return [self.id.hex, self.size]
        return [self.id.hex, self.size, base64.b64encode(self.inline).decode("ascii")]

    @classmethod
    def from_json(cls, path: str, raw: list[Any]) -> ChunkRef:
        chunk = cls(ObjectId(raw[0]), int(raw[1]))
        if len(raw) < 3:
            return chunk
        if chunk.size > MAX_INLINE_SIZE:
            raise FormatError(f"entry {path}: an inline chunk claims {chunk.size} bytes, more than {MAX_INLINE_SIZE}")
        try:
            content = base64.b64decode(raw[2], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"entry {path}: inline chunk {chunk.id.hex} is not base64") from None
        if len(content) != chunk.size:
            raise FormatError(f"entry {path}: inline chunk {chunk.id.hex} holds {len(content)} bytes, not {chunk.size}")
        # Checked here, once: readers then copy inline content without hashing it again.
        if hash_hex(content) != chunk.id.hex:
            raise FormatError(f"entry {path}: inline chunk {chunk.id.hex} does not hash to its id")
        return cls(chunk.id, chunk.size, content)


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a manifest: a leaf of a dict checkpoint, or a file, link or directory."""

    kind: str
    size: int = 0
    chunks: tuple[ChunkRef, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)  # dtype, shape, value, target, ...

    @property
    def dtype(self) -> str | None:
        return self.meta.get("dtype")

    @property
    def shape(self) -> tuple[int, ...] | None:
        shape = self.meta.get("shape")
        return None if shape is None else tuple(shape)

    @property
    def chunked(self) -> bool:
        return self.kind in CHUNKED_KINDS

    @property
    def stored_chunks(self) -> tuple[ChunkRef, ...]:
        """The chunks the store holds (the others the manifest holds inline)."""
        return tuple(c for c in self.chunks if c.inline is None)

    def fields(self) -> dict[str, Any]:
        """The entry as its manifest holds it, less the chunk list: what a value is made of
        (a checkout asks for this per entry; encoding every chunk reference, inline content
        in base64 included, only to drop it cost 2% of a 1 GiB checkout's CPU)."""
        out = dict(self.meta)
        out["kind"] = self.kind
        if self.chunked:
            out["size"] = self.size
        return out

    def to_json(self) -> dict[str, Any]:
        out = self.fields()
        if self.chunked:
            out["chunks"] = [c.to_json() for c in self.chunks]
        return out

    @classmethod
    def from_json(cls, path: str, raw: Mapping[str, Any]) -> Entry:
        meta = {k: v for k, v in raw.items() if k not in ("kind", "size", "chunks")}
        kind = raw["kind"]
        if kind not in CHUNKED_KINDS:
            return cls(kind=kind, meta=meta)
        chunks = tuple(ChunkRef.from_json(path, c) for c in raw["chunks"])
        size = int(raw["size"])
        if sum(c.size for c in chunks) != size:
            raise FormatError(f"entry {path}: chunk sizes add up to {sum(c.size for c in chunks)}, not {size}")
        if any(c.size > MAX_OBJECT_SIZE for c in chunks):
            raise FormatError(f"entry {path}: a chunk claims more than {MAX_OBJECT_SIZE} bytes")
        if kind == "tensor":
            _check_tensor_size(path, meta, size)
        return cls(kind=kind, size=size, chunks=chunks, meta=meta)


CHUNKED_KINDS = frozenset({"tensor", "bytes", "str", "pickle", "file"})
DIRECTORY_KINDS = frozenset({"file", "dir", "symlink"})


def _check_tensor_size(path: str, meta: Mapping[str, Any], size: int) -> None:
    shape = meta["shape"]
    count = math.prod(shape)
    if count == 0:
        if size != 0:
            raise FormatError(f"entry {path}: an empty tensor holds {size} bytes")
        return
    if size % count:
        raise FormatError(f"entry {path}: {size} bytes do not fit shape {shape}")
    itemsize = dtype_itemsize(meta["dtype"])
    if itemsize is not None and size != count * itemsize:
        raise FormatError(f"entry {path}: {size} bytes do not hold {shape} of {meta['dtype']}")


_BITS_RE = re.compile(r"^(?:b?float|u?int|complex)([0-9]+)")


def dtype_itemsize(dtype: str) -> int | None:
    """Bytes per element of a dtype name (float32: 4, int4 and float4 kinds: 1 each), or None
    for names this cannot tell; checked against entries before anything is allocated."""
    if dtype == "bool":
        return 1
    match = _BITS_RE.match(dtype)
    return None if match is None else max(1, int(match[1]) // 8)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a checkpoint holds: entries by path; for a dict checkpoint, also its tree."""

    type: str  # "dict" | "directory"
    entries: Mapping[str, Entry]
    tree: Any = None

    def to_document(self) -> dict[str, Any]:
        inline = any(c.inline is not None for e in self.entries.values() for c in e.chunks)
        doc: dict[str, Any] = {
            "kind": "manifest",
            "format": INLINE_FORMAT_VERSION if inline else FORMAT_VERSION,
            "type": self.type,
            "entries": {path: entry.to_json() for path, entry in self.entries.items()},
        }
        if self.type == "dict":
            doc["tree"] = self.tree
        return doc

    def encode(self) -> bytes:
        return canonical_json(self.to_document())

    @property
    def id(self) -> ObjectId:
        return ObjectId(hash_hex(self.encode()))

    @classmethod
    def from_document(cls, doc: Any) -> Manifest:
        validate(doc, "manifest", "manifest")
        if len(doc["entries"]) > MAX_ENTRIES:
            raise FormatError(f"manifest: {len(doc['entries'])} entries exceed the limit {MAX_ENTRIES}")
        entries = {path: Entry.from_json(path, raw) for path, raw in doc["entries"].items()}
        if doc["format"] < INLINE_FORMAT_VERSION:
            for path, entry in entries.items():
                if any(c.inline is not None for c in entry.chunks):
                    raise FormatError(f"manifest: entry {path}: an inline chunk in a format {doc['format']} manifest")
        tree = doc.get("tree")
        if doc["type"] == "dict":
            leaf_paths = iter_leaf_paths(tree)
            if sorted(leaf_paths) != sorted(entries) or len(set(leaf_paths)) != len(leaf_paths):
                raise FormatError("manifest: the tree's leaves and the entries do not match")
            ordered = {path: entries[path] for path in leaf_paths}
            return cls(type="dict", entries=ordered, tree=tree)
        for path, entry in entries.items():
            if entry.kind not in DIRECTORY_KINDS:
                raise FormatError(f"manifest: entry {path}: {entry.kind} in a directory checkpoint")
        return cls(type="directory", entries=dict(sorted(entries.items())))

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def delta_bases(self, path: str, kind: str | None, dtype: str | None, size: int) -> list[ObjectId] | None:
        """The chunks of entry ``path``, offered as delta bases to the same entry in a child
        commit when it has the same kind, dtype and size and is stored as objects."""
        old = self.entries.get(path)
        if old is None or old.kind != kind or old.size != size or old.dtype != dtype:
            return None
        if len(old.stored_chunks) != len(old.chunks):
            return None
        return [c.id for c in old.chunks]

    def chunk_ids(self) -> set[ObjectId]:
        """The chunks this manifest needs from the store (its inline chunks it holds itself)."""
        return {c.id for e in self.entries.values() for c in e.stored_chunks}


@dataclass(frozen=True, slots=True)
class CommitStats:
    logical_bytes: int = 0
    stored_bytes: int = 0
    new_chunks: int = 0
    reused_chunks: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "new_chunks": self.new_chunks,
            "reused_chunks": self.reused_chunks,
        }


@dataclass(frozen=True, slots=True)
class Commit:
    manifest_id: ObjectId
    parents: tuple[ObjectId, ...]
    branch: str
    step: int | None
    message: str
    metrics: Mapping[str, float]
    meta: Mapping[str, Any]
    created: datetime
    stats: CommitStats

    def to_document(self) -> dict[str, Any]:
        return {
            "kind": "commit",
            "format": FORMAT_VERSION,
            "manifest": self.manifest_id.hex,
            "parents": [p.hex for p in self.parents],
            "branch": self.branch,
            "step": self.step,
            "message": self.message,
            "metrics": {k: _metric_json(v) for k, v in self.metrics.items()},
            "meta": dict(self.meta),
            "created": self.created.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "stats": self.stats.to_json(),
        }

    def encode(self) -> bytes:
        return canonical_json(self.to_document())

    @property
    def id(self) -> ObjectId:
        return ObjectId(hash_hex(self.encode()))

    @property
    def logical_bytes(self) -> int:
        return self.stats.logical_bytes

    @classmethod
    def from_document(cls, doc: Any) -> Commit:
        validate(doc, "commit", "commit")
        try:
            created = datetime.fromisoformat(doc["created"].replace("Z", "+00:00"))
        except ValueError as exc:
            raise FormatError(f"commit: field created: {exc}") from None
        return cls(
            manifest_id=ObjectId(doc["manifest"]),
            parents=tuple(ObjectId(p) for p in doc["parents"]),
            branch=doc["branch"],
            step=doc["step"],
            message=doc["message"],
            metrics={k: _metric_value(v) for k, v in doc["metrics"].items()},
            meta=doc["meta"],
            created=created,
            stats=CommitStats(**doc["stats"]),
        )


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as a commit records them: str names, float values (nan and inf allowed)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to number, not {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, not {key!r}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key} must be a number, not {value!r}") from None
    return out


def _metric_json(value: float) -> float | str:
    # JSON has no nan/inf; a diverged loss is still worth recording.
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _metric_value(value: float | str) -> float:
    return float(value)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
