"""How one object's bytes are laid out on storage: a small header, then the coded payload.

Object file::

    b"CKO" + version byte (1)
    u32 little-endian: length of the header
    header: canonical JSON {"kind": ..., "size": <decoded bytes>, "coding": <coding>}
    payload

A coding is a JSON value, so new ones fit without a format break:

    {"codec": "raw"}                         payload is the content
    {"codec": "zstd"}                        payload is one zstd frame (content size declared)
    {"codec": "planes", "itemsize": k, "planes": [{"codec": "raw"|"zstd", "length": n}, ...]}
        the content's elements of k bytes split into k byte planes (plane i holds byte i of
        every element, then a last plane with the len % k trailing bytes); each plane stored
        one after the other, compressed only where that pays
    {"codec": "delta", "base": "<object id>", "itemsize": k, "depth": d, "inner": <coding>}
        decode ``inner`` (raw, zstd, planes or ans) to a buffer z as long as the content; the
        content is the decoded base (same size) plus z, element by element: elements are k
        little-endian bytes (k in 1, 2, 4, 8; the len % k trailing bytes are elements of one
        byte), z holds zigzag(new - base) modulo 2**(8k), zigzag(v) = (v << 1) ^ (v >> 8k-1)
        on the signed value, so small changes either way become small numbers; ``depth`` is
        the number of deltas from here down to an object that is not a delta (base depth + 1)
    {"codec": "ans", "exponent": [shift, bits], "moves": bool, "sections": [t, w, r]}
        only inside a delta of 2-byte elements: z coded with models chosen by the base's
        exponent and, with "moves", how the base itself moved (entropy.py)
    {"codec": "xor", "base": "<object id>", "inner": <coding>}
        (read only; written by early versions) decode ``inner``, then XOR it with the decoded
        base object (zero-padded or cut to length)

The id of an object is the blake3 of its decoded content, so the coding can change without
the id changing. A delta names its base in the header (``Header.base``): whoever keeps an
object alive (gc, prune, push) keeps its base alive too.

Why these codings: a float's exponent byte compresses (typically to a quarter or a third),
its low mantissa bytes do not, so planes are compressed one by one and only where a sample
shows a saving; between two checkpoints of one training run a weight moves by a few units in
its last place, so the difference to the parent's chunk has nearly empty high planes.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np

from . import compiled, entropy
from .errors import FormatError
from .frames import DEFAULT_LEVEL, Buffer, zstd_compress, zstd_decompress, zstd_decompress_into

MAGIC = b"CKO\x01"
_HEADER_LEN = struct.Struct("<I")
PREFIX_SIZE = len(MAGIC) + _HEADER_LEN.size
MAX_HEADER_SIZE = 1 << 20
# Every size claimed by a header or frame is checked against this before allocating.
MAX_OBJECT_SIZE = 1 << 30
KINDS = ("chunk", "manifest", "commit")
# Codings that decode against another object named in the header as "base".
DELTA_CODECS = frozenset({"delta", "xor"})
# A reader follows at most this many deltas to reach a full object (writers stay far below).
MAX_DELTA_DEPTH = 16


def canonical_json(value: Any) -> bytes:
    """The one encoding of documents: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Header:
    kind: str
    size: int
    coding: dict[str, Any]

    @property
    def codec(self) -> str:
        return str(self.coding.get("codec"))

    @property
    def base(self) -> str | None:
        """The id of the object this one is a delta against, if any."""
        if self.coding.get("codec") in DELTA_CODECS:
            return str(self.coding["base"])
        return None

    @property
    def depth(self) -> int | None:
        """Deltas from this object down to a full one: 0 for a full object, None when the
        header does not say (``xor`` objects of early versions: walk the bases instead)."""
        if self.base is None:
            return 0
        depth = self.coding.get("depth")
        if isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= MAX_DELTA_DEPTH:
            return depth
        return None

    @property
    def label(self) -> str:
        """A short name for the coding, e.g. ``planes``, ``delta+planes``, ``zstd``."""
        inner = self.coding.get("inner")
        if self.base is not None and isinstance(inner, dict):
            return f"{self.codec}+{inner.get('codec')}"
        return self.codec


def encode_object(kind: str, payload: Buffer, size: int, coding: dict[str, Any]) -> list[Buffer]:
    """The parts of an object file, to be written one after the other."""
    header = canonical_json({"kind": kind, "size": size, "coding": coding})
    return [MAGIC + _HEADER_LEN.pack(len(header)) + header, payload]


def parse_prefix(prefix: bytes) -> int:
    """Validate an object file's first bytes; return the header's length."""
    if len(prefix) < PREFIX_SIZE or prefix[: len(MAGIC)] != MAGIC:
        raise FormatError("not a ckptrepo object file (bad magic)")
    (hlen,) = _HEADER_LEN.unpack_from(prefix, len(MAGIC))
    if hlen > MAX_HEADER_SIZE:
        raise FormatError(f"object header claims {hlen} bytes (limit {MAX_HEADER_SIZE})")
    return int(hlen)


