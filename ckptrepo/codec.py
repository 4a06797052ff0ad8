"""How one object's bytes are laid out on storage: a small header, then the coded payload.

Object file::

    b"CKO" + version byte (1)
    u32 little-endian: length of the header
    header: canonical JSON {"kind": ..., "size": <decoded bytes>, "coding": <coding>}
    payload

A coding is a JSON value, so new ones fit without a format break:

    {"codec": "raw"}                         payload is the content
    {"codec": "zstd"}                        payload is one zstd frame
    {"codec": "planes", "itemsize": k, "planes": [{"codec": "raw"|"zstd", "length": n}, ...]}
        the content's elements of k bytes split into k byte planes (plane i holds byte i of
        every element, then a last plane with the len % k trailing bytes); each plane stored
        one after the other, compressed only where that pays
    {"codec": "xor", "base": "<object id>", "inner": <coding>}
        decode ``inner``, then XOR it with the decoded base object (zero-padded to length)

The id of an object is the blake3 of its decoded content, so the coding can change without
the id changing.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from .errors import FormatError

MAGIC = b"CKO\x01"
_HEADER_LEN = struct.Struct("<I")
PREFIX_SIZE = len(MAGIC) + _HEADER_LEN.size
MAX_HEADER_SIZE = 1 << 20
# Every size claimed by a header or frame is checked against this before allocating.
MAX_OBJECT_SIZE = 1 << 30
KINDS = ("chunk", "manifest", "commit")


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
    def base(self) -> str | None:
        """The id of the object this one is a delta against, if any."""
        if self.coding.get("codec") == "xor":
            return str(self.coding["base"])
        return None


def encode_object(kind: str, payload: bytes | memoryview, size: int, coding: dict[str, Any]) -> list[bytes | memoryview]:
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    return Header(kind=kind, size=size, coding=coding)


def split_object(data: bytes) -> tuple[Header, memoryview]:
    hlen = parse_prefix(data[:PREFIX_SIZE])
    end = PREFIX_SIZE + hlen
    if len(data) < end:
        raise FormatError("object file is truncated inside its header")
    return parse_header(data[PREFIX_SIZE:end]), memoryview(data)[end:]


# --- codings -------------------------------------------------------------------------------

_ZSTD_LEVEL_DEFAULT = 3


def zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    # write_content_size lets the reader check the declared size before it allocates.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(frame: bytes | memoryview, expected_size: int) -> bytes:
    """Decompress one frame that must yield exactly ``expected_size`` bytes.

    The frame's declared size is checked first: python-zstandard would otherwise trust it and
    allocate whatever a hostile frame claims.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if declared != expected_size:
        raise FormatError(f"zstd frame declares {declared} bytes, expected {expected_size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if len(out) != expected_size:
        raise FormatError(f"zstd frame yielded {len(out)} bytes, expected {expected_size}")
    return out


def split_planes(data: bytes | memoryview, itemsize: int) -> list[memoryview]:
    """Byte planes of ``data``: plane i holds byte i of each element, then the tail bytes."""
    arr = np.frombuffer(data, dtype=np.uint8)
    whole = len(arr) - len(arr) % itemsize
    matrix = arr[:whole].reshape(-1, itemsize)
    planes = [memoryview(np.ascontiguousarray(matrix[:, i]).data) for i in range(itemsize)]
    planes.append(memoryview(arr[whole:].data))
    return planes


def join_planes(planes: list[bytes], itemsize: int, size: int) -> bytes:
    whole = size - size % itemsize
    out = np.empty(size, dtype=np.uint8)
    matrix = out[:whole].reshape(-1, itemsize)
    for i in range(itemsize):
        matrix[:, i] = np.frombuffer(planes[i], dtype=np.uint8)
    out[whole:] = np.frombuffer(planes[itemsize], dtype=np.uint8)
    return out.tobytes()


def xor_bytes(data: bytes | memoryview, base: bytes | memoryview) -> bytes:
    a = np.frombuffer(data, dtype=np.uint8)
    b = np.frombuffer(base, dtype=np.uint8)
    out = a.copy()
    n = min(len(a), len(b))
    np.bitwise_xor(out[:n], b[:n], out=out[:n])
    return out.tobytes()


@dataclass(frozen=True, slots=True)
class CodingPolicy:
    """How the writer codes new objects (from config.yaml's ``compression`` section)."""

    level: int = _ZSTD_LEVEL_DEFAULT
    # A coded form is kept only if it is at most this fraction of the raw size.
    min_saving: float = 0.97
    planes: bool = True
    # XOR against the parent's chunk when smaller; a full object at least every N versions.
    delta: bool = True
    max_delta_chain: int = 8


def encode_payload(
    data: bytes | memoryview, policy: CodingPolicy, itemsize: int = 1
) -> tuple[dict[str, Any], bytes | memoryview]:
    """Pick a coding for ``data``: planes for multi-byte elements, else zstd, else raw."""
    size = len(data)
    if size == 0:
        return {"codec": "raw"}, b""
    if policy.planes and itemsize > 1 and size >= 4 * itemsize:
        return _encode_planes(data, itemsize, policy)
    frame = zstd_compress(data, policy.level)
    if len(frame) <= size * policy.min_saving:
        return {"codec": "zstd"}, frame
    return {"codec": "raw"}, data


def _encode_planes(
    data: bytes | memoryview, itemsize: int, policy: CodingPolicy
) -> tuple[dict[str, Any], bytes]:
    descriptors: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    for plane in split_planes(data, itemsize):
        coding, payload = encode_payload(plane, policy, itemsize=1)
        descriptors.append({"codec": coding["codec"], "length": len(payload)})
        parts.append(payload)
    return {"codec": "planes", "itemsize": itemsize, "planes": descriptors}, b"".join(parts)


def decode_payload(
    coding: dict[str, Any],
    payload: bytes | memoryview,
    size: int,
    load_base: Callable[[str], bytes],
) -> bytes:
    """Invert :func:`encode_payload`; ``load_base`` returns the decoded content of a base id."""
    codec = coding.get("codec")
    if codec == "raw":
        if len(payload) != size:
            raise FormatError(f"raw payload holds {len(payload)} bytes, expected {size}")
        return bytes(payload)
    if codec == "zstd":
        return zstd_decompress(payload, size)
    if codec == "planes":
        return _decode_planes(coding, payload, size)
    if codec == "xor":
        base_id = coding.get("base")
        inner = coding.get("inner")
        if not isinstance(base_id, str) or not isinstance(inner, dict):
            raise FormatError("xor coding needs a base id and an inner coding")
        delta = decode_payload(inner, payload, size, load_base)
        return xor_bytes(delta, load_base(base_id))
    raise FormatError(f"unknown codec {codec!r}")


def _decode_planes(coding: dict[str, Any], payload: bytes | memoryview, size: int) -> bytes:
    itemsize = coding.get("itemsize")
    descriptors = coding.get("planes")
    if not isinstance(itemsize, int) or not 1 < itemsize <= 16:
        raise FormatError(f"planes coding: bad itemsize {itemsize!r}")
    if not isinstance(descriptors, list) or len(descriptors) != itemsize + 1:
        raise FormatError("planes coding: wrong number of planes")
    plane_sizes = [size // itemsize] * itemsize + [size % itemsize]
    planes: list[bytes] = []
    offset = 0
    for descriptor, plane_size in zip(descriptors, plane_sizes):
        length = descriptor.get("length") if isinstance(descriptor, dict) else None
        if not isinstance(length, int) or length < 0 or offset + length > len(payload):
            raise FormatError("planes coding: plane lengths exceed the payload")
        part = payload[offset : offset + length]
        planes.append(decode_payload({"codec": descriptor.get("codec")}, part, plane_size, _no_base))
        offset += length
    if offset != len(payload):
        raise FormatError("planes coding: payload has trailing bytes")
    return join_planes(planes, itemsize, size)


def _no_base(object_id: str) -> bytes:
    raise FormatError("a plane cannot be a delta")
