"""Lock files for a local disk or a network filesystem, with dead owners detected safely.

A lock is a file created with ``O_EXCL`` (atomic on local disks and on NFS v3 and later) that
holds ``host pid`` for people reading it. While it holds the lock, the owner also keeps an
``flock`` on the file: the kernel drops it when the owner dies (on NFS the server drops it when
the client's lease runs out), so "can I flock it?" answers "is the owner alive?" for owners on
any host, without guessing from pids or clocks.

Breaking a stale lock is where naive lock files race: two breakers both decide the lock is
stale, one removes it and takes a fresh one, and the other then removes *that*. Here every
removal of a lock file happens while holding the flock on the very file being removed (checked by
inode after locking): the owner unlinks its own file before letting go, and a breaker unlinks
only a file it has flocked and that the path still names. A second breaker therefore finds either
no file or a new one that its owner holds, and leaves it alone. A creator checks the same way
that the path still names its file once it has the flock, so a breaker that caught a new file in
the instant before its creator locked it only costs the creator a retry.

Filesystems without flock (some FUSE and SMB mounts answer ENOLCK or EOPNOTSUPP) fall back to
reading ``host pid``: a dead pid on this host is stale; another host's lock only after
``stale_after`` seconds without change.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import BackendError, LockError

HOST = socket.gethostname()
# Errors that mean "this filesystem does not do flock" rather than "somebody holds it".
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# An empty lock file was caught between its creation and its first write.
_EMPTY_GRACE_S = 5.0

# Lock files this process holds. Its own threads must see them as alive without opening them:
# where flock is emulated with POSIX record locks (NFS), closing any descriptor of the file would
# drop the owner's lock.
_held: set[str] = set()
_held_guard = threading.Lock()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_text() -> str:
    return f"{HOST} {os.getpid()}\n"


def _flock(fd: int) -> bool | None:
    """Try to flock ``fd`` without waiting: True if taken, False if held, None if unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in _NO_FLOCK:
            return None
        raise
    return True


def _names(fd: int, path: Path) -> bool:
    """True if ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _stale_by_content(fd: int, stale_after: float) -> bool:
    """Fallback where flock is unavailable: judge by ``host pid`` and by age."""
    st = os.fstat(fd)
    text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    age = time.time() - st.st_mtime
    host, _, pid = text.partition(" ")
    if not text:
        return age > _EMPTY_GRACE_S
    if host == HOST and pid.isdigit():
        return not pid_alive(int(pid))
    return age > stale_after


def _open_lock(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(f"lock file {path} is a symlink; refusing to touch it") from None
        raise BackendError(f"probing lock {path}: {exc.strerror or exc}") from exc


def _ours(path: Path) -> bool:
    with _held_guard:
        return str(path) in _held


def break_if_stale(path: Path, *, stale_after: float) -> bool:
    """Remove ``path`` if no live owner holds it. True if the lock is gone (or was never there),
    False if a live owner (possibly this process) holds it."""
    if _ours(path):
        return False
    fd = _open_lock(path)
    if fd is None:
        return True
    try:
        taken = _flock(fd)
        if taken is False:
            return False
        stale = True if taken else _stale_by_content(fd, stale_after)
        if not stale:
            return False
        if _names(fd, path):
            os.unlink(path)
        return True
    finally:
        os.close(fd)  # drops our flock, if we took one


def is_stale(path: Path, *, stale_after: float) -> bool:
    """True if a lock file is at ``path`` and no live owner holds it; removes nothing."""
    if _ours(path):
        return False
    fd = _open_lock(path)
    if fd is None:
        return False
    try:
        taken = _flock(fd)
        return True if taken else (taken is None and _stale_by_content(fd, stale_after))
    finally:
        os.close(fd)


def is_held(path: Path, *, stale_after: float) -> bool:
    """True if a live owner holds the lock at ``path`` (stale ones are removed on the way)."""
    return path.exists() and not break_if_stale(path, stale_after=stale_after)


class LockFile:
    """One exclusive lock file. ``acquire`` waits up to ``timeout`` seconds."""

    def __init__(self, path: Path, *, timeout: float = 30.0, stale_after: float = 6 * 3600) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.stale_after = stale_after
        self._fd: int | None = None
        self._pid = -1

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; never waits."""
        if self._fd is not None:
            raise LockError(f"lock {self.path} is already held by this object")
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                if not break_if_stale(self.path, stale_after=self.stale_after):
                    return False
                continue
            except OSError as exc:
                raise BackendError(f"taking lock {self.path}: {exc.strerror or exc}") from exc
            if self._own(fd):
                return True
        return False

    def _own(self, fd: int) -> bool:
        try:
            taken = _flock(fd)
            # A breaker may have caught the new file before we locked it, and removed it.
            if taken is False or not _names(fd, self.path):
                os.close(fd)
                return False
            try:
                os.write(fd, owner_text().encode())
            except OSError as exc:
                # With flock the text is only for people reading it (a full disk costs
                # nothing); without, it is all that tells others this lock is alive.
                if taken is None:
                    os.unlink(self.path)
                    raise BackendError(f"taking lock {self.path}: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._pid = os.getpid()
        with _held_guard:
            _held.add(str(self.path))
        return True

    def acquire(self, what: str = "") -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while not self.try_acquire():
            if time.monotonic() > deadline:
                busy = f" ({what})" if what else ""
                raise LockError(f"timed out after {self.timeout:.0f}s waiting for lock {self.path}{busy}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._pid != os.getpid():
            # A forked child holds a copy of the parent's lock; only the parent may end it.
            os.close(fd)
            return
        try:
            if _names(fd, self.path):
                os.unlink(self.path)  # while still holding the flock: see the module docstring
        finally:
            with _held_guard:
                _held.discard(str(self.path))
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
