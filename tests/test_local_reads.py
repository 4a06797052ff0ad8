"""Whole-file reads of the local backend: large files in the page cache are mapped rather
than copied, the mapping never writes back to the file, and files not cached, or on a
filesystem that cannot map, are read."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptrepo
from ckptrepo.backends import local
from ckptrepo.backends.local import MAPPED_MIN_BYTES, LocalBackend


def _payload(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


class _Allocations:
    """An ``allocate`` for read_into that remembers what it was asked for."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, size: int) -> np.ndarray:
        self.sizes.append(size)
        return np.empty(size, dtype=np.uint8)


def _write_cached(backend: LocalBackend, key: str, data: bytes) -> None:
    """Write ``key`` and read it once, as a first checkout would: large writes bypass the
    page cache, and only cached files are mapped."""
    backend.write(key, data, create_only=True)
    assert backend.read(key) == data


_libc = ctypes.CDLL(None, use_errno=True)


def _residency(path: Path) -> list[bool]:
    """Which of the file's pages are in the page cache, asked with mincore on a mapping that
    is never touched (an RWF_NOWAIT read would start reading the pages back in)."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8)
        pages = (len(view) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(view)), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del view
        return [bool(v & 1) for v in vector]
    finally:
        mapping.close()


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache, asking until none is left: pages just read
    may still sit on a CPU's list of new pages, out of reach of a request, and a busy machine
    (a full test run) once kept them through two requests."""
    for _ in range(50):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        time.sleep(0.02)
        if sum(_residency(path)) == 0:
            return
    raise AssertionError(f"{path}: the kernel keeps {sum(_residency(path))} pages cached after 50 requests to drop them")


