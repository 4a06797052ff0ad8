"""A bounded local read cache in front of a remote backend, for lazy remote checkouts.

Only keys under the immutable prefixes (``objects/``: written once, never changed) are
cached; refs, HEAD and config always go to the remote. A cached key is a file under the
cache directory, written aside and renamed into place, so a crash leaves no half file.
When the cache grows past ``max_bytes`` the least recently read files are removed.

The cache holds exactly the bytes the remote served; it checks nothing itself, since the
object store above verifies every object against its id on every read. Deleting the cache
directory at any time loses nothing.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import BackendError
from .base import TEMP_MARKER, Backend, BackendWrapper, KeyStat, validate_key

DEFAULT_CACHE_BYTES = 2 << 30
# A small ranged read (an object's header) is passed through: fetching the whole object for
# it would cost a full download where a few hundred bytes do.
SMALL_READ_BYTES = 64 << 10


class CachedBackend(BackendWrapper):
    def __init__(
        self,
        inner: Backend,
        cache_dir: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        immutable_prefixes: tuple[str, ...] = ("objects/",),
    ) -> None:
        super().__init__(inner)
        self.dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self.immutable_prefixes = immutable_prefixes
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._size = sum(p.stat().st_size for p in self._files())

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, {str(self.dir)!r})"

    @property
    def cached_bytes(self) -> int:
        return self._size

    def _cacheable(self, key: str) -> bool:
        return key.startswith(self.immutable_prefixes)

    def _file(self, key: str) -> Path:
        return self.dir / validate_key(key)

    def _files(self) -> Iterator[Path]:
        if not self.dir.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(self.dir):
            for name in filenames:
                if TEMP_MARKER not in name:
                    yield Path(dirpath) / name

    # --- reading -----------------------------------------------------------------------

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if not self._cacheable(key):
            return self.inner.read(key, offset, length)
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read() if length is None else f.read(length)
            os.utime(path)  # recency for eviction
            self.hits += 1
            return data
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"reading cache file {path}: {exc}") from exc
        self.misses += 1
        if length is not None and offset + length <= SMALL_READ_BYTES:
            return self.inner.read(key, offset, length)
        blob = self.inner.read(key)
        self._store(path, blob)
        return blob[offset:] if length is None else blob[offset : offset + length]

    def _store(self, path: Path, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return
        tmp = path.with_name(f"{path.name}{TEMP_MARKER}{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except OSError:
            # A full or read-only cache disk slows reads down; it must not fail them.
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._size += len(blob)
            if self._size > self.max_bytes:
                self._evict(int(self.max_bytes * 0.9))

    def _evict(self, target: int) -> None:
        by_age = []
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            by_age.append((st.st_mtime, st.st_size, path))
        by_age.sort()
        total = sum(size for _, size, _ in by_age)
        for _mtime, size, path in by_age:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._size = total

    def stat(self, key: str) -> KeyStat | None:
        if self._cacheable(key):
            try:
                st = self._file(key).stat()
                return KeyStat(size=st.st_size, mtime=st.st_mtime)
            except FileNotFoundError:
                pass
        return self.inner.stat(key)

    # --- writing goes through; a deleted object leaves the cache too --------------------

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        if self._cacheable(key):
            path = self._file(key)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return
            with self._lock:
                self._size -= size
