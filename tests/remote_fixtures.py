"""Test doubles for the remote tests: backends that fail or race on purpose, a strictly atomic
in-memory fsspec filesystem, and small training-like histories.

These are real implementations of the Backend protocol and of an fsspec filesystem, not mocks:
the code under test calls them exactly as it calls the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.memory import MemoryFileSystem

import ckptrepo
from ckptrepo.backends.base import Backend, BackendWrapper, KeyStat
from ckptrepo.config import Chunking, Config
from ckptrepo.errors import BackendError

# Small chunks: a few hundred KiB of checkpoint become dozens of objects, so a transfer has
# many writes to fail between and takes the listing path of the presence check.
SMALL_CHUNKS = Config(chunking=Chunking(tensor_chunk_size=16 << 10))


def training_state(step: int, size: int = 1 << 15) -> dict[str, Any]:
    """Weights that drift a little per step (stored as deltas against the parent), an
    optimizer moment that changes fully, and a few scalars."""
    weights = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    weights += np.float32(1e-3 * step) * np.random.default_rng(step).standard_normal(size).astype(np.float32)
    moment = np.random.default_rng((step, 1)).standard_normal(size // 4).astype(np.float32)
    return {"model": {"w": weights, "b": np.arange(8, dtype=np.int64) * step},
            "optimizer": {"exp_avg": moment}, "step": step}


def make_history(repo: ckptrepo.Repository, steps: range, branch: str | None = None) -> list[ckptrepo.Commit]:
    return [repo.commit(training_state(s), step=s, branch=branch, metrics={"loss": 1.0 / (s + 1)}) for s in steps]


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (np.array_equal(a["model"]["w"], b["model"]["w"]) and np.array_equal(a["model"]["b"], b["model"]["b"])
            and np.array_equal(a["optimizer"]["exp_avg"], b["optimizer"]["exp_avg"]) and a["step"] == b["step"])


class FaultyBackend(BackendWrapper):
    """The ``fail_at``-th write of a key under ``prefix`` fails:

    - ``"fail"``: nothing is written, a permanent BackendError is raised;
    - ``"truncate"``: the first half of the data lands at the key (a store without atomic
      writes, cut off mid-upload), then a permanent BackendError is raised;
    - ``"transient"``: nothing is written, a transient BackendError is raised (once);
    - ``"read"``: the ``fail_at``-th whole read of such a key fails instead (a download cut off).
    """

    def __init__(self, inner: Backend, *, fail_at: int, mode: str = "fail", prefix: str = "objects/") -> None:
        super().__init__(inner)
        assert mode in ("fail", "truncate", "transient", "read")
        self.reads = 0
        self.fail_at = fail_at
        self.mode = mode
        self.prefix = prefix
        self.writes = 0
        self.failed_key: str | None = None
        self._lock = threading.Lock()

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if self.mode == "read" and key.startswith(self.prefix) and offset == 0 and length is None:
            with self._lock:
                self.reads += 1
                hit = self.reads == self.fail_at
            if hit:
                raise BackendError(f"injected failure reading {key}")
        return self.inner.read(key, offset, length)

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        if key.startswith(self.prefix) and self.mode != "read":
            with self._lock:
                self.writes += 1
                hit = self.writes == self.fail_at
            if hit:
                self.failed_key = key
                if self.mode == "truncate":
                    self.inner.write(key, bytes(data)[: len(data) // 2], create_only=create_only)
                raise BackendError(f"injected {self.mode} writing {key}", transient=self.mode == "transient")
        self.inner.write(key, data, create_only=create_only)


class GatedBackend(BackendWrapper):
    """Calls ``gate(key)`` just before a conditional update of a key under ``prefix``, so a
    test can line two writers up at the instant that decides between them."""

    def __init__(self, inner: Backend, gate: Callable[[str], None], prefix: str = "refs/branches/") -> None:
        super().__init__(inner)
        self.gate = gate
        self.prefix = prefix

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        if create_only and key.startswith(self.prefix):
            self.gate(key)
        self.inner.write(key, data, create_only=create_only)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        if key.startswith(self.prefix):
            self.gate(key)
        self.inner.compare_and_swap(key, expected, new)


class CountingBackend(BackendWrapper):
    """Counts the operations that reach the store."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._count("read")
        return super().read(key, offset, length)

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self._count("write")
        super().write(key, data, create_only=create_only)

    def stat(self, key: str) -> KeyStat | None:
        self._count("stat")
        return super().stat(key)


class StrictMemoryFileSystem(MemoryFileSystem):
    """An in-memory fsspec filesystem whose create-only write is exactly atomic, and whose
    reads yield the GIL, so that unprotected read-compare-write races really interleave.
    Each instance has its own store (MemoryFileSystem shares one per process)."""

    protocol = "strictmem"
    cachable = False  # a new, empty filesystem per construction

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = {}
        self.pseudo_dirs = [""]
        self._create_lock = threading.Lock()

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self._create_lock:
            if mode == "create" and self.exists(path):
                raise FileExistsError(path)
            super().pipe_file(path, value, mode="overwrite", **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        time.sleep(0.0002)
        return super().cat_file(path, start, end, **kwargs)


fsspec.register_implementation("strictmem", StrictMemoryFileSystem, clobber=True)