class _CountedMaps:
    """Stands in for mmap.mmap, counting the mappings made."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = mmap.mmap

    def __call__(self, *args: Any, **kwargs: Any) -> mmap.mmap:
        self.calls += 1
        return self.real(*args, **kwargs)


def _mappings_of(directory: Path) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(directory) in line]


@pytest.mark.parametrize("size", [1, MAPPED_MIN_BYTES - 1, MAPPED_MIN_BYTES, MAPPED_MIN_BYTES + 1, (17 << 20) + 5])
def test_whole_reads_return_the_file_mapped_from_the_threshold_up(tmp_path: Path, size: int) -> None:
    backend = LocalBackend(tmp_path / "store")
    data = _payload(size)
    _write_cached(backend, "objects/ab/x", data)
    allocate = _Allocations()
    content = backend.read_into("objects/ab/x", allocate)
    assert content.tobytes() == data
    assert allocate.sizes == ([] if size >= MAPPED_MIN_BYTES else [size])


def test_writing_into_a_mapped_read_leaves_the_file_alone(tmp_path: Path) -> None:
    # The store's decoders never write into what they read, but should one, it must change
    # its own copy only: the file is a stored object.
    backend = LocalBackend(tmp_path / "store")
    data = _payload(2 * MAPPED_MIN_BYTES)
    _write_cached(backend, "objects/ab/x", data)
    allocate = _Allocations()
    content = backend.read_into("objects/ab/x", allocate)
    assert allocate.sizes == [] and content.flags.writeable
    content[:] = 0
    del content
    assert (tmp_path / "store/objects/ab/x").read_bytes() == data


def test_a_filesystem_that_cannot_map_gets_plain_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> mmap.mmap:
        raise OSError(19, "No such device")  # ENODEV: what mmap says on filesystems without it

    backend = LocalBackend(tmp_path / "store")
    data = _payload(2 * MAPPED_MIN_BYTES)
    _write_cached(backend, "objects/ab/x", data)
    monkeypatch.setattr(local.mmap, "mmap", refuse)
    allocate = _Allocations()
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)] and backend.mapped_reads is False


def test_network_filesystems_get_plain_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # There an I/O error under a mapped page would end the process instead of raising.
    monkeypatch.setattr(local, "network_filesystem", lambda path: True)
    backend = LocalBackend(tmp_path / "store")
    data = _payload(2 * MAPPED_MIN_BYTES)
    _write_cached(backend, "objects/ab/x", data)
    allocate = _Allocations()
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)]


def test_a_file_not_in_the_page_cache_is_read_not_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its pages would come in by faults, some while the GIL is held: a read is faster.
    backend = LocalBackend(tmp_path / "store")
    data = _payload(4 * MAPPED_MIN_BYTES)
    _write_cached(backend, "objects/ab/x", data)
    _evict(tmp_path / "store/objects/ab/x")
    maps = _CountedMaps()
    monkeypatch.setattr(local.mmap, "mmap", maps)
    allocate = _Allocations()
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)] and maps.calls == 0
    # That read brought it into the page cache: the next one maps it.
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)] and maps.calls == 1


@pytest.mark.parametrize("cached_page", ["first", "last"])
def test_a_file_with_only_one_page_cached_is_read_not_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached_page: str
) -> None:
    # As a direct write may leave it: its last partial block went through the page cache (and
    # a clean-clone test run once found the first page cached). The file must not pass for
    # cached on the strength of one page.
    backend = LocalBackend(tmp_path / "store")
    data = _payload(4 * MAPPED_MIN_BYTES + 123)
    path = tmp_path / "store/objects/ab/x"
    _write_cached(backend, "objects/ab/x", data)
    offset = 0 if cached_page == "first" else len(data) - 1
    middle = len(data) // 2 // mmap.PAGESIZE
    for _ in range(20):
        _evict(path)
        assert backend.read("objects/ab/x", offset, 1) == data[offset : offset + 1]  # that page back in
        # The kernel reads ahead of a read: the test stands only if the middle page (which
        # the backend asks about, with the first) stayed out.
        if not _residency(path)[middle]:
            break
    else:
        raise AssertionError(f"{path}: reading one page kept bringing the middle page in")
    maps = _CountedMaps()
    monkeypatch.setattr(local.mmap, "mmap", maps)
    allocate = _Allocations()
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)] and maps.calls == 0


def test_without_a_way_to_ask_the_page_cache_files_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    data = _payload(2 * MAPPED_MIN_BYTES)
    _write_cached(backend, "objects/ab/x", data)
    monkeypatch.delattr(local.os, "RWF_NOWAIT")
    allocate = _Allocations()
    assert backend.read_into("objects/ab/x", allocate).tobytes() == data
    assert allocate.sizes == [len(data)]


def _large_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal(3 << 20, dtype=np.float32),  # 12 MiB: chunks far above the threshold
        "b": rng.standard_normal(100, dtype=np.float32),
    }


def test_checkouts_through_mapped_reads_round_trip_and_unmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maps = _CountedMaps()
    monkeypatch.setattr(local.mmap, "mmap", maps)
    state = _large_state(0)
    with ckptrepo.init(tmp_path / "repo") as repo:
        first = repo.commit(state, step=1)
        second = repo.commit({"w": state["w"] + 1e-3, "b": state["b"]}, step=2)  # delta objects
        objects = tmp_path / "repo" / "objects"
        # The first checkout of each reads its files (written past the page cache), the
        # second maps them.
        for _ in range(2):
            for commit, expected in ((first, state["w"]), (second, state["w"] + 1e-3)):
                restored = repo.checkout(commit.id).to_dict()
                np.testing.assert_array_equal(restored["w"], expected)
        assert maps.calls > 0
        # Every object file was unmapped once decoded: nothing of the store stays mapped.
        assert _mappings_of(objects) == []


def test_a_damaged_large_object_is_refused_through_a_mapped_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maps = _CountedMaps()
    monkeypatch.setattr(local.mmap, "mmap", maps)
    with ckptrepo.init(tmp_path / "repo") as repo:
        commit = repo.commit(_large_state(1), step=1)
        repo.checkout(commit.id).to_dict()  # now in the page cache, so mapped from here on
        chunk = repo.checkout(commit.id).entry("w").chunks[0].id
        path = tmp_path / "repo" / "objects" / chunk[:2] / chunk[2:]
        assert path.stat().st_size >= MAPPED_MIN_BYTES
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0x40
        os.chmod(path, 0o644)
        path.write_bytes(bytes(damaged))
        mapped = maps.calls
        with pytest.raises(ckptrepo.ObjectCorruptError):
            repo.checkout(commit.id)["w"]
        assert maps.calls > mapped
        # Cut short: the mapping covers what is there, and the decoder says what is missing.
        path.write_bytes(bytes(damaged[: len(damaged) // 2]))
        with pytest.raises(ckptrepo.ObjectCorruptError):
            repo.checkout(commit.id)["w"]
