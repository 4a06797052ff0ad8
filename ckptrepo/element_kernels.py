"""The codec's per-element loops, compiled: byte planes split and joined in one pass,
zigzag differences taken and added back in one pass, and a delta's planes joined and added
back to its base in one pass, for elements of 2, 4 and 8 bytes.

They give exactly the bytes of the numpy forms in codec.py, which need a pass (and often a
temporary) per byte plane or per operation: here 3-5x less CPU per GiB (docs/benchmarks.md).
Signatures are explicit, so importing the module loads (or, the first time on a machine,
compiles and caches) every loop at once, and inputs are declared read-only so buffers of
bytes and writable arrays take the same compiled code. The loops do not check bounds: the
callers in codec.py check every length first. codec.py uses the module only once
``compiled.warm`` has loaded it.
"""

# The loops are typed by their signatures, not annotated.
# mypy: disable-error-code="no-untyped-def, no-untyped-call"

from __future__ import annotations

import numpy as np
from numba import njit, types

_U8 = types.Array(types.uint8, 1, "C")
_U8_IN = types.Array(types.uint8, 1, "C", readonly=True)
_WIDE = {2: types.uint16, 4: types.uint32, 8: types.uint64}


def _wide(width, readonly=False):
    return types.Array(_WIDE[width], 1, "C", readonly=readonly)


def _compile(signature):
    return njit(signature, cache=True, nogil=True)


# --- byte planes: plane i holds byte i (little-endian) of every element --------------------


@_compile(types.void(_wide(2, True), _U8, _U8))
def split2(src, p0, p1):
    for i in range(src.shape[0]):
        v = src[i]
        p0[i] = v & 0xFF
        p1[i] = v >> 8


@_compile(types.void(_wide(4, True), _U8, _U8, _U8, _U8))
def split4(src, p0, p1, p2, p3):
    for i in range(src.shape[0]):
        v = src[i]
        p0[i] = v & 0xFF
        p1[i] = (v >> 8) & 0xFF
        p2[i] = (v >> 16) & 0xFF
        p3[i] = v >> 24


@_compile(types.void(_wide(8, True), _U8, _U8, _U8, _U8, _U8, _U8, _U8, _U8))
def split8(src, p0, p1, p2, p3, p4, p5, p6, p7):
    for i in range(src.shape[0]):
        v = src[i]
        p0[i] = v & 0xFF
        p1[i] = (v >> 8) & 0xFF
        p2[i] = (v >> 16) & 0xFF
        p3[i] = (v >> 24) & 0xFF
        p4[i] = (v >> 32) & 0xFF
        p5[i] = (v >> 40) & 0xFF
        p6[i] = (v >> 48) & 0xFF
        p7[i] = v >> 56


@_compile(types.void(_U8_IN, _U8_IN, _wide(2)))
def join2(p0, p1, out):
    for i in range(out.shape[0]):
        out[i] = np.uint16(p0[i]) | (np.uint16(p1[i]) << 8)


@_compile(types.void(_U8_IN, _U8_IN, _U8_IN, _U8_IN, _wide(4)))
def join4(p0, p1, p2, p3, out):
    for i in range(out.shape[0]):
        out[i] = np.uint32(p0[i]) | (np.uint32(p1[i]) << 8) | (np.uint32(p2[i]) << 16) | (np.uint32(p3[i]) << 24)


@_compile(types.void(_U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _wide(8)))
def join8(p0, p1, p2, p3, p4, p5, p6, p7, out):
    for i in range(out.shape[0]):
        low = np.uint32(p0[i]) | (np.uint32(p1[i]) << 8) | (np.uint32(p2[i]) << 16) | (np.uint32(p3[i]) << 24)
        high = np.uint32(p4[i]) | (np.uint32(p5[i]) << 8) | (np.uint32(p6[i]) << 16) | (np.uint32(p7[i]) << 24)
        out[i] = np.uint64(low) | (np.uint64(high) << np.uint64(32))


