"""Inline chunks: entries of at most ``chunking.inline_max_size`` bytes live in the manifest.

A small tensor then costs no object file; everything that reads, compares, counts, checks
or copies chunks treats an inline chunk like any other, and a manifest's inline content is
checked against its id when the manifest is read.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptrepo
from ckptrepo.config import Chunking, Config
from ckptrepo.errors import ConfigError, FormatError
from ckptrepo.ids import hash_hex
from ckptrepo.objects import MAX_INLINE_SIZE, Manifest


def _object_files(repo: ckptrepo.Repository) -> int:
    return sum(len(files) for _, _, files in os.walk(Path(repo.location) / "objects"))


def _with_inline(limit: int) -> Config:
    return Config(chunking=Chunking(inline_max_size=limit))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
    limit=st.sampled_from([0, 1, 1000, 4096, 8192]),
)
def test_entries_up_to_the_limit_are_inline_and_read_back(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], limit: int
) -> None:
    rng = np.random.default_rng(sum(sizes) + limit)
    state = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    with ckptrepo.init(tmp_path_factory.mktemp("inline") / "r", config=_with_inline(limit)) as repo:
        commit = repo.commit(state)
        manifest = repo.load_manifest(commit.manifest_id)
        for path, array in state.items():
            chunks = manifest.entries[path].chunks
            inline = [c.inline is not None for c in chunks]
            assert inline == ([0 < array.size <= limit] if array.size else [])
        # Objects: the distinct stored chunks, the manifest and the commit; nothing else.
        assert _object_files(repo) == len(manifest.chunk_ids()) + 2
        assert repo.load_commit(commit.id).stats.new_chunks == len(manifest.chunk_ids())
        document = manifest.to_document()
        assert document["format"] == (2 if any(0 < n <= limit for n in sizes) else 1)
        back = repo.checkout(commit.id).to_dict()
        for path, array in state.items():
            np.testing.assert_array_equal(back[path], array)
        assert repo.fsck(read_data=True).ok


def test_a_state_of_small_tensors_writes_only_its_documents(tmp_path: Path) -> None:
    state = {f"layer{i}.bias": np.full(384, i, dtype=np.float32) for i in range(50)}
    with ckptrepo.init(tmp_path / "r") as repo:
        commit = repo.commit(state, step=1)
        assert _object_files(repo) == 2
        again = repo.commit(state, step=2)
        assert again.manifest_id == commit.manifest_id and _object_files(repo) == 3  # one more commit
        usage = repo.du("steps/1")
        assert usage.inline.objects == 50 and usage.inline.logical_bytes == 50 * 384 * 4
        assert usage.chunks.objects == 0 and usage.stored_bytes > 0


def test_a_manifest_without_inline_chunks_keeps_format_1(tmp_path: Path) -> None:
    state = {"w": np.arange(4096, dtype=np.float32)}
    with ckptrepo.init(tmp_path / "r") as repo:
        manifest = repo.load_manifest(repo.commit(state).manifest_id)
    assert manifest.to_document()["format"] == 1


def test_small_files_of_a_directory_are_inline_and_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"lr": 0.001}')
    (src / "sub" / "big.bin").write_bytes(os.urandom(300_000))
    (src / "empty").write_bytes(b"")
    with ckptrepo.init(tmp_path / "r") as repo:
        commit = repo.commit(src)
        entries = repo.load_manifest(commit.manifest_id).entries
        assert [c.inline is not None for c in entries["config.json"].chunks] == [True]
        assert all(c.inline is None for c in entries["sub/big.bin"].chunks)
        out = repo.checkout(commit.id).to_directory(tmp_path / "out")
    for name in ("config.json", "sub/big.bin", "empty"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_dict_to_directory_and_back_keeps_inline_entries(tmp_path: Path) -> None:
    state = {"small": np.arange(10, dtype=np.float32), "big": np.arange(5000, dtype=np.float32), "step": 3}
    with ckptrepo.init(tmp_path / "r") as repo:
        commit = repo.commit(state)
        out = repo.checkout(commit.id).to_directory(tmp_path / "out")
        again = repo.commit(str(out))
    assert again.manifest_id == commit.manifest_id and again.stats.new_chunks == 0


def test_diff_compares_inline_entries(tmp_path: Path) -> None:
    with ckptrepo.init(tmp_path / "r") as repo:
        repo.commit({"a": np.ones(8, dtype=np.float32), "b": np.zeros(8, dtype=np.float32)}, step=1)
        repo.commit({"a": np.ones(8, dtype=np.float32), "b": np.full(8, 0.5, dtype=np.float32)}, step=2)
        result = repo.diff("steps/1", "steps/2", numeric=True)
    by_path = {e.path: e for e in result.entries}
    assert by_path["a"].status == "unchanged" and by_path["b"].status == "modified"
    assert by_path["b"].numeric is not None and by_path["b"].numeric.max_abs == pytest.approx(0.5)
    assert by_path["b"].numeric.changed == by_path["b"].numeric.elements == 8


def test_clone_and_push_carry_inline_entries(tmp_path: Path) -> None:
    state = {"small": np.arange(10, dtype=np.float32), "big": np.arange(5000, dtype=np.float32)}
    with ckptrepo.init(tmp_path / "a") as repo:
        commit = repo.commit(state, step=1)
        copy = ckptrepo.clone(str(tmp_path / "a"), tmp_path / "b")
        with copy:
            np.testing.assert_array_equal(copy.checkout("steps/1").to_dict()["small"], state["small"])
            assert copy.fsck(read_data=True).ok
            copy.commit({**state, "small": state["small"] + 1}, step=2)
            copy.push("origin")
        assert repo.checkout("steps/2").to_dict()["small"].tolist() == (state["small"] + 1).tolist()
        assert repo.resolve("steps/1").id == commit.id and repo.fsck(read_data=True).ok


def test_gc_keeps_what_inline_entries_sit_beside(tmp_path: Path) -> None:
    with ckptrepo.init(tmp_path / "r") as repo:
        for step in range(3):
            repo.commit({"b": np.full(4, step, dtype=np.float32), "w": np.arange(5000, dtype=np.float32) + step}, step=step)
        repo.gc(grace_seconds=0)
        for step in range(3):
            assert repo.checkout(f"steps/{step}").to_dict()["b"].tolist() == [step] * 4
        assert repo.fsck(read_data=True).ok


# --- what a manifest may claim -----------------------------------------------------------


def _manifest_document(chunk: list, size: int, fmt: int = 2) -> dict:
    return {
        "kind": "manifest", "format": fmt, "type": "directory",
        "entries": {"f": {"kind": "file", "size": size, "chunks": [chunk], "executable": False}},
    }


def test_inline_content_is_checked_against_its_id() -> None:
    content = b"small file"
    good = [hash_hex(content), len(content), base64.b64encode(content).decode()]
    assert Manifest.from_document(_manifest_document(good, len(content))).entries["f"].chunks[0].inline == content
    wrong = [hash_hex(b"other"), len(content), good[2]]
    with pytest.raises(FormatError, match="entry f: inline chunk .* does not hash to its id"):
        Manifest.from_document(_manifest_document(wrong, len(content)))
    short = [good[0], len(content) + 1, good[2]]
    with pytest.raises(FormatError, match="holds 10 bytes, not 11"):
        Manifest.from_document(_manifest_document(short, len(content) + 1))
    with pytest.raises(FormatError, match="inline chunk in a format 1 manifest"):
        Manifest.from_document(_manifest_document(good, len(content), fmt=1))
    with pytest.raises(FormatError):
        Manifest.from_document(_manifest_document([good[0], len(content), "not base64!"], len(content)))


def test_an_inline_claim_beyond_the_bound_is_refused_before_decoding() -> None:
    size = MAX_INLINE_SIZE + 1
    claim = [hash_hex(b""), size, base64.b64encode(b"x" * 3).decode()]
    with pytest.raises(FormatError, match=f"claims {size} bytes, more than {MAX_INLINE_SIZE}"):
        Manifest.from_document(_manifest_document(claim, size))


def test_config_records_the_inline_limit(tmp_path: Path) -> None:
    with ckptrepo.init(tmp_path / "r", config=_with_inline(100)) as repo:
        assert repo.config.chunking.inline_max_size == 100
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert "inline_max_size: 100" in config
    # A config from before the setting existed reads with the default.
    (tmp_path / "r" / "config.yaml").write_text(config.replace("  inline_max_size: 100\n", ""))
    with ckptrepo.open(tmp_path / "r") as repo:
        assert repo.config.chunking.inline_max_size == Chunking().inline_max_size
    (tmp_path / "r" / "config.yaml").write_text(config.replace("inline_max_size: 100", "inline_max_size: 100000"))
    with pytest.raises(ConfigError, match="inline_max_size"):
        ckptrepo.open(tmp_path / "r")


def test_a_collected_commit_of_inline_entries_cannot_be_checked_out(tmp_path: Path) -> None:
    # Nothing but its manifest holds its data, and a parsed manifest is remembered in memory.
    with ckptrepo.init(tmp_path / "r") as repo:
        first = repo.commit({"tag": "s1", "w": np.ones(3, dtype=np.float32)}, step=1)
        assert repo.checkout(first.id).to_dict()["tag"] == "s1"
        repo.commit({"tag": "s2", "w": np.ones(3, dtype=np.float32)}, step=2)
        repo.prune(keep_last=1)
        repo.gc(grace_seconds=0)
        with pytest.raises(ckptrepo.ObjectNotFoundError):
            repo.checkout(first.id).to_dict()
