"""Repository locks: many committers share the repository; gc and prune take it alone.

Lock files live under ``locks/`` and hold ``host pid``. A shared lock is
``locks/shared-<uuid>``; the exclusive lock is ``locks/exclusive``, created with O_EXCL.
A writer first waits for no exclusive lock, takes its shared lock, then checks again (and
backs off if gc got in between). gc takes the exclusive lock, then waits until no shared lock
of a live process is left. Locks of dead processes on this host are stale and are removed,
so a crashed committer never blocks gc for ever; locks of other hosts are trusted until they
are older than ``stale_after`` seconds (their owners refresh nothing, so keep sessions short).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .backends.local import pid_alive
from .errors import LockError

HOST = socket.gethostname()
EXCLUSIVE = "exclusive"


def _owner() -> str:
    return f"{HOST} {os.getpid()}\n"


class RepoLock:
    def __init__(self, locks_dir: Path, *, timeout: float = 60.0, stale_after: float = 6 * 3600) -> None:
        self.dir = locks_dir
        self.timeout = timeout
        self.stale_after = stale_after

    def _stale(self, path: Path) -> bool:
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        host, _, pid = text.strip().partition(" ")
        if host == HOST and pid.isdigit():
            return not pid_alive(int(pid))
        if not text.strip():
            return age > 5.0  # caught between creation and the write of its owner
        return age > self.stale_after

    def _remove_if_stale(self, path: Path) -> bool:
        if self._stale(path):
            path.unlink(missing_ok=True)
            return True
        return False

    def _live_shared(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.glob("shared-*") if not self._remove_if_stale(p)]

    def _exclusive_held(self) -> bool:
        path = self.dir / EXCLUSIVE
        return path.exists() and not self._remove_if_stale(path)

    def _wait(self, condition: str, check: "callable[[], bool]") -> None:  # type: ignore[valid-type]
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while not check():
            if time.monotonic() > deadline:
                raise LockError(f"repository is busy ({condition}) after {self.timeout:.0f}s; see {self.dir}")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"shared-{uuid.uuid4().hex}"
        while True:
            self._wait("gc or prune is running", lambda: not self._exclusive_held())
            path.write_text(_owner())
            if not self._exclusive_held():
                break
            path.unlink(missing_ok=True)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / EXCLUSIVE

        def take() -> bool:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._remove_if_stale(path)
                return False
            with os.fdopen(fd, "w") as f:
                f.write(_owner())
            return True

        self._wait("another gc or prune is running", take)
        try:
            self._wait("commits are in progress", lambda: not self._live_shared())
            yield
        finally:
            path.unlink(missing_ok=True)