SPLIT = {2: split2, 4: split4, 8: split8}
JOIN = {2: join2, 4: join4, 8: join8}


# --- zigzag differences: z = zigzag(new - base) modulo 2**(8 * width) -----------------------


@_compile(types.void(_wide(2, True), _wide(2, True), _wide(2)))
def zigzag2(new, base, z):
    for i in range(z.shape[0]):
        d = np.int16(new[i] - base[i])
        z[i] = np.uint16((d << 1) ^ (d >> 15))


@_compile(types.void(_wide(4, True), _wide(4, True), _wide(4)))
def zigzag4(new, base, z):
    for i in range(z.shape[0]):
        d = np.int32(new[i] - base[i])
        z[i] = np.uint32((d << 1) ^ (d >> 31))


@_compile(types.void(_wide(8, True), _wide(8, True), _wide(8)))
def zigzag8(new, base, z):
    for i in range(z.shape[0]):
        d = np.int64(new[i] - base[i])
        z[i] = np.uint64((d << 1) ^ (d >> 63))


@_compile(types.void(_wide(2), _wide(2, True)))
def unzigzag2(acc, z):
    for i in range(acc.shape[0]):
        v = z[i]
        acc[i] += np.uint16((v >> 1) ^ (np.uint16(0) - (v & 1)))


@_compile(types.void(_wide(4), _wide(4, True)))
def unzigzag4(acc, z):
    for i in range(acc.shape[0]):
        v = z[i]
        acc[i] += np.uint32((v >> 1) ^ (np.uint32(0) - (v & 1)))


@_compile(types.void(_wide(8), _wide(8, True)))
def unzigzag8(acc, z):
    for i in range(acc.shape[0]):
        v = z[i]
        acc[i] += (v >> np.uint64(1)) ^ (np.uint64(0) - (v & np.uint64(1)))


ZIGZAG = {2: zigzag2, 4: zigzag4, 8: zigzag8}
UNZIGZAG = {2: unzigzag2, 4: unzigzag4, 8: unzigzag8}


# --- a delta's byte planes added to its base in one pass: acc += unzigzag(join(planes)) -----


@_compile(types.void(_U8_IN, _U8_IN, _wide(2)))
def join_unzigzag2(p0, p1, acc):
    for i in range(acc.shape[0]):
        v = np.uint16(p0[i]) | (np.uint16(p1[i]) << 8)
        acc[i] += np.uint16((v >> 1) ^ (np.uint16(0) - (v & 1)))


@_compile(types.void(_U8_IN, _U8_IN, _U8_IN, _U8_IN, _wide(4)))
def join_unzigzag4(p0, p1, p2, p3, acc):
    for i in range(acc.shape[0]):
        v = np.uint32(p0[i]) | (np.uint32(p1[i]) << 8) | (np.uint32(p2[i]) << 16) | (np.uint32(p3[i]) << 24)
        acc[i] += np.uint32((v >> 1) ^ (np.uint32(0) - (v & 1)))


@_compile(types.void(_U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _U8_IN, _wide(8)))
def join_unzigzag8(p0, p1, p2, p3, p4, p5, p6, p7, acc):
    for i in range(acc.shape[0]):
        low = np.uint32(p0[i]) | (np.uint32(p1[i]) << 8) | (np.uint32(p2[i]) << 16) | (np.uint32(p3[i]) << 24)
        high = np.uint32(p4[i]) | (np.uint32(p5[i]) << 8) | (np.uint32(p6[i]) << 16) | (np.uint32(p7[i]) << 24)
        v = np.uint64(low) | (np.uint64(high) << np.uint64(32))
        acc[i] += (v >> np.uint64(1)) ^ (np.uint64(0) - (v & np.uint64(1)))


JOIN_UNZIGZAG = {2: join_unzigzag2, 4: join_unzigzag4, 8: join_unzigzag8}