def parse_header(raw: bytes) -> Header:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"object header is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("object header is not a JSON object")
    kind, size, coding = doc.get("kind"), doc.get("size"), doc.get("coding")
    if kind not in KINDS:
        raise FormatError(f"object header: unknown kind {kind!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT_SIZE:
        raise FormatError(f"object header: size {size!r} out of range 0..{MAX_OBJECT_SIZE}")
    if not isinstance(coding, dict):
        raise FormatError("object header: coding is not an object")
    if coding.get("codec") in DELTA_CODECS and not isinstance(coding.get("base"), str):
        raise FormatError("object header: a delta coding needs a base id")
    return Header(kind=kind, size=size, coding=coding)


def split_object(data: Buffer) -> tuple[Header, memoryview]:
    hlen = parse_prefix(bytes(data[:PREFIX_SIZE]))
    end = PREFIX_SIZE + hlen
    if len(data) < end:
        raise FormatError("object file is truncated inside its header")
    return parse_header(bytes(data[PREFIX_SIZE:end])), memoryview(data)[end:]


# (Scratch buffers are per thread: see _scratch.)
_local = threading.local()


# --- compiled loops ------------------------------------------------------------------------

# The per-element loops in C (_elements.c, built at install): one pass where the numpy forms
# below take a pass (and often a temporary) per byte plane or per operation, 3-5x less CPU per
# GiB, and loaded in under a millisecond. Built optionally: an install without a C compiler
# runs the numpy forms, which give the same bytes.
_LOOPS = compiled.ELEMENTS

_log = logging.getLogger(__name__)
_warned_slow = False
# Set by forced_element_loops: (the loops to use, None for the numpy forms).
_forced: tuple[ModuleType | None] | None = None


@contextmanager
def forced_element_loops(kernels: ModuleType | None) -> Iterator[None]:
    """Run the codec with the compiled loops ``kernels`` (ckptrepo._elements), or with the
    numpy forms (None): to compare the two (the tests, and benchmarks/bench_element_loops.py).
    Process-wide, so not for use while other threads code."""
    global _forced
    saved, _forced = _forced, (kernels,)
    try:
        yield
    finally:
        _forced = saved


def _element_loops(nbytes: int) -> ModuleType | None:
    """The compiled element loops, or None where the numpy forms must run."""
    global _warned_slow
    if _forced is not None:
        return _forced[0]
    if _LOOPS is None and nbytes >= _SLOW_WARNING_BYTES and not _warned_slow:
        _warned_slow = True
        _log.warning(
            "ckptrepo._elements is not built (no C compiler at install?): byte planes and "
            "deltas run in numpy, 3-5x slower; reinstall with a C compiler for full speed"
        )
    return _LOOPS


# The element widths the compiled loops take.
LOOP_WIDTHS = frozenset({2, 4, 8})
# Only a process that moves real data hears that the compiled loops are missing.
_SLOW_WARNING_BYTES = 1 << 20


# --- byte planes ---------------------------------------------------------------------------

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _bytes_of(data: Buffer | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _split_plane(src: np.ndarray, itemsize: int, index: int, out: np.ndarray) -> None:
    """Byte ``index`` of each whole element of ``src`` (uint8) into ``out``."""
    count = len(out)
    whole = src[: count * itemsize]
    if itemsize in _UINT and whole.ctypes.data % itemsize == 0:
        # A shift of the wide view then a narrowing store: one vectorised pass, about 4 GB/s,
        # where numpy's strided column copy manages well under 1 GB/s.
        wide = whole.view(_UINT[itemsize])
        np.right_shift(wide, 8 * index, out=out, casting="unsafe")
    else:
        out[:] = whole.reshape(-1, itemsize)[:, index]


# Elements per compiled split while some planes are unwanted (their spare rows: 1 MiB a thread
# for 4-byte elements).
_SPLIT_SEGMENT = 1 << 18


def split_planes_into(src: np.ndarray, itemsize: int, outs: Sequence[np.ndarray | None]) -> None:
    """Byte plane i of the whole elements of ``src`` (uint8) into ``outs[i]``, where it is not
    None; compiled, all planes come out of one pass over ``src``."""
    count = len(src) // itemsize
    if len(outs) != itemsize or any(out is not None and len(out) != count for out in outs):
        raise AssertionError("plane buffers do not fit the content")  # a bug, never bad input
    kernels = _element_loops(count * itemsize)
    whole = src[: count * itemsize]
    if count and kernels is not None and itemsize in LOOP_WIDTHS:
        if all(out is not None for out in outs):
            kernels.split(whole, *outs)
            return
        # The planes nobody wants go to spare rows, a row each (the loop refuses outputs that
        # overlap), a segment at a time to keep the rows small.
        step = min(count, _SPLIT_SEGMENT)
        spare = _scratch(2, itemsize * step).reshape(itemsize, step)
        for start in range(0, count, step):
            end = min(count, start + step)
            kernels.split(
                whole[start * itemsize : end * itemsize],
                *(spare[j, : end - start] if out is None else out[start:end] for j, out in enumerate(outs)),
            )
        return
    for index, out in enumerate(outs):
        if out is not None:
            _split_plane(src, itemsize, index, out)


def split_planes(data: Buffer, itemsize: int) -> list[memoryview]:
    """Byte planes of ``data``: plane i holds byte i of each element, then the tail bytes."""
    src = _bytes_of(data)
    count = len(src) // itemsize
    planes = []
    for i in range(itemsize):
        plane = np.empty(count, dtype=np.uint8)
        _split_plane(src, itemsize, i, plane)
        planes.append(plane.data)
    planes.append(src[count * itemsize :].copy().data)
    return planes


def _whole_planes(planes: Sequence[Buffer | np.ndarray], itemsize: int, count: int) -> list[np.ndarray]:
    """The first ``itemsize`` of ``planes`` (which end with the tail) as byte arrays, each
    checked to hold ``count`` elements: the compiled loops do not check bounds, so no plane
    may be shorter than the content's."""
    inputs = [_bytes_of(plane) for plane in planes[:itemsize]]
    if len(planes) != itemsize + 1 or any(len(plane) != count for plane in inputs):
        raise FormatError(f"planes do not hold {count} elements of {itemsize} bytes")
    return inputs


def join_planes_into(planes: Sequence[Buffer | np.ndarray], itemsize: int, out: np.ndarray) -> None:
    """Inverse of :func:`split_planes`, writing into ``out`` (uint8, the content's length)."""
    count = len(out) // itemsize
    inputs = _whole_planes(planes, itemsize, count)
    whole = out[: count * itemsize]
    kernels = _element_loops(len(whole))
    if kernels is not None and itemsize in LOOP_WIDTHS:
        kernels.join(*inputs, whole)
    else:
        rows = whole.reshape(-1, itemsize)
        for i, plane in enumerate(inputs):
            rows[:, i] = plane
    out[count * itemsize :] = _bytes_of(planes[itemsize])


def join_planes(planes: Sequence[Buffer], itemsize: int, size: int) -> bytes:
    out = np.empty(size, dtype=np.uint8)
    join_planes_into(planes, itemsize, out)
    return out.tobytes()


# --- deltas --------------------------------------------------------------------------------


def delta_itemsize(itemsize: int) -> int:
    """The element width a delta subtracts in: the value's own when it is 1, 2, 4 or 8 bytes
    (so a float's change lands in its low bytes), else the widest that divides it."""
    for width in (8, 4, 2, 1):
        if itemsize % width == 0 and itemsize >= width:
            return width
    return 1


def _aligned(array: np.ndarray, width: int) -> bool:
    return array.ctypes.data % width == 0


def subtract_zigzag(new: Buffer | np.ndarray, base: Buffer | np.ndarray, width: int, out: np.ndarray) -> None:
    """``out`` (uint8, same length) = zigzag(new - base) per element of ``width`` bytes."""
    a, b = _bytes_of(new), _bytes_of(base)
    count = len(out) // width
    whole = count * width
    _zigzag_part(a[:whole], b[:whole], out[:whole], width)
    _zigzag_part(a[whole:], b[whole:], out[whole:], 1)


def _zigzag_part(a: np.ndarray, b: np.ndarray, out: np.ndarray, width: int) -> None:
    if not len(out):
        return
    if len(a) != len(out) or len(b) != len(out):
        raise AssertionError("difference of buffers of different lengths")  # a bug, never bad input
    kernels = _element_loops(len(out))
    if kernels is not None and width in LOOP_WIDTHS:
        kernels.zigzag(a, b, out, width)  # any alignment
        return
    if not (_aligned(a, width) and _aligned(b, width) and _aligned(out, width)):
        a, b = a.copy(), b.copy()  # fresh arrays are aligned; rare (views at odd offsets)
        if not _aligned(out, width):
            tmp = np.empty(len(out), dtype=np.uint8)
            _zigzag_part(a, b, tmp, width)
            out[:] = tmp
            return
    ua, ub, uz = a.view(_UINT[width]), b.view(_UINT[width]), out.view(_UINT[width])
    np.subtract(ua, ub, out=uz)
    sign = np.right_shift(uz.view(_INT[width]), 8 * width - 1)
    np.left_shift(uz, 1, out=uz)
    np.bitwise_xor(uz, sign.view(_UINT[width]), out=uz)


def add_unzigzag_into(acc: np.ndarray, z: np.ndarray, width: int, scratch: np.ndarray | None = None) -> None:
    """``acc`` (uint8, holding the base) += unzigzag(``z``) per element: the inverse of
    :func:`subtract_zigzag`. ``z`` is overwritten; ``scratch`` (uint8, as long) is optional."""
    count = len(acc) // width
    whole = count * width
    if scratch is None:
        scratch = np.empty(len(acc), dtype=np.uint8)
    _unzigzag_part(acc[:whole], z[:whole], width, scratch[:whole])
    _unzigzag_part(acc[whole:], z[whole:], 1, scratch[whole:])


def add_joined_unzigzag_into(acc: np.ndarray, planes: Sequence[Buffer | np.ndarray], width: int) -> None:
    """``acc`` (uint8, holding the base) += unzigzag(join(``planes``)) per element of
    ``width`` bytes: a delta's byte planes added to its base. Compiled, one pass; a join
    into a temporary and a sum over it were two passes over memory, 0.47 s of CPU per GiB
    against 0.25 s."""
    count = len(acc) // width
    whole = acc[: count * width]
    kernels = _element_loops(len(whole))
    if kernels is None or width not in LOOP_WIDTHS:
        z = _scratch(0, len(acc))
        join_planes_into(planes, width, z)
        add_unzigzag_into(acc, z, width, _scratch(1, len(acc)))
        return
    inputs = _whole_planes(planes, width, count)
    tail = _bytes_of(planes[width])
    if len(tail) != len(acc) - len(whole):
        raise FormatError(f"planes leave {len(tail)} tail bytes, expected {len(acc) - len(whole)}")
    kernels.join_unzigzag(*inputs, whole)
    _unzigzag_part(acc[len(whole) :], tail.copy(), 1, np.empty(len(tail), dtype=np.uint8))


def _unzigzag_part(acc: np.ndarray, z: np.ndarray, width: int, scratch: np.ndarray) -> None:
    if not len(acc):
        return
    if len(acc) != len(z):
        raise AssertionError("sum of buffers of different lengths")  # a bug, never bad input
    kernels = _element_loops(len(acc))
    if kernels is not None and width in LOOP_WIDTHS:
        kernels.unzigzag(acc, z, width)  # any alignment
        return
    if not (_aligned(acc, width) and _aligned(z, width) and _aligned(scratch, width)):
        tmp = acc.copy()
        _unzigzag_part(tmp, z.copy(), width, np.empty(len(acc), dtype=np.uint8))
        acc[:] = tmp
        return
    ua, uz = acc.view(_UINT[width]), z.view(_UINT[width])
    low = scratch.view(_UINT[width])
    np.bitwise_and(uz, 1, out=low)
    np.negative(low.view(_INT[width]), out=low.view(_INT[width]))
    np.right_shift(uz, 1, out=uz)
    np.bitwise_xor(uz, low, out=uz)
    np.add(ua, uz, out=ua)


def _scratch(slot: int, size: int) -> np.ndarray:
    """A per-thread buffer of at least ``size`` bytes, reused across calls: decoding a delta
    needs two chunk-sized temporaries, and fresh ones cost a page fault per 4 KiB each time.
    Slots 0 and 1 are decode_into's, slot 2 split_planes_into's, slot 3 the decompressed
    planes of one object until they are joined, slot 4 the planes an object file compresses
    as it is written; none is used across a call that could use it too."""
    buffers: list[np.ndarray] | None = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = [np.empty(0, dtype=np.uint8) for _ in range(5)]
    if len(buffers[slot]) < size:
        buffers[slot] = np.empty(size, dtype=np.uint8)
    return buffers[slot][:size]


def xor_bytes(data: Buffer, base: Buffer) -> bytes:
    a = np.frombuffer(data, dtype=np.uint8)
    b = np.frombuffer(base, dtype=np.uint8)
    out = a.copy()
    n = min(len(a), len(b))
    np.bitwise_xor(out[:n], b[:n], out=out[:n])
    return out.tobytes()


# --- choosing a coding ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodingPolicy:
    """How the writer codes new objects (from config.yaml's ``compression`` section)."""

    # zstd level for the buffers that pay (and for planes when ``fast_planes`` is off). On
    # float exponent planes level 1 beats level 3 in size as well as speed (matches only break
    # up the entropy coding).
    level: int = DEFAULT_LEVEL
    # Compress byte planes with zstd parameters made for them (see _FAST_PLANES).
    fast_planes: bool = True
    # A coded form is kept only if it is at most this fraction of the raw size.
    min_saving: float = 0.97
    planes: bool = True
    # Store a tensor chunk as its difference to the parent's chunk when that is smaller;
    # a full object at least every ``max_delta_chain + 1`` versions.
    delta: bool = True
    max_delta_chain: int = 5
    # A delta must be estimated at most this fraction of the full coding's size: a delta
    # costs a read of its base at checkout, so a marginal saving is not worth it.
    delta_min_gain: float = 0.95
    # Code the deltas of 16-bit floats with models chosen by the base's exponent and last
    # move (entropy.py) where that is smaller than their byte planes.
    context_coding: bool = True


@dataclass(frozen=True, slots=True)
class DeltaBase:
    """A candidate delta base: its id, decoded content and delta depth, and, when it is a
    2-byte delta itself, how it moved (``entropy.moves_of``), which a child's context reads."""

    id: str
    content: Buffer | np.ndarray
    depth: int
    moves: np.ndarray | None = None


# Content up to this size is coded outright to decide; larger content is judged on samples.
_SAMPLE_ALL = 128 << 10
_SAMPLE_WINDOW = 32 << 10
_SAMPLE_WINDOWS = 3
_DELTA_HEADER_GROWTH = 160


@dataclass(slots=True)
class _PendingPlanes:
    """Byte planes whose compression waits for the object file (see :func:`object_file`).

    Compressing a plane before the file is laid out costs a pass over the content to extract
    it, and the raw planes another pass into the file. Raw planes ahead of every compressed
    one have known places in the file, so one split writes those there and the planes from
    the first compressed one on into scratch, where they are compressed (or, if raw, copied
    from): a tenth less CPU for a commit of fp32 weights, fresh or as deltas, whose planes
    that pay are the high bytes (docs/benchmarks.md). ``coding`` holds the estimated frame
    lengths until then."""

    content: np.ndarray
    itemsize: int
    pays: list[bool]  # per plane: estimated to pay, so compressed
    policy: CodingPolicy
    outer: dict[str, Any] | None = None  # a delta's coding, around the planes' (its "inner")

    @property
    def first_compressed(self) -> int:
        return self.pays.index(True)


# Tests set this to False to compare with planes compressed before the file is laid out.
_PLANES_AS_WRITTEN = True


@dataclass(slots=True)
class Encoded:
    """A chosen coding and the means to write its payload (planes are split straight into
    the output, so a chunk is copied once on its way to storage).

    With ``pending``, ``coding`` and ``payload_size`` are estimates until :func:`object_file`
    writes the object and settles them."""

    coding: dict[str, Any]
    size: int
    payload_size: int
    _parts: list[tuple[int, Any]]  # (plane itemsize or 0 for a ready buffer, source)
    # A 2-byte delta's moves, kept with the content when it is cached as the next base.
    moves: np.ndarray | None = None
    pending: _PendingPlanes | None = None

    def write_payload(self, out: np.ndarray) -> None:
        if self.pending is not None:
            raise AssertionError("pending planes are written by object_file")  # a bug, never bad input
        position = 0
        # The raw planes are split into their places in one go, once the places are known.
        source: np.ndarray | None = None
        planes: list[np.ndarray | None] = []
        for itemsize, part in self._parts:
            if itemsize == 0:
                n = len(part)
                out[position : position + n] = _bytes_of(part)
            else:
                src, index, n = part
                if source is None:
                    source, planes = src, [None] * itemsize
                elif src is not source or len(planes) != itemsize:
                    raise AssertionError("raw planes of different contents")  # a bug, never bad input
                planes[index] = out[position : position + n]
            position += n
        if position != self.payload_size:
            raise AssertionError("payload parts do not add up")  # a bug, never bad input
        if source is not None:
            split_planes_into(source, len(planes), planes)

    def payload(self) -> bytes:
        if self.pending is not None:
            blob = np.frombuffer(object_file("chunk", self), dtype=np.uint8)
            return blob[len(blob) - self.payload_size :].tobytes()
        out = np.empty(self.payload_size, dtype=np.uint8)
        self.write_payload(out)
        return out.tobytes()


def _samples(content: np.ndarray, width: int) -> np.ndarray:
    """A few windows spread over ``content``, each a whole number of elements."""
    if len(content) <= _SAMPLE_ALL:
        return content
    window = _SAMPLE_WINDOW - _SAMPLE_WINDOW % width
    step = (len(content) - window) // (_SAMPLE_WINDOWS - 1)
    starts = [(i * step) // 64 * 64 for i in range(_SAMPLE_WINDOWS)]
    return np.concatenate([content[s : s + window] for s in starts])


@dataclass(slots=True)
class _Estimate:
    rate: float  # coded bytes per content byte
    pays: list[bool]  # per plane (or the one buffer): whether zstd saves enough
    frames: list[bytes | None] | None  # the compressed planes, when the sample was everything
    rates: list[float]  # per plane (or the one buffer): its sample's coded bytes per byte


def _estimate(content: np.ndarray, itemsize: int, policy: CodingPolicy) -> _Estimate:
    """Judge the coding of ``content`` (as planes of ``itemsize``, or one buffer) on samples;
    small content is compressed outright and the result kept."""
    sample = _samples(content, itemsize)
    exact = len(sample) == len(content)
    planes = itemsize > 1 and policy.planes
    views = split_planes(sample.data, itemsize)[:itemsize] if planes else [sample.data]
    total = 0
    pays = []
    frames: list[bytes | None] = []
    rates = []
    fast = planes and policy.fast_planes
    for view in views:
        n = len(view)
        frame = zstd_compress(view, policy.level, fast_planes=fast) if n else b""
        ok = n > 0 and len(frame) <= n * policy.min_saving
        pays.append(ok)
        frames.append(frame if ok else None)
        rates.append(len(frame) / n if ok else 1.0)
        total += len(frame) if ok else n
    return _Estimate(total / max(1, len(sample)), pays, frames if exact else None, rates)


def _code(content: np.ndarray, itemsize: int, estimate: _Estimate, policy: CodingPolicy) -> Encoded:
    """Code ``content`` (uint8) as planes of ``itemsize`` or as one buffer, compressing the
    parts the estimate says pay, and storing any that turn out not to raw after all."""
    size = len(content)

    def compressed(index: int, make: Callable[[], np.ndarray], n: int, fast: bool = False) -> bytes | None:
        if not estimate.pays[index]:
            return None
        if estimate.frames is not None:
            frame = estimate.frames[index]
        else:
            frame = zstd_compress(make(), policy.level, fast_planes=fast)
        return _paying(frame, n, policy)

    if itemsize == 1 or not policy.planes:
        frame = compressed(0, lambda: content, size)
        if frame is not None:
            return Encoded({"codec": "zstd"}, size, len(frame), [(0, frame)])
        return Encoded({"codec": "raw"}, size, size, [(0, content)])
    count = size // itemsize
    if _PLANES_AS_WRITTEN and estimate.frames is None and any(estimate.pays):
        guess: list[dict[str, Any]] = [
            {"codec": "zstd", "length": int(count * rate)} if pays else {"codec": "raw", "length": count}
            for pays, rate in zip(estimate.pays, estimate.rates)
        ] + [{"codec": "raw", "length": size - count * itemsize}]
        return Encoded(
            {"codec": "planes", "itemsize": itemsize, "planes": guess},
            size,
            sum(d["length"] for d in guess),
            [],
            pending=_PendingPlanes(content, itemsize, list(estimate.pays), policy),
        )

    def plane(i: int) -> np.ndarray:
        out = np.empty(count, dtype=np.uint8)
        _split_plane(content, itemsize, i, out)
        return out

    frames = [compressed(i, partial(plane, i), count, policy.fast_planes) for i in range(itemsize)]
    return _planes_encoded(content, itemsize, frames, policy)


def _paying(frame: bytes | None, n: int, policy: CodingPolicy) -> bytes | None:
    """``frame``, if it codes ``n`` bytes in at most ``policy.min_saving`` of them."""
    return frame if frame is not None and len(frame) <= n * policy.min_saving else None


def _planes_encoded(
    content: np.ndarray, itemsize: int, frames: Sequence[bytes | None], policy: CodingPolicy
) -> Encoded:
    """The planes coding of ``content`` with ``frames[i]`` as plane i's payload (None: the
    plane stored raw), or raw if the plane list would eat the saving."""
    size = len(content)
    count = size // itemsize
    descriptors: list[dict[str, Any]] = []
    parts: list[tuple[int, Any]] = []
    for i, frame in enumerate(frames):
        if frame is not None:
            descriptors.append({"codec": "zstd", "length": len(frame)})
            parts.append((0, frame))
        else:
            descriptors.append({"codec": "raw", "length": count})
            parts.append((itemsize, (content, i, count)))
    tail = content[count * itemsize :]
    descriptors.append({"codec": "raw", "length": len(tail)})
    parts.append((0, tail))
    payload_size = sum(d["length"] for d in descriptors)
    coding = {"codec": "planes", "itemsize": itemsize, "planes": descriptors}
    # The plane list lengthens the header: on a small chunk that can eat the saving.
    if payload_size + _header_growth(coding) > size * policy.min_saving:
        return Encoded({"codec": "raw"}, size, size, [(0, content)])
    return Encoded(coding, size, payload_size, parts)


_RAW_CODING_JSON = len(canonical_json({"codec": "raw"}))


def _header_growth(coding: dict[str, Any]) -> int:
    return len(canonical_json(coding)) - _RAW_CODING_JSON


def encode_chunk(
    data: Buffer | np.ndarray,
    policy: CodingPolicy,
    itemsize: int = 1,
    base: DeltaBase | None = None,
    dtype: str | None = None,
) -> Encoded:
    """Choose and apply a coding for ``data`` whose elements are ``itemsize`` bytes (of
    ``dtype``, a manifest's name, where known).

    Planes for multi-byte elements, a delta against ``base`` when that is clearly smaller
    (and the chain stays within ``policy.max_delta_chain``), zstd where it pays, else raw;
    a delta of 16-bit floats context-coded when that beats its planes. The choices are made
    on samples (the context coding on exact counts), so a chunk is compressed once.
    """
    content = _bytes_of(data)
    size = len(content)
    if size == 0:
        return Encoded({"codec": "raw"}, 0, 0, [])
    width = itemsize if itemsize > 1 and size >= 4 * itemsize and policy.planes else 1
    plain = _estimate(content, width, policy)
    if base is None or not _delta_allowed(base, size, policy):
        return _code(content, width, plain, policy)
    dwidth = delta_itemsize(itemsize)
    inner_width = dwidth if dwidth > 1 and size >= 4 * dwidth and policy.planes else 1
    base_bytes = _bytes_of(base.content)
    sample_new, sample_base = _samples(content, dwidth), _samples(base_bytes, dwidth)
    zsample = np.empty(len(sample_new), dtype=np.uint8)
    subtract_zigzag(sample_new, sample_base, dwidth, zsample)
    delta = _estimate(zsample, inner_width, policy)
    # (The delta's header names its base: about 150 more bytes, which matter on tiny chunks.)
    if delta.rate * size + _DELTA_HEADER_GROWTH > plain.rate * size * policy.delta_min_gain:
        return _code(content, width, plain, policy)
    if len(zsample) == size:
        z = zsample  # the sample was everything
    else:
        delta.frames = None
        z = np.empty(size, dtype=np.uint8)
        subtract_zigzag(content, base_bytes, dwidth, z)
    # Moves are kept only where a child may be context-coded: 16-bit floats, coding on.
    field = entropy.exponent_field(dtype) if itemsize == 2 and size % 2 == 0 and policy.context_coding else None
    moves = entropy.moves_of(z.view(np.uint16)) if field is not None else None
    inner = None
    if field is not None and moves is not None:
        base_moves = base.moves if base.moves is not None and len(base.moves) == len(moves) else None
        if not _aligned(base_bytes, 2):
            base_bytes = base_bytes.copy()
        coded = entropy.encode(z.view(np.uint16), base_bytes.view(np.uint16), base_moves, field, delta.rate * size)
        if coded is not None and coded.payload_size < delta.rate * size:
            inner = Encoded(coded.coding, size, coded.payload_size, [(0, s) for s in coded.sections])
    if inner is None:
        inner = _code(z, inner_width, delta, policy)
    coding = {"codec": "delta", "base": base.id, "itemsize": dwidth, "depth": base.depth + 1, "inner": inner.coding}
    pending = inner.pending
    if pending is not None:
        pending.outer = {k: v for k, v in coding.items() if k != "inner"}
    return Encoded(coding, size, inner.payload_size, inner._parts, moves, pending)


def _delta_allowed(base: DeltaBase, size: int, policy: CodingPolicy) -> bool:
    return policy.delta and len(base.content) == size and base.depth + 1 <= policy.max_delta_chain


def object_file(
    kind: str, encoded: Encoded, allocate: Callable[[int], np.ndarray] | None = None
) -> memoryview:
    """The whole object file, prefix, header and payload, in one buffer: a new one, or one
    from ``allocate(size)`` (a writer reusing its buffer from chunk to chunk)."""
    if encoded.pending is not None:
        return _pending_object_file(kind, encoded, encoded.pending, allocate)
    header = _object_prefix(kind, encoded.size, encoded.coding)
    start = len(header)
    size = start + encoded.payload_size
    # np.empty, not bytearray: every byte is written below, and bytearray would first zero
    # the whole buffer while holding the GIL.
    blob = allocate(size) if allocate is not None else np.empty(size, dtype=np.uint8)
    blob[:start] = np.frombuffer(header, dtype=np.uint8)
    encoded.write_payload(blob[start:])
    return blob.data


def _object_prefix(kind: str, size: int, coding: dict[str, Any]) -> bytes:
    header = canonical_json({"kind": kind, "size": size, "coding": coding})
    return MAGIC + _HEADER_LEN.pack(len(header)) + header


# Room a settled header may need beyond the estimated one (a frame length of more digits).
_HEADER_SLACK = 256


def _pending_object_file(
    kind: str, encoded: Encoded, pending: _PendingPlanes, allocate: Callable[[int], np.ndarray] | None
) -> memoryview:
    """:func:`object_file` of pending planes: one split puts the raw planes ahead of the first
    compressed one in their places (after a header of the estimated lengths) and the others
    in scratch; those are compressed or copied, the header settled, and the planes in place
    moved only if the header's length changed."""
    content, itemsize, policy = pending.content, pending.itemsize, pending.policy
    first = pending.first_compressed
    size = len(content)
    count = size // itemsize
    raw_end = first * count  # the raw planes' bytes, at the start of the payload
    start = len(_object_prefix(kind, size, encoded.coding))
    room = start + size + _HEADER_SLACK
    blob = allocate(room) if allocate is not None else np.empty(room, dtype=np.uint8)
    later = _scratch(4, (itemsize - first) * count).reshape(itemsize - first, count)  # planes first.. on
    split_planes_into(
        content, itemsize, [blob[start + i * count : start + (i + 1) * count] for i in range(first)] + list(later)
    )
    frames = [
        _paying(zstd_compress(plane, policy.level, fast_planes=policy.fast_planes), count, policy)
        if pending.pays[index]
        else None
        for index, plane in enumerate(later, start=first)
    ]
    settled = _planes_encoded(content, itemsize, [None] * first + frames, policy)
    coding, parts, payload_size = settled.coding, settled._parts, settled.payload_size
    if coding["codec"] == "raw":
        raw_end = 0  # the estimate was wrong and nothing saves enough: the chunk is stored raw
    if pending.outer is not None:
        coding = {**pending.outer, "inner": coding}
    header = _object_prefix(kind, size, coding)
    if len(header) != start and raw_end:
        blob[len(header) : len(header) + raw_end] = blob[start : start + raw_end].copy()
    start = len(header)
    blob[:start] = np.frombuffer(header, dtype=np.uint8)
    position = start + raw_end
    for width, part in parts[first if raw_end else 0 :]:  # (the raw planes were split into place)
        n = part[2] if width else len(part)
        source = later[part[1] - first] if width else _bytes_of(part)
        blob[position : position + n] = source
        position += n
    encoded._parts = parts
    encoded.coding, encoded.payload_size, encoded.pending = coding, payload_size, None
    return blob[:position].data


def encode_payload(data: Buffer, policy: CodingPolicy, itemsize: int = 1) -> tuple[dict[str, Any], bytes]:
    """A coding and its payload for ``data`` (no delta): planes, zstd or raw."""
    encoded = encode_chunk(data, policy, itemsize)
    return encoded.coding, encoded.payload()


# --- decoding ------------------------------------------------------------------------------

# Fills its second argument with the decoded content of the base named by the first; raises
# FormatError when the base is not exactly that long. When the third is true it returns the
# base's moves (None where the base is not a 2-byte delta).
BaseInto = Callable[[str, memoryview, bool], "np.ndarray | None"]


def decode_into(
    coding: dict[str, Any], payload: Buffer, out: memoryview, base_into: BaseInto, want_moves: bool = False
) -> np.ndarray | None:
    """Decode ``payload`` into ``out``, which is exactly the content's size. With
    ``want_moves``, return the content's moves when it is a 2-byte delta (else None)."""
    codec = coding.get("codec")
    expected_keys = _CODING_KEYS.get(codec) if isinstance(codec, str) else None
    if expected_keys is None:
        raise FormatError(f"unknown codec {codec!r}")
    if set(coding) != expected_keys:
        # Every byte of a header counts: an unknown or missing field is damage, not news.
        raise FormatError(f"{codec} coding has fields {sorted(coding)}, expected {sorted(expected_keys)}")
    target = np.frombuffer(out, dtype=np.uint8)
    size = len(target)
    if codec == "raw":
        if len(payload) != size:
            raise FormatError(f"raw payload holds {len(payload)} bytes, expected {size}")
        target[:] = _bytes_of(payload)
    elif codec == "zstd":
        zstd_decompress_into(payload, target)
    elif codec == "planes":
        _decode_planes(coding, payload, target)
    elif codec == "delta":
        base_id, inner, width = coding.get("base"), coding.get("inner"), coding.get("itemsize")
        if not isinstance(base_id, str) or not isinstance(inner, dict):
            raise FormatError("delta coding needs a base id and an inner coding")
        if width not in _UINT:
            raise FormatError(f"delta coding: bad itemsize {width!r}")
        inner_codec = inner.get("codec")
        if inner_codec not in ("raw", "zstd", "planes", "ans"):
            raise FormatError(f"delta coding: inner codec {inner_codec!r} not allowed")
        contextual = inner_codec == "ans"
        if contextual and (width != 2 or size % 2):
            raise FormatError(f"ans coding needs 2-byte elements, not {width} over {size} bytes")
        # The base first: its own decoding may use this thread's scratch buffers.
        base_moves = base_into(base_id, out, contextual and inner.get("moves") is True)
        if inner_codec == "planes" and inner.get("itemsize") == width and not (want_moves and width == 2):
            # Nobody needs the difference itself: its planes are added to the base as joined.
            add_joined_unzigzag_into(target, _planes_of(inner, payload, size), width)
            return None
        z = _scratch(0, size)
        if contextual:
            entropy.decode_into(inner, _bytes_of(payload).data, target.view(np.uint16), base_moves, z.view(np.uint16))
        else:
            decode_into(inner, payload, z.data, _no_base)
        moves = entropy.moves_of(z.view(np.uint16)) if want_moves and width == 2 and size % 2 == 0 else None
        add_unzigzag_into(target, z, width, _scratch(1, size))
        return moves
    elif codec == "xor":
        base_id, inner = coding.get("base"), coding.get("inner")
        if not isinstance(base_id, str) or not isinstance(inner, dict) or inner.get("codec") in DELTA_CODECS:
            raise FormatError("xor coding needs a base id and an inner coding")
        delta = np.empty(size, dtype=np.uint8)
        decode_into(inner, payload, delta.data, _no_base)
        base_into(base_id, out, False)
        np.bitwise_xor(target, delta, out=target)
    else:
        raise FormatError(f"unknown codec {codec!r}")
    return None


_CODING_KEYS = {
    "raw": {"codec"},
    "zstd": {"codec"},
    "planes": {"codec", "itemsize", "planes"},
    "delta": {"codec", "base", "itemsize", "depth", "inner"},
    "xor": {"codec", "base", "inner"},
}


def _decode_planes(coding: dict[str, Any], payload: Buffer, target: np.ndarray) -> None:
    join_planes_into(_planes_of(coding, payload, len(target)), coding["itemsize"], target)


def _planes_of(coding: dict[str, Any], payload: Buffer, size: int) -> list[Buffer | np.ndarray]:
    """The byte planes (and the tail) of a planes coding of ``size`` bytes: raw ones as views
    of ``payload``, compressed ones decompressed into this thread's scratch (slot 3)."""
    itemsize = coding.get("itemsize")
    descriptors = coding.get("planes")
    if not isinstance(itemsize, int) or isinstance(itemsize, bool) or not 1 < itemsize <= 16:
        raise FormatError(f"planes coding: bad itemsize {itemsize!r}")
    if not isinstance(descriptors, list) or len(descriptors) != itemsize + 1:
        raise FormatError("planes coding: wrong number of planes")
    plane_sizes = [size // itemsize] * itemsize + [size % itemsize]
    rows: np.ndarray | None = None  # the thread's scratch, a row per compressed plane
    planes: list[Buffer | np.ndarray] = []
    view = memoryview(payload)
    offset = 0
    for descriptor, plane_size in zip(descriptors, plane_sizes):
        if not isinstance(descriptor, dict) or set(descriptor) != {"codec", "length"}:
            raise FormatError("planes coding: a plane needs exactly a codec and a length")
        length = descriptor.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0 or offset + length > len(view):
            raise FormatError("planes coding: plane lengths exceed the payload")
        part = view[offset : offset + length]
        plane_codec = descriptor.get("codec")
        if plane_codec == "raw":
            if length != plane_size:
                raise FormatError(f"raw plane holds {length} bytes, expected {plane_size}")
            planes.append(part)
        elif plane_codec == "zstd" and len(planes) < itemsize:
            if rows is None:
                rows = _scratch(3, itemsize * plane_size).reshape(itemsize, plane_size)
            zstd_decompress_into(part, rows[len(planes)])
            planes.append(rows[len(planes)])
        elif plane_codec == "zstd":
            planes.append(zstd_decompress(part, plane_size))  # the tail: a few bytes
        else:
            raise FormatError(f"planes coding: unknown plane codec {plane_codec!r}")
        offset += length
    if offset != len(view):
        raise FormatError("planes coding: payload has trailing bytes")
    return planes


def _no_base(object_id: str, out: memoryview, want_moves: bool) -> None:
    raise FormatError("a delta's inner coding cannot itself be a delta")


# The decoded content of a base id, and its moves when the second argument asks for them.
LoadBase = Callable[[str, bool], "tuple[Buffer, np.ndarray | None]"]


def decode_payload(coding: dict[str, Any], payload: Buffer, size: int, load_base: LoadBase) -> bytes:
    """Invert the coding; ``load_base`` gives a base's content (and moves, when asked)."""
    if not 0 <= size <= MAX_OBJECT_SIZE:
        raise FormatError(f"size {size} out of range")
    codec = coding.get("codec")

    def base_into(base_id: str, out: memoryview, want_moves: bool) -> np.ndarray | None:
        content, moves = load_base(base_id, want_moves)
        base = _bytes_of(content)
        target = np.frombuffer(out, dtype=np.uint8)
        if codec == "xor":  # early deltas: base zero-padded or cut to length
            n = min(len(base), len(target))
            target[:n] = base[:n]
            target[n:] = 0
        elif len(base) != len(target):
            raise FormatError(f"delta base {base_id} holds {len(base)} bytes, expected {len(target)}")
        else:
            target[:] = base
        return moves

    out = bytearray(size)
    decode_into(coding, payload, memoryview(out), base_into)
    return bytes(out)
