"""One conformance suite that every backend passes (local here; remote backends add
themselves to BACKENDS below)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptrepo.backends.base import Backend, validate_key
from ckptrepo.backends.local import LocalBackend
from ckptrepo.errors import FormatError, KeyNotFoundError, PreconditionFailedError


def _local(tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "store")


def _local_buffered(tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "store", direct=False)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"local": _local, "local-buffered": _local_buffered}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    b.close()


def test_write_read_ranges(backend: Backend) -> None:
    backend.write("a/b/c", b"0123456789")
    assert backend.read("a/b/c") == b"0123456789"
    assert backend.read("a/b/c", 2, 3) == b"234"
    assert backend.read("a/b/c", 8) == b"89"
    stat = backend.stat("a/b/c")
    assert stat is not None and stat.size == 10


def test_missing_key(backend: Backend) -> None:
    with pytest.raises(KeyNotFoundError):
        backend.read("nope")
    assert backend.stat("nope") is None
    backend.delete("nope")  # not an error


def test_create_only_never_overwrites(backend: Backend) -> None:
    backend.write("k", b"first", create_only=True)
    with pytest.raises(PreconditionFailedError):
        backend.write("k", b"second", create_only=True)
    assert backend.read("k") == b"first"
    backend.write("k", b"third")
    assert backend.read("k") == b"third"


def test_compare_and_swap(backend: Backend) -> None:
    backend.compare_and_swap("ref", None, b"1")
    with pytest.raises(PreconditionFailedError):
        backend.compare_and_swap("ref", None, b"2")
    with pytest.raises(PreconditionFailedError):
        backend.compare_and_swap("ref", b"0", b"2")
    backend.compare_and_swap("ref", b"1", b"2")
    assert backend.read("ref") == b"2"
    backend.compare_and_swap("ref", b"2", None)
    assert backend.stat("ref") is None


def test_concurrent_compare_and_swap_has_one_winner_per_value(backend: Backend) -> None:
    backend.write("counter", b"0")
    wins: list[int] = []

    def bump(worker: int) -> None:
        for _ in range(20):
            while True:
                current = backend.read("counter")
                try:
                    backend.compare_and_swap("counter", current, str(int(current) + 1).encode())
                    wins.append(worker)
                    break
                except PreconditionFailedError:
                    continue

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.read("counter") == b"80" and len(wins) == 80


def test_list_is_recursive_and_hides_temporary_files(backend: Backend) -> None:
    for key in ("objects/aa/1", "objects/ab/2", "refs/x"):
        backend.write(key, b"x")
    assert sorted(backend.list("objects")) == ["objects/aa/1", "objects/ab/2"]
    assert sorted(backend.list()) == ["objects/aa/1", "objects/ab/2", "refs/x"]
    assert list(backend.list("empty")) == []


def test_delete(backend: Backend) -> None:
    backend.write("gone", b"x")
    backend.delete("gone")
    assert backend.stat("gone") is None


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", ".hidden", "a/.tmp-x", "x.tmp-1", "sp ace", "a/"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(FormatError):
        validate_key(key)
