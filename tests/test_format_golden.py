"""Golden vectors: the encodings of each object kind are fixed, so the format cannot drift
by accident. If a change here is intended, it is a format change: bump the format version
and document it in docs/format.md."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from ckptrepo.backends.local import LocalBackend
from ckptrepo.codec import CodingPolicy, encode_object, split_object
from ckptrepo.ids import ObjectId, hash_hex
from ckptrepo.objects import ChunkRef, Commit, CommitStats, Entry, Manifest
from ckptrepo.store import ObjectStore
from ckptrepo.validation import validate
from ckptrepo.values import flatten

GOLDEN = Path(__file__).parent / "golden"
# Regenerate the vectors only for an intended format change: CKPT_WRITE_GOLDEN=1 pytest …
WRITE = os.environ.get("CKPT_WRITE_GOLDEN") == "1"
CHUNK = bytes(range(256)) * 4


def _manifest() -> Manifest:
    tree, leaves = flatten({"model": {"w": np.arange(4, dtype=np.float32)}, "step": 7, 3: [None, 1.5, b"x"]})
    entries = {}
    for leaf in leaves:
        meta = {k: v for k, v in leaf.entry.items() if k != "kind"}
        if leaf.data is None:
            entries[leaf.path] = Entry(leaf.entry["kind"], meta=meta)
        else:
            data = bytes(leaf.data)
            entries[leaf.path] = Entry(leaf.entry["kind"], len(data), (ChunkRef(ObjectId(hash_hex(data)), len(data)),), meta)
    return Manifest("dict", entries, tree)


def _commit(manifest: Manifest) -> Commit:
    return Commit(
        manifest_id=manifest.id, parents=(ObjectId("ab" * 32),), branch="main", step=7, message="golden",
        metrics={"loss": 0.25, "diverged": float("nan")}, meta={"sha": "abc"},
        created=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        stats=CommitStats(logical_bytes=20, stored_bytes=10, new_chunks=2, reused_chunks=1),
    )


CASES = {
    "manifest.json": lambda: _manifest().encode(),
    "commit.json": lambda: _commit(_manifest()).encode(),
    "chunk-raw.bin": lambda: b"".join(encode_object("chunk", CHUNK, len(CHUNK), {"codec": "raw"})),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_matches_golden_bytes(name: str) -> None:
    produced = CASES[name]()
    path = GOLDEN / name
    if WRITE:
        path.write_bytes(produced)
    assert produced == path.read_bytes(), f"{name} encoding changed: this is a format change"


def test_golden_ids_are_stable() -> None:
    ids = json.loads((GOLDEN / "ids.json").read_text()) if (GOLDEN / "ids.json").exists() else None
    current = {"manifest": _manifest().id, "commit": _commit(_manifest()).id, "chunk": hash_hex(CHUNK)}
    if WRITE:
        (GOLDEN / "ids.json").write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        ids = current
    assert current == ids


def test_documents_validate_and_decode_back() -> None:
    manifest = _manifest()
    validate(manifest.to_document(), "manifest", "manifest")
    assert Manifest.from_document(json.loads(manifest.encode())) == manifest
    commit = _commit(manifest)
    validate(commit.to_document(), "commit", "commit")
    back = Commit.from_document(json.loads(commit.encode()))
    assert back.id == commit.id


def test_golden_objects_decode_with_every_reader(tmp_path: Path) -> None:
    """Stored vectors of each coding decode to the same content (read compatibility)."""
    store = ObjectStore(LocalBackend(tmp_path), None, CodingPolicy())
    for coding_name, policy in {"zstd": CodingPolicy(planes=False), "planes": CodingPolicy(planes=True)}.items():
        path = GOLDEN / f"chunk-{coding_name}.bin"
        if WRITE:
            writer = ObjectStore(LocalBackend(tmp_path / coding_name), None, policy)
            result = writer.put("chunk", np.linspace(0, 1, 256, dtype=np.float32).tobytes(), itemsize=4)
            path.write_bytes((tmp_path / coding_name / "objects" / result.id[:2] / result.id[2:]).read_bytes())
        blob = path.read_bytes()
        header, _ = split_object(blob)
        assert header.coding["codec"] == coding_name
        content = np.linspace(0, 1, 256, dtype=np.float32).tobytes()
        object_id = ObjectId(hash_hex(content))
        (tmp_path / "objects" / object_id[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "objects" / object_id[:2] / object_id[2:]).write_bytes(blob)
        assert store.get(object_id) == content
        (tmp_path / "objects" / object_id[:2] / object_id[2:]).unlink()


def _bf16_chain() -> list[bytes]:
    """Three versions of 20,000 bf16 values that move by a few units in the last place."""
    rng = np.random.default_rng(2026)
    words = (rng.standard_normal(20_000).astype(np.float32) * 0.05).view(np.uint32) >> 16
    first_move = rng.integers(-2, 3, len(words))
    # Momentum: most values move again the way they moved before.
    second_move = np.where(rng.random(len(words)) < 0.9, first_move, rng.integers(-2, 3, len(words)))
    versions = [words.astype(np.uint16)]
    for move in (first_move, second_move):
        versions.append(versions[-1] + move.astype(np.uint16))
    return [v.tobytes() for v in versions]


def test_golden_context_coded_chain_decodes(tmp_path: Path) -> None:
    """A full object, a delta coded "ans" on the exponent, and one that also reads its base's
    moves: stored vectors decode to the same content (the "ans" stream is ours to keep)."""
    contents = _bf16_chain()
    names = [GOLDEN / f"chunk-ans-{i}.bin" for i in range(3)]
    if WRITE:
        writer = ObjectStore(LocalBackend(tmp_path / "write"), None, CodingPolicy())
        base = None
        for content, path in zip(contents, names):
            result = writer.put("chunk", content, itemsize=2, base=base, remember=True, dtype="bfloat16")
            path.write_bytes((tmp_path / "write" / "objects" / result.id[:2] / result.id[2:]).read_bytes())
            base = result.id
    store = ObjectStore(LocalBackend(tmp_path / "read"), None, CodingPolicy())
    inner = []
    for content, path in zip(contents, names):
        blob = path.read_bytes()
        header, _ = split_object(blob)
        inner.append((header.coding.get("inner") or {}).get("moves"))
        object_id = ObjectId(hash_hex(content))
        (tmp_path / "read" / "objects" / object_id[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "read" / "objects" / object_id[:2] / object_id[2:]).write_bytes(blob)
    assert inner == [None, False, True]
    for content in contents:
        assert store.get(ObjectId(hash_hex(content))) == content
