"""Object ids: blake3-256 of an object's decoded content, written as 64 lowercase hex digits."""

from __future__ import annotations

import re

import blake3

from .errors import FormatError

ID_BYTES = 32
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class ObjectId(str):
    """The one id type. It is the hex string itself (so ``commit.id`` prints and compares as
    hex), validated once at construction: parse at the boundary, then trust the type."""

    __slots__ = ()

    def __new__(cls, value: str) -> ObjectId:
        if isinstance(value, ObjectId):
            return value
        if not isinstance(value, str) or not _HEX_RE.match(value):
            raise FormatError(f"not an object id (64 lowercase hex digits): {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ObjectId:
        return cls(hash_hex(data))

    @property
    def hex(self) -> str:
        return str.__str__(self)

    @property
    def short(self) -> str:
        return self[:12]

    def __repr__(self) -> str:
        return f"ObjectId({self.short}…)"


def hash_hex(data: bytes | bytearray | memoryview) -> str:
    # blake3 releases the GIL on large inputs, so the data path's threads hash in parallel.
    return blake3.blake3(data).hexdigest()
