"""The storage interface every backend implements, and the one validator for keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import FormatError

TEMP_MARKER = ".tmp-"
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe storage key, else raise FormatError.

    Keys are relative posix paths whose segments start with a letter, digit or underscore
    (so no ``..``, no hidden or temporary names) and hold only ``[A-Za-z0-9_.-]``.
    """
    if not isinstance(key, str) or not key:
        raise FormatError(f"invalid storage key {key!r}: empty")
    for segment in key.split("/"):
        if not _SEGMENT_RE.match(segment) or TEMP_MARKER in segment:
            raise FormatError(f"invalid storage key {key!r}: bad segment {segment!r}")
    return key


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend guarantees; callers pick their protocol from this, not from its type."""

    atomic_create: bool  # write(create_only=True) is race-free between processes
    conditional_replace: bool  # compare_and_swap is race-free between processes
    consistent_listing: bool  # list() sees every completed write at once
    local: bool  # keys are files on a local disk (LMDB, hard links and mmap are allowed)


@dataclass(frozen=True, slots=True)
class KeyStat:
    size: int
    mtime: float  # seconds since the epoch


@runtime_checkable
class Backend(Protocol):
    """Bytes under keys. Writes are all-or-nothing: a reader never sees half an object."""

    capabilities: Capabilities

    @property
    def location(self) -> str: ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        """Store ``data`` at ``key``. With ``create_only``, raise PreconditionFailedError if the
        key exists (and leave it unchanged)."""

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        """Set ``key`` to ``new`` (None deletes) only if it holds ``expected`` (None: absent);
        otherwise raise PreconditionFailedError."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (a folder), recursively; temporary files are hidden."""

    def stat(self, key: str) -> KeyStat | None: ...

    def close(self) -> None: ...
