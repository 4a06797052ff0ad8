"""The compiled element loops (ckptrepo._elements, from _elements.c) give exactly the bytes of
the numpy forms, refuse buffers they could overrun or that overlap, and are built in this
install: an install without them falls back to the numpy forms quietly but for one warning,
so a broken build would otherwise pass unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptrepo import _elements, codec
from ckptrepo.codec import (
    CodingPolicy,
    DeltaBase,
    add_joined_unzigzag_into,
    add_unzigzag_into,
    decode_payload,
    encode_chunk,
    forced_element_loops,
    join_planes_into,
    object_file,
    split_object,
    split_planes_into,
    subtract_zigzag,
)
from ckptrepo.errors import FormatError
from ckptrepo.ids import hash_hex

KERNELS = _elements
WIDTHS = [2, 4, 8]


@st.composite
def elements(draw: Any, width: int) -> np.ndarray:
    """Whole elements plus a ragged tail, at an aligned or an odd address: random bytes,
    small floats that drift, or the extremes where wrapping arithmetic shows."""
    count = draw(st.integers(0, 2000))
    size = count * width + draw(st.integers(0, width - 1))
    offset = draw(st.sampled_from([0, 0, 1, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "floats", "extremes"]))
    if kind == "random":
        data = rng.integers(0, 256, size, dtype=np.uint8)
    elif kind == "floats":
        data = np.frombuffer((rng.standard_normal(size // 4 + 1) * 0.02).astype(np.float32).tobytes()[:size], np.uint8)
    else:
        data = rng.choice(np.array([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF], dtype=np.uint8), size)
    buffer = np.empty(size + offset, dtype=np.uint8)
    buffer[offset:] = data
    return buffer[offset:]


def _pair(width: int) -> Any:
    return elements(width).flatmap(
        lambda a: st.tuples(st.just(a), elements(width).filter(lambda b: len(b) >= len(a)).map(lambda b: b[: len(a)]))
    )


@given(st.sampled_from(WIDTHS).flatmap(lambda w: st.tuples(st.just(w), elements(w))), st.data())
def test_split_and_join_match_numpy(case: tuple[int, np.ndarray], data: Any) -> None:
    width, content = case
    count = len(content) // width
    wanted = data.draw(st.lists(st.booleans(), min_size=width, max_size=width))
    results = []
    for kernels in (KERNELS, None):
        outs = [np.full(count, 0xAA, dtype=np.uint8) if w else None for w in wanted]
        with forced_element_loops(kernels):
            split_planes_into(content, width, outs)
        results.append([o.tobytes() if o is not None else None for o in outs])
    assert results[0] == results[1]
    planes = [bytes(p) for p in codec.split_planes(content.tobytes(), width)]
    for kernels in (KERNELS, None):
        out = np.empty(len(content) + 1, dtype=np.uint8)[1:] if data.draw(st.booleans()) else np.empty(len(content), np.uint8)
        with forced_element_loops(kernels):
            join_planes_into(planes, width, out)
        assert out.tobytes() == content.tobytes()


@pytest.mark.parametrize("width", WIDTHS)
def test_planes_split_in_segments_when_some_are_not_wanted(width: int) -> None:
    """Beyond one segment of spare rows, every segment's planes land in their places."""
    count = codec._SPLIT_SEGMENT * 5 // 2 + 3
    content = np.random.default_rng(width).integers(0, 256, count * width + 1, dtype=np.uint8)
    for wanted in ([True] + [False] * (width - 1), [False] * (width - 1) + [True], [i % 2 == 0 for i in range(width)]):
        results = []
        for kernels in (KERNELS, None):
            outs = [np.zeros(count, dtype=np.uint8) if w else None for w in wanted]
            with forced_element_loops(kernels):
                split_planes_into(content, width, outs)
            results.append([o.tobytes() for o in outs if o is not None])
        assert results[0] == results[1]


