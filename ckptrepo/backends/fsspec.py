"""A backend over any fsspec filesystem: s3://, gs://, az://, memory://, sftp://, ...

Bytes move through fsspec; what makes a remote repository safe to share is how create-only
writes and ref compare-and-swap are done, and that depends on the store. One of three
*write protocols* is picked per filesystem (``conditional_writes`` in the remote options):

``full`` (default on s3://)
    S3 conditional writes. A create-only write is a PUT with ``If-None-Match: *``; a
    compare-and-swap reads the key and its ETag in one consistent read (the HEAD's ETag is
    sent as ``If-Match`` on the GET), compares the bytes, and PUTs (or DELETEs) with
    ``If-Match: <etag>``. The store arbitrates: of two racing writers one gets 412.
``create-only``
    For stores that create atomically but cannot replace conditionally (an S3-compatible
    store that honours ``If-None-Match`` but not ``If-Match``, or any fsspec filesystem whose
    ``pipe_file(mode="create")`` is atomic): creates through the filesystem's create-only
    write; a compare-and-swap runs under a *lock object* (below).
``none`` (default elsewhere)
    No help from the store: a create-only write checks, then writes; a compare-and-swap
    runs under a lock object taken with that same check-then-write. This is safe for one
    writer at a time and narrows, but cannot close, the race between two.

memory:// lives in this process only, so there a process-wide lock makes every
conditional write exact.

Lock objects: to swap ``K``, a writer creates ``K.tmp-lock`` (create-only) holding
``{"owner", "host", "pid", "expires"}``, reads it back to check it is its own, reads ``K``,
compares, writes or deletes ``K``, then deletes the lock if it is still its own. A lock past
``expires`` (``lock_ttl`` seconds after it was taken, 60 by default; a swap takes
milliseconds) is stale and is deleted by the next writer. Keys holding ``.tmp-`` are hidden
from listings.

Listings are never trusted from a cache: an S3 filesystem is opened with
``use_listings_cache=False`` (and shared within the process: creating a client costs far more
than a request), other filesystems with ``skip_instance_cache``, and the listing cache is
invalidated before every listing and stat: refs must never be read from a stale listing.
Every foreign error is wrapped once into :class:`BackendError`, with ``transient`` set
where a retry may help (timeouts, throttling, 5xx, dropped connections).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from ..errors import BackendError, CkptRepoError, KeyNotFoundError, PreconditionFailedError
from .base import TEMP_MARKER, Capabilities, KeyStat, validate_key

CONDITIONAL_WRITES = ("full", "create-only", "none")
DEFAULT_LOCK_TTL_S = 60.0
# Stores whose single PUT is all-or-nothing: no temporary name and rename needed.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_FOREIGN_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "gcsfs", "adlfs",
                    "google", "azure", "s3fs", "fsspec", "paramiko")
_TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EREMOTEIO,
})
_TRANSIENT_WORDS = ("Timeout", "Connection", "Throttl", "SlowDown", "ServiceUnavailable",
                    "InternalError", "RequestLimitExceeded", "ConditionalRequestConflict")
# memory:// is one dict per process; this lock makes its conditional writes exact.
_MEMORY_LOCK = threading.RLock()


def protocol_of(fs: Any) -> str:
    protocol = fs.protocol
    return str(protocol if isinstance(protocol, str) else protocol[0])


# --- error wrapping --------------------------------------------------------------------------


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping):
            return str(error.get("Code", ""))
    return ""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_precondition_failed(exc: BaseException) -> bool:
    # s3fs turns a lost If-None-Match into FileExistsError, but a stale If-Match into a plain
    # OSError whose cause is botocore's PreconditionFailed (FIELD_NOTES.md).
    return any(_error_code(e) in ("PreconditionFailed", "412") for e in _chain(exc))


def _is_transient(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        code = _error_code(e)
        if code and (code.startswith("5") or any(w in code for w in _TRANSIENT_WORDS)):
            return True
        if any(w in type(e).__name__ for w in _TRANSIENT_WORDS):
            return True
    return False


def _is_foreign(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in _FOREIGN_MODULES


def wrap_error(exc: BaseException, what: str) -> BackendError:
    """The one translation of a storage library's error into ckptrepo's error tree."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, FileExistsError) or _is_precondition_failed(exc):
        return PreconditionFailedError(f"{what}: the key exists already or no longer holds what was expected")
    if isinstance(exc, FileNotFoundError):
        return KeyNotFoundError(f"{what}: not found")
    detail = str(exc) or type(exc).__name__
    return BackendError(f"{what}: {type(exc).__name__}: {detail}", transient=_is_transient(exc))


@contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except CkptRepoError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary where foreign errors are wrapped
        if not _is_foreign(exc):
            raise
        raise wrap_error(exc, what) from exc


# --- the backend -----------------------------------------------------------------------------


