"""Decoded chunks of the last commit, kept in memory as delta bases for the next one.

A training job commits the same tensors again and again: each new chunk is coded against the
chunk at the same position of the parent commit. Decoding that base from storage costs a read,
a decompression and, for a base that is itself a delta, its whole chain. Keeping the content
of the chunks just written saves all of that, within a byte budget.

The budget is kept position-stable rather than least-recently-used: a commit walks its chunks
in the same order every time, and LRU would evict each base just before the next commit asks
for it. Here a chunk that served as a base makes room for its successor, entries written by
the current commit are never evicted by it, and what an earlier commit left behind (chunks no
longer anyone's parent) goes first when room is needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .frames import Buffer
from .ids import ObjectId


@dataclass(frozen=True, slots=True)
class CachedBase:
    content: np.ndarray  # read-only uint8 copy
    depth: int  # deltas from this chunk down to a full object
    generation: int
    moves: np.ndarray | None = None  # how a 2-byte delta moved (codec.DeltaBase.moves)

    @property
    def nbytes(self) -> int:
        return len(self.content) + (0 if self.moves is None else len(self.moves))


class BaseCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self.used_bytes = 0
        self.generation = 0
        self._entries: OrderedDict[ObjectId, CachedBase] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def new_generation(self) -> None:
        """Start a commit: what earlier commits left may be evicted from now on."""
        with self._lock:
            self.generation += 1

    def get(self, object_id: ObjectId) -> CachedBase | None:
        with self._lock:
            return self._entries.get(object_id)

    def discard(self, object_id: ObjectId) -> None:
        with self._lock:
            entry = self._entries.pop(object_id, None)
            if entry is not None:
                self.used_bytes -= entry.nbytes

    def add(self, object_id: ObjectId, content: Buffer, depth: int, moves: np.ndarray | None = None) -> bool:
        """Keep a copy of ``content`` (and ``moves``, which the caller hands over) if the
        budget allows; True if it was kept."""
        size = len(content) + (0 if moves is None else len(moves))
        if size > self.budget_bytes:
            return False
        with self._lock:
            if object_id in self._entries:
                return True
            if not self._make_room(size):
                return False
            # Reserve before copying (outside the lock: a copy of megabytes should not block
            # the other writer threads).
            self.used_bytes += size
        # A numpy copy runs without the GIL, so writer threads keep coding meanwhile.
        copy = np.frombuffer(content, dtype=np.uint8).copy()
        copy.flags.writeable = False
        if moves is not None:
            moves.flags.writeable = False
        with self._lock:
            if object_id in self._entries:
                self.used_bytes -= size  # another thread kept it meanwhile
            else:
                self._entries[object_id] = CachedBase(copy, depth, self.generation, moves)
        return True

    def _make_room(self, size: int) -> bool:
        while self.used_bytes + size > self.budget_bytes:
            oldest_id = next(iter(self._entries), None)
            if oldest_id is None:
                return False
            oldest = self._entries[oldest_id]
            if oldest.generation >= self.generation:
                return False
            del self._entries[oldest_id]
            self.used_bytes -= oldest.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0
