"""The parallel data path: chunk, hash, code and write (or read, decode and verify) whole
buffers in a small thread pool, with the bytes in flight bounded by a window.

blake3, zstd and numpy's copies release the GIL, so a few threads keep every core busy;
memory stays bounded by the window, not by the checkpoint's size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fastcdc

from .config import Chunking
from .ids import ObjectId
from .objects import ChunkRef, Entry
from .store import ObjectStore, PutResult

DEFAULT_WINDOW_BYTES = 256 << 20
PREFETCH_CHUNKS = 4


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


# A chunk on its way to the store: the future of its write, and its size.
Pending = tuple[Future[PutResult], int]


class _Window:
    """Admits work while fewer than ``limit`` bytes are in flight (always at least one item)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.in_flight and self.in_flight + n > self.limit:
                self.cond.wait()
            self.in_flight += n

    def release(self, n: int) -> None:
        with self.cond:
            self.in_flight -= n
            self.cond.notify_all()


@dataclass
class WriteStats:
    new_chunks: int = 0
    reused_chunks: int = 0
    stored_bytes: int = 0

    def add(self, result: PutResult) -> None:
        if result.new:
            self.new_chunks += 1
            self.stored_bytes += result.stored_bytes
        else:
            self.reused_chunks += 1


class ChunkWriter:
    """Stores buffers as chunks. Results come back in order; errors surface in ``refs``."""

    def __init__(
        self,
        store: ObjectStore,
        pool: ThreadPoolExecutor,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.on_progress = on_progress
        self.store = store
        self.pool = pool
        self.window = _Window(window_bytes)
        self.stats = WriteStats()
        self._lock = threading.Lock()

    def _submit(self, piece: memoryview, itemsize: int, base: ObjectId | None) -> Pending:
        size = len(piece)
        self.window.acquire(size)

        def work() -> PutResult:
            try:
                result = self.store.put("chunk", piece, itemsize=itemsize, base=base)
            finally:
                self.window.release(size)
            with self._lock:
                self.stats.add(result)
            if self.on_progress is not None:
                self.on_progress(size)
            return result

        return self.pool.submit(work), size

    def write_fixed(
        self, data: memoryview, chunk_size: int, itemsize: int = 1, bases: Sequence[ObjectId] | None = None
    ) -> list[Pending]:
        """Chunks at fixed offsets: chunk i is ``data[i*chunk_size:(i+1)*chunk_size]``, so a
        tensor's chunk i lines up with chunk i of the same tensor in the parent commit."""
        futures = []
        for i, start in enumerate(range(0, len(data), chunk_size)):
            base = bases[i] if self.store.policy.delta and bases and i < len(bases) else None
            futures.append(self._submit(data[start : start + chunk_size], itemsize, base))
        return futures

    def write_cdc(self, data: memoryview, chunking: Chunking) -> list[Pending]:
        """Content-defined chunks, so an insertion moves only the chunks around it."""
        if len(data) == 0:
            return []
        cuts = fastcdc.fastcdc(
            data, chunking.file_min_size, chunking.file_avg_size, chunking.file_max_size, fat=False
        )
        return [self._submit(data[c.offset : c.offset + c.length], 1, None) for c in cuts]

    @staticmethod
    def resolve(pending: list[Pending]) -> tuple[ChunkRef, ...]:
        """Wait for the chunks of one entry; the first failure is raised here."""
        return tuple(ChunkRef(future.result().id, size) for future, size in pending)


class ChunkReader:
    def __init__(self, store: ObjectStore, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self.pool = pool

    def _check_present(self, entry: Entry) -> None:
        # Allocation follows what the manifest claims; only claims backed by stored chunks
        # are believed, so a hostile manifest cannot make us allocate what it does not hold.
        for chunk in entry.chunks:
            if not self.store.has(chunk.id):
                from .errors import ObjectNotFoundError

                raise ObjectNotFoundError(chunk.id.hex, self.store.backend.location)

    def read_entry(self, entry: Entry) -> bytearray:
        self._check_present(entry)
        out = bytearray(entry.size)
        view = memoryview(out)
        offsets = []
        position = 0
        for chunk in entry.chunks:
            offsets.append(position)
            position += chunk.size

        def fill(index: int) -> None:
            chunk = entry.chunks[index]
            data = self.store.get(chunk.id, kind="chunk", expected_size=chunk.size)
            view[offsets[index] : offsets[index] + chunk.size] = data

        for future in [self.pool.submit(fill, i) for i in range(len(entry.chunks))]:
            future.result()
        return out

    def iter_entry(self, entry: Entry) -> Iterator[bytes]:
        """The entry's chunks in order, a few read ahead in the pool."""
        self._check_present(entry)
        pending: deque[Future[bytes]] = deque()
        chunks = iter(entry.chunks)
        for chunk in chunks:
            pending.append(self.pool.submit(self.store.get, chunk.id, kind="chunk", expected_size=chunk.size))
            if len(pending) >= PREFETCH_CHUNKS:
                break
        while pending:
            data = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(self.pool.submit(self.store.get, nxt.id, kind="chunk", expected_size=nxt.size))
            yield data
