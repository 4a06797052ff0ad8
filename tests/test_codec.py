"""The object codec: every coding round-trips, sizes are checked before allocating, delta
chains stay bounded, and objects of earlier versions (``xor``) still read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptrepo import codec as codec_module
from ckptrepo.backends.local import LocalBackend
from ckptrepo.basecache import BaseCache
from ckptrepo.codec import (
    MAX_DELTA_DEPTH,
    CodingPolicy,
    DeltaBase,
    add_unzigzag_into,
    canonical_json,
    decode_into,
    decode_payload,
    encode_chunk,
    encode_object,
    join_planes,
    object_file,
    split_object,
    split_planes,
    subtract_zigzag,
)
from ckptrepo.config import Config
from ckptrepo.errors import FormatError, ObjectCorruptError
from ckptrepo.frames import zstd_compress, zstd_decompress, zstd_decompress_into
from ckptrepo.ids import ObjectId, hash_hex
from ckptrepo.objects import ChunkRef, Entry
from ckptrepo.store import ObjectStore, object_key

ITEMSIZES = [1, 2, 3, 4, 8, 16]


@st.composite
def contents(draw: Any, itemsize: int) -> bytes:
    """Bytes shaped like checkpoint data: random, constant, or floats that change a little
    (so the zstd and plane paths run, not only raw)."""
    count = draw(st.integers(0, 3000))
    tail = draw(st.integers(0, itemsize - 1)) if itemsize > 1 else 0
    kind = draw(st.sampled_from(["random", "zeros", "floats"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = count * itemsize + tail
    if kind == "random":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "zeros":
        return bytes(size)
    floats = (rng.standard_normal(size // 4 + 1) * 0.02).astype(np.float32).tobytes()
    return floats[:size]


def _perturb(data: bytes, seed: int) -> bytes:
    """A slightly different version of ``data`` (as after a training step), same length."""
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    if len(arr):
        idx = rng.integers(0, len(arr), max(1, len(arr) // 16))
        arr[idx] ^= rng.integers(1, 4, len(idx), dtype=np.uint8)
    return arr.tobytes()


def _decode(blob: bytes | bytearray, bases: dict[str, bytes]) -> bytes:
    header, payload = split_object(blob)
    return decode_payload(header.coding, payload, header.size, lambda b, _moves: (bases[b], None))


policies = st.builds(
    CodingPolicy,
    level=st.sampled_from([1, 3, -1]),
    planes=st.booleans(),
    fast_planes=st.booleans(),
    delta=st.booleans(),
    max_delta_chain=st.integers(1, 8),
)


@given(st.sampled_from(ITEMSIZES).flatmap(lambda k: st.tuples(st.just(k), contents(k))), policies)
def test_every_coding_round_trips(case: tuple[int, bytes], policy: CodingPolicy) -> None:
    itemsize, data = case
    encoded = encode_chunk(data, policy, itemsize)
    blob = object_file("chunk", encoded)
    header, _ = split_object(blob)
    assert header.size == len(data) and header.base is None and header.depth == 0
    assert _decode(blob, {}) == data
    if header.codec != "raw":  # a coding is only kept when its payload saves enough
        # (the header of the chosen coding, with no payload, is what any object file costs;
        # "zstd" names itself in one byte more than "raw")
        empty = len(b"".join(encode_object("chunk", b"", len(data), header.coding)))
        assert len(blob) <= len(data) * policy.min_saving + empty


@given(
    st.sampled_from(ITEMSIZES).flatmap(lambda k: st.tuples(st.just(k), contents(k))),
    policies,
    st.integers(0, 2**32 - 1),
    st.integers(0, 7),
)
def test_delta_round_trips_and_respects_the_chain_limit(
    case: tuple[int, bytes], policy: CodingPolicy, seed: int, base_depth: int
) -> None:
    itemsize, base = case
    data = _perturb(base, seed)
    base_id = hash_hex(base)
    encoded = encode_chunk(data, policy, itemsize, DeltaBase(base_id, base, base_depth))
    blob = object_file("chunk", encoded)
    header, _ = split_object(blob)
    if header.base is not None:
        assert policy.delta and header.base == base_id
        assert header.depth == base_depth + 1 <= policy.max_delta_chain
        assert header.coding["inner"]["codec"] in ("raw", "zstd", "planes")
    assert _decode(blob, {base_id: base}) == data


def test_the_planes_that_pay_are_stored_as_their_own_zstd_frames() -> None:
    # Large enough to be judged on samples: the planes that pay are then split out and
    # compressed. Weights cut to 16 bits of mantissa and exponent: bytes 0 and 1 are
    # zero, byte 2 is noise, byte 3 repeats a few exponents.
    weights = (np.random.default_rng(5).standard_normal(1 << 19) * 0.02).astype(np.float32)
    content = (weights.view(np.uint32) & 0xFFFF0000).tobytes()
    encoded = encode_chunk(content, CodingPolicy(), 4)
    blob = object_file("chunk", encoded)
    header, payload = split_object(blob)
    assert [d["codec"] for d in header.coding["planes"]] == ["zstd", "zstd", "raw", "zstd", "raw"]
    planes = split_planes(content, 4)
    offset = 0
    for plane, descriptor in zip(planes, header.coding["planes"]):
        stored = bytes(payload[offset : offset + descriptor["length"]])
        if descriptor["codec"] == "zstd":
            assert stored == zstd_compress(plane, CodingPolicy().level, fast_planes=True)
        else:
            assert stored == bytes(plane)
        offset += descriptor["length"]
    assert offset == len(payload)
    assert _decode(blob, {}) == content


def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compress the planes that pay before the object file is laid out, so the two paths can
    be compared."""
    monkeypatch.setattr(codec_module, "_PLANES_AS_WRITTEN", False)


