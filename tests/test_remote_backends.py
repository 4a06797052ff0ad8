"""The fsspec backend and its wrappers: the shared backend conformance suite over memory://,
a real S3 server (moto, through s3fs) with both conditional-write protocols, and a strictly
atomic in-process filesystem under the lock-object protocol; then what is particular to each:
error wrapping, stale ETags, lock objects, retries and the read cache."""

from __future__ import annotations

import errno
import inspect
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_backend_conformance as conformance
from remote_fixtures import FaultyBackend, StrictMemoryFileSystem
from s3_server import S3Server

from ckptrepo.backends.base import Backend
from ckptrepo.backends.cached import CachedBackend
from ckptrepo.backends.fsspec import FsspecBackend, wrap_error
from ckptrepo.backends.local import LocalBackend
from ckptrepo.backends.retrying import RetryingBackend
from ckptrepo.errors import BackendError, KeyNotFoundError, PreconditionFailedError


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def _memory(_s3: Callable[[], S3Server], _tmp: Path) -> Backend:
    return FsspecBackend.from_uri(f"memory://conformance-{uuid.uuid4().hex}")


def _s3_full(s3: Callable[[], S3Server], _tmp: Path) -> Backend:
    return FsspecBackend.from_uri(f"s3://{s3().new_bucket()}/store")


def _s3_lock_objects(s3: Callable[[], S3Server], _tmp: Path) -> Backend:
    return FsspecBackend.from_uri(f"s3://{s3().new_bucket()}/store", conditional_writes="create-only")


def _strict_lock_objects(_s3: Callable[[], S3Server], _tmp: Path) -> Backend:
    return FsspecBackend(StrictMemoryFileSystem(), "/store", conditional_writes="create-only")


def _retrying_cached(_s3: Callable[[], S3Server], tmp: Path) -> Backend:
    inner = FsspecBackend.from_uri(f"memory://conformance-{uuid.uuid4().hex}")
    return CachedBackend(RetryingBackend(inner), tmp / "cache", immutable_prefixes=("objects/",))


BACKENDS = {
    "memory": _memory,
    "s3-full": _s3_full,
    "s3-lock-objects": _s3_lock_objects,
    "strict-lock-objects": _strict_lock_objects,
    "retrying-cached-memory": _retrying_cached,
}
# moto checks a condition and writes without atomicity (FIELD_NOTES.md): under racing threads
# two writers can both win there. Its protocol behaviour is tested; concurrency on the others.
NOT_ATOMIC_UNDER_RACES = {"s3-full", "s3-lock-objects"}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if "concurrent" in request.node.name and request.param in NOT_ATOMIC_UNDER_RACES:
        pytest.skip("moto is not atomic under racing writers")
    b = BACKENDS[request.param](lambda: request.getfixturevalue("s3"), tmp_path)
    yield b
    b.close()


# Every test of the shared conformance suite that takes a backend runs here over ours too.
for _name, _test in vars(conformance).items():
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        globals()[f"test_conformance_{_name[5:]}"] = _test


# --- FsspecBackend specifics ---------------------------------------------------------------


def test_temporary_and_lock_keys_are_hidden(backend: Backend) -> None:
    backend.write("refs/branches/main", b"1")
    backend.compare_and_swap("refs/branches/main", b"1", b"2")
    assert list(backend.list("refs")) == ["refs/branches/main"]


def test_s3_stale_etag_loses(s3: S3Server) -> None:
    """A writer that read the ref, then lost the race to another before its conditional PUT,
    is refused by the store (412 on If-Match), never silently overwrites."""
    bucket = s3.new_bucket()
    other = s3.filesystem()

    class SlowReader(FsspecBackend):
        def _read_with_etag(self, path: str) -> tuple[bytes | None, str | None]:
            seen = super()._read_with_etag(path)
            other.pipe_file(path, b"theirs")  # lands between our read and our write
            return seen

    backend = SlowReader(s3.filesystem(), f"{bucket}/repo")
    backend.write("refs/branches/main", b"base")
    with pytest.raises(PreconditionFailedError):
        backend.compare_and_swap("refs/branches/main", b"base", b"ours")
    assert backend.read("refs/branches/main") == b"theirs"


