"""repo.diff: statuses from manifests, numeric figures streamed chunk by chunk, every dtype."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from history_fixtures import (
    FROZEN,
    TRAINED,
    close,
    fine_tune,
    reference_figures,
    small_chunk_repo,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import checkpoints

import ckptrepo
from ckptrepo.config import Chunking, Config
from ckptrepo.diff import STATUSES, Diff, decoder_for, minifloat_table
from ckptrepo.diff import diff as diff_of
from ckptrepo.objects import Entry
from ckptrepo.store import object_key

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


def assert_matches_reference(diff: Diff, repo: ckptrepo.Repository, path: str) -> None:
    entry = diff[path]
    assert entry.numeric is not None, path
    a = repo.checkout(diff.a.rev).get(path, framework="torch")
    b = repo.checkout(diff.b.rev).get(path, framework="torch")
    expected = reference_figures(a, b)
    n = entry.numeric
    for name in ("l2", "rel_l2", "max_abs", "frac_changed", "norm_a"):
        assert close(getattr(n, name), expected[name]), (path, name, getattr(n, name), expected[name])
    assert n.elements == a.numel()


# --- the fine-tuning run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> ckptrepo.Repository:
    repo = small_chunk_repo(tmp_path_factory.mktemp("tuned") / "repo")
    fine_tune(repo, steps=3)
    yield repo
    repo.close()


def test_frozen_layers_unchanged_trained_layers_modified(tuned: ckptrepo.Repository) -> None:
    diff = tuned.diff("steps/1", "steps/3")
    model = {e.path: e.status for e in diff.entries if e.path.startswith("model/")}
    assert {p for p, s in model.items() if s == "modified"} == TRAINED
    assert {p for p, s in model.items() if s == "unchanged"} == FROZEN
    assert not diff.added and not diff.removed
    assert diff["step"].status == "modified"
    # Adam's moments move with the trained parameters; its hyper-parameters do not.
    assert all(e.status == "modified" for e in diff.entries if "/exp_avg" in e.path)
    assert all(e.status == "unchanged" for e in diff.entries if e.path.startswith("optimizer/param_groups/0/lr"))
    for path in FROZEN:
        assert diff[path].shared_chunks == diff[path].chunks_b
    assert diff["model/0.weight"].chunks_b > 1
    for path in TRAINED:
        assert diff[path].changes == ("content",)


def test_numeric_figures_match_numpy(tuned: ckptrepo.Repository) -> None:
    diff = tuned.diff("steps/1", "steps/2", numeric=True)
    tensors = [e.path for e in diff.modified if e.kind_a == "tensor"]
    assert TRAINED <= set(tensors)
    assert set(diff.numeric) == set(tensors)
    for path in tensors:
        assert_matches_reference(diff, tuned, path)
    for path in TRAINED:
        assert 0 < diff[path].numeric.rel_l2 < 1
        assert diff[path].numeric.frac_changed > 0.5
    assert all(diff[p].numeric is None for p in FROZEN)
    totals = diff.totals
    assert totals.numeric_entries == len(tensors)
    assert close(totals.l2, math.sqrt(sum(diff[p].numeric.l2 ** 2 for p in tensors)))


def test_bfloat16_run(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    fine_tune(repo, steps=2, lr=5e-2, model_dtype=torch.bfloat16)
    diff = repo.diff("steps/1", "steps/2", numeric=True)
    assert {e.path for e in diff.modified if e.path.startswith("model/")} == TRAINED
    assert {e.path for e in diff.unchanged if e.path.startswith("model/")} == FROZEN
    for path in TRAINED:
        assert diff[path].dtype_b == "bfloat16"
        assert_matches_reference(diff, repo, path)


def test_diff_across_branches_and_with_itself(tuned: ckptrepo.Repository, tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    fine_tune(repo, steps=2, seed=0)
    repo.branch("other", "steps/1")
    fine_tune(repo, steps=2, seed=1, branch="other")
    diff = repo.diff("main/steps/2", "other/steps/2", numeric=True)
    assert diff.a.branch == "main" and diff.b.branch == "other"
    # Another seed: another initialisation, so even the frozen layer differs.
    assert {e.path for e in diff.modified} >= FROZEN | TRAINED
    for path in FROZEN | TRAINED:
        assert_matches_reference(diff, repo, path)
    same = repo.diff("other/steps/2", "other")
    assert same.identical and len(same.unchanged) == len(same.entries)


# --- what is read and what is not ----------------------------------------------------------


def test_unchanged_entries_are_not_read(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    frozen = np.arange(10_000, dtype=np.float32)
    repo.commit({"frozen": frozen, "w": np.zeros(3000, np.float32)}, step=1)
    repo.commit({"frozen": frozen, "w": np.ones(3000, np.float32)}, step=2)
    manifest = repo.checkout("steps/1").manifest
    for chunk in manifest.entries["frozen"].chunks:
        (Path(repo.location) / object_key(chunk.id)).unlink()
    diff = repo.diff("steps/1", "steps/2", numeric=True)
    assert diff["frozen"].status == "unchanged"
    assert diff["w"].numeric.frac_changed == 1.0


def test_numeric_runs_in_bounded_memory(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    a = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)  # 1 MiB
    b = a.copy()
    b[::7] += 1
    repo.commit({"w": a}, step=1)
    repo.commit({"w": b}, step=2)
    del b
    tracemalloc.start()
    try:
        diff = repo.diff("steps/1", "steps/2", numeric=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 256 chunks of 4 KiB: a few chunks in flight, never the whole tensor (1 MiB, or 2 x 2 MiB
    # as float64).
    assert peak < 384 << 10, peak
    assert math.isclose(diff["w"].numeric.frac_changed, len(range(0, 1 << 18, 7)) / (1 << 18))
    assert diff["w"].numeric.max_abs == pytest.approx(1.0, rel=1e-6)


def test_different_chunk_sizes_and_dtypes_pair_up(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 61)).astype(np.float32)
    repo.commit({"w": a, "v": a}, step=1)
    # The same repository, now cutting tensors at 12 KiB: no chunk offsets line up.
    repo.save_config(Config(chunking=Chunking(tensor_chunk_size=12288)))
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-2
    repo.commit({"w": b, "v": torch.from_numpy(b).to(torch.bfloat16)}, step=2)
    diff = repo.diff("steps/1", "steps/2", numeric=True)
    assert diff["w"].changes == ("content",)
    assert diff["v"].changes == ("dtype", "content", "meta")  # meta: committed from torch now
    assert diff["v"].dtype_a == "float32" and diff["v"].dtype_b == "bfloat16"
    for path in ("w", "v"):
        assert_matches_reference(diff, repo, path)


def test_dict_against_directory_checkpoint(tmp_path: Path) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_bytes(b'{"layers": 3}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    repo.commit({"config.json": b'{"layers": 3}', "w": np.ones(4)}, step=1)
    repo.commit(str(src), step=2)
    diff = repo.diff("steps/1", "steps/2")
    assert diff.a.type == "dict" and diff.b.type == "directory"
    same_bytes = diff["config.json"]
    assert same_bytes.status == "modified"
    assert same_bytes.kind_a == "bytes" and same_bytes.kind_b == "file"
    assert "content" not in same_bytes.changes and "kind" in same_bytes.changes
    assert same_bytes.shared_chunks == 1  # the same bytes are the same chunk
    assert diff["w"].status == "removed"
    assert {e.path for e in diff.added} == {"sub/weights.bin"}
    back = repo.diff("steps/2", "steps/1")
    assert {e.path for e in back.removed} == {e.path for e in diff.added}


def test_prefix_filters_and_bad_revisions(tuned: ckptrepo.Repository) -> None:
    diff = diff_of(tuned, "steps/1", "steps/2", prefix="model/")
    assert diff.entries and all(e.path.startswith("model/") for e in diff.entries)
    with pytest.raises(ckptrepo.RevisionError):
        tuned.diff("steps/1", "steps/99")
    with pytest.raises(KeyError):
        diff["nope"]
    with pytest.raises(ValueError):
        diff.with_status("changed")


# --- properties ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> ckptrepo.Repository:
    repo = small_chunk_repo(tmp_path_factory.mktemp("scratch") / "repo")
    yield repo
    repo.close()


@settings(max_examples=25)
@given(checkpoints(with_torch=False))
def test_diff_with_itself_is_all_unchanged(scratch: ckptrepo.Repository, checkpoint: dict[Any, Any]) -> None:
    first = scratch.commit(checkpoint)
    second = scratch.commit(checkpoint)
    diff = scratch.diff(first.id, second.id, numeric=True)
    assert diff.identical
    assert [e.path for e in diff.entries] == list(scratch.checkout(first.id).manifest.entries)
    assert all(e.shared_chunks == e.chunks_b for e in diff.entries)
    assert not diff.numeric


@settings(max_examples=25)
@given(checkpoints(with_torch=False), checkpoints(with_torch=False))
def test_swapping_sides_swaps_added_and_removed(
    scratch: ckptrepo.Repository, left: dict[Any, Any], right: dict[Any, Any]
) -> None:
    a = scratch.commit(left)
    b = scratch.commit(right)
    forward = scratch.diff(a.id, b.id)
    backward = scratch.diff(b.id, a.id)
    paths = {s: {e.path for e in forward.with_status(s)} for s in STATUSES}
    back = {s: {e.path for e in backward.with_status(s)} for s in STATUSES}
    assert paths["added"] == back["removed"] and paths["removed"] == back["added"]
    assert paths["modified"] == back["modified"] and paths["unchanged"] == back["unchanged"]
    for entry in forward.entries:
        assert backward[entry.path].changes == entry.changes
    assert forward.totals.bytes_a == backward.totals.bytes_b
    assert forward.totals.shared_chunks == backward.totals.shared_chunks


NUMPY_NUMERIC = ["bool", "int8", "uint16", "int32", "uint64", "int64", "float16", "float32", "float64",
                 "complex64", "complex128"]
TORCH_NUMERIC = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "float8_e8m0fnu", "complex32", "float16", "int8"]


@st.composite
def array_pairs(draw: Any) -> tuple[Any, Any]:
    """Two arrays of one shape, b a partial edit of a: some elements equal, some not, special
    values included."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40))
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(NUMPY_NUMERIC))
        # Magnitudes bounded so the plain reference's squares do not overflow float64.
        elements = None
        kind, width = np.dtype(dtype).kind, np.dtype(dtype).itemsize * 8
        specials = st.sampled_from([np.nan, np.inf, -np.inf])
        if kind == "f":
            bound = float(np.finfo(dtype).max) if dtype == "float16" else 2.0**100
            elements = st.floats(-bound, bound, width=width) | specials
        elif kind == "c":
            elements = st.complex_numbers(max_magnitude=2.0**100, width=width) | specials
        a = draw(hnp.arrays(dtype, shape, elements=elements))
        b = draw(hnp.arrays(dtype, shape, elements=elements))
        keep = draw(hnp.arrays(np.bool_, shape))
        return a, np.where(keep, a, b).astype(dtype)
    name = draw(st.sampled_from(TORCH_NUMERIC))
    dtype = getattr(torch, name)
    count = int(np.prod(shape)) * dtype.itemsize
    raw_a = draw(st.binary(min_size=count, max_size=count))
    raw_b = draw(st.binary(min_size=count, max_size=count))
    a = torch.frombuffer(bytearray(raw_a), dtype=torch.uint8).view(dtype).reshape(shape)
    b = torch.frombuffer(bytearray(raw_b), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    keep = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    b.view(torch.uint8).view(-1, b.element_size())[keep.reshape(-1)] = a.view(torch.uint8).view(-1, a.element_size())[keep.reshape(-1)]
    return a, b


def _raw(array: Any) -> bytes:
    if isinstance(array, torch.Tensor):
        return array.contiguous().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(array).tobytes()


@settings(max_examples=60)
@given(array_pairs())
@example(pair=(np.array([0.0]), np.array([5.90940606e-205])))  # squares that underflow
@example(pair=(np.zeros(2, np.complex64), np.array([np.inf, 1], np.complex64)))  # complex infinity
def test_numeric_figures_for_every_dtype(scratch: ckptrepo.Repository, pair: tuple[Any, Any]) -> None:
    a, b = pair
    first = scratch.commit({"x": a})
    second = scratch.commit({"x": b})
    diff = scratch.diff(first.id, second.id, numeric=True)
    entry = diff["x"]
    if entry.status == "unchanged":
        assert _raw(a) == _raw(b)
        return
    expected = reference_figures(a, b)
    n = entry.numeric
    assert n is not None
    for name in ("l2", "rel_l2", "max_abs", "frac_changed", "norm_a"):
        assert close(getattr(n, name), expected[name]), (name, getattr(n, name), expected[name])


# --- decoding every code -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"])
def test_minifloat_tables_agree_with_torch(name: str) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = codes.view(getattr(torch, name)).to(torch.float64).numpy()
    np.testing.assert_array_equal(minifloat_table(name), expected)


@pytest.mark.parametrize(
    "name", ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
             "float8_e4m3b11fnuz", "float4_e2m1fn"]
)
def test_minifloat_tables_agree_with_ml_dtypes(name: str) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    table = minifloat_table(name)
    expected = np.arange(len(table), dtype=np.uint8).view(getattr(ml_dtypes, name)).astype(np.float64)
    np.testing.assert_array_equal(table, expected)