@given(st.sampled_from(WIDTHS).flatmap(lambda w: st.tuples(st.just(w), _pair(w))))
def test_differences_and_sums_match_numpy(case: tuple[int, tuple[np.ndarray, np.ndarray]]) -> None:
    width, (new, base) = case
    zs = []
    for kernels in (KERNELS, None):
        z = np.empty(len(new), dtype=np.uint8)
        with forced_element_loops(kernels):
            subtract_zigzag(new, base, width, z)
        zs.append(z)
    assert zs[0].tobytes() == zs[1].tobytes()
    for kernels in (KERNELS, None):
        acc = base.copy()
        with forced_element_loops(kernels):
            add_unzigzag_into(acc, zs[0].copy(), width)
        assert acc.tobytes() == new.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "int16"])
def test_objects_are_the_same_bytes_either_way(dtype: str) -> None:
    """What a process writes and reads does not depend on whether it had loaded the loops."""
    rng = np.random.default_rng(7)
    itemsize = 2 if dtype in ("bfloat16", "int16") else np.dtype(dtype).itemsize
    weights = (rng.standard_normal(300_000) * 0.02).astype(np.float32)
    if itemsize == 2:
        old = (weights.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        new = ((weights + np.float32(1e-3)).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        old = weights.astype(dtype).tobytes()
        new = (weights + np.float32(2e-5)).astype(dtype).tobytes()
    base = DeltaBase(hash_hex(old), old, 0)
    files = []
    for kernels in (KERNELS, None):
        with forced_element_loops(kernels):
            full = object_file("chunk", encode_chunk(old, CodingPolicy(), itemsize, dtype=dtype))
            delta = object_file("chunk", encode_chunk(new, CodingPolicy(), itemsize, base, dtype=dtype))
        files.append((bytes(full), bytes(delta)))
    assert files[0] == files[1]
    full, delta = files[0]
    assert split_object(delta)[0].base == base.id
    for kernels in (KERNELS, None):
        with forced_element_loops(kernels):
            for blob, content in ((full, old), (delta, new)):
                header, payload = split_object(blob)
                decoded = decode_payload(header.coding, payload, header.size, lambda b, _moves: (old, None))
                assert decoded == content


@given(st.sampled_from(WIDTHS).flatmap(lambda w: st.tuples(st.just(w), _pair(w))))
def test_planes_added_to_a_base_as_joined_match_numpy(case: tuple[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """A delta's planes summed into its base in one pass: the bytes of the two numpy passes."""
    width, (new, base) = case
    z = np.empty(len(new), dtype=np.uint8)
    with forced_element_loops(None):
        subtract_zigzag(new, base, width, z)
    planes = [bytes(p) for p in codec.split_planes(z.tobytes(), width)]
    for kernels in (KERNELS, None):
        acc = base.copy()
        with forced_element_loops(kernels):
            add_joined_unzigzag_into(acc, planes, width)
        assert acc.tobytes() == new.tobytes()


@pytest.mark.parametrize("width", WIDTHS)
def test_a_short_plane_is_refused_before_a_sum_into_the_base(width: int) -> None:
    count = 1000
    planes: list[bytes] = [bytes(count)] * width + [b""]
    planes[0] = bytes(count - 1)
    acc = np.zeros(count * width, dtype=np.uint8)
    with forced_element_loops(KERNELS), pytest.raises(FormatError, match="planes do not hold"):
        add_joined_unzigzag_into(acc, planes, width)
    assert not acc.any()  # refused before anything was added


@pytest.mark.parametrize("width", WIDTHS)
def test_a_short_plane_is_refused_before_the_loop_runs(width: int) -> None:
    count = 1000
    planes: list[bytes] = [bytes(count)] * width + [b""]
    planes[width - 1] = bytes(count - 1)
    with forced_element_loops(KERNELS), pytest.raises(FormatError, match="planes do not hold"):
        join_planes_into(planes, width, np.empty(count * width, dtype=np.uint8))


def _run(script: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_process_that_moves_little_never_loads_numba(tmp_path: Any) -> None:
    result = _run(f"""
        import json, sys
        import numpy as np
        import ckptrepo
        state = {{"w": np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)}}
        with ckptrepo.init({str(tmp_path / "repo")!r}) as repo:
            repo.commit(state, step=0)
            state["w"] += np.float32(1e-4)
            repo.commit(state, step=1)
            back = repo.checkout(step=1).to_dict()
        assert np.array_equal(back["w"], state["w"])
        print(json.dumps({{"numba": "numba" in sys.modules}}))
    """)
    assert result == {"numba": False}


def test_the_compiled_loops_are_what_the_codec_runs() -> None:
    assert codec._element_loops(1 << 30) is _elements


@pytest.mark.parametrize("width", WIDTHS)
def test_the_loops_refuse_buffers_that_do_not_fit(width: int) -> None:
    """The loops check their buffers themselves, whatever their caller checked."""
    count = 64
    planes = [np.zeros(count, dtype=np.uint8) for _ in range(width)]
    out = np.zeros(count * width, dtype=np.uint8)
    with pytest.raises(ValueError, match="plane 1 holds"):
        _elements.join(planes[0], planes[1][:-1], *planes[2:], out)
    with pytest.raises(ValueError, match="not whole elements"):
        _elements.split(out[:-1], *planes)
    with pytest.raises(ValueError, match="operand 1 holds"):
        _elements.zigzag(out, out[:-width].copy(), np.zeros_like(out), width)
    with pytest.raises(ValueError, match="difference 0 holds"):
        _elements.unzigzag(out, out[:-width].copy(), width)
    with pytest.raises(ValueError, match="width must be 2, 4 or 8"):
        _elements.zigzag(out, out.copy(), np.zeros_like(out), 3)
    with pytest.raises(BufferError):
        _elements.join(*[bytes(count)] * width, bytes(count * width))  # a read-only output
    assert not out.any()


def test_the_loops_refuse_an_output_that_overlaps_another_buffer() -> None:
    buffer = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlaps"):
        _elements.join(buffer[:16], buffer[16:32], buffer[8:40])
    with pytest.raises(ValueError, match="overlaps"):
        _elements.split(buffer[:32], buffer[32:48], buffer[40:56])
    with pytest.raises(ValueError, match="overlaps"):
        _elements.unzigzag(buffer[:32], buffer[16:48], 4)


_COMMIT_TWICE = """
    import json, logging, sys
    if {blocked}:
        sys.modules["ckptrepo._elements"] = None  # as if it had not been built
    import numpy as np
    import ckptrepo
    from ckptrepo import codec
    from ckptrepo.ids import hash_hex
    from ckptrepo.store import object_key
    warnings = []
    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("ckptrepo.codec").addHandler(Keep())
    rng = np.random.default_rng(0)
    # fp16 too: its deltas are context-coded, by the extension's loops or by numba's.
    state = {{"w": rng.standard_normal(1 << 20).astype(np.float32),
              "h": (rng.standard_normal(1 << 18) * 0.05).astype(np.float16)}}
    with ckptrepo.init({root!r}) as repo:
        repo.commit(state, step=0)
        for step in (1, 2):
            state["w"] += np.float32(1e-4)
            state["h"] = (state["h"].view(np.uint16) + rng.integers(-1, 2, 1 << 18).astype(np.uint16)).view(np.float16)
            repo.commit(state, step=step)
        back = repo.checkout(step=2).to_dict()
        files = {{i.hex: hash_hex(repo.store.backend.read(object_key(i)))
                 for i in repo.store.ids() if repo.store.header(i).kind == "chunk"}}
        codings = [repo.store.header(i).coding for i in repo.store.ids() if repo.store.header(i).kind == "chunk"]
    assert np.array_equal(back["w"], state["w"]) and np.array_equal(back["h"].view(np.uint16), state["h"].view(np.uint16))
    assert any(c.get("inner", {{}}).get("codec") == "ans" for c in codings), codings
    print(json.dumps({{"loops": codec._LOOPS is not None, "warnings": warnings, "files": files}}))
"""


def test_without_the_compiled_loops_a_process_warns_once_and_gives_the_same_bytes(tmp_path: Any) -> None:
    """An install that could not build the extension (no C compiler) runs the numpy forms: a
    full chunk and a delta committed so are the same object files as with the loops."""
    blocked = _run(_COMMIT_TWICE.format(blocked=True, root=str(tmp_path / "numpy")))
    built = _run(_COMMIT_TWICE.format(blocked=False, root=str(tmp_path / "compiled")))
    assert not blocked["loops"] and built["loops"]
    assert len(blocked["warnings"]) == 1 and "not built" in blocked["warnings"][0]
    assert built["warnings"] == []
    assert len(blocked["files"]) >= 2 and blocked["files"] == built["files"]
