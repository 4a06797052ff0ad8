"""Compare two committed checkpoints: which entries were added, removed, modified or left
unchanged, what they share, and (on request) how far each modified tensor moved.

Unchanged entries are recognised from the manifests alone: an entry whose kind, metadata and
chunk ids are the same in both holds the same bytes, because a chunk id is the blake3 of its
content. Only modified tensors are read, and only for ``numeric=True``: chunk by chunk, the
two sides paired element for element, so a tensor of any size is compared in a few chunks of
memory. Chunks that sit at the same offset with the same id in both sides are read once.

Numbers are decoded by :mod:`ckptrepo.diff` itself (numpy only): 8-bit and 4-bit floats
through a table of every code, bfloat16 by widening its bits, sub-byte integers by masking,
so the figures never need torch or ml_dtypes at run time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import FormatError
from .ids import ObjectId
from .objects import ChunkRef, Entry, Manifest
from .store import ObjectStore

if TYPE_CHECKING:
    from .repository import Repository

STATUSES = ("added", "removed", "modified", "unchanged")
# What can differ in a modified entry, in the order it is reported.
CHANGES = ("kind", "dtype", "shape", "content", "meta")
# Meta fields that hold an entry's content rather than describe it.
_CONTENT_META = frozenset({"value", "target"})
# Chunk reads in flight per side while a tensor is compared.
_READ_AHEAD = 2


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NumericDiff:
    """How far one tensor moved from ``a`` to ``b``, over all its elements.

    ``l2`` is the L2 norm of ``b - a``; ``max_abs`` the largest ``|b - a|``; an element counts
    as changed unless both values are equal (``-0.0 == 0.0``) or both are NaN, and such an
    element contributes nothing to ``l2`` and ``max_abs`` (so equal infinities do not make a
    NaN). A NaN against a number makes ``l2`` and ``max_abs`` NaN.
    """

    elements: int
    changed: int
    l2: float
    max_abs: float
    norm_a: float
    norm_b: float

    @property
    def rel_l2(self) -> float:
        """``l2 / norm_a``: 0 when nothing moved, inf when ``a`` was all zeros and ``b`` is not."""
        if self.l2 == 0:
            return 0.0
        if self.norm_a == 0:
            return math.inf
        return self.l2 / self.norm_a

    @property
    def frac_changed(self) -> float:
        return self.changed / self.elements if self.elements else 0.0


@dataclass(frozen=True, slots=True)
class EntryDiff:
    """One path of either checkpoint. ``a`` / ``b`` are its manifest entries (None where absent).

    ``shared_chunks`` / ``shared_bytes``: how many of this entry's chunks (in ``b``, or in ``a``
    for a removed entry) the other checkpoint also holds, anywhere, and their size.
    """

    path: str
    status: str
    a: Entry | None
    b: Entry | None
    changes: tuple[str, ...] = ()
    shared_chunks: int = 0
    shared_bytes: int = 0
    numeric: NumericDiff | None = None

    @property
    def kind_a(self) -> str | None:
        return None if self.a is None else self.a.kind

    @property
    def kind_b(self) -> str | None:
        return None if self.b is None else self.b.kind

    @property
    def dtype_a(self) -> str | None:
        return None if self.a is None else self.a.dtype

    @property
    def dtype_b(self) -> str | None:
        return None if self.b is None else self.b.dtype

    @property
    def shape_a(self) -> tuple[int, ...] | None:
        return None if self.a is None else self.a.shape

    @property
    def shape_b(self) -> tuple[int, ...] | None:
        return None if self.b is None else self.b.shape

    @property
    def bytes_a(self) -> int:
        return 0 if self.a is None else self.a.size

    @property
    def bytes_b(self) -> int:
        return 0 if self.b is None else self.b.size

    @property
    def chunks_a(self) -> int:
        return 0 if self.a is None else len(self.a.chunks)

    @property
    def chunks_b(self) -> int:
        return 0 if self.b is None else len(self.b.chunks)

    @property
    def changed_bytes(self) -> int:
        """Bytes of this entry in chunks the other checkpoint lacks (the entry's own side)."""
        own = self.b if self.b is not None else self.a
        return (own.size if own is not None else 0) - self.shared_bytes

    @property
    def change(self) -> float:
        """One figure for "how much changed", for sorting and bars: ``rel_l2`` where computed,
        else the fraction of the entry's bytes in chunks the other side lacks (1 for an added
        or removed entry, 0 for an unchanged one)."""
        if self.status == "unchanged":
            return 0.0
        if self.status in ("added", "removed"):
            return 1.0
        if self.numeric is not None:
            return self.numeric.rel_l2
        own = self.b if self.b is not None else self.a
        if own is None or own.size == 0:
            return 1.0
        return self.changed_bytes / own.size


@dataclass(frozen=True, slots=True)
class Side:
    """One of the two checkpoints compared."""

    rev: str
    commit: ObjectId
    manifest: ObjectId
    step: int | None
    branch: str
    type: str  # "dict" | "directory"


@dataclass(frozen=True, slots=True)
class DiffTotals:
    """Sums over the entries of a diff (after any prefix filter); chunks counted once each."""

    counts: dict[str, int]
    bytes_a: int
    bytes_b: int
    chunks_a: int
    chunks_b: int
    shared_chunks: int
    shared_bytes: int  # logical bytes of the chunks both sides hold
    new_chunks: int  # chunks of b that a lacks
    new_bytes: int
    numeric_entries: int
    l2: float  # L2 norm of the difference over every tensor compared numerically
    norm_a: float

    @property
    def rel_l2(self) -> float:
        if self.l2 == 0:
            return 0.0
        return self.l2 / self.norm_a if self.norm_a else math.inf


@dataclass(frozen=True, slots=True)
class Diff:
    a: Side
    b: Side
    entries: tuple[EntryDiff, ...]
    numeric_computed: bool
    prefix: str | None = None

    def __getitem__(self, path: str) -> EntryDiff:
        for entry in self.entries:
            if entry.path == path:
                return entry
        raise KeyError(f"{path!r} is in neither checkpoint")

    def with_status(self, status: str) -> tuple[EntryDiff, ...]:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        return tuple(e for e in self.entries if e.status == status)

    @property
    def added(self) -> tuple[EntryDiff, ...]:
        return self.with_status("added")

    @property
    def removed(self) -> tuple[EntryDiff, ...]:
        return self.with_status("removed")

    @property
    def modified(self) -> tuple[EntryDiff, ...]:
        return self.with_status("modified")

    @property
    def unchanged(self) -> tuple[EntryDiff, ...]:
        return self.with_status("unchanged")

    @property
    def numeric(self) -> dict[str, NumericDiff]:
        """The numeric figures by path, for every tensor that got them."""
        return {e.path: e.numeric for e in self.entries if e.numeric is not None}

    @property
    def identical(self) -> bool:
        return all(e.status == "unchanged" for e in self.entries)

    @property
    def totals(self) -> DiffTotals:
        counts = dict.fromkeys(STATUSES, 0)
        chunks_a: dict[ObjectId, int] = {}
        chunks_b: dict[ObjectId, int] = {}
        l2 = norm_a = 0.0
        for entry in self.entries:
            counts[entry.status] += 1
            if entry.a is not None:
                chunks_a.update((c.id, c.size) for c in entry.a.chunks)
            if entry.b is not None:
                chunks_b.update((c.id, c.size) for c in entry.b.chunks)
            if entry.numeric is not None:
                l2 = _hypot(l2, entry.numeric.l2)
                norm_a = _hypot(norm_a, entry.numeric.norm_a)
        shared = chunks_a.keys() & chunks_b.keys()
        new = chunks_b.keys() - chunks_a.keys()
        return DiffTotals(
            counts=counts,
            bytes_a=sum(e.bytes_a for e in self.entries),
            bytes_b=sum(e.bytes_b for e in self.entries),
            chunks_a=len(chunks_a),
            chunks_b=len(chunks_b),
            shared_chunks=len(shared),
            shared_bytes=sum(chunks_b[c] for c in shared),
            new_chunks=len(new),
            new_bytes=sum(chunks_b[c] for c in new),
            numeric_entries=sum(1 for e in self.entries if e.numeric is not None),
            l2=l2,
            norm_a=norm_a,
        )


# --- comparing -----------------------------------------------------------------------------


def diff(
    repo: Repository, rev_a: str, rev_b: str, *, numeric: bool = False, prefix: str | None = None
) -> Diff:
    """Compare the checkpoints ``rev_a`` and ``rev_b`` (any revisions, any branches, dict or
    directory). ``prefix`` keeps only the paths that start with it."""
    sides = []
    manifests = []
    for rev in (rev_a, rev_b):
        commit_id = repo.resolve_id(rev)
        commit = repo.load_commit(commit_id)
        manifest = repo.load_manifest(commit.manifest_id)
        sides.append(Side(rev, commit_id, commit.manifest_id, commit.step, commit.branch, manifest.type))
        manifests.append(manifest)
    entries = compare_manifests(manifests[0], manifests[1], prefix=prefix)
    if numeric:
        entries = [_with_numeric(repo.store, repo.pool, e) for e in entries]
    return Diff(sides[0], sides[1], tuple(entries), numeric_computed=numeric, prefix=prefix)


def compare_manifests(a: Manifest, b: Manifest, *, prefix: str | None = None) -> list[EntryDiff]:
    """Every path of ``a`` (in its order), then the paths only ``b`` has (in ``b``'s order),
    each with its status; reads no chunk."""
    sizes_a = {c.id: c.size for e in a.entries.values() for c in e.chunks}
    sizes_b = {c.id: c.size for e in b.entries.values() for c in e.chunks}
    out = []
    for path, old in a.entries.items():
        if prefix is not None and not path.startswith(prefix):
            continue
        new = b.entries.get(path)
        if new is None:
            shared = [c for c in old.chunks if c.id in sizes_b]
            out.append(EntryDiff(path, "removed", old, None, (), len(shared), sum(c.size for c in shared)))
            continue
        shared = [c for c in new.chunks if c.id in sizes_a]
        changes = entry_changes(old, new)
        status = "modified" if changes else "unchanged"
        out.append(EntryDiff(path, status, old, new, changes, len(shared), sum(c.size for c in shared)))
    for path, new in b.entries.items():
        if path in a.entries or (prefix is not None and not path.startswith(prefix)):
            continue
        shared = [c for c in new.chunks if c.id in sizes_a]
        out.append(EntryDiff(path, "added", None, new, (), len(shared), sum(c.size for c in shared)))
    return out


def entry_changes(a: Entry, b: Entry) -> tuple[str, ...]:
    """What differs between two entries of one path: empty when they hold the same thing."""
    if a.to_json() == b.to_json():
        return ()
    found = set()
    if a.kind != b.kind:
        found.add("kind")
    if a.dtype != b.dtype:
        found.add("dtype")
    if a.shape != b.shape:
        found.add("shape")
    if a.size != b.size or [c.id for c in a.chunks] != [c.id for c in b.chunks]:
        found.add("content")
    for key in (a.meta.keys() | b.meta.keys()) - {"dtype", "shape"}:
        if a.meta.get(key) != b.meta.get(key):
            found.add("content" if key in _CONTENT_META else "meta")
    return tuple(c for c in CHANGES if c in found)


def _with_numeric(store: ObjectStore, pool: ThreadPoolExecutor, entry: EntryDiff) -> EntryDiff:
    a, b = entry.a, entry.b
    if (
        entry.status != "modified"
        or a is None or b is None
        or a.kind != "tensor" or b.kind != "tensor"
        or a.shape != b.shape
        or "content" not in entry.changes and "dtype" not in entry.changes
    ):
        return entry
    decoder_a, decoder_b = decoder_for(a), decoder_for(b)
    if decoder_a is None or decoder_b is None or decoder_a.lanes != decoder_b.lanes:
        return entry
    from dataclasses import replace

    return replace(entry, numeric=numeric_diff(store, pool, a, b, decoder_a, decoder_b))


# --- decoding numbers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoder:
    """Turns the stored bytes of a tensor into float64 (or complex128) values.

    ``unit`` bytes hold one element of the tensor's shape, which is ``lanes`` numbers (2 for
    ``float4_e2m1fn_x2``, which packs two 4-bit floats in a byte; else 1). ``exact`` is the
    integer dtype of the stored form, for integer tensors: their changes and differences are
    then computed on the integers rather than on the (possibly rounded) float64 values.
    """

    name: str
    unit: int
    lanes: int
    decode: Callable[[memoryview], np.ndarray]
    exact: np.dtype | None = None


def decoder_for(entry: Entry) -> Decoder | None:
    """The decoder for a tensor entry's dtype, or None for a dtype with no numeric meaning."""
    dtype = entry.dtype
    if not isinstance(dtype, str):
        return None
    big = entry.meta.get("byteorder") == "big"
    try:
        return _decoder(dtype, big)
    except (TypeError, ValueError):
        return None


@cache
def _decoder(name: str, big: bool) -> Decoder | None:
    order: Literal["<", ">"] = ">" if big else "<"
    if name == "bfloat16":
        return Decoder(name, 2, 1, lambda raw: _bfloat16(raw, order))
    if name == "complex32":
        return Decoder(name, 4, 1, lambda raw: _complex32(raw, order))
    if name in _MINIFLOATS:
        table = minifloat_table(name)
        return Decoder(name, 1, 1, lambda raw: table[np.frombuffer(raw, np.uint8) & (len(table) - 1)])
    if name == "float4_e2m1fn_x2":
        table = minifloat_table("float4_e2m1fn")
        return Decoder(name, 1, 2, lambda raw: _unpack_nibbles(raw, table))
    bits = _SUBBYTE_INTS.get(name)
    if bits is not None:
        return Decoder(name, 1, 1, lambda raw: _subbyte_int(raw, bits))
    if name in _BIT_CONTAINERS:
        container = np.dtype(f"{order}u{_BIT_CONTAINERS[name]}")
        return Decoder(name, container.itemsize, 1, lambda raw: _widen(raw, container), container)
    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    if dtype.kind not in "biufc" or name != dtype.name:
        return None
    dtype = dtype.newbyteorder(order)
    exact = dtype if dtype.kind in "iu" else None
    return Decoder(name, dtype.itemsize, 1, lambda raw: _widen(raw, dtype), exact)


def _widen(raw: memoryview, dtype: np.dtype) -> np.ndarray:
    values = np.frombuffer(raw, dtype)
    with np.errstate(invalid="ignore"):  # signalling NaNs widen to NaN, as they should
        return values.astype(np.complex128 if dtype.kind == "c" else np.float64)


def _bfloat16(raw: memoryview, order: str) -> np.ndarray:
    # bfloat16 is the high half of a float32: widening its bits is exact.
    high = np.frombuffer(raw, np.dtype(f"{order}u2")).astype(np.uint32)
    with np.errstate(invalid="ignore"):
        return (high << 16).view(np.float32).astype(np.float64)


def _complex32(raw: memoryview, order: str) -> np.ndarray:
    parts = np.frombuffer(raw, np.dtype(f"{order}f2")).astype(np.float64)
    return parts.view(np.complex128)


def _unpack_nibbles(raw: memoryview, table: np.ndarray) -> np.ndarray:
    codes = np.frombuffer(raw, np.uint8)
    out = np.empty(2 * len(codes), np.float64)
    out[0::2] = table[codes & 0x0F]
    out[1::2] = table[codes >> 4]
    return out


def _subbyte_int(raw: memoryview, bits: tuple[int, bool]) -> np.ndarray:
    width, signed = bits
    values = (np.frombuffer(raw, np.uint8) & ((1 << width) - 1)).astype(np.int16)
    if signed:
        values = np.where(values >= 1 << (width - 1), values - (1 << width), values)
    return values.astype(np.float64)


# torch's uint1..uint7 / int1..int7 and ml_dtypes' int4, uint4, int2, uint2: one element per byte,
# the value in the low bits.
_SUBBYTE_INTS: dict[str, tuple[int, bool]] = {
    **{f"uint{n}": (n, False) for n in range(1, 8)},
    **{f"int{n}": (n, True) for n in range(1, 8)},
}
# torch's bits types have no numeric meaning; their storage is compared as unsigned integers.
_BIT_CONTAINERS = {"bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1}


@dataclass(frozen=True, slots=True)
class _Minifloat:
    exponent_bits: int
    mantissa_bits: int
    bias: int
    # "ieee": the top exponent holds inf and NaN; "fn": no inf, NaN is every bit set;
    # "fnuz": no inf and no -0, NaN is the sign bit alone; "finite": neither; "e8m0": the
    # unsigned power-of-two scale format (no zero, NaN is 0xFF).
    special: str


_MINIFLOATS = {
    "float8_e4m3fn": _Minifloat(4, 3, 7, "fn"),
    "float8_e4m3fnuz": _Minifloat(4, 3, 8, "fnuz"),
    "float8_e5m2": _Minifloat(5, 2, 15, "ieee"),
    "float8_e5m2fnuz": _Minifloat(5, 2, 16, "fnuz"),
    "float8_e4m3b11fnuz": _Minifloat(4, 3, 11, "fnuz"),
    "float8_e8m0fnu": _Minifloat(8, 0, 127, "e8m0"),
    "float4_e2m1fn": _Minifloat(2, 1, 1, "finite"),
}


@cache
def minifloat_table(name: str) -> np.ndarray:
    """The float64 value of every code of an 8-bit (or 4-bit) float format, by code."""
    spec = _MINIFLOATS[name]
    if spec.special == "e8m0":
        table = np.array([2.0 ** (code - spec.bias) for code in range(256)])
        table[0xFF] = np.nan
        return table
    man_bits, exp_bits = spec.mantissa_bits, spec.exponent_bits
    width = 1 + exp_bits + man_bits
    top_exponent, top_mantissa = (1 << exp_bits) - 1, (1 << man_bits) - 1
    values = []
    for code in range(1 << width):
        sign = -1.0 if code >> (width - 1) else 1.0
        exponent = (code >> man_bits) & top_exponent
        mantissa = code & top_mantissa
        if spec.special == "fnuz" and code == 1 << (width - 1):
            values.append(math.nan)
        elif spec.special == "ieee" and exponent == top_exponent:
            values.append(sign * math.inf if mantissa == 0 else math.nan)
        elif spec.special == "fn" and exponent == top_exponent and mantissa == top_mantissa:
            values.append(math.nan)
        elif exponent == 0:
            values.append(sign * math.ldexp(mantissa, 1 - spec.bias - man_bits))
        else:
            values.append(sign * math.ldexp((1 << man_bits) + mantissa, exponent - spec.bias - man_bits))
    return np.array(values, dtype=np.float64)


# --- streaming the figures -----------------------------------------------------------------


class _Accumulator:
    """Running figures over pieces of a tensor: norms are combined with ``hypot`` from
    per-piece norms computed with scaling, so no square overflows or underflows."""

    def __init__(self) -> None:
        self.elements = 0
        self.changed = 0
        self.l2 = 0.0
        self.max_abs = 0.0
        self.norm_a = 0.0
        self.norm_b = 0.0

    def add_same(self, values: np.ndarray) -> None:
        norm = _norm(values)
        self.elements += len(values)
        self.norm_a = _hypot(self.norm_a, norm)
        self.norm_b = _hypot(self.norm_b, norm)

    def add(self, a: np.ndarray, b: np.ndarray, exact: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Add a piece; ``exact``: which elements are equal and ``|b - a|``, when computed
        exactly (integers) rather than from the float64 values."""
        if exact is not None:
            same, difference = exact
            changed = len(a) - int(np.count_nonzero(same))
        else:
            difference = _difference(a, b)
            # IEEE subtraction gives 0 exactly when the operands are equal (gradual underflow).
            changed = int(np.count_nonzero(difference))
        self.elements += len(a)
        self.changed += changed
        self.l2 = _hypot(self.l2, _norm(difference))
        if changed:
            largest = _max_abs(difference)
            self.max_abs = largest if math.isnan(largest) else max(self.max_abs, largest)
        self.norm_a = _hypot(self.norm_a, _norm(a))
        self.norm_b = _hypot(self.norm_b, _norm(b))

    def result(self) -> NumericDiff:
        return NumericDiff(self.elements, self.changed, self.l2, self.max_abs, self.norm_a, self.norm_b)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b - a``, with 0 wherever the two are equal or both NaN (where plain subtraction
    gives NaN for equal infinities and for NaN pairs)."""
    with np.errstate(invalid="ignore", over="ignore"):
        difference: np.ndarray = b - a
        undefined = np.flatnonzero(np.isnan(difference))
        if len(undefined):
            left, right = a[undefined], b[undefined]
            equal = (left == right) | (np.isnan(left) & np.isnan(right))
            difference[undefined[equal]] = 0
    return difference


def _max_abs(values: np.ndarray) -> float:
    if values.dtype.kind == "c":
        return float(np.abs(values).max())
    # max and min of the values rather than max of a new array of magnitudes; NaN propagates.
    return float(max(values.max(), -values.min()))


def _hypot(x: float, y: float) -> float:
    """``sqrt(x*x + y*y)`` without overflow, NaN if either is NaN (``math.hypot`` would give
    inf for inf and NaN; a NaN difference must show)."""
    if math.isnan(x) or math.isnan(y):
        return math.nan
    return math.hypot(x, y)


def _norm(values: np.ndarray) -> float:
    """The L2 norm of float64 or complex128 ``values`` (NaN if any is NaN, else inf if any is
    inf). One dot product in the usual case; scaled where squares overflow or underflow."""
    if len(values) == 0:
        return 0.0
    if values.dtype.kind == "c":
        values = values.view(np.float64)  # (re, im) pairs: the same sum of squares
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        total = float(np.dot(values, values))
    if math.isnan(total):
        return math.nan
    if 1e-280 < total < math.inf:
        return math.sqrt(total)
    if total == 0 and not np.count_nonzero(values):
        return 0.0
    largest = float(np.abs(values).max())
    if not math.isfinite(largest):
        return largest
    scaled = values / largest
    return largest * math.sqrt(float(np.dot(scaled, scaled)))


def numeric_diff(
    store: ObjectStore, pool: ThreadPoolExecutor, a: Entry, b: Entry, decoder_a: Decoder, decoder_b: Decoder
) -> NumericDiff:
    """The figures of ``b - a`` for two tensors of one shape, read piece by piece."""
    expected = math.prod(a.shape or ())
    for entry, decoder in ((a, decoder_a), (b, decoder_b)):
        if entry.size != expected * decoder.unit:
            raise FormatError(
                f"tensor of shape {list(entry.shape or ())} and dtype {decoder.name} "
                f"cannot hold {entry.size} bytes"
            )
    accumulator = _Accumulator()
    for piece_a, piece_b in _pieces(store, pool, a, b, decoder_a.unit, decoder_b.unit):
        values_a = decoder_a.decode(piece_a)
        if piece_b is None:
            accumulator.add_same(values_a)
            continue
        values_b = decoder_b.decode(piece_b)
        exact = None
        if decoder_a.exact is not None and decoder_b.exact is not None:
            exact = _integer_difference(
                np.frombuffer(piece_a, decoder_a.exact), np.frombuffer(piece_b, decoder_b.exact)
            )
        accumulator.add(values_a, values_b, exact)
    return accumulator.result()


def _integer_difference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Which elements are equal, and ``|b - a|`` computed exactly and rounded once to float64
    (the float64 values of two large 64-bit integers may be equal when the integers are not).
    None where the two dtypes have no common integer type (int64 against uint64)."""
    common = np.result_type(a.dtype, b.dtype)
    if common.kind not in "iu":
        return None
    common = common.newbyteorder("=")
    a, b = a.astype(common), b.astype(common)
    unsigned = np.dtype(f"u{common.itemsize}")
    # In two's complement, b - a modulo 2**n is exact whenever b >= a, and a - b otherwise.
    magnitude = np.where(b >= a, b.view(unsigned) - a.view(unsigned), a.view(unsigned) - b.view(unsigned))
    return a == b, magnitude.astype(np.float64)


def _pieces(
    store: ObjectStore, pool: ThreadPoolExecutor, a: Entry, b: Entry, unit_a: int, unit_b: int
) -> Iterator[tuple[memoryview, memoryview | None]]:
    """Pairs of byte ranges holding the same elements of ``a`` and ``b``; the second is None
    where both sides hold the very same chunk at the same place (read once).

    When both tensors were cut at the same offsets (the same chunk size and element size, the
    usual case), chunk i pairs with chunk i. Otherwise the two chunk streams are re-cut into
    pieces of equal element counts.
    """
    if unit_a == unit_b and [c.size for c in a.chunks] == [c.size for c in b.chunks]:
        def pair(i: int) -> Callable[[], tuple[bytes, bytes | None]]:
            ca, cb = a.chunks[i], b.chunks[i]
            if ca.id == cb.id:
                return lambda: (store.chunk(ca), None)
            return lambda: (store.chunk(ca), store.chunk(cb))

        for data_a, data_b in _read_ahead(pool, (pair(i) for i in range(len(a.chunks))), _READ_AHEAD):
            yield memoryview(data_a), None if data_b is None else memoryview(data_b)
        return
    yield from _recut(_stream(store, pool, a.chunks), _stream(store, pool, b.chunks), unit_a, unit_b)


def _stream(store: ObjectStore, pool: ThreadPoolExecutor, chunks: Iterable[ChunkRef]) -> Iterator[bytes]:
    return _read_ahead(pool, (partial(store.chunk, c) for c in chunks), _READ_AHEAD)


def _read_ahead(pool: ThreadPoolExecutor, calls: Iterator[Callable[[], Any]], depth: int) -> Iterator[Any]:
    """The results of ``calls`` in order, with up to ``depth`` running ahead in ``pool``."""
    pending: deque[Future[Any]] = deque()
    try:
        for call in calls:
            pending.append(pool.submit(call))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _recut(
    stream_a: Iterator[bytes], stream_b: Iterator[bytes], unit_a: int, unit_b: int
) -> Iterator[tuple[memoryview, memoryview]]:
    rest_a, rest_b = memoryview(b""), memoryview(b"")
    while True:
        rest_a = _refill(rest_a, stream_a, unit_a)
        rest_b = _refill(rest_b, stream_b, unit_b)
        count = min(len(rest_a) // unit_a, len(rest_b) // unit_b)
        if count == 0:
            if len(rest_a) or len(rest_b):
                raise FormatError("the two tensors hold different numbers of elements")
            return
        yield rest_a[: count * unit_a], rest_b[: count * unit_b]
        rest_a, rest_b = rest_a[count * unit_a :], rest_b[count * unit_b :]


def _refill(rest: memoryview, stream: Iterator[bytes], unit: int) -> memoryview:
    """``rest`` with the next chunk appended while it holds less than one element."""
    while len(rest) < unit:
        chunk = next(stream, None)
        if chunk is None:
            return rest
        rest = memoryview(bytes(rest) + chunk) if len(rest) else memoryview(chunk)
    return rest