class FsspecBackend:
    """Keys under ``root`` on an fsspec filesystem. See the module docstring for protocols."""

    def __init__(
        self,
        fs: Any,
        root: str,
        *,
        conditional_writes: str | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL_S,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.protocol = protocol_of(fs)
        if conditional_writes is None:
            conditional_writes = "full" if self.protocol in _S3_PROTOCOLS else "none"
        if conditional_writes not in CONDITIONAL_WRITES:
            raise BackendError(f"conditional_writes must be one of {', '.join(CONDITIONAL_WRITES)}, "
                               f"not {conditional_writes!r}")
        if conditional_writes == "full" and self.protocol not in _S3_PROTOCOLS:
            raise BackendError(f"conditional_writes=full (If-Match) is only supported on s3://; "
                               f"use create-only where {self.protocol}:// creates atomically")
        self.conditional_writes = conditional_writes
        self.lock_ttl = float(lock_ttl)
        self._exact = self.protocol == "memory"
        atomic_create = self._exact or conditional_writes != "none"
        self.capabilities = Capabilities(
            atomic_create=atomic_create,
            conditional_replace=atomic_create,
            consistent_listing=self.protocol in _ATOMIC_PUT_PROTOCOLS,
            local=False,
        )

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any] | None = None, **backend_options: Any) -> FsspecBackend:
        """Open ``uri`` with fsspec; ``options`` go to the filesystem (after fsspec's own config)."""
        import fsspec

        fs_options = dict(options or {})
        protocol = uri.split("://", 1)[0]
        if protocol in _S3_PROTOCOLS:
            # The instance is shared in this process (a new S3 client costs 0.1-0.5 s of model
            # loading), but ours never caches listings: its kwargs differ from a default
            # instance's, so it is never the one other code configured with a listing cache.
            fs_options["use_listings_cache"] = False
        else:
            fs_options["skip_instance_cache"] = True
        try:
            fs, root = fsspec.core.url_to_fs(uri, **fs_options)
        except (ImportError, ValueError) as exc:
            raise BackendError(f"cannot open {uri}: {exc}") from None
        with _storage_errors(f"opening {uri}"):
            return cls(fs, root, **backend_options)

    @property
    def location(self) -> str:
        return str(self.fs.unstrip_protocol(self.root))

    def __repr__(self) -> str:
        return f"FsspecBackend({self.location!r}, conditional_writes={self.conditional_writes!r})"

    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}" if self.root else validate_key(key)

    def _where(self, key: str) -> str:
        return f"{self.location}/{key}"

    # --- reading -----------------------------------------------------------------------

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        with _storage_errors(f"reading {self._where(key)}"):
            if offset == 0 and length is None:
                return bytes(self._cat(path))
            end = None if length is None else offset + length
            if end is not None and end <= offset:
                return b""
            return bytes(self.fs.cat_file(path, start=offset, end=end))

    def _cat(self, path: str) -> bytes:
        if self.protocol in _S3_PROTOCOLS:
            # One GET: s3fs otherwise asks for the size first to split large reads.
            return self.fs.cat_file(path, max_concurrency=1)  # type: ignore[no-any-return]
        return self.fs.cat_file(path)  # type: ignore[no-any-return]

    def _read_or_none(self, path: str) -> bytes | None:
        try:
            return bytes(self._cat(path))
        except FileNotFoundError:
            return None

    def stat(self, key: str) -> KeyStat | None:
        path = self._path(key)
        with _storage_errors(f"stat {self._where(key)}"):
            if self.protocol in _S3_PROTOCOLS:
                return self._stat_s3(path)
            self.fs.invalidate_cache(path)
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
        if info.get("type") != "file":
            return None
        return KeyStat(size=int(info.get("size") or 0), mtime=_mtime(info))

    def _stat_s3(self, path: str) -> KeyStat | None:
        # One HEAD: s3fs's info() follows a missing key with a LIST, to find a "directory".
        bucket, object_key, _ = self.fs.split_path(path)
        try:
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=object_key)
        except FileNotFoundError:
            return None
        modified = head.get("LastModified")
        return KeyStat(size=int(head.get("ContentLength") or 0),
                       mtime=modified.timestamp() if isinstance(modified, datetime) else 0.0)

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from self.list_sizes(prefix)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Every visible key under ``prefix`` with its size, from one (paged) listing."""
        base = self._path(prefix) if prefix else self.root
        with _storage_errors(f"listing {self.location}/{prefix}"):
            self.fs.invalidate_cache(base)
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        start = len(self.root) + 1 if self.root else 0
        out: dict[str, int] = {}
        for full, info in found.items():
            if info.get("type", "file") != "file":
                continue
            key = full[start:]
            if key and not _hidden(key):
                out[key] = int(info.get("size") or 0)
        return dict(sorted(out.items()))

    # --- writing -----------------------------------------------------------------------

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        path = self._path(key)
        body = bytes(data)
        with _storage_errors(f"writing {self._where(key)}"):
            if create_only:
                self._create(path, body)
            elif self._exact:
                with _MEMORY_LOCK:
                    self.fs.pipe_file(path, body)
            else:
                self._put(path, body)

    def _put(self, path: str, body: bytes) -> None:
        if self.protocol in _ATOMIC_PUT_PROTOCOLS:
            self.fs.pipe_file(path, body)
            return
        # A filesystem where a write can be seen half done: write aside, then rename.
        tmp = f"{path}{TEMP_MARKER}{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, body)
        try:
            self.fs.mv(tmp, path)
        except BaseException:
            self._remove_quietly(tmp)
            raise

    def _create(self, path: str, body: bytes) -> None:
        if self._exact:
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    raise FileExistsError(path)
                self.fs.pipe_file(path, body)
        elif self.conditional_writes != "none":
            self.fs.pipe_file(path, body, mode="create")  # If-None-Match: *
        else:
            if self.fs.exists(path):
                raise FileExistsError(path)
            self._put(path, body)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _storage_errors(f"deleting {self._where(key)}"):
            self._remove_quietly(path)

    def _remove_quietly(self, path: str) -> None:
        try:
            if self._exact:
                with _MEMORY_LOCK:
                    self.fs.rm_file(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        path = self._path(key)
        with _storage_errors(f"updating {self._where(key)}"):
            if self._exact:
                with _MEMORY_LOCK:
                    self._swap_unguarded(path, expected, new)
            elif expected is None and new is not None:
                self._create(path, new)
            elif self.conditional_writes == "full":
                self._swap_if_match(path, expected, new)
            else:
                with self._lock_object(path):
                    self._swap_unguarded(path, expected, new)

    def _swap_unguarded(self, path: str, expected: bytes | None, new: bytes | None) -> None:
        current = self._read_or_none(path)
        if current != expected:
            raise PreconditionFailedError(
                f"{self.fs.unstrip_protocol(path)} holds {_show(current)}, expected {_show(expected)}"
            )
        if new is None:
            if current is not None:
                self.fs.rm_file(path)
        elif self._exact:
            self.fs.pipe_file(path, new)
        else:
            self._put(path, new)

    def _swap_if_match(self, path: str, expected: bytes | None, new: bytes | None) -> None:
        current, etag = self._read_with_etag(path)
        if current != expected:
            raise PreconditionFailedError(
                f"{self.fs.unstrip_protocol(path)} holds {_show(current)}, expected {_show(expected)}"
            )
        if current is None:  # expected absent, asked to delete: nothing to do
            return
        if new is None:
            bucket, object_key, _ = self.fs.split_path(path)
            self.fs.call_s3("delete_object", Bucket=bucket, Key=object_key, IfMatch=etag)
            self.fs.invalidate_cache(path)
        else:
            self.fs.pipe_file(path, new, IfMatch=etag)

    def _read_with_etag(self, path: str) -> tuple[bytes | None, str | None]:
        """The bytes of ``path`` and the ETag of exactly those bytes: s3fs sends the HEAD's
        ETag as If-Match on the GET, so a change in between fails instead of mixing."""
        self.fs.invalidate_cache(path)
        try:
            with self.fs.open(path, "rb", cache_type="none") as f:
                etag = f.details.get("ETag")
                data = f.read()
        except FileNotFoundError:
            return None, None
        if not etag:
            raise BackendError(f"{self.fs.unstrip_protocol(path)}: the store sent no ETag; "
                               "set conditional_writes: create-only for this remote")
        return bytes(data), str(etag)

    # --- lock objects ------------------------------------------------------------------

    @contextmanager
    def _lock_object(self, path: str) -> Iterator[None]:
        lock_path = f"{path}{TEMP_MARKER}lock"
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + 2 * self.lock_ttl
        delay = 0.005
        while True:
            body = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                               "expires": time.time() + self.lock_ttl}).encode()
            try:
                self._create(lock_path, body)
                if self._lock_owner(lock_path) == owner:
                    break
            except FileExistsError:
                self._break_if_stale(lock_path)
            if time.monotonic() > deadline:
                raise BackendError(f"timed out waiting for lock {self.fs.unstrip_protocol(lock_path)}",
                                   transient=True)
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            yield
        finally:
            if self._lock_owner(lock_path) == owner:
                self._remove_quietly(lock_path)

    def _lock_owner(self, lock_path: str) -> str | None:
        raw = self._read_or_none(lock_path)
        try:
            return str(json.loads(raw)["owner"]) if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None

    def _break_if_stale(self, lock_path: str) -> None:
        raw = self._read_or_none(lock_path)
        if raw is None:
            return
        try:
            expires = float(json.loads(raw)["expires"])
        except (ValueError, KeyError, TypeError):
            expires = 0.0  # unreadable: a writer died between create and write
        if time.time() > expires:
            self._remove_quietly(lock_path)

    def close(self) -> None:
        return None


def _hidden(key: str) -> bool:
    return any(seg.startswith(".") or TEMP_MARKER in seg for seg in key.split("/"))


def _mtime(info: Mapping[str, Any]) -> float:
    for name in ("LastModified", "mtime", "updated", "created", "last_modified"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _show(raw: bytes | None) -> str:
    if raw is None:
        return "nothing"
    text = raw[:80].decode("utf-8", "replace").strip()
    return repr(text)
