"""Repository locks: many committers share the repository; gc and prune take it alone.

Lock files live under ``locks/`` (see :mod:`ckptrepo.backends.lockfile` for how one lock file
works, stale ones included). A shared lock is ``locks/shared-<uuid>``; the exclusive lock is
``locks/exclusive``. A writer first waits for no exclusive lock, takes its shared lock, then
checks again (and backs off if gc got in between). gc takes the exclusive lock, then waits until
no shared lock of a live process is left; since new writers back off while it waits, a stream
of commits cannot starve it. Both sides write their own file before looking for the other's,
so at least one of them sees the other.

Liveness comes from flock, which the kernel (or the NFS server) drops when a process dies: a
crashed committer never blocks gc, on this host or another. Everything here works over NFS;
the LMDB index is what must not live there (see ``ckptrepo.backends.local.network_filesystem``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .backends.lockfile import LockFile, break_if_stale, is_held, is_stale
from .errors import LockError

EXCLUSIVE = "exclusive"
SHARED_PREFIX = "shared-"


class RepoLock:
    def __init__(self, locks_dir: Path, *, timeout: float = 300.0, stale_after: float = 6 * 3600) -> None:
        self.dir = locks_dir
        self.timeout = timeout
        self.stale_after = stale_after

    def _lock_file(self, name: str) -> LockFile:
        return LockFile(self.dir / name, timeout=self.timeout, stale_after=self.stale_after)

    def _live_shared(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return [
            p for p in sorted(self.dir.glob(f"{SHARED_PREFIX}*"))
            if not break_if_stale(p, stale_after=self.stale_after)
        ]

    def _exclusive_held(self) -> bool:
        return is_held(self.dir / EXCLUSIVE, stale_after=self.stale_after)

    def _wait(self, condition: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not done():
            if time.monotonic() > deadline:
                raise LockError(f"repository is busy ({condition}) after {self.timeout:.0f}s; see {self.dir}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock_file(f"{SHARED_PREFIX}{uuid.uuid4().hex}")
        while True:
            self._wait("gc or prune is running", lambda: not self._exclusive_held())
            lock.acquire("shared")
            if not self._exclusive_held():
                break
            lock.release()  # gc came in between: let it go first
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock_file(EXCLUSIVE)
        self._wait("another gc, prune or repair is running", lock.try_acquire)
        try:
            self._wait("commits are in progress", lambda: not self._live_shared())
            yield
        finally:
            lock.release()

    def stale(self) -> list[Path]:
        """Lock files whose owners are gone (left by processes that crashed)."""
        if not self.dir.is_dir():
            return []
        return [
            path for path in sorted(self.dir.iterdir())
            if (path.name == EXCLUSIVE or path.name.startswith(SHARED_PREFIX))
            and is_stale(path, stale_after=self.stale_after)
        ]

    def remove_stale(self) -> list[Path]:
        """Remove lock files of dead owners; return the paths removed."""
        return [p for p in self.stale() if break_if_stale(p, stale_after=self.stale_after)]
