"""A backend over a directory on a local disk: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import BackendError, KeyNotFoundError, LockError, PreconditionFailedError
from .base import TEMP_MARKER, Capabilities, KeyStat, validate_key

_LOCK_TIMEOUT_S = 30.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wrap(exc: OSError, what: str) -> BackendError:
    # Out of space, read-only or permission problems will not go away on retry.
    transient = exc.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY)
    return BackendError(f"{what}: {exc.strerror or exc}", transient=transient)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBackend:
    capabilities = Capabilities(
        atomic_create=True, conditional_replace=True, consistent_listing=True, local=True
    )

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise KeyNotFoundError(f"{key} not found in {self.root}") from None
        except OSError as exc:
            raise _wrap(exc, f"reading {path}") from exc

    def _write_temp(self, path: Path, data: bytes | memoryview) -> Path:
        tmp = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data).cast("B")
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _wrap(exc, f"writing {path}") from exc
        return tmp

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            if create_only:
                # link() fails if the name exists: an atomic create-only publish.
                os.link(tmp, path)
                tmp.unlink()
            else:
                os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise PreconditionFailedError(f"{key} exists already in {self.root}") from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _wrap(exc, f"writing {path}") from exc

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        path = self._path(key)
        with self._key_lock(path):
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as exc:
                raise _wrap(exc, f"reading {path}") from exc
            if current != expected:
                raise PreconditionFailedError(
                    f"{key} in {self.root} holds {current!r}, expected {expected!r}"
                )
            if new is None:
                self.delete(key)
            else:
                self.write(key, new)

    def _key_lock(self, path: Path) -> "_LockFile":
        return _LockFile(path.with_name(f".{path.name}{TEMP_MARKER}lock"))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _wrap(exc, f"deleting {path}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(".") or TEMP_MARKER in name:
                    continue
                yield name if rel == "." else f"{rel}/{name}"

    def stat(self, key: str) -> KeyStat | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _wrap(exc, f"stat {key}") from exc
        return KeyStat(size=st.st_size, mtime=st.st_mtime)

    def temp_files(self) -> Iterator[Path]:
        """Leftovers of writes that a crash interrupted (fsck --repair removes them)."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and TEMP_MARKER in name:
                    yield Path(dirpath) / name

    def close(self) -> None:
        return None


class _LockFile:
    """An exclusive lock held as a file created with O_EXCL (works on NFS too).

    The file holds ``host pid``; a lock whose process on this host is gone is stale and is
    broken. Locks of other hosts are broken only after they are older than the timeout.
    """

    def __init__(self, path: Path, timeout: float = _LOCK_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    def __enter__(self) -> "_LockFile":
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        owner = f"{socket.gethostname()} {os.getpid()}\n".encode()
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                if time.monotonic() > deadline:
                    raise LockError(f"timed out waiting for lock {self.path}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            except OSError as exc:
                raise _wrap(exc, f"taking lock {self.path}") from exc
            try:
                os.write(fd, owner)
            finally:
                os.close(fd)
            return self

    def _break_if_stale(self) -> bool:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        host, _, pid = text.strip().partition(" ")
        same_host = host == socket.gethostname()
        stale = (same_host and pid.isdigit() and not pid_alive(int(pid))) or (
            not same_host and age > self.timeout
        )
        # A lock file caught between creation and its write is empty; give it time.
        if not text and age > 1.0:
            stale = True
        if stale:
            self.path.unlink(missing_ok=True)
        return stale

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
