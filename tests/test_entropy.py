"""Context coding of 16-bit float deltas ("ans" inside a delta, ckptrepo/entropy.py).

The coder itself round-trips whatever differences, bases and moves it is given, refuses
damaged payloads with a FormatError, and writes the same bytes for the same input (the
format is ours: a golden digest pins it). Through the repository, a bf16 training run's
deltas are context-coded and read back exactly from a fresh process, with the moves a child
needs recomputed from storage when no cache holds them, and through clone, push and fsck.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptrepo
from ckptrepo import compiled, entropy
from ckptrepo.codec import CodingPolicy, DeltaBase, decode_into, encode_chunk, subtract_zigzag
from ckptrepo.config import Config
from ckptrepo.errors import ConfigError, FormatError
from ckptrepo.frames import zstd_compress, zstd_decompress
from ckptrepo.ids import hash_hex

BF16 = entropy.exponent_field("bfloat16")
assert BF16 is not None


def _zigzag(new: np.ndarray, base: np.ndarray) -> np.ndarray:
    out = np.empty(2 * len(new), dtype=np.uint8)
    subtract_zigzag(new.view(np.uint8), base.view(np.uint8), 2, out)
    return out.view(np.uint16)


# The coder's loops a process may run: in C where the extension is built, numba's otherwise.
DECODERS = {"C": compiled.ELEMENTS, "numba": None}


@contextmanager
def _decoder(name: str) -> Iterator[None]:
    saved, entropy._LOOPS = entropy._LOOPS, DECODERS[name]
    try:
        yield
    finally:
        entropy._LOOPS = saved


def _decode_with(name: str, coding: dict[str, Any], payload: bytes, base: np.ndarray, moves: np.ndarray | None) -> np.ndarray:
    out = np.zeros(len(base), dtype=np.uint16)
    with _decoder(name):
        entropy.decode_into(coding, memoryview(payload), base, moves, out)
    return out


def _outcomes(coding: dict[str, Any], payload: bytes, base: np.ndarray, moves: np.ndarray | None) -> list[bytes | str]:
    """Per decoder: what it decoded, or the message it refused the payload with."""
    outcomes: list[bytes | str] = []
    for name in DECODERS:
        try:
            outcomes.append(_decode_with(name, coding, payload, base, moves).tobytes())
        except FormatError as exc:
            outcomes.append(str(exc))
    return outcomes


def _decode(coded: entropy.ContextCoded, base: np.ndarray, moves: np.ndarray | None) -> np.ndarray:
    """Decoded by both decoders, which must agree."""
    payload = b"".join(coded.sections)
    c, numba = (_decode_with(name, coded.coding, payload, base, moves) for name in DECODERS)
    np.testing.assert_array_equal(c, numba)
    return c


def _training_like(n: int, seed: int, spread: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bf16 bit patterns of a base, its parent, and a child that moved by a few units."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal(n) * 0.05).astype(np.float32)
    parent = torch.from_numpy(weights).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    base = parent + rng.integers(-spread, spread + 1, n).astype(np.uint16)
    child = base + rng.integers(-spread, spread + 1, n).astype(np.uint16)
    return parent, base, child


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    seed=st.integers(0, 2**32 - 1),
    big=st.floats(0, 1),
    with_moves=st.booleans(),
    dtype=st.sampled_from(["bfloat16", "float16"]),
)
def test_round_trip_of_any_differences(n: int, seed: int, big: float, with_moves: bool, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    small = rng.integers(0, 9, n, dtype=np.uint16)
    wide = rng.integers(0, 1 << 16, n, dtype=np.uint16)  # escapes and raw values
    z = np.where(rng.random(n) < big * 0.3, wide, small).astype(np.uint16)
    moves = rng.integers(0, 256, n, dtype=np.uint8) if with_moves else None
    field = entropy.exponent_field(dtype)
    assert field is not None
    coded = entropy.encode(z, base, moves, field, float("inf"))
    assert coded is not None and coded.coding["moves"] is with_moves
    with _decoder("numba"):
        assert entropy.encode(z, base, moves, field, float("inf")) == coded  # the same bytes from numba's loops
    np.testing.assert_array_equal(_decode(coded, base, moves), z)


def test_limit_declines_what_would_not_pay() -> None:
    base = np.random.default_rng(1).integers(0, 1 << 16, 4096, dtype=np.uint16)
    z = np.random.default_rng(2).integers(0, 1 << 16, 4096, dtype=np.uint16)
    assert entropy.encode(z, base, None, BF16, 2 * 4096 * 0.9) is None


def test_moves_as_context_make_momentum_cheaper() -> None:
    # A weight that moved up moves up again: with its base's moves, the coder knows which.
    n = 200_000
    _parent, base, _ = _training_like(n, 3, spread=0)
    rng = np.random.default_rng(4)
    last = rng.integers(0, 3, n).astype(np.uint16)  # 0 still, 1 down, 2 up
    z = np.where(rng.random(n) < 0.9, last, 0).astype(np.uint16)
    moves = entropy.moves_of(last)
    with_moves = entropy.encode(z, base, moves, BF16, float("inf"))
    without = entropy.encode(z, base, None, BF16, float("inf"))
    assert with_moves is not None and without is not None
    assert with_moves.payload_size < 0.6 * without.payload_size
    np.testing.assert_array_equal(_decode(with_moves, base, moves), z)


def test_output_is_pinned() -> None:
    # The stream is ours (ans_kernels.py): a change to the coder that changes its bytes
    # breaks every stored object, so the bytes of a fixed input are pinned here.
    parent, base, child = _training_like(50_000, 5)
    coded = entropy.encode(_zigzag(child, base), base, entropy.moves_of(_zigzag(base, parent)), BF16, float("inf"))
    assert coded is not None
    with _decoder("numba"):  # the loops in C and numba's write the same stream
        assert entropy.encode(_zigzag(child, base), base, entropy.moves_of(_zigzag(base, parent)), BF16, float("inf")) == coded
    assert coded.coding["sections"][1:] == [14490, 0]
    assert hash_hex(coded.sections[1]) == "034f67a5c8263479f1fe700389c0e68cc4bf03ab498c8a343208a99d85475558"
    layout = entropy._Layout(*BF16, moves=True)
    tables = zstd_decompress(coded.sections[0], 2 * layout.table_entries)
    assert hash_hex(tables) == "073cb8a3c8f7a9cfce070d696a5d9e0c19ae9d3e7d3ff89a0e7777ad8b96cadb"


@pytest.mark.parametrize(
    "damage",
    ["truncate_words", "extra_word", "flip_word", "table_sum", "sections", "fields", "moves_missing", "raw_small"],
)
def test_damaged_payloads_are_refused(damage: str) -> None:
    parent, base, child = _training_like(20_000, 6, spread=60)
    moves = entropy.moves_of(_zigzag(base, parent))
    z = _zigzag(child, base)
    coded = entropy.encode(z, base, moves, BF16, float("inf"))
    assert coded is not None and coded.sections[2]  # some raw values
    tables, words, raw = coded.sections
    coding = dict(coded.coding)
    given_moves: np.ndarray | None = moves
    if damage == "truncate_words":
        words = words[:-2]
    elif damage == "extra_word":
        words = words + b"\x01\x00"
    elif damage == "flip_word":
        words = words[:10] + bytes([words[10] ^ 0xFF]) + words[11:]
    elif damage == "table_sum":
        layout = entropy._Layout(BF16[0], BF16[1], True)
        freq = np.frombuffer(zstd_decompress(tables, 2 * layout.table_entries), dtype="<u2").copy()
        freq[np.flatnonzero(freq)[0]] += 1
        tables = zstd_compress(freq, 3)
    elif damage == "sections":
        coding["sections"] = [len(tables), len(words) + 1, len(raw) - 1]
    elif damage == "fields":
        coding["extra"] = 1
    elif damage == "moves_missing":
        given_moves = None
    elif damage == "raw_small":
        raw = np.full(len(raw) // 2, 3, dtype="<u2").tobytes()
    if damage not in ("sections", "fields"):
        coding["sections"] = [len(tables), len(words), len(raw)]
    # Both decoders refuse it with the same message, or (a flipped word can still decode to
    # something) give the same output, which must not be the content.
    c, numba = _outcomes(coding, tables + words + raw, base, given_moves)
    assert c == numba
    if isinstance(c, bytes):
        assert damage == "flip_word" and c != z.tobytes()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 400), flips=st.integers(1, 4))
def test_the_decoders_agree_on_damaged_streams(seed: int, cut: int, flips: int) -> None:
    # Whatever a damaged stream holds, the C decoder reports what numba's reports and leaves
    # the same output: a repository reads the same in a process with or without the extension.
    parent, base, child = _training_like(3000, seed % 1000, spread=40)
    moves = entropy.moves_of(_zigzag(base, parent))
    coded = entropy.encode(_zigzag(child, base), base, moves, BF16, float("inf"))
    assert coded is not None
    tables, words, raw = coded.sections
    rng = np.random.default_rng(seed)
    kept = max(0, len(words) - cut)
    damaged = bytearray(words[: kept - kept % 2])
    for _ in range(flips if damaged else 0):
        damaged[rng.integers(0, len(damaged))] ^= 1 << int(rng.integers(0, 8))
    coding = dict(coded.coding, sections=[len(tables), len(damaged), len(raw)])
    c, numba = _outcomes(coding, tables + bytes(damaged) + raw, base, moves)
    assert c == numba


def test_the_c_coder_refuses_buffers_that_do_not_fit() -> None:
    decoder = compiled.ELEMENTS
    assert decoder is not None
    layout = entropy._Layout(*BF16, moves=True)
    main = np.zeros((layout.contexts, entropy.MAIN_ALPHABET), dtype=np.int64)
    escape = np.zeros((1 << BF16[1], entropy.ESCAPE_ALPHABET), dtype=np.int64)
    main_cum, escape_cum = entropy._cumulative(main), entropy._cumulative(escape)
    words, raw, base = np.zeros(4, np.uint16), np.zeros(0, np.uint16), np.zeros(8, np.uint16)
    moves, out = np.zeros(8, np.uint8), np.zeros(8, np.uint16)

    def call(**change: Any) -> int:
        args = dict(words=words, raw=raw, base=base, moves=moves, main=main, main_cum=main_cum, escape=escape,
                    escape_cum=escape_cum, out=out, shift=BF16[0], mask=layout.mask, use_moves=True) | change
        result: int = decoder.ans_decode(*args.values())
        return result

    assert call() == entropy.BAD_MODEL  # every frequency 0: fits, and is refused as a stream
    for change, message in [
        ({"base": base[:-1]}, "base"),
        ({"moves": moves[:-1]}, "moves"),
        ({"main": main[:-1]}, "main frequencies"),
        ({"main_cum": main_cum[:, :-1].copy()}, "main starts"),
        ({"escape": escape[:-1]}, "escape frequencies"),
        ({"escape_cum": escape_cum[:-1]}, "escape starts"),
        ({"use_moves": False}, "main frequencies"),  # tables for contexts with moves
        ({"words": np.zeros(3, np.uint8)}, "words"),
        ({"out": np.zeros(15, np.uint8)}, "output"),
        ({"mask": 6}, "exponent field"),
        ({"shift": 16}, "exponent field"),
        ({"out": base}, "overlaps"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(**change)
    with pytest.raises(BufferError):
        call(out=bytes(16))  # a read-only output
    np.testing.assert_array_equal(out, 0)  # nothing was written by a refused call

    # The counts and the encoder check the same way; the encoder says when its words are short.
    z = np.array([0, 1, 7, 80, 2, 0, 0, 3], dtype=np.uint16)
    with pytest.raises(ValueError, match="base"):
        decoder.ans_count(z, base[:-1], moves, main.copy(), escape.copy(), BF16[0], layout.mask, True)
    with pytest.raises(ValueError, match="main counts"):
        decoder.ans_count(z, base, moves, main[:-1].copy(), escape.copy(), BF16[0], layout.mask, True)
    with pytest.raises(BufferError):
        decoder.ans_count(z, base, moves, main.tobytes(), escape.copy(), BF16[0], layout.mask, True)
    counts, escapes = main.copy(), escape.copy()
    decoder.ans_count(z, base, moves, counts, escapes, BF16[0], layout.mask, True)
    freq, escape_freq = entropy._frequencies(counts), entropy._frequencies(escapes)
    cum, escape_cum2 = entropy._cumulative(freq), entropy._cumulative(escape_freq)
    args = (freq, cum, escape_freq, escape_cum2)
    assert decoder.ans_encode(z, base, moves, *args, np.zeros(2, np.uint16), BF16[0], layout.mask, True) == -2
    assert decoder.ans_encode(z, base, moves, main, main_cum, escape, escape_cum, np.zeros(32, np.uint16),
                              BF16[0], layout.mask, True) == -1  # no symbol has a frequency
    words = np.zeros(32, np.uint16)
    start = decoder.ans_encode(z, base, moves, *args, words, BF16[0], layout.mask, True)
    back = np.zeros(len(z), np.uint16)
    assert decoder.ans_decode(words[start:], z[z >= 70], base, moves, *args, back, BF16[0], layout.mask, True) == 0
    np.testing.assert_array_equal(back, z)


def test_a_process_that_codes_bf16_deltas_does_not_load_numba(tmp_path: Path) -> None:
    # With the extension built, committing and checking out a bf16 run (context-coded deltas)
    # runs the coder's loops in C: the process never imports numba.
    steps = _training_like(300_000, 11)
    for step, bits in enumerate(steps):
        np.save(tmp_path / f"{step}.npy", bits)
    script = (
        "import json, sys, numpy as np, torch, ckptrepo\n"
        f"root = {str(tmp_path)!r}\n"
        "steps = [np.load(f'{root}/{i}.npy') for i in range(3)]\n"
        "with ckptrepo.init(f'{root}/repo') as repo:\n"
        "    for i, bits in enumerate(steps):\n"
        "        repo.commit({'w': torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)}, step=i)\n"
        "with ckptrepo.open(f'{root}/repo') as repo:\n"
        "    back = [repo.checkout(step=i).to_dict('numpy')['w'] for i in range(3)]\n"
        "same = all(np.array_equal(b.view(np.uint16), s) for b, s in zip(back, steps))\n"
        "print(json.dumps({'numba': 'numba' in sys.modules, 'same': same}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"numba": False, "same": True}
    with ckptrepo.open(tmp_path / "repo") as repo:
        assert ("ans", True) in _inner_codecs(repo)


def test_codec_picks_ans_for_bf16_deltas_and_keeps_moves() -> None:
    parent, base, child = _training_like(100_000, 7)
    base_moves = entropy.moves_of(_zigzag(base, parent))
    policy = CodingPolicy()
    delta_base = DeltaBase("ab" * 32, base.view(np.uint8), 1, base_moves)
    encoded = encode_chunk(child.view(np.uint8), policy, 2, delta_base, "bfloat16")
    assert encoded.coding["codec"] == "delta" and encoded.coding["inner"]["codec"] == "ans"
    assert encoded.coding["inner"]["moves"] is True
    assert encoded.moves is not None
    np.testing.assert_array_equal(encoded.moves, entropy.moves_of(_zigzag(child, base)))
    planes = encode_chunk(child.view(np.uint8), policy, 2, delta_base, "int16")
    assert planes.coding["inner"]["codec"] == "planes"
    assert encoded.payload_size < planes.payload_size
    off = encode_chunk(child.view(np.uint8), CodingPolicy(context_coding=False), 2, delta_base, "bfloat16")
    assert off.coding["inner"]["codec"] == "planes"

    asked = []

    def base_into(base_id: str, out: memoryview, want_moves: bool) -> np.ndarray | None:
        asked.append(want_moves)
        np.frombuffer(out, dtype=np.uint8)[:] = base.view(np.uint8)
        return base_moves

    out = bytearray(len(child) * 2)
    moves = decode_into(encoded.coding, encoded.payload(), memoryview(out), base_into, want_moves=True)
    assert bytes(out) == child.tobytes() and asked == [True]
    assert moves is not None and np.array_equal(moves, encoded.moves)


def _bf16_run(steps: int, n: int = 300_000, seed: int = 8) -> list[dict[str, torch.Tensor]]:
    """Mixed-precision training in miniature: fp32 master weights, exported as bf16."""
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g) * 0.05
    momentum = torch.zeros(n)
    states = []
    for _ in range(steps):
        momentum = 0.9 * momentum + 0.1 * torch.randn(n, generator=g)
        master += 3e-4 * momentum.sign()
        states.append({"w": master.to(torch.bfloat16), "h": master[:5000].to(torch.float16)})
    return states


def _inner_codecs(repo: ckptrepo.Repository) -> list[tuple[str | None, bool | None]]:
    found = []
    for object_id in repo.store.ids():
        header = repo.store.header(object_id)
        inner = header.coding.get("inner") or {}
        if header.kind == "chunk":
            found.append((inner.get("codec"), inner.get("moves")))
    return found


def test_a_bf16_run_is_context_coded_and_reads_back_everywhere(tmp_path: Path) -> None:
    states = _bf16_run(5)
    with ckptrepo.init(tmp_path / "a") as repo:
        for step, state in enumerate(states[:3]):
            repo.commit(state, step=step)
    # A new process has no base cache: the moves of the parent come from storage.
    with ckptrepo.open(tmp_path / "a") as repo:
        for step, state in enumerate(states[3:], start=3):
            repo.commit(state, step=step)
        codecs = _inner_codecs(repo)
        assert ("ans", True) in codecs and ("ans", False) in codecs
        assert repo.fsck(read_data=True).ok
    with ckptrepo.open(tmp_path / "a") as repo:
        for step, state in enumerate(states):
            back = repo.checkout(step=step).to_dict()
            assert torch.equal(back["w"], state["w"]) and torch.equal(back["h"], state["h"])
    copy = ckptrepo.clone(str(tmp_path / "a"), tmp_path / "b")
    with copy:
        assert copy.fsck(read_data=True).ok
        assert torch.equal(copy.checkout(step=4).to_dict()["w"], states[4]["w"])
        more = _bf16_run(7)[5:]
        for step, state in enumerate(more, start=5):
            copy.commit(state, step=step)
        copy.push("origin")
    with ckptrepo.open(tmp_path / "a") as repo:
        assert repo.fsck(read_data=True).ok
        assert torch.equal(repo.checkout(step=6).to_dict()["w"], more[1]["w"])


def test_context_coding_is_a_config_switch(tmp_path: Path) -> None:
    default = Config()
    assert default.compression.context_coding is True
    document = default.to_document()
    assert document["compression"]["context_coding"] is True
    document["compression"]["context_coding"] = False
    off = Config.load(yaml.safe_dump(document).encode(), "config.yaml")
    assert off.compression.context_coding is False
    del document["compression"]["context_coding"]
    assert Config.load(yaml.safe_dump(document).encode(), "config.yaml").compression.context_coding is True
    document["compression"]["context_coding"] = "yes"
    with pytest.raises(ConfigError):
        Config.load(yaml.safe_dump(document).encode(), "config.yaml")
    with ckptrepo.init(tmp_path / "r", config=off) as repo:
        for step, state in enumerate(_bf16_run(3)):
            repo.commit(state, step=step)
        assert all(codec != "ans" for codec, _ in _inner_codecs(repo))
