"""A backend over a directory on a local disk: temp file, fsync, rename, fsync the directory.

Large writes bypass the page cache (``O_DIRECT``) where the filesystem allows it. On the
machines this project measures, copying a commit's objects into the page cache cost more
system time than coding them (docs/benchmarks.md, "Where a fresh commit's time went"): each
new page-cache page is a fresh page of memory, and fsync then writes it out anyway. A direct
write goes from a page-aligned buffer (the caller's, or one reused per thread that other
buffers are copied through) straight to the disk.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat as stat_module
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, KeyNotFoundError, PreconditionFailedError
from .base import TEMP_MARKER, Capabilities, KeyStat, validate_key
from .lockfile import LockFile, pid_alive  # noqa: F401  (pid_alive: kept importable from here)

_LOCK_TIMEOUT_S = 30.0
# O_DIRECT wants the buffer address, the file offset and the length aligned to the device's
# logical block size; 4096 covers 512-byte and 4 KiB devices.
_DIRECT_ALIGN = 4096
# Smaller writes (refs, small documents) stay in the page cache: the extra system calls of a
# direct write outweigh the copy there.
DIRECT_MIN_BYTES = 256 << 10
# Files read whole from this size up are mapped rather than copied (see read_into); below it
# the calls to map and unmap cost more than the copy saves.
MAPPED_MIN_BYTES = 1 << 20
# The per-thread buffer a direct write copies through; larger writes go through it in pieces.
_DIRECT_BUFFER_BYTES = 8 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_buffer(size: int) -> np.ndarray:
    """A writable buffer of ``size`` bytes that starts on a page, which a direct write takes as
    it is; its pages take memory only once touched. Private: a child forked meanwhile gets
    its own copy (a shared mapping, Python's default, would let a child's writes land in the
    parent's object files in flight)."""
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), dtype=np.uint8)


class _AlignedBuffer(threading.local):
    """One page-aligned buffer per thread, kept between writes so its pages are mapped once."""

    view: memoryview | None = None

    def get(self) -> memoryview:
        if self.view is None:
            self.view = aligned_buffer(_DIRECT_BUFFER_BYTES).data
        return self.view


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _aligned_address(view: memoryview) -> bool:
    return bool(np.frombuffer(view, dtype=np.uint8).ctypes.data % _DIRECT_ALIGN == 0)


def _stop_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


@dataclass(frozen=True, slots=True)
class StagedWrite:
    key: str
    path: Path  # where publish puts it
    tmp: Path  # where its bytes are now


def _fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_path(path, os.O_DIRECTORY)


def _wrap(exc: OSError, what: str) -> BackendError:
    # Out of space, read-only or permission problems will not go away on retry.
    transient = exc.errno in (errno.EAGAIN, errno.EINTR, errno.EBUSY)
    return BackendError(f"{what}: {exc.strerror or exc}", transient=transient)


# Filesystems where several machines share the files: lock files work there (O_EXCL and flock
# are honoured), but LMDB must never be (its lock table and mmap are per machine).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "9p", "afs",
    "beegfs", "ocfs2", "gfs2", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.goofys", "fuse.mountpoint-s3", "virtiofs",
})
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: str | os.PathLike[str], mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the filesystem holding ``path`` (Linux mountinfo), or None if unknown."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = Path(path).resolve()
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        # Mount points escape space, tab, newline and backslash as \ooo octal.
        mount_point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
        fstype = line.split(" - ", 1)[1].split(" ")[0]
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, fstype)
    return None if best is None else best[1]


def network_filesystem(path: str | os.PathLike[str], mountinfo: Path = MOUNTINFO) -> bool:
    return filesystem_type(path, mountinfo) in NETWORK_FILESYSTEMS