_SEGMENT_KINDS = ["random", "zeros", "floats", "one exponent", "few exponents", "random exponents"]


def _segment(kind: str, size: int, rng: np.random.Generator) -> bytes:
    if kind == "random":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "zeros":
        return bytes(size)
    floats = (rng.standard_normal(size // 4 + 1) * 0.02).astype(np.float32)
    if kind == "one exponent":  # byte 3 the same everywhere, the rest noise
        floats = floats.view(np.uint32) & 0x00FFFFFF | np.uint32(61 << 24)
    elif kind == "few exponents":  # byte 3 from a few values, the rest noise
        floats = (floats.view(np.uint32) & 0x00FFFFFF | (rng.integers(60, 64, len(floats)) << 24).astype(np.uint32))
    elif kind == "random exponents":  # nothing to compress in any byte
        floats = floats.view(np.uint32) ^ (rng.integers(0, 256, len(floats)) << 24).astype(np.uint32)
    return floats.tobytes()[:size]


@st.composite
def sampled_contents(draw: Any) -> tuple[int, bytes]:
    """Content large enough to be judged on samples, made of segments of different kinds, so
    that the samples can misjudge what the whole compresses to."""
    itemsize = draw(st.sampled_from([2, 4, 8]))
    size = draw(st.integers(150_000, 400_000))
    kinds = draw(st.lists(st.sampled_from(_SEGMENT_KINDS), min_size=1, max_size=8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bounds = np.linspace(0, size, len(kinds) + 1).astype(int)
    return itemsize, b"".join(_segment(k, int(b - a), rng) for k, a, b in zip(kinds, bounds, bounds[1:]))


@settings(max_examples=60, deadline=None)
@given(sampled_contents(), st.booleans(), st.integers(0, 2**32 - 1))
def test_planes_compressed_as_the_file_is_written_match_those_compressed_before(
    case: tuple[int, bytes], as_delta: bool, seed: int
) -> None:
    # The planes that pay, when they are the last ones, are compressed only as the object
    # file is written, after one split (see _PendingPlanes); the file must be the one the
    # other path writes, whatever the samples said.
    itemsize, data = case
    base = DeltaBase(hash_hex(b"base"), _perturb(data, seed), 0) if as_delta else None
    new = data if base is None else _perturb(bytes(base.content), seed + 1)
    blob = _written_both_ways(new, itemsize, base)
    assert _decode(blob, {} if base is None else {base.id: bytes(base.content)}) == new


def _written_both_ways(data: bytes, itemsize: int, base: DeltaBase | None = None) -> bytes:
    """The object file of ``data`` with the planes compressed as it is written, checked to be
    the one written with every plane compressed first."""
    pending = encode_chunk(data, CodingPolicy(), itemsize, base)
    blob = bytes(object_file("chunk", pending))
    assert pending.pending is None and pending.coding == split_object(blob)[0].coding
    with pytest.MonkeyPatch.context() as patch:
        _eager(patch)
        eager = encode_chunk(data, CodingPolicy(), itemsize, base)
        assert eager.pending is None
        assert bytes(object_file("chunk", eager)) == blob
    assert pending.payload() == eager.payload()  # the settled Encoded writes the same again
    return blob


def _windows_and_rest(rest: str, windows: str, size: int = 1 << 20, mask: int = 0xFFFFFFFF) -> bytes:
    """fp32 content whose sampled windows (start, middle, end) are of one kind and the rest of
    another, every element and-ed with ``mask``."""
    rng = np.random.default_rng(3)
    content = bytearray(_segment(rest, size, rng))
    window = 32 << 10
    step = (size - window) // 2
    for start in (0, step // 64 * 64, 2 * step // 64 * 64):
        content[start : start + window] = _segment(windows, window, rng)
    return (np.frombuffer(content, dtype=np.uint32) & np.uint32(mask)).tobytes()


def test_pending_planes_settle_a_header_longer_than_the_estimate() -> None:
    # The samples see one exponent (a frame of a few bytes), the rest has a few: the frame's
    # length has more digits than estimated, so the raw planes move along the header.
    data = _windows_and_rest("few exponents", "one exponent")
    encoded = encode_chunk(data, CodingPolicy(), 4)
    assert encoded.pending is not None
    estimated = canonical_json(encoded.coding)
    blob = object_file("chunk", encoded)
    assert [d["codec"] for d in encoded.coding["planes"]] == ["raw", "raw", "raw", "zstd", "raw"]
    assert len(canonical_json(encoded.coding)) != len(estimated)
    assert _decode(blob, {}) == data
    assert _written_both_ways(data, 4) == bytes(blob)


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        # Only the samples' exponent plane compresses: the chunk is stored raw after all.
        (0xFFFFFFFF, None),
        # Byte 2 compresses everywhere, byte 3 only in the samples: byte 3 is stored raw.
        (0xFF00FFFF, ["raw", "raw", "zstd", "raw", "raw"]),
    ],
)
def test_pending_planes_that_do_not_pay_after_all_are_stored_raw(mask: int, expected: list[str] | None) -> None:
    data = _windows_and_rest("random exponents", "one exponent", 4 << 20, mask)
    encoded = encode_chunk(data, CodingPolicy(), 4)
    assert encoded.pending is not None
    blob = object_file("chunk", encoded)
    coding = split_object(blob)[0].coding
    assert coding == encoded.coding
    if expected is None:
        assert coding == {"codec": "raw"}
    else:
        assert [d["codec"] for d in coding["planes"]] == expected
    assert _decode(blob, {}) == data
    assert _written_both_ways(data, 4) == bytes(blob)


def test_delta_is_chosen_for_slowly_changing_floats() -> None:
    rng = np.random.default_rng(1)
    old = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)
    new = old + np.float32(2e-5) * np.sign(rng.standard_normal(old.shape)).astype(np.float32)
    policy = CodingPolicy()
    full = object_file("chunk", encode_chunk(new.tobytes(), policy, 4))
    delta = object_file("chunk", encode_chunk(new.tobytes(), policy, 4, DeltaBase("ab" * 32, old.tobytes(), 0)))
    assert split_object(full)[0].codec == "planes"
    assert split_object(delta)[0].label == "delta+planes"
    assert len(delta) < 0.8 * len(full) < 0.9 * new.nbytes
    assert _decode(delta, {"ab" * 32: old.tobytes()}) == new.tobytes()


@given(st.binary(max_size=200), st.sampled_from(ITEMSIZES))
def test_planes_split_and_join_invert(data: bytes, itemsize: int) -> None:
    planes = split_planes(data, itemsize)
    assert len(planes) == itemsize + 1
    assert join_planes(planes, itemsize, len(data)) == data


@given(st.binary(max_size=300), st.binary(max_size=300), st.sampled_from([1, 2, 4, 8]), st.integers(0, 7))
def test_zigzag_difference_inverts(a: bytes, b: bytes, width: int, offset: int) -> None:
    n = min(len(a), len(b))
    # Odd offsets give unaligned views, the slow path.
    new = np.frombuffer(bytes(offset) + a[:n], dtype=np.uint8)[offset:]
    base = np.frombuffer(bytes(offset) + b[:n], dtype=np.uint8)[offset:]
    z = np.empty(n, dtype=np.uint8)
    subtract_zigzag(new, base, width, z)
    acc = base.copy()
    add_unzigzag_into(acc, z, width)
    assert acc.tobytes() == new.tobytes()


def test_small_changes_give_small_zigzag_values() -> None:
    base = np.array([1.0, -2.5, 3e-3], dtype=np.float32)
    new = np.nextafter(base, np.float32(np.inf))  # one unit in the last place up
    z = np.empty(base.nbytes, dtype=np.uint8)
    subtract_zigzag(new, base, 4, z)
    values = z.view(np.uint32)
    assert list(values) == [2, 1, 2]  # +1 -> 2, and -2.5 going up is -1 in its bits -> 1


# --- hostile and damaged input -----------------------------------------------------------


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating() -> None:
    frame = zstd_compress(bytes(100), 1)
    with pytest.raises(FormatError, match="declares"):
        decode_into({"codec": "zstd"}, frame, memoryview(bytearray(10)), _no_base)


@given(data=st.binary(max_size=5000), level=st.sampled_from([1, 3]))
def test_decompressing_into_a_buffer_matches_decompressing(data: bytes, level: int) -> None:
    frame = zstd_compress(data, level)
    out = np.full(len(data), 0xAA, dtype=np.uint8)
    zstd_decompress_into(frame, out)
    assert out.tobytes() == data == zstd_decompress(frame, len(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda frame: frame[:-3], "yielded"),  # cut short
        (lambda frame: frame + frame, "more than"),  # a second frame behind the first
        (lambda frame: frame + b"xyz", "bad zstd frame"),  # trailing bytes
    ],
)
def test_decompressing_into_a_buffer_refuses_frames_that_do_not_fill_it_exactly(damage: Any, message: str) -> None:
    data = bytes(range(256)) * 64
    out = np.empty(len(data), dtype=np.uint8)
    with pytest.raises(FormatError, match=message):
        zstd_decompress_into(damage(zstd_compress(data, 1)), out)
    with pytest.raises(FormatError):  # and into bytes alike
        zstd_decompress(damage(zstd_compress(data, 1)), len(data))
    with pytest.raises(FormatError, match="declares"):
        zstd_decompress_into(zstd_compress(data, 1), out[:-1])  # the size is checked first


def test_plane_lengths_beyond_the_payload_are_refused() -> None:
    coding = {"codec": "planes", "itemsize": 4, "planes": [{"codec": "raw", "length": 1 << 40}] + [{"codec": "raw", "length": 0}] * 4}
    with pytest.raises(FormatError, match="exceed"):
        decode_into(coding, b"1234", memoryview(bytearray(4)), _no_base)


@pytest.mark.parametrize(
    "coding",
    [
        {"codec": "planes", "itemsize": 99, "planes": []},
        {"codec": "planes", "itemsize": 4, "planes": [{"codec": "lz77", "length": 1}] * 5},
        {"codec": "delta", "base": "ab" * 32, "itemsize": 3, "depth": 1, "inner": {"codec": "raw"}},
        {"codec": "delta", "base": "ab" * 32, "itemsize": 4, "depth": 1,
         "inner": {"codec": "delta", "base": "cd" * 32, "itemsize": 4, "depth": 1, "inner": {"codec": "raw"}}},
        {"codec": "nope"},
    ],
)
def test_malformed_codings_are_refused(coding: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        decode_into(coding, bytes(8), memoryview(bytearray(8)), lambda b, out: None)


def _no_base(base: str, out: memoryview) -> None:
    raise AssertionError("no base expected")


def _plant(root: Path, object_id: str, kind: str, payload: bytes, size: int, coding: dict[str, Any]) -> None:
    path = root / object_key(ObjectId(object_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(encode_object(kind, payload, size, coding)))


def test_a_cycle_of_deltas_is_refused_not_followed_forever(tmp_path: Path) -> None:
    store = ObjectStore(LocalBackend(tmp_path), None)
    a, b = "aa" * 32, "bb" * 32
    inner = {"codec": "raw"}
    _plant(tmp_path, a, "chunk", bytes(8), 8, {"codec": "delta", "base": b, "itemsize": 1, "depth": 1, "inner": inner})
    _plant(tmp_path, b, "chunk", bytes(8), 8, {"codec": "delta", "base": a, "itemsize": 1, "depth": 1, "inner": inner})
    with pytest.raises(ObjectCorruptError, match=f"longer than {MAX_DELTA_DEPTH}"):
        store.get(ObjectId(a))
    with pytest.raises(ObjectCorruptError):
        store.get_into(ObjectId(a), memoryview(bytearray(8)))


def test_objects_of_early_versions_still_read(tmp_path: Path) -> None:
    """``xor`` deltas (no depth in the header) as the first writers stored them."""
    store = ObjectStore(LocalBackend(tmp_path), None)
    base = np.arange(64, dtype=np.float32).tobytes()
    new = (np.arange(64, dtype=np.float32) + 1).tobytes()
    base_id = store.put("chunk", base).id
    xor = (np.frombuffer(new, np.uint8) ^ np.frombuffer(base, np.uint8)).tobytes()
    new_id = hash_hex(new)
    _plant(tmp_path, new_id, "chunk", xor, len(new), {"codec": "xor", "base": base_id.hex, "inner": {"codec": "raw"}})
    assert store.get(ObjectId(new_id)) == new
    out = bytearray(len(new))
    assert store.get_into(ObjectId(new_id), memoryview(out)) == 1 and out == new
    assert store.header(ObjectId(new_id)).depth is None
    assert store.delta_depth(ObjectId(new_id)) == 1


def test_a_corrupt_base_is_caught_by_the_hash_of_what_was_asked_for(tmp_path: Path) -> None:
    policy = CodingPolicy(max_delta_chain=4)
    store = ObjectStore(LocalBackend(tmp_path), None, policy, base_cache_bytes=0)
    rng = np.random.default_rng(3)
    v0 = (rng.standard_normal(4096) * 0.02).astype(np.float32)
    v1 = v0 + np.float32(1e-5)
    id0 = store.put("chunk", v0.tobytes(), itemsize=4).id
    id1 = store.put("chunk", v1.tobytes(), itemsize=4, base=id0).id
    assert store.header(id1).base == id0.hex
    path = tmp_path / object_key(id0)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(ObjectCorruptError):
        store.get(id1)
    with pytest.raises(ObjectCorruptError):
        store.get_into(id1, memoryview(bytearray(v1.nbytes)))


# --- the store's delta chains --------------------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_delta_chains_stay_within_the_configured_depth(tmp_path: Path, cache_bytes: int) -> None:
    policy = CodingPolicy(max_delta_chain=3)
    store = ObjectStore(LocalBackend(tmp_path), None, policy, base_cache_bytes=cache_bytes)
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(8192) * 0.02).astype(np.float32)
    previous: ObjectId | None = None
    versions = []
    for _step in range(10):
        weights = weights + np.float32(2e-5) * np.sign(rng.standard_normal(weights.shape)).astype(np.float32)
        store.base_cache.new_generation()
        result = store.put("chunk", weights.tobytes(), itemsize=4, base=previous, remember=True)
        versions.append((result.id, weights.tobytes()))
        previous = result.id
    depths = [store.delta_depth(object_id) for object_id, _ in versions]
    if cache_bytes:
        assert depths == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    else:
        # Without the base cache a base is decoded from storage only while its chain is short.
        assert depths == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for object_id, content in versions:
        assert store.get(object_id) == content
        out = bytearray(len(content))
        assert store.get_into(object_id, memoryview(out)) == store.delta_depth(object_id)
        assert out == content


def test_chunk_reader_decodes_entries_in_order(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ckptrepo.datapath import ChunkReader, ChunkWriter

    store = ObjectStore(LocalBackend(tmp_path), None)
    rng = np.random.default_rng(5)
    arrays = {f"t{i}": rng.standard_normal(int(n)).astype(np.float32) for i, n in enumerate(rng.integers(0, 5000, 12))}
    with ThreadPoolExecutor(4) as pool:
        writer = ChunkWriter(store, pool)
        entries = {}
        for path, array in arrays.items():
            refs = writer.resolve(writer.write_fixed(memoryview(array.view(np.uint8)), 4096, 4))
            entries[path] = Entry("bytes", array.nbytes, refs)
        writer.publish()
        reader = ChunkReader(store, pool)
        got = list(reader.read_entries(entries.items(), window_bytes=8192))
        assert [p for p, _ in got] == list(arrays)
        for path, data in got:
            assert bytes(data) == arrays[path].tobytes()
        assert b"".join(reader.iter_entry(entries["t3"])) == arrays["t3"].tobytes()
        bad = Entry("bytes", 5, (ChunkRef(entries["t0"].chunks[0].id, 5),)) if entries["t0"].chunks else None
        if bad is not None and entries["t0"].chunks[0].size != 5:
            with pytest.raises(ObjectCorruptError):
                reader.read_entry(bad)


# --- the base cache --------------------------------------------------------------------------


def test_base_cache_keeps_positions_stable_within_its_budget() -> None:
    cache = BaseCache(100)
    ids = [ObjectId(f"{i:064x}") for i in range(6)]
    cache.new_generation()
    assert cache.add(ids[0], bytes(40), 0) and cache.add(ids[1], bytes(40), 0)
    assert not cache.add(ids[2], bytes(40), 0)  # full of this commit's chunks: the newcomer waits
    cache.new_generation()
    # The next commit: a hit makes room for its successor; leftovers of the last commit go
    # first when room is needed.
    assert cache.get(ids[0]) is not None
    cache.discard(ids[0])
    assert cache.add(ids[3], bytes(40), 1)
    assert cache.add(ids[4], bytes(40), 0)  # evicts ids[1], left by the previous commit
    assert cache.get(ids[1]) is None and cache.used_bytes == 80
    assert not cache.add(ids[5], bytes(200), 0)  # larger than the whole budget


def test_canonical_json_is_stable() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


def test_fast_planes_is_a_config_choice_with_a_default_for_older_configs() -> None:
    off = Config(compression=CodingPolicy(fast_planes=False))
    assert Config.load(off.dump(), "config.yaml").compression.fast_planes is False
    older = yaml.safe_load(Config().dump())
    del older["compression"]["fast_planes"]  # a config written before the option existed
    assert Config.load(yaml.safe_dump(older).encode(), "config.yaml").compression.fast_planes is True


def test_both_plane_compressors_code_float_weights_and_decode_alike() -> None:
    weights = (np.random.default_rng(3).standard_normal(1 << 18).astype(np.float32) * 0.02).tobytes()
    sizes = {}
    for fast in (True, False):
        encoded = encode_chunk(weights, CodingPolicy(fast_planes=fast), 4)
        blob = object_file("chunk", encoded)
        assert encoded.coding["codec"] == "planes"
        assert [d["codec"] for d in encoded.coding["planes"]][:4] == ["raw", "raw", "raw", "zstd"]
        assert _decode(blob, {}) == weights
        sizes[fast] = len(blob)
    # The exponent plane's entropy bounds both; neither may be far from the other.
    assert 0.95 < sizes[True] / sizes[False] < 1.05