def test_s3_conditional_delete(s3: S3Server) -> None:
    backend = FsspecBackend.from_uri(f"s3://{s3.new_bucket()}/repo")
    backend.write("refs/tags/v1", b"a")
    with pytest.raises(PreconditionFailedError):
        backend.compare_and_swap("refs/tags/v1", b"b", None)
    backend.compare_and_swap("refs/tags/v1", b"a", None)
    assert backend.stat("refs/tags/v1") is None


def test_s3_listing_is_never_stale(s3: S3Server) -> None:
    backend = FsspecBackend.from_uri(f"s3://{s3.new_bucket()}/repo")
    assert list(backend.list("refs")) == []
    s3.filesystem().pipe_file(f"{backend.root}/refs/branches/x", b"1")  # another client
    assert list(backend.list("refs")) == ["refs/branches/x"]
    assert backend.list_sizes("refs") == {"refs/branches/x": 1}


def test_stale_lock_object_is_broken() -> None:
    fs = StrictMemoryFileSystem()
    backend = FsspecBackend(fs, "/store", conditional_writes="create-only", lock_ttl=0.05)
    backend.write("refs/branches/main", b"1")
    # A writer that died holding the lock: its lock object says it expired long ago.
    fs.pipe_file("/store/refs/branches/main.tmp-lock", b'{"owner": "dead", "expires": 0}')
    backend.compare_and_swap("refs/branches/main", b"1", b"2")
    assert backend.read("refs/branches/main") == b"2"
    assert not fs.exists("/store/refs/branches/main.tmp-lock")


def test_live_lock_object_blocks_then_times_out() -> None:
    import json
    import time

    fs = StrictMemoryFileSystem()
    backend = FsspecBackend(fs, "/store", conditional_writes="create-only", lock_ttl=0.1)
    backend.write("refs/branches/main", b"1")
    fs.pipe_file("/store/refs/branches/main.tmp-lock",
                 json.dumps({"owner": "alive", "expires": time.time() + 60}).encode())
    with pytest.raises(BackendError) as info:
        backend.compare_and_swap("refs/branches/main", b"1", b"2")
    assert info.value.transient and "lock" in str(info.value)
    assert backend.read("refs/branches/main") == b"1"


def test_full_conditional_writes_only_on_s3() -> None:
    with pytest.raises(BackendError, match="only supported on s3"):
        FsspecBackend.from_uri("memory://x", conditional_writes="full")
    with pytest.raises(BackendError, match="must be one of"):
        FsspecBackend.from_uri("memory://x", conditional_writes="sometimes")


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match="cannot open"):
        FsspecBackend.from_uri("nosuchproto://bucket/x")


def test_foreign_errors_are_wrapped_once() -> None:
    from botocore.exceptions import ClientError

    missing = wrap_error(FileNotFoundError("x"), "reading k")
    assert isinstance(missing, KeyNotFoundError)
    exists = wrap_error(FileExistsError("x"), "writing k")
    assert isinstance(exists, PreconditionFailedError)
    stale = OSError(errno.EINVAL, "pre-conditions")
    stale.__cause__ = ClientError({"Error": {"Code": "PreconditionFailed", "Message": "no"}}, "PutObject")
    assert isinstance(wrap_error(stale, "writing k"), PreconditionFailedError)
    throttled = OSError(errno.EBUSY, "SlowDown")
    assert wrap_error(throttled, "writing k").transient
    assert wrap_error(TimeoutError("read timed out"), "reading k").transient
    denied = wrap_error(PermissionError(errno.EACCES, "AccessDenied"), "writing k")
    assert not denied.transient and "writing k" in str(denied)
    already = BackendError("x", transient=True)
    assert wrap_error(already, "y") is already


def test_unreachable_server_is_a_transient_backend_error(s3: S3Server) -> None:
    dead = S3Server()
    with dead:
        endpoint = dead.endpoint_url
    backend = FsspecBackend.from_uri(
        "s3://bucket/repo",
        {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}},
    )
    with pytest.raises(BackendError) as info:
        backend.read("config.yaml")
    assert info.value.transient
    assert "s3://bucket/repo/config.yaml" in str(info.value)


# --- retries -------------------------------------------------------------------------------


