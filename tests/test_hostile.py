"""Hostile input: crafted manifests, commits, configs, refs, object files and repository
layouts, each refused with a clear error (a CkptRepoError or the documented TypeError), fast,
without large allocations, and without writing anything outside the repository or the
checkout's destination. Nothing a stranger's repository holds can make ckptrepo run code."""

from __future__ import annotations

import os
import pickle
import re
import stat
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

import ckptrepo
from ckptrepo.codec import MAX_OBJECT_SIZE, canonical_json
from ckptrepo.errors import (
    BackendError,
    CkptRepoError,
    ConfigError,
    FormatError,
    InvalidRefNameError,
    ObjectCorruptError,
    PathSafetyError,
)
from ckptrepo.ids import ObjectId, hash_hex
from ckptrepo.refs import branch_ref, tag_ref
from ckptrepo.store import object_key


@pytest.fixture
def repo(tmp_path: Path) -> ckptrepo.Repository:
    repository = ckptrepo.init(tmp_path / "repo")
    repository.commit({"seed": np.arange(4, dtype=np.float32)})
    yield repository
    repository.close()


def _tree_snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` with its content (or link target): to prove nothing changed."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


def _craft(repo: ckptrepo.Repository, manifest: dict[str, Any] | bytes, name: str = "evil") -> ObjectId:
    """Store a crafted manifest (a document, or raw bytes) under a commit on branch ``name``."""
    if isinstance(manifest, bytes):
        manifest_id = repo.store.put("manifest", manifest).id
    else:
        manifest_id = repo.store.put_document(manifest).id
    seed = repo.load_commit(repo.resolve_id("main")).to_document()
    commit_id = repo.store.put_document(seed | {"manifest": manifest_id.hex, "parents": [], "step": None}).id
    repo.refs.update(branch_ref(name), commit_id, repo.refs.get(branch_ref(name)))
    return commit_id


def _chunk(repo: ckptrepo.Repository, data: bytes) -> list[Any]:
    return [repo.store.put("chunk", data).id.hex, len(data)]


def _directory(entries: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "manifest", "format": 1, "type": "directory", "entries": entries}


def _file(repo: ckptrepo.Repository, data: bytes = b"payload") -> dict[str, Any]:
    return {"kind": "file", "size": len(data), "chunks": [_chunk(repo, data)], "executable": False}


def _raw_object(repo: ckptrepo.Repository, object_id: ObjectId, header: dict[str, Any] | bytes, payload: bytes) -> None:
    head = header if isinstance(header, bytes) else canonical_json(header)
    blob = b"CKO\x01" + struct.pack("<I", len(head)) + head + payload
    repo.backend.write(object_key(object_id), blob)


# --- pickle ----------------------------------------------------------------------------------


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value


def test_pickle_needs_consent_on_both_ends(repo: ckptrepo.Repository) -> None:
    with pytest.raises(TypeError, match="allow_pickle"):
        repo.commit({"a": {"b": Opaque(1)}})
    assert len(repo.log()) == 1  # refused before anything was written
    commit = repo.commit({"a": {"b": Opaque(1)}}, allow_pickle=True)
    snap = repo.checkout(commit.id)
    with pytest.raises(TypeError, match="allow_pickle"):
        snap.to_dict()
    with pytest.raises(TypeError, match="allow_pickle"):
        snap["a/b"]
    assert snap.to_dict(allow_pickle=True) == {"a": {"b": Opaque(1)}}


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def test_a_strangers_pickle_never_runs(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Payload(str(marker)))
    commit = _craft(repo, {
        "kind": "manifest", "format": 1, "type": "dict", "tree": {"dict": [["x", None]]},
        "entries": {"x": {"kind": "pickle", "size": len(payload), "chunks": [_chunk(repo, payload)]}},
    })
    snap = repo.checkout(commit)
    with pytest.raises(TypeError, match="allow_pickle"):
        snap.to_dict()
    with pytest.raises(TypeError, match="allow_pickle"):
        snap.get("x", framework="torch")
    out = snap.to_directory(tmp_path / "out")  # the bytes are written as bytes, never loaded
    assert (out / "data.safetensors").exists() or any(out.iterdir())
    assert not marker.exists()


# --- checkout paths --------------------------------------------------------------------------


TRAVERSALS = {
    "dot-dot": lambda r: {"../escaped": _file(r)},
    "deep dot-dot": lambda r: {"a/../../escaped": _file(r)},
    "absolute": lambda r: {"/tmp/escaped-abs": _file(r)},
    "dot segment": lambda r: {"./x": _file(r)},
    "empty segment": lambda r: {"a//b": _file(r)},
    "nul byte": lambda r: {"a\x00b": _file(r)},
    "link out": lambda r: {"l": {"kind": "symlink", "target": "../outside"}},
    "link far out": lambda r: {"d/l": {"kind": "symlink", "target": "../../outside"}},
    "absolute link": lambda r: {"l": {"kind": "symlink", "target": "/etc/passwd"}},
    "link through link": lambda r: {
        "a": {"kind": "symlink", "target": "."}, "b": {"kind": "symlink", "target": "a/../.."},
    },
    "write through link": lambda r: {
        "l": {"kind": "symlink", "target": "sub"}, "sub": {"kind": "dir"}, "l/x": _file(r),
    },
    "file below a file": lambda r: {"f": _file(r), "f/x": _file(r)},
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_checkout_refuses_paths_that_lead_out(repo: ckptrepo.Repository, tmp_path: Path, case: str) -> None:
    commit = _craft(repo, _directory(TRAVERSALS[case](repo)))
    before = _tree_snapshot(tmp_path)
    with pytest.raises(PathSafetyError):
        repo.checkout(commit).to_directory(tmp_path / "dest" / "inner")
    after = _tree_snapshot(tmp_path)
    created = {k: v for k, v in after.items() if k not in before}
    # The destination itself may have been made (empty); nothing else appears or changes.
    assert set(created) <= {"dest", "dest/inner"} and all(v == "dir" for v in created.values())
    assert {k: v for k, v in after.items() if k in before} == before
    with pytest.raises(PathSafetyError):
        repo.checkout(commit).to_uri(f"memory://hostile-{case.replace(' ', '-')}/dest")


def test_duplicate_paths_are_refused(repo: ckptrepo.Repository) -> None:
    entry = canonical_json(_file(repo)).decode()
    raw = ('{"entries":{"x":' + entry + ',"x":' + entry + '},"format":1,"kind":"manifest","type":"directory"}')
    commit = _craft(repo, raw.encode())
    with pytest.raises(FormatError, match="duplicate key 'x'"):
        repo.checkout(commit)


def test_checkout_into_a_planted_link_is_refused(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").symlink_to(outside)
    with pytest.raises(ckptrepo.RepositoryError, match="not an empty directory"):
        repo.checkout("latest").to_directory(tmp_path / "dest")
    assert list(outside.iterdir()) == []


def test_dict_keys_cannot_name_files_outside(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    commit = repo.commit({"../../escaped": np.arange(3), "/abs": b"x", "ok": np.ones(2)})
    out = repo.checkout(commit.id).to_directory(tmp_path / "deep" / "out")
    written = sorted(p.name for p in out.iterdir())
    assert written == ["ckptrepo-checkpoint.json", "data.safetensors", "ok.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "repo"]


# --- sizes and bombs -------------------------------------------------------------------------


def _peak_mib(fn: Any) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_zstd_frame_declaring_a_terabyte_is_refused_before_allocating(repo: ckptrepo.Repository) -> None:
    content = b"a" * 1000
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(content))
    # Rewrite the frame header to declare 1 TiB (Frame_Content_Size as 8 bytes).
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(content)
    # Frame header: magic, descriptor (top two bits: size field of 8 bytes), window, size.
    descriptor = (bomb[4] & 0x3F) | 0xC0
    bomb = bomb[:4] + bytes([descriptor]) + bomb[5:6] + struct.pack("<Q", 1 << 40) + bomb[6:]
    assert zstandard.frame_content_size(bomb) == 1 << 40
    object_id = ObjectId(hash_hex(content))
    _raw_object(repo, object_id, {"kind": "chunk", "size": len(content), "coding": {"codec": "zstd"}}, bomb)

    def read() -> None:
        with pytest.raises(ObjectCorruptError, match="declares 1099511627776 bytes"):
            repo.store.get(object_id)

    assert _peak_mib(read) < 16
    assert frame  # the honest frame decodes (control)


def test_header_claiming_more_than_the_object_limit_is_refused(repo: ckptrepo.Repository) -> None:
    object_id = ObjectId("12" * 32)
    _raw_object(repo, object_id, {"kind": "chunk", "size": MAX_OBJECT_SIZE + 1, "coding": {"codec": "raw"}}, b"x")
    with pytest.raises(ObjectCorruptError, match="out of range"):
        repo.store.get(object_id)
    with pytest.raises(FormatError, match="out of range"):
        repo.store.header(object_id)


PLANE_LIES = {
    "length past the payload": [{"codec": "raw", "length": 10**9}] + [{"codec": "raw", "length": 0}] * 4,
    "wrong plane count": [{"codec": "raw", "length": 4}],
    "negative length": [{"codec": "raw", "length": -4}] + [{"codec": "raw", "length": 4}] * 4,
    "nested planes": [{"codec": "planes", "length": 4}] * 4 + [{"codec": "raw", "length": 0}],
    "delta inside a plane": [{"codec": "xor", "length": 4}] * 4 + [{"codec": "raw", "length": 0}],
    "short plane": [{"codec": "raw", "length": 3}, {"codec": "raw", "length": 5}]
    + [{"codec": "raw", "length": 4}] * 2 + [{"codec": "raw", "length": 0}],
}


@pytest.mark.parametrize("case", sorted(PLANE_LIES))
def test_planes_coding_that_lies_about_lengths(repo: ckptrepo.Repository, case: str) -> None:
    content = bytes(range(16))
    object_id = ObjectId(hash_hex(content))
    coding = {"codec": "planes", "itemsize": 4, "planes": PLANE_LIES[case]}
    _raw_object(repo, object_id, {"kind": "chunk", "size": 16, "coding": coding}, content)
    with pytest.raises(ObjectCorruptError):
        repo.store.get(object_id)


def _ans(moves: bool = False, field: list[int] | None = None, sections: list[int] | None = None) -> dict[str, Any]:
    return {"codec": "ans", "exponent": field or [7, 8], "moves": moves, "sections": sections or [0, 4, 0]}


ANS_LIES = {
    "ans at the top": (_ans(), False, "unknown codec 'ans'"),
    "ans as a plane": ({"codec": "planes", "itemsize": 2, "planes": [{"codec": "ans", "length": 2}] * 2
                        + [{"codec": "raw", "length": 0}]}, False, "unknown plane codec 'ans'"),
    "ans over 4-byte elements": ({"codec": "delta", "base": "BASE", "itemsize": 4, "depth": 1, "inner": _ans()}, True,
                                 "needs 2-byte elements"),
    "moves of a full base": ({"codec": "delta", "base": "BASE", "itemsize": 2, "depth": 1, "inner": _ans(True)}, True,
                             "base is not a 2-byte delta"),
    "exponent past 16 bits": ({"codec": "delta", "base": "BASE", "itemsize": 2, "depth": 1,
                               "inner": _ans(field=[12, 8])}, True, "bad exponent field"),
    "sections past the payload": ({"codec": "delta", "base": "BASE", "itemsize": 2, "depth": 1,
                                   "inner": _ans(sections=[10**9, 4, 0])}, True, "do not divide a payload"),
    "no tables": ({"codec": "delta", "base": "BASE", "itemsize": 2, "depth": 1, "inner": _ans()}, True, "zstd frame"),
}


@pytest.mark.parametrize("case", sorted(ANS_LIES))
def test_context_codings_that_lie(repo: ckptrepo.Repository, case: str) -> None:
    # A real full base, then a chunk whose coding claims what it cannot hold.
    base = repo.store.put("chunk", np.arange(8, dtype=np.uint16).tobytes(), itemsize=2)
    content = np.arange(1, 9, dtype=np.uint16).tobytes()
    object_id = ObjectId(hash_hex(content))
    coding, needs_base, problem = ANS_LIES[case]
    text = canonical_json(coding).replace(b"BASE", base.id.hex.encode()) if needs_base else canonical_json(coding)
    header = b'{"coding":' + text + b',"kind":"chunk","size":16}'
    _raw_object(repo, object_id, header, b"\x00\x01\x02\x03")
    with pytest.raises(ObjectCorruptError, match=re.escape(problem)):
        repo.store.get(object_id)
    out = bytearray(16)
    with pytest.raises(ObjectCorruptError, match=re.escape(problem)):
        repo.store.get_into(object_id, memoryview(out))


def test_manifest_claiming_huge_sizes_allocates_nothing(repo: ckptrepo.Repository) -> None:
    tiny = _chunk(repo, b"a")[0]
    commit = _craft(repo, {
        "kind": "manifest", "format": 1, "type": "dict", "tree": {"dict": [["t", None]]},
        "entries": {"t": {"kind": "bytes", "size": 16 << 30, "chunks": [[tiny, 1 << 30]] * 16}},
    })
    snap = repo.checkout(commit)

    def read() -> None:
        with pytest.raises(CkptRepoError, match="holds 1 bytes"):
            snap["t"]
        with pytest.raises(CkptRepoError, match="holds 1 bytes"):
            snap.to_dict()

    assert _peak_mib(read) < 16
    too_big = {"kind": "bytes", "size": 1 << 45, "chunks": [[tiny, 1]]}
    with pytest.raises(FormatError, match="field entries/t"):
        repo.checkout(_craft(repo, {**_directory({}), "type": "dict", "tree": {"dict": [["t", None]]},
                                    "entries": {"t": too_big}}, "evil2"))


def test_tensor_dtype_that_does_not_fit_its_bytes(repo: ckptrepo.Repository) -> None:
    chunk = _chunk(repo, bytes(12))
    commit = _craft(repo, {
        "kind": "manifest", "format": 1, "type": "dict", "tree": {"dict": [["t", None]]},
        "entries": {"t": {"kind": "tensor", "framework": "numpy", "dtype": "float64", "shape": [3],
                          "size": 12, "chunks": [chunk]}},
    })
    with pytest.raises(FormatError, match="do not hold \\[3\\] of float64"):
        repo.checkout(commit)


def test_deeply_nested_documents_are_refused(repo: ckptrepo.Repository) -> None:
    depth = 100_000
    deep_header = b"[" * depth + b"]" * depth
    object_id = ObjectId("34" * 32)
    _raw_object(repo, object_id, deep_header, b"")
    with pytest.raises(ObjectCorruptError, match="not JSON"):
        repo.store.get(object_id)
    tree = '{"list":[' * 5000 + "null" + "]}" * 5000
    raw = '{"entries":{},"format":1,"kind":"manifest","tree":' + tree + ',"type":"dict"}'
    commit = _craft(repo, raw.encode())
    with pytest.raises(FormatError):
        repo.checkout(commit)


# --- documents -------------------------------------------------------------------------------


def test_schema_violations_name_the_field(repo: ckptrepo.Repository) -> None:
    seed = repo.load_commit(repo.resolve_id("main")).to_document()
    cases = {
        "step": seed | {"step": -1},
        "created": seed | {"created": "2024-13-45T00:00:00.000000Z"},
        "parents/0": seed | {"parents": ["not-an-id"]},
        "(top level)": {k: v for k, v in seed.items() if k != "branch"},
    }
    for field, doc in cases.items():
        object_id = repo.store.put_document(doc).id
        with pytest.raises(FormatError, match=re.escape(f"field {field}")):
            repo.load_commit(object_id)
    bad_manifest = _directory({"x": {"kind": "file", "size": 1, "chunks": [["zz", 1]], "executable": False}})
    with pytest.raises(FormatError, match="field entries/x"):
        repo.checkout(_craft(repo, bad_manifest))
    # A parent id with a final newline: Python's "$" matches before it, so the pure-Python
    # validator alone would let it through; the compiled one refuses, and that stands.
    object_id = repo.store.put_document(seed | {"parents": ["ab" * 32 + "\n"]}).id
    with pytest.raises(FormatError, match="parents/0"):
        repo.load_commit(object_id)


def test_truncated_objects_give_clear_errors(repo: ckptrepo.Repository) -> None:
    for object_id in list(repo.store.ids()):
        path = Path(repo.location) / object_key(object_id)
        whole = path.read_bytes()
        kind = repo.store.header(object_id).kind
        for length in sorted({0, 1, 3, 4, 7, 8, 9, len(whole) // 2, len(whole) - 1}):
            path.write_bytes(whole[:length])
            with pytest.raises((ObjectCorruptError, FormatError)):
                repo.store.get(object_id, kind=kind)
            with pytest.raises(CkptRepoError):
                repo.store.header(object_id) if length < 9 else repo.store.get(object_id)
        path.write_bytes(whole)
    assert repo.fsck(read_data=True).ok


def test_hostile_config_is_refused_with_its_field(tmp_path: Path) -> None:
    root = tmp_path / "r"
    ckptrepo.init(root).close()
    config = root / "config.yaml"
    good = config.read_text()
    config.write_text(good.replace("max_delta_chain:", "max_delta_chain: 1000 #"))
    with pytest.raises(ConfigError, match="compression/max_delta_chain"):
        ckptrepo.open(root)
    config.write_text("!!python/object/apply:os.system ['touch " + str(tmp_path / "ran") + "']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ckptrepo.open(root)
    assert not (tmp_path / "ran").exists()
    # A billion-laughs alias bomb: refused or read, but quickly and without blowing up.
    lines = ["a: &a ['x','x','x','x','x','x','x','x','x','x']"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    config.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError):
        ckptrepo.open(root)
    assert time.monotonic() - started < 5


# --- refs --------------------------------------------------------------------------------


def test_hostile_refs(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    root = Path(repo.location)
    (root / "HEAD").write_text("../../../etc\n")
    with pytest.raises(InvalidRefNameError):
        repo.resolve("latest")
    (root / "HEAD").write_text("main\n")
    (root / "refs" / "tags" / "junk").write_bytes(b"\xff" * 100)
    with pytest.raises(FormatError, match="does not hold a commit id"):
        repo.resolve("junk")
    (root / "refs" / "tags" / "junk").unlink()
    # A tag that is a link to a file outside: moving the tag replaces the link, never the file.
    victim = tmp_path / "victim"
    victim.write_text(repo.resolve_id("main") + "\n")
    (root / "refs" / "tags" / "linked").symlink_to(victim)
    repo.tag("linked", "main", force=True)
    assert victim.read_text() == repo.resolve_id("main") + "\n"
    assert not (root / "refs" / "tags" / "linked").is_symlink()
    with pytest.raises(InvalidRefNameError):
        repo.tag("../../escape", "main")
    assert repo.refs.get(tag_ref("linked")) == repo.resolve_id("main")


# --- repository layout ---------------------------------------------------------------------


def test_linked_object_directory_cannot_redirect_writes(repo: ckptrepo.Repository, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    objects = Path(repo.location) / "objects"
    data = {"w": np.random.default_rng(1).standard_normal(2000).astype(np.float32)}  # 8 KB: not inline
    chunk = hash_hex(memoryview(data["w"]).cast("B"))
    shard = objects / chunk[:2]
    if shard.exists():
        for leftover in shard.iterdir():
            leftover.unlink()
        shard.rmdir()
    shard.symlink_to(outside)
    with pytest.raises(BackendError, match="leads outside the repository"):
        repo.commit(data)
    assert list(outside.iterdir()) == []
    shard.unlink()
    objects_link = tmp_path / "evil-repo"
    ckptrepo.init(objects_link).close()
    for name in ("locks", "cache"):
        moved = objects_link / name
        os.rename(moved, tmp_path / f"{name}-real")
        moved.symlink_to(outside)
        with pytest.raises(ckptrepo.RepositoryError, match="leads outside"):
            ckptrepo.open(objects_link)
        moved.unlink()
        os.rename(tmp_path / f"{name}-real", moved)
    assert list(outside.iterdir()) == []


def test_object_files_that_are_not_files(repo: ckptrepo.Repository) -> None:
    fifo_id = ObjectId("56" * 32)
    path = Path(repo.location) / object_key(fifo_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(BackendError, match="not a regular file"):
        repo.store.get(fifo_id)
    zero_id = ObjectId("78" * 32)
    zero = Path(repo.location) / object_key(zero_id)
    zero.parent.mkdir(parents=True, exist_ok=True)
    zero.symlink_to("/dev/zero")
    with pytest.raises(BackendError, match="not a regular file"):
        repo.store.get(zero_id)
    assert time.monotonic() - started < 5
    assert stat.S_ISFIFO(path.lstat().st_mode)  # looked at, never opened for writing
