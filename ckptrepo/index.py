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

from .errors import BackendError
from .ids import ID_BYTES, ObjectId


class IndexUnavailableError(BackendError):
    """The index cannot be opened or written (read-only or full filesystem)."""

_VALUE = struct.Struct("<QQ")  # stored bytes, decoded bytes
_INITIAL_MAP_SIZE = 1 << 30
_READY_KEY = b"\x00ready"
_RESERVE_NAME = "reserve"
RESERVE_BYTES = 1 << 20

# One LMDB environment per index directory and process, shared by every ChunkIndex on it:
# LMDB forbids opening the same files twice in one process (py-lmdb refuses it), yet a process
# may well open one repository twice. Entries: resolved path -> [pid, environment, users].
_ENVS: dict[str, list] = {}  # type: ignore[type-arg]
_ENVS_LOCK = threading.Lock()


def _attach(path: Path) -> lmdb.Environment:
    key = str(path.resolve())
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry[0] == os.getpid():
            entry[2] += 1
            shared: lmdb.Environment = entry[1]
            return shared
        if entry is not None:
            # Inherited through fork(): LMDB must not be used here, and while it is open
            # py-lmdb refuses a new one. Closing the child's copy leaves the parent's alone
            # (LMDB's file locks belong to each process).
            entry[1].close()
        try:
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(
                str(path), map_size=_INITIAL_MAP_SIZE, subdir=True, max_dbs=1, metasync=False, sync=False,
            )
        except (OSError, lmdb.Error) as exc:
            # A read-only filesystem, for one: the repository then works without its cache.
            raise IndexUnavailableError(f"cannot open the index at {path}: {exc}") from None
        _ENVS[key] = [os.getpid(), env, 1]
        return env


def _detach(path: Path) -> None:
    key = str(path.resolve())
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None or entry[0] != os.getpid():
            return
        entry[2] -= 1
        if entry[2] <= 0:
            entry[1].close()
            del _ENVS[key]


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
                    self._env = _attach(self.path)
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
            except lmdb.Error as exc:
                # Typically a full disk: LMDB copies pages on write, even to delete. The
                # reserve gives it room once, so gc can always make the index forget.
                if self.release_reserve():
                    continue
                raise IndexUnavailableError(f"cannot update the index at {self.path}: {exc}") from None

    @property
    def ready(self) -> bool:
        """True once the index holds every object the store had when it was built."""
        with self._environment().begin() as txn:
            return txn.get(_READY_KEY) is not None

    def mark_ready(self) -> None:
        self._write(lambda txn: txn.put(_READY_KEY, b"1"))
        self.ensure_reserve()

    def ensure_reserve(self) -> bool:
        """Keep RESERVE_BYTES of allocated disk beside the index (True if it is there): on a
        full disk an index write, which LMDB cannot do without new pages, frees it and
        retries, so gc can always make the index forget what it deletes."""
        path = self.path / _RESERVE_NAME
        if path.exists():
            return True
        try:
            with open(path, "xb") as f:
                f.write(bytes(RESERVE_BYTES))  # written, not truncated: real blocks, no holes
                f.flush()
                os.fsync(f.fileno())
        except FileExistsError:
            return True
        except OSError:
            path.unlink(missing_ok=True)  # no room now; gc makes it once space is freed
            return False
        return True

    def release_reserve(self) -> bool:
        try:
            (self.path / _RESERVE_NAME).unlink()
        except FileNotFoundError:
            return False
        return True

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

    def ids(self) -> list[ObjectId]:
        """Every object id the index claims (fsck compares them with the store)."""
        with self._environment().begin() as txn:
            keys = [bytes(key) for key, _ in txn.cursor() if len(key) == ID_BYTES]
        return [ObjectId(key.hex()) for key in keys]

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
            _detach(self.path)
        self._env = None