def _cached(fd: int, size: int) -> bool:
    """Whether the file ``fd`` is in the page cache, asked without waiting for the disk: its
    first byte and its middle one. Files are read whole, so a file read before has every page
    cached; a file written past the page cache may still have one or two (its last partial
    block goes through it, and a clean-clone test run once found the first page cached too).
    Asking about a page not cached starts reading it in, which the read that follows uses."""
    try:
        for offset in (0, size // 2):
            os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except (OSError, AttributeError):  # EAGAIN: not cached; no RWF_NOWAIT here: cannot tell
        return False
    return True


class LocalBackend:
    capabilities = Capabilities(
        atomic_create=True, conditional_replace=True, consistent_listing=True, local=True
    )

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, direct: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        shared = network_filesystem(self.root)
        # Cleared for good the first time the filesystem refuses O_DIRECT (tmpfs on older
        # kernels, some FUSE filesystems). Off on network filesystems: there every direct
        # write is a synchronous round trip to the server, and the gain was measured only on
        # local disks.
        self.direct = direct and _O_DIRECT != 0 and not shared
        # Cleared for good the first time a file cannot be mapped. Off on network filesystems,
        # where an I/O error while reading a mapped page ends the process (SIGBUS) instead of
        # raising.
        self.mapped_reads = not shared
        self._buffer = _AlignedBuffer()
        self._real_root = self.root.resolve()
        self._safe_dirs: set[Path] = set()

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _check_inside(self, directory: Path) -> None:
        """Refuse to write where a link leads out of the repository: a repository copied from a
        stranger could hold ``objects/ab -> ~/.ssh``. Checked before any directory is made."""
        if directory in self._safe_dirs:
            return
        real = directory.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise BackendError(f"{directory} leads outside the repository (to {real}); refusing to write there")
        self._safe_dirs.add(directory)

    def _open_file(self, key: str) -> tuple[Path, int, int]:
        """Open ``key`` for reading: (path, fd, size); refuses anything but a regular file."""
        path = self._path(key)
        try:
            # O_NONBLOCK: a planted FIFO must not hang us; it is refused below as not a file.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise KeyNotFoundError(f"{key} not found in {self.root}") from None
        except OSError as exc:
            raise _wrap(exc, f"reading {path}") from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _wrap(exc, f"reading {path}") from exc
        if not stat_module.S_ISREG(st.st_mode):
            os.close(fd)
            raise BackendError(f"reading {path}: not a regular file")
        return path, fd, st.st_size

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path, fd, _size = self._open_file(key)
        try:
            with os.fdopen(fd, "rb") as f:
                fd = -1
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise _wrap(exc, f"reading {path}") from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def read_into(self, key: str, allocate: Callable[[int], np.ndarray]) -> np.ndarray:
        """All of ``key`` (see ``base.read_whole``): a file of at least ``MAPPED_MIN_BYTES``
        whose pages are in the page cache is mapped, any other read into ``allocate(size)``.

        A mapping hands the reader the page cache's own pages where a read would copy them
        (0.24 s of CPU per GiB here, against 0.05 s to map and touch them). It is private and
        copy-on-write, so nothing done to the array reaches the file. A file not yet cached
        (written past the page cache, or evicted) is read instead: its pages would come in
        by faults, some taken while holding the GIL, and a checkout of such files took 1.4-1.8
        s against 1.25 s read. The file is never changed after it is written (objects are
        renamed into place once complete); should another process truncate it while it is
        mapped, reading past the new end stops this process with SIGBUS, as it would for the
        LMDB index.
        """
        path, fd, size = self._open_file(key)
        try:
            if self.mapped_reads and size >= MAPPED_MIN_BYTES and _cached(fd, size):
                try:
                    return np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY), dtype=np.uint8)
                except (OSError, ValueError):
                    self.mapped_reads = False  # a filesystem that cannot map files: read them
            out = allocate(size)
            view = out.data.cast("B")
            done = 0
            while done < len(view):
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    break  # shorter than its size said: the reader's checks say what is wrong
                done += n
            return out[:done]
        except OSError as exc:
            raise _wrap(exc, f"reading {path}") from exc
        finally:
            os.close(fd)

    def _write_temp(self, path: Path, data: bytes | memoryview, *, sync: bool = True) -> Path:
        tmp = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex}")
        self._check_inside(path.parent)
        view = memoryview(data).cast("B")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, direct = self._create(tmp, direct=self.direct and len(view) >= DIRECT_MIN_BYTES)
            try:
                if direct:
                    view = self._write_direct(fd, view)
                _write_all(fd, view)
                if self.fsync and sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _discard(tmp)
            raise _wrap(exc, f"writing {path}") from exc
        return tmp

    def _create(self, tmp: Path, *, direct: bool) -> tuple[int, bool]:
        """Create ``tmp`` for writing: (fd, whether it is open for direct writes)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct:
            try:
                return os.open(tmp, flags | _O_DIRECT, 0o644), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # this filesystem does not do O_DIRECT
        return os.open(tmp, flags, 0o644), False

    def _write_direct(self, fd: int, view: memoryview) -> memoryview:
        """Write the aligned head of ``view`` with O_DIRECT, then switch ``fd`` back to
        buffered; return what is left (under one block, or everything after a refusal or a
        short write, which the caller writes buffered).

        A page-aligned ``view`` (the store assembles object files in such buffers) goes to
        the disk as it is; any other is copied through the thread's buffer a piece at a time.
        """
        buffer = None if _aligned_address(view) else self._buffer.get()
        try:
            while len(view) >= _DIRECT_ALIGN:
                n = len(view) if buffer is None else min(len(view), len(buffer))
                n -= n % _DIRECT_ALIGN
                if buffer is None:
                    written = os.write(fd, view[:n])
                else:
                    buffer[:n] = view[:n]
                    written = os.write(fd, buffer[:n])
                view = view[written:]
                if written != n:
                    break  # a short write (the disk filling up): buffered writes report why
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False  # the device wants another alignment: the page cache it is
        _stop_direct(fd)
        return view

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
            # Over NFS a retransmitted link() can report EEXIST for the link it just made.
            made_by_us = _same_file(tmp, path)
            _discard(tmp)
            if made_by_us:
                return
            raise PreconditionFailedError(f"{key} exists already in {self.root}") from None
        except OSError as exc:
            _discard(tmp)
            raise _wrap(exc, f"writing {path}") from exc

    # --- staged writes: many objects made durable together ------------------------------

    def stage(self, key: str, data: bytes | memoryview) -> StagedWrite:
        """Write ``data`` to a hidden temporary file beside ``key``: neither durable nor
        visible until :meth:`publish`. ``data`` is the caller's again when this returns."""
        path = self._path(key)
        return StagedWrite(key, path, self._write_temp(path, data, sync=False))

    def publish(
        self, staged: Sequence[StagedWrite], map_fn: Callable[..., Iterable[Any]] = map
    ) -> list[bool]:
        """Make staged writes durable, then visible under their keys, create-only: True for
        each key created, False where the key existed already (its temporary file is
        dropped; objects are immutable, so the one there holds the same bytes).

        One fsync per file, all issued after every file is written (``map_fn`` may run them
        in parallel): the filesystem then commits its journal once for many files, where an
        fsync right after each write commits it once per file. A file's data is durable
        before its name appears, as with :meth:`write`; the names are made durable by one
        fsync per directory at the end.
        """
        try:
            if self.fsync:
                for _ in map_fn(_fsync_path, [s.tmp for s in staged]):
                    pass
            created = []
            directories = set()
            for s in staged:
                try:
                    os.link(s.tmp, s.path)
                    created.append(True)
                except FileExistsError:
                    created.append(_same_file(s.tmp, s.path))  # an NFS retransmission, or not ours
                s.tmp.unlink()
                directories.add(s.path.parent)
            if self.fsync:
                for _ in map_fn(_fsync_dir, sorted(directories)):
                    pass
        except OSError as exc:
            self.discard(staged)
            raise _wrap(exc, f"publishing {len(staged)} objects in {self.root}") from exc
        return created

    def discard(self, staged: Sequence[StagedWrite]) -> None:
        """Drop staged writes that will not be published (a commit that failed)."""
        for s in staged:
            _discard(s.tmp)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        path = self._path(key)
        self._check_inside(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
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

    def _key_lock(self, path: Path) -> LockFile:
        return LockFile(path.with_name(f".{path.name}{TEMP_MARKER}lock"), timeout=_LOCK_TIMEOUT_S)

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._check_inside(path.parent)
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


def _discard(tmp: Path) -> None:
    """Remove a temporary file after a failed write; on a read-only or broken filesystem the
    removal fails too, and the error that matters is the write's (fsck --repair cleans up)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