def test_retrying_backend_retries_transient_errors_only(tmp_path: Path) -> None:
    delays: list[float] = []
    flaky = FaultyBackend(LocalBackend(tmp_path), fail_at=1, mode="transient", prefix="")
    backend = RetryingBackend(flaky, sleep=delays.append)
    backend.write("a", b"1")
    assert backend.read("a") == b"1" and backend.retries == 1 and len(delays) == 1

    broken = RetryingBackend(FaultyBackend(LocalBackend(tmp_path / "b"), fail_at=1, prefix=""), sleep=delays.append)
    with pytest.raises(BackendError):
        broken.write("a", b"1")
    assert broken.retries == 0
    with pytest.raises(KeyNotFoundError):
        backend.read("missing")


class _LostReply(LocalBackend):
    """Applies the first conditional write, then reports a timeout (the reply was lost)."""

    lost = False

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        super().compare_and_swap(key, expected, new)
        if not self.lost:
            self.lost = True
            raise BackendError("reply lost", transient=True)


def test_retried_swap_whose_first_try_landed_succeeds(tmp_path: Path) -> None:
    backend = RetryingBackend(_LostReply(tmp_path), sleep=lambda s: None)
    backend.write("ref", b"old")
    backend.compare_and_swap("ref", b"old", b"new")  # the retry finds its own write: a win
    assert backend.read("ref") == b"new"
    with pytest.raises(PreconditionFailedError):
        backend.compare_and_swap("ref", b"old", b"other")


def test_retries_give_up_after_the_attempts(tmp_path: Path) -> None:
    class AlwaysDown(LocalBackend):
        def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            raise BackendError("down", transient=True)

    backend = RetryingBackend(AlwaysDown(tmp_path), attempts=3, sleep=lambda s: None)
    with pytest.raises(BackendError, match="down"):
        backend.read("x")
    assert backend.retries == 2


# --- the read cache ----------------------------------------------------------------------


def test_cache_serves_immutable_keys_and_never_refs(tmp_path: Path) -> None:
    from remote_fixtures import CountingBackend

    counting = CountingBackend(LocalBackend(tmp_path / "remote"))
    cache = CachedBackend(counting, tmp_path / "cache")
    blob = bytes(range(256)) * 400
    cache.write("objects/ab/cd", blob, create_only=True)
    cache.write("refs/branches/main", b"1")
    assert cache.read("objects/ab/cd") == blob
    assert cache.read("objects/ab/cd", 100, 50) == blob[100:150]
    assert cache.read("refs/branches/main") == b"1"
    cache.write("refs/branches/main", b"2")
    assert cache.read("refs/branches/main") == b"2"  # a ref is never served from the cache
    assert counting.counts["read"] == 3  # one object download, two ref reads
    assert cache.hits == 1 and cache.misses == 1
    # A small header read of an uncached object passes through without downloading it all.
    cache.write("objects/ef/01", blob, create_only=True)
    assert cache.read("objects/ef/01", 0, 8) == blob[:8]
    assert not (tmp_path / "cache" / "objects" / "ef" / "01").exists()


def test_cache_stays_within_its_bound(tmp_path: Path) -> None:
    remote = LocalBackend(tmp_path / "remote")
    cache = CachedBackend(remote, tmp_path / "cache", max_bytes=100_000)
    for i in range(10):
        remote.write(f"objects/{i:02d}/x", bytes([i]) * 30_000)
    for i in range(10):
        assert cache.read(f"objects/{i:02d}/x") == bytes([i]) * 30_000
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert on_disk <= 100_000 and cache.cached_bytes == on_disk
    assert (tmp_path / "cache" / "objects" / "09" / "x").exists()  # the newest stays
    assert not (tmp_path / "cache" / "objects" / "00" / "x").exists()  # the oldest went


def test_concurrent_creates_on_the_lock_protocol_have_one_winner() -> None:
    backend = FsspecBackend(StrictMemoryFileSystem(), "/store", conditional_writes="create-only")
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        try:
            backend.compare_and_swap("refs/tags/v1", None, str(i).encode())
            winners.append(i)
        except PreconditionFailedError:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and backend.read("refs/tags/v1") == str(winners[0]).encode()
