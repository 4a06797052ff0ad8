"""The local chunk index: an LMDB cache of which objects the store holds and their sizes.

It is only a cache. Deleting it loses nothing: the store rebuilds it by listing objects. It
never lives on a remote or network filesystem, and an environment is reopened after fork().
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import lmdb

from .ids import ObjectId

_VALUE = struct.Struct("<QQ")  # stored bytes, decoded bytes
_INITIAL_MAP_SIZE = 1 << 30
_READY_KEY = b"\x00ready"


class ChunkIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            with self._lock:
                if self._env is None or self._pid != os.getpid():
                    self.path.mkdir(parents=True, exist_ok=True)
                    self._env = lmdb.open(
                        str(self.path), map_size=_INITIAL_MAP_SIZE, subdir=True,
                        max_dbs=1, metasync=False, sync=False,
                    )
                    self._pid = os.getpid()
        return self._env

    def _write(self, fn) -> None:  # type: ignore[no-untyped-def]
        # Grow the map when full instead of failing: the default size is far too small.
        while True:
            env = self._environment()
            try:
                with env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)

    @property
    def ready(self) -> bool:
        """True once the index holds every object the store had when it was built."""
        with self._environment().begin() as txn:
            return txn.get(_READY_KEY) is not None

    def mark_ready(self) -> None:
        self._write(lambda txn: txn.put(_READY_KEY, b"1"))

    def get(self, object_id: ObjectId) -> tuple[int, int] | None:
        with self._environment().begin() as txn:
            raw = txn.get(bytes.fromhex(object_id.hex))
        if raw is None:
            return None
        stored, size = _VALUE.unpack(raw)
        return int(stored), int(size)

    def add(self, object_id: ObjectId, stored: int, size: int) -> None:
        self.add_many([(object_id, stored, size)])

    def add_many(self, items: Iterable[tuple[ObjectId, int, int]]) -> None:
        rows = [(bytes.fromhex(oid.hex), _VALUE.pack(stored, size)) for oid, stored, size in items]

        def put_all(txn: lmdb.Transaction) -> None:
            for key, value in rows:
                txn.put(key, value)

        self._write(put_all)

    def remove(self, object_id: ObjectId) -> None:
        self._write(lambda txn: txn.delete(bytes.fromhex(object_id.hex)))

    def clear(self) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            keys = [key for key, _ in txn.cursor()]
            for key in keys:
                txn.delete(key)

        self._write(drop)

    def sync(self) -> None:
        if self._env is not None:
            self._env.sync(True)

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None
