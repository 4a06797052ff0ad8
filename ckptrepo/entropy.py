"""Context coding of 16-bit float deltas: an entropy coder whose model depends on what the
reader already knows.

Between two checkpoints of a bf16 (or fp16) run a weight moves by zero, one or a few units in
its last place. Whether it moves depends on its magnitude (a unit in the last place of a large
weight is more than a few training steps move it) and on how it moved the time before (Adam's
momentum: a weight that went up tends to go up again). A reader that decodes a delta has
already decoded its base, and, when the base is itself a delta, how the base moved. So each
element's zigzag difference ``z`` is coded with a model chosen by a context of those::

    exponent = (base >> shift) & (2**bits - 1)            the base's exponent field
    move     = min(zigzag(base - base's own base), 4)     when the base is a 2-byte delta
    context  = exponent * 5 + move   ("moves": true)  or  exponent   ("moves": false)

byte planes and zstd keep no such context: on the bf16 series of the benchmark a delta codes
to about 0.074 of its raw size this way, against 0.14 with zstd on the difference's planes.

Symbols: ``s = min(z, 7)`` with the context's model; ``s == 7`` escapes to
``e = min(z - 7, 63)`` with a model chosen by the exponent alone; ``e == 63`` escapes to the
raw z. One rANS stream (a 32-bit state, 16-bit words, probabilities in 14 bits; the loops in
``_elements.c``, or ``ans_kernels.py`` without the extension) holds both: element by element,
its ``s``, then its ``e`` if it escapes.

Coding ``{"codec": "ans", "exponent": [shift, bits], "moves": bool, "sections": [t, w, r]}``
(only as a delta's inner coding, itemsize 2); the payload is three sections of those lengths:

- tables: one zstd frame of little-endian u16 frequencies, the main models' (contexts x 8)
  then the escape models' (2**bits x 64), row by row; a row sums to 2**14, or is all zero
  for a context that does not occur;
- words: the rANS stream, u16 LE: the final state's high then low half, then the words the
  reader takes in as it goes;
- raw: the z (u16 LE) of every element whose ``e`` is 63, in element order.

The frequencies are what the writer counted, scaled to 2**14 (every symbol that occurs at
least 1), so no model adapts while coding and the reader needs nothing but the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import compiled
from .errors import FormatError
from .frames import zstd_compress, zstd_decompress

MAIN_ALPHABET = 8
ESCAPE_ALPHABET = 64
ESCAPE = MAIN_ALPHABET - 1  # the main symbol that escapes
RAW = ESCAPE_ALPHABET - 1  # the escape symbol that escapes to the raw z
# Moves are kept up to this value: 0 still, 1 down one unit, 2 up one, 3 down two, 4 beyond.
MOVE_CAP = 4
_MOVE_CONTEXTS = MOVE_CAP + 1
PROB_BITS = 14
_PROB_SCALE = 1 << PROB_BITS
# The exponent field of the 16-bit float types: (shift, bits).
_EXPONENT_FIELDS = {"bfloat16": (7, 8), "float16": (10, 5)}
_MAX_BITS = 8
_TABLE_LEVEL = 3


def exponent_field(dtype: str | None) -> tuple[int, int] | None:
    """(shift, bits) of the exponent of a 16-bit float dtype named as in a manifest."""
    return _EXPONENT_FIELDS.get(dtype or "")


def moves_of(z: np.ndarray) -> np.ndarray:
    """The moves a child's context reads: ``min(z, MOVE_CAP)`` of a delta's uint16 zigzag
    differences, one byte each."""
    out = np.empty(len(z), dtype=np.uint8)
    np.minimum(z, MOVE_CAP, out=out, casting="unsafe")
    return out


def _kernels() -> ModuleType:
    # Imported on first use: numba and the compiled loops cost a process about a second,
    # which only a process that codes 16-bit float deltas should pay.
    return compiled.load("ans_kernels")


# The coder's loops in C (_elements.ans_count, ans_encode, ans_decode) where the extension was
# built: the same results as ans_kernels' at the same speed, without loading numba, which a
# process otherwise pays for on its first 16-bit float delta (a resuming run, the CLI, a bf16
# training run). Without the extension, numba's. Tests set it to None to run numba's.
_LOOPS: ModuleType | None = compiled.ELEMENTS

# What a decoder returns: OK, or what was wrong with the stream (ans_kernels and _elements.c
# use these codes).
OK, BAD_MODEL, TRUNCATED, RAW_SHORT, LEFT_OVER, RAW_LEFT = 0, 1, 2, 3, 4, 5
PROBLEMS = {
    BAD_MODEL: "uses a model that gives its symbol no probability",
    TRUNCATED: "ends too early",
    RAW_SHORT: "needs more raw values than the raw section holds",
    LEFT_OVER: "does not end where its words end",
    RAW_LEFT: "leaves raw values over",
}


@dataclass(frozen=True, slots=True)
class ContextCoded:
    coding: dict[str, Any]
    sections: tuple[bytes, bytes, bytes]

    @property
    def payload_size(self) -> int:
        return sum(len(s) for s in self.sections)


@dataclass(frozen=True, slots=True)
class _Layout:
    shift: int
    bits: int
    moves: bool

    @property
    def contexts(self) -> int:
        return (1 << self.bits) * (_MOVE_CONTEXTS if self.moves else 1)

    @property
    def table_entries(self) -> int:
        return self.contexts * MAIN_ALPHABET + (1 << self.bits) * ESCAPE_ALPHABET

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    def split(self, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        main = self.contexts * MAIN_ALPHABET
        return (
            tables[:main].reshape(self.contexts, MAIN_ALPHABET),
            tables[main:].reshape(1 << self.bits, ESCAPE_ALPHABET),
        )


def _information_bytes(counts: np.ndarray) -> float:
    """What an ideal coder needs for the symbols behind ``counts`` (rows = models)."""
    totals = counts.sum(axis=1, keepdims=True)
    used = counts > 0
    ratio = np.divide(totals, counts, out=np.ones(counts.shape), where=used)
    return float((counts * np.log2(ratio)).sum()) / 8


def _frequencies(counts: np.ndarray) -> np.ndarray:
    """Rows of counts scaled to sum to 2**PROB_BITS, every symbol that occurs at least 1
    (the largest entry takes up the rounding); rows with no counts stay zero."""
    totals = counts.sum(axis=1, keepdims=True)
    freq: np.ndarray = counts * _PROB_SCALE // np.maximum(totals, 1)
    freq[(counts > 0) & (freq == 0)] = 1
    rows = np.flatnonzero(totals[:, 0])
    top = freq.argmax(axis=1)
    freq[rows, top[rows]] += _PROB_SCALE - freq[rows].sum(axis=1)
    return freq


def _cumulative(freq: np.ndarray) -> np.ndarray:
    cum = np.zeros((freq.shape[0], freq.shape[1] + 1), dtype=np.int64)
    np.cumsum(freq, axis=1, out=cum[:, 1:])
    return cum


def encode(
    z: np.ndarray, base: np.ndarray, base_moves: np.ndarray | None, field: tuple[int, int], limit: float
) -> ContextCoded | None:
    """Code ``z`` (uint16 zigzag differences to ``base``, uint16); None when an ideal coder
    would already need more than ``limit`` bytes (the caller's other coding is then smaller)."""
    shift, bits = field
    layout = _Layout(shift, bits, base_moves is not None)
    moves = base_moves if base_moves is not None else np.zeros(0, dtype=np.uint8)
    main_counts = np.zeros((layout.contexts, MAIN_ALPHABET), dtype=np.int64)
    escape_counts = np.zeros((1 << bits, ESCAPE_ALPHABET), dtype=np.int64)
    if _LOOPS is not None:
        _LOOPS.ans_count(z, base, moves, main_counts, escape_counts, shift, layout.mask, layout.moves)
    else:
        _kernels().count(z, base, moves, shift, layout.mask, layout.moves, main_counts, escape_counts)
    raw = z[z >= ESCAPE + RAW]
    if _information_bytes(main_counts) + _information_bytes(escape_counts) + 2 * len(raw) > limit:
        return None
    main_freq, escape_freq = _frequencies(main_counts), _frequencies(escape_counts)
    # At most one word per coded symbol, two symbols for an escaping element, two for the end.
    words = np.empty(len(z) + int(main_counts[:, ESCAPE].sum()) + 2, dtype=np.uint16)
    main_cum, escape_cum = _cumulative(main_freq), _cumulative(escape_freq)
    if _LOOPS is not None:
        start = _LOOPS.ans_encode(
            z, base, moves, main_freq, main_cum, escape_freq, escape_cum, words, shift, layout.mask, layout.moves,
        )
    else:
        start = _kernels().encode(
            z, base, moves, shift, layout.mask, layout.moves, main_freq, main_cum, escape_freq, escape_cum, words,
        )
    if start < 0:
        # a bug, never bad input: every counted symbol has a frequency, words holds the stream
        raise AssertionError("the rANS encoder found a symbol without frequency or no room")
    tables = np.concatenate([main_freq.reshape(-1), escape_freq.reshape(-1)]).astype("<u2")
    sections = (zstd_compress(tables, _TABLE_LEVEL), words[start:].astype("<u2").tobytes(), raw.astype("<u2").tobytes())
    coding = {"codec": "ans", "exponent": [shift, bits], "moves": layout.moves, "sections": [len(s) for s in sections]}
    return ContextCoded(coding, sections)


def decode_into(
    coding: dict[str, Any], payload: memoryview, base: np.ndarray, base_moves: np.ndarray | None, out: np.ndarray
) -> None:
    """Decode an "ans" payload into ``out`` (uint16 zigzag differences, as long as ``base``)."""
    layout, (t, w, r) = _parse(coding, len(payload))
    if layout.moves and base_moves is None:
        raise FormatError("ans coding reads its base's moves, but the base is not a 2-byte delta")
    if w % 2 or r % 2:
        raise FormatError("ans words or raw section is not whole 16-bit values")
    view = memoryview(payload)
    tables = np.frombuffer(zstd_decompress(view[:t], 2 * layout.table_entries), dtype="<u2").astype(np.int64)
    main_freq, escape_freq = layout.split(tables)
    for name, freq in (("main", main_freq), ("escape", escape_freq)):
        sums = freq.sum(axis=1)
        if not np.isin(sums, (0, _PROB_SCALE)).all():
            raise FormatError(f"ans {name} model sums to {int(sums[~np.isin(sums, (0, _PROB_SCALE))][0])}, "
                              f"expected {_PROB_SCALE}")
    words = np.frombuffer(view[t : t + w], dtype="<u2").astype(np.uint16)
    raw = np.frombuffer(view[t + w :], dtype="<u2").astype(np.uint16)
    if len(raw) and int(raw.min()) < ESCAPE + RAW:
        raise FormatError("ans raw value small enough to have been coded")
    moves = base_moves if layout.moves and base_moves is not None else np.zeros(0, dtype=np.uint8)
    main_cum, escape_cum = _cumulative(main_freq), _cumulative(escape_freq)
    if _LOOPS is not None:
        result = _LOOPS.ans_decode(
            words, raw, base, moves, main_freq, main_cum, escape_freq, escape_cum, out,
            layout.shift, layout.mask, layout.moves,
        )
    else:
        result = _kernels().decode(
            words, raw, base, moves, layout.shift, layout.mask, layout.moves,
            main_freq, main_cum, escape_freq, escape_cum, out,
        )
    if result:
        raise FormatError(f"ans stream {PROBLEMS[result]}")


_CODING_KEYS = {"codec", "exponent", "moves", "sections"}


def _parse(coding: dict[str, Any], payload_size: int) -> tuple[_Layout, list[int]]:
    if set(coding) != _CODING_KEYS:
        raise FormatError(f"ans coding has fields {sorted(coding)}, expected {sorted(_CODING_KEYS)}")
    field, moves, sections = coding["exponent"], coding["moves"], coding["sections"]
    if (
        not isinstance(field, list)
        or len(field) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in field)
        or not (0 <= field[0] <= 15 and 1 <= field[1] <= _MAX_BITS and field[0] + field[1] <= 16)
    ):
        raise FormatError(f"ans coding: bad exponent field {field!r}")
    if not isinstance(moves, bool):
        raise FormatError(f"ans coding: moves must be true or false, not {moves!r}")
    if (
        not isinstance(sections, list)
        or len(sections) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sections)
        or sum(sections) != payload_size
    ):
        raise FormatError(f"ans coding: sections {sections!r} do not divide a payload of {payload_size} bytes")
    return _Layout(field[0], field[1], moves), sections