def _decode(dtype: str, raw: bytes, **meta: Any) -> np.ndarray:
    decoder = decoder_for(Entry("tensor", len(raw), (), {"dtype": dtype, "shape": [len(raw)], **meta}))
    assert decoder is not None
    return decoder.decode(memoryview(raw))


def test_every_bfloat16_and_sub_byte_code() -> None:
    codes = np.arange(1 << 16, dtype=np.uint16)
    expected = torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(_decode("bfloat16", codes.tobytes()), expected)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name, low, high in (("int4", -8, 8), ("uint4", 0, 16), ("int2", -2, 2), ("uint2", 0, 4)):
        values = np.arange(low, high)
        raw = values.astype(getattr(ml_dtypes, name)).tobytes()
        np.testing.assert_array_equal(_decode(name, raw), values)
    packed = np.arange(256, dtype=np.uint8)
    low_first = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1).view(ml_dtypes.float4_e2m1fn)
    np.testing.assert_array_equal(_decode("float4_e2m1fn_x2", packed.tobytes()), low_first.astype(np.float64))


def test_big_endian_and_complex32() -> None:
    values = np.array([1.5, -2.25, np.inf], dtype=">f4")
    np.testing.assert_array_equal(_decode("float32", values.tobytes(), byteorder="big"), values.astype(np.float64))
    z = torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64).to(torch.complex32)
    np.testing.assert_array_equal(
        _decode("complex32", z.view(torch.uint8).numpy().tobytes()), z.to(torch.complex128).numpy()
    )
    assert decoder_for(Entry("tensor", 0, (), {"dtype": "str", "shape": [0]})) is None
