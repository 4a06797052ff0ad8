"""The storage interface every backend implements, and the one validator for keys."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

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
        key exists (and leave it unchanged). ``data`` is the caller's again when this returns
        (the object store reuses the buffer): copy what must outlive the call."""

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        """Set ``key`` to ``new`` (None deletes) only if it holds ``expected`` (None: absent);
        otherwise raise PreconditionFailedError."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (a folder), recursively; temporary files are hidden."""

    def stat(self, key: str) -> KeyStat | None: ...

    def close(self) -> None: ...


def list_sizes(backend: Any, prefix: str = "") -> dict[str, int]:
    """Keys under ``prefix`` with their sizes: one listing where the backend can say sizes
    while listing (object stores), else a listing and a stat per key (local disks)."""
    sized = getattr(backend, "list_sizes", None)
    if sized is not None:
        return dict(sized(prefix))
    out: dict[str, int] = {}
    for key in backend.list(prefix):
        stat = backend.stat(key)
        if stat is not None:
            out[key] = stat.size
    return out


@runtime_checkable
class StagingBackend(Protocol):
    """A backend that can write many objects first and make them durable and visible
    together (local disks; see ``LocalBackend.publish``)."""

    def stage(self, key: str, data: bytes | memoryview) -> Any: ...

    def publish(self, staged: Sequence[Any], map_fn: Callable[..., Iterable[Any]] = map) -> list[bool]: ...

    def discard(self, staged: Sequence[Any]) -> None: ...


def read_whole(backend: Any, key: str, allocate: Callable[[int], np.ndarray]) -> memoryview:
    """All of ``key``: read into ``allocate(size)`` or mapped where the backend can (local
    disks: the caller reuses one buffer rather than a new bytes object, and new pages, per
    object; a large file in the page cache is mapped instead), else the backend's own bytes.
    Wrappers do not pass ``read_into`` through, so a wrapper that changes ``read`` (the
    tests' fault injectors) is always the one asked."""
    read_into = getattr(backend, "read_into", None)
    if read_into is not None:
        return memoryview(read_into(key, allocate))
    return memoryview(backend.read(key))


class BackendWrapper:
    """Passes every call through to ``inner``. Decorators (retries, caching, and the fault
    injectors of the tests) subclass it and override only the calls they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities

    @property
    def location(self) -> str:
        return self.inner.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(key, offset, length)

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self.inner.write(key, data, create_only=create_only)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        self.inner.compare_and_swap(key, expected, new)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return list_sizes(self.inner, prefix)

    def stat(self, key: str) -> KeyStat | None:
        return self.inner.stat(key)

    def close(self) -> None:
        self.inner.close()
