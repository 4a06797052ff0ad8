"""The parallel data path: chunk, hash, code and write (or read, decode and verify) whole
buffers in a small thread pool, with the bytes in flight bounded by a window.

blake3, zstd and numpy's copies release the GIL, so a few threads keep every core busy;
memory stays bounded by the window, not by the checkpoint's size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fastcdc
import numpy as np

from .config import Chunking
from .errors import FormatError, ObjectNotFoundError
from .ids import ObjectId, hash_hex
from .objects import ChunkRef, Entry
from .store import ObjectStore, PutResult

DEFAULT_WINDOW_BYTES = 256 << 20
PREFETCH_CHUNKS = 4
# Entries larger than this have their chunks' sizes checked before their buffer is allocated.
_TRUSTED_ENTRY_BYTES = 64 << 20
# Entries up to this size are read several to a pool task (up to _BATCH_BYTES or
# _BATCH_ENTRIES a task), gathered from wherever they sit in the manifest: their decoding is
# mostly Python, so a task each only had the pool's threads handing the GIL to each other
# (the 430 small tensors of a 1 GiB state read in 0.10-0.16 s so, against 0.18-0.21 s).
_BATCHED_ENTRY_BYTES = 256 << 10
_BATCH_BYTES = 4 << 20
_BATCH_ENTRIES = 256


def uninitialized(size: int) -> memoryview:
    """A writable buffer whose bytes are about to be overwritten: bytearray(n) would first
    fill it with zeros, a pass over memory as costly as decoding into it."""
    return np.empty(size, dtype=np.uint8).data


def default_workers() -> int:
    # More threads than cores: a local write bypasses the page cache and waits for the disk,
    # and a thread waiting there leaves its core to another thread's hashing and coding.
    # Memory per thread is a few chunks.
    return max(4, min(16, 4 * (os.cpu_count() or 2)))


# A chunk on its way to the store: what the manifest will say of it once written.
Pending = Future[ChunkRef]


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
    """Stores buffers as chunks. Results come back in order; errors surface in ``resolve``.

    The chunks are durable and visible only after :meth:`publish` (the store's WriteBatch):
    call it before writing anything that names them. Used as a context manager, a writer
    that is left without publishing (an error) drops what it staged.
    """

    def __init__(
        self,
        store: ObjectStore,
        pool: ThreadPoolExecutor,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        on_progress: Callable[[int], None] | None = None,
        inline_max: int = 0,
    ) -> None:
        self.on_progress = on_progress
        self.inline_max = inline_max
        self.store = store
        self.pool = pool
        self.window = _Window(window_bytes)
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._batch = store.batch()
        self._submitted: list[Future[ChunkRef]] = []
        # A new commit: chunks the last one kept as delta bases may now make way.
        store.base_cache.new_generation()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # After a failure other chunks may still be on their way: stop those not started and
        # let the others finish, so nothing is staged after the batch is dropped.
        for future in self._submitted:
            future.cancel()
        wait(self._submitted)
        self._batch.discard()

    def publish(self) -> None:
        """Make every chunk written so far durable and visible (fsyncs in the pool)."""
        duplicate_bytes = self._batch.publish(self.pool.map)
        with self._lock:
            self.stats.stored_bytes -= duplicate_bytes

    def _submit(
        self, piece: memoryview, itemsize: int, base: ObjectId | None, remember: bool = False, dtype: str | None = None
    ) -> Pending:
        size = len(piece)
        self.window.acquire(size)

        def work() -> ChunkRef:
            try:
                result = self.store.put(
                    "chunk", piece, itemsize=itemsize, base=base, remember=remember, batch=self._batch, dtype=dtype
                )
            finally:
                self.window.release(size)
            with self._lock:
                self.stats.add(result)
            if self.on_progress is not None:
                self.on_progress(size)
            return ChunkRef(result.id, size)

        future = self.pool.submit(work)
        self._submitted.append(future)
        return future

    def _inline(self, data: memoryview) -> list[Pending] | None:
        """An entry small enough to live in the manifest: hashed here and copied (the
        caller's buffer may change once the entry is resolved), never written."""
        if not 0 < len(data) <= self.inline_max:
            return None
        content = bytes(data)
        future: Pending = Future()
        future.set_result(ChunkRef(ObjectId(hash_hex(content)), len(content), content))
        if self.on_progress is not None:
            self.on_progress(len(content))
        return [future]

    def write_fixed(
        self,
        data: memoryview,
        chunk_size: int,
        itemsize: int = 1,
        bases: Sequence[ObjectId] | None = None,
        dtype: str | None = None,
    ) -> list[Pending]:
        """Chunks at fixed offsets: chunk i is ``data[i*chunk_size:(i+1)*chunk_size]``, so a
        tensor's chunk i lines up with chunk i of the same tensor in the parent commit. An
        entry of at most ``inline_max`` bytes is one inline chunk. ``dtype`` (a manifest's
        name) steers the coding."""
        inline = self._inline(data)
        if inline is not None:
            return inline
        delta = self.store.policy.delta
        futures = []
        for i, start in enumerate(range(0, len(data), chunk_size)):
            base = bases[i] if delta and bases and i < len(bases) else None
            futures.append(self._submit(data[start : start + chunk_size], itemsize, base, delta, dtype))
        return futures

    def write_cdc(self, data: memoryview, chunking: Chunking) -> list[Pending]:
        """Content-defined chunks, so an insertion moves only the chunks around it. A file
        of at most ``inline_max`` bytes is one inline chunk."""
        if len(data) == 0:
            return []
        inline = self._inline(data)
        if inline is not None:
            return inline
        cuts = fastcdc.fastcdc(
            data, chunking.file_min_size, chunking.file_avg_size, chunking.file_max_size, fat=False
        )
        return [self._submit(data[c.offset : c.offset + c.length], 1, None) for c in cuts]

    @staticmethod
    def resolve(pending: list[Pending]) -> tuple[ChunkRef, ...]:
        """Wait for the chunks of one entry; the first failure is raised here."""
        return tuple(future.result() for future in pending)


def _chunk_targets(entry: Entry, out: memoryview) -> list[tuple[ChunkRef, memoryview]]:
    """Each chunk of ``entry`` with the slice of the entry's buffer it decodes into."""
    targets = []
    position = 0
    for chunk in entry.chunks:
        targets.append((chunk, out[position : position + chunk.size]))
        position += chunk.size
    return targets


class ChunkReader:
    """Reads entries back: every chunk decoded by a pool thread straight into the entry's
    final buffer (which a torch or numpy array then wraps without a copy), verified there."""

    def __init__(self, store: ObjectStore, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self.pool = pool

    def _check_present(self, entry: Entry) -> None:
        # Allocation follows what the manifest claims; only claims backed by stored chunks
        # are believed, so a hostile manifest cannot make us allocate what it does not hold.
        # For a large entry each distinct chunk's claimed size is also checked against its
        # stored header (one small read): 16 claims of 1 GiB on a 1-byte chunk allocate nothing.
        check_sizes = entry.size > _TRUSTED_ENTRY_BYTES
        checked: set[ObjectId] = set()
        for chunk in entry.stored_chunks:
            if not self.store.has(chunk.id):
                raise ObjectNotFoundError(chunk.id.hex, self.store.backend.location)
            if check_sizes and chunk.id not in checked:
                checked.add(chunk.id)
                stored = self.store.header(chunk.id).size
                if stored != chunk.size:
                    raise FormatError(
                        f"chunk {chunk.id.hex} holds {stored} bytes, the manifest claims {chunk.size}"
                    )

    def _check(self, entry: Entry) -> None:
        total = sum(chunk.size for chunk in entry.chunks)
        if total != entry.size:
            raise FormatError(f"entry chunks hold {total} bytes, the entry claims {entry.size}")
        self._check_present(entry)

    def _start(self, entry: Entry) -> tuple[memoryview, list[Future[None]]]:
        """Allocate the (checked) entry's buffer and submit the decoding of each chunk into
        its slice."""
        out = uninitialized(entry.size)
        futures = [
            self.pool.submit(self.store.chunk_into, chunk, target)
            for chunk, target in _chunk_targets(entry, out)
        ]
        return out, futures

    def _start_batch(self, entries: Sequence[Entry]) -> tuple[list[memoryview], Future[None]]:
        """Allocate the buffers of several small (checked) entries and submit one task that
        decodes them all, one after another."""
        outs = [uninitialized(entry.size) for entry in entries]

        def decode_all() -> None:
            for entry, out in zip(entries, outs):
                for chunk, target in _chunk_targets(entry, out):
                    self.store.chunk_into(chunk, target)

        return outs, self.pool.submit(decode_all)

    @staticmethod
    def _finish(futures: Sequence[Future[Any]]) -> None:
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()

    def read_entry(self, entry: Entry) -> memoryview:
        """The entry's content in a new writable buffer (torch.frombuffer and np.frombuffer
        wrap it without a copy)."""
        self._check(entry)
        out, futures = self._start(entry)
        self._finish(futures)
        return out

    def read_entries(
        self, entries: Iterable[tuple[str, Entry]], window_bytes: int = DEFAULT_WINDOW_BYTES
    ) -> Iterator[tuple[str, memoryview]]:
        """Entries read in parallel and yielded in order, at most ``window_bytes`` decoded
        ahead of the consumer (always at least one entry): small tensors, one chunk each, would
        otherwise be read one at a time."""
        items = list(entries)
        # Every entry is checked before any is decoded: the checks are many small calls that
        # release the GIL (index lookups, header reads), and each would wait to get it back
        # while pool threads decode (0.3 s of a 1 GiB checkout spent so, against 10 ms here).
        for _path, entry in items:
            self._check(entry)
        small = [i for i, (_path, entry) in enumerate(items) if entry.size <= _BATCHED_ENTRY_BYTES]
        next_small = 0  # small[next_small] is the first small entry not started
        started: dict[int, tuple[memoryview, Sequence[Future[Any]]]] = {}
        position = 0  # every entry before this one is started
        ahead = 0
        try:
            for index, (path, _entry) in enumerate(items):
                while position < len(items) and (position <= index or ahead < window_bytes):
                    entry = items[position][1]
                    if position in started:
                        pass
                    elif entry.size <= _BATCHED_ENTRY_BYTES:
                        # This one and the next small entries, wherever they are, in one task.
                        batch: list[int] = []
                        batch_bytes = 0
                        for candidate in small[next_small : next_small + _BATCH_ENTRIES]:
                            size = items[candidate][1].size
                            if batch and batch_bytes + size > _BATCH_BYTES:
                                break
                            batch.append(candidate)
                            batch_bytes += size
                        next_small += len(batch)
                        buffers, decoding = self._start_batch([items[i][1] for i in batch])
                        for i, buffer in zip(batch, buffers):
                            started[i] = (buffer, (decoding,))
                        ahead += batch_bytes
                    else:
                        started[position] = self._start(entry)
                        ahead += entry.size
                    position += 1
                out, futures = started.pop(index)
                ahead -= len(out)
                self._finish(futures)
                yield path, out
        finally:
            for _out, futures in started.values():
                for future in futures:
                    future.cancel()

    def _read_chunk(self, chunk: ChunkRef) -> memoryview:
        out = uninitialized(chunk.size)
        self.store.chunk_into(chunk, out)
        return out

    def iter_entry(self, entry: Entry) -> Iterator[memoryview]:
        """The entry's chunks in order, a few read ahead in the pool."""
        self._check_present(entry)
        pending: deque[Future[memoryview]] = deque()
        chunks = iter(entry.chunks)
        for chunk in chunks:
            pending.append(self.pool.submit(self._read_chunk, chunk))
            if len(pending) >= PREFETCH_CHUNKS:
                break
        try:
            while pending:
                data = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(self.pool.submit(self._read_chunk, nxt))
                yield data
        finally:
            for future in pending:
                future.cancel()
