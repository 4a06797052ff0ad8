"""Direct (O_DIRECT) writes of the local backend: every size comes back byte for byte, and a
filesystem or device that refuses them gets the same bytes through the page cache."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptrepo.backends import local
from ckptrepo.backends.local import LocalBackend

ALIGN = 4096


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) % 251 for i in range(size))


def _direct_supported(root: Path) -> bool:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, (256 << 10) - 1, 256 << 10,
                                  (256 << 10) + 1, (8 << 20) + ALIGN + 7, (20 << 20) + 3])
def test_every_size_round_trips(tmp_path: Path, size: int) -> None:
    backend = LocalBackend(tmp_path / "store")
    data = _payload(size, seed=size)
    backend.write("objects/ab/x", data, create_only=True)
    assert backend.read("objects/ab/x") == data
    assert (tmp_path / "store/objects/ab/x").stat().st_size == size
    # The filesystem took the direct writes: the backend did not fall back.
    assert backend.direct == _direct_supported(tmp_path / "probe-dir")
    assert list(backend.temp_files()) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 5 * ALIGN + 17), min_size=1, max_size=6), seed=st.integers(0, 250))
def test_direct_writes_through_a_small_buffer_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int], seed: int
) -> None:
    # Every write direct, through a buffer of two blocks, so one object crosses it many times.
    monkeypatch.setattr(local, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(local, "_DIRECT_BUFFER_BYTES", 2 * ALIGN)
    backend = LocalBackend(tmp_path / f"store-{seed}-{len(sizes)}")
    for i, size in enumerate(sizes):
        data = _payload(size, seed + i)
        backend.write(f"k/{i}", data)
        assert backend.read(f"k/{i}") == data


def _refusing(real: Callable[..., Any], refuse: Callable[[int], bool]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if refuse(args[1] if len(args) > 1 else 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(*args, **kwargs)

    return call


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As tmpfs before Linux 6.6 and many FUSE filesystems answer: EINVAL at open.
    monkeypatch.setattr(os, "open", _refusing(os.open, lambda flags: bool(flags & os.O_DIRECT)))
    backend = LocalBackend(tmp_path / "store")
    data = _payload(1 << 20)
    backend.write("objects/ab/x", data, create_only=True)
    assert backend.read("objects/ab/x") == data
    assert backend.direct is False
    backend.write("objects/ab/y", data, create_only=True)  # straight to the page cache now
    assert backend.read("objects/ab/y") == data


def _intercept_direct_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_write: Callable[[Callable[..., int], int, Any], int]
) -> None:
    """Route every write on an O_DIRECT file through ``direct_write(real_write, fd, data)``
    (skips where the filesystem has no O_DIRECT to intercept)."""
    if not _direct_supported(tmp_path / "probe-dir"):
        pytest.skip("this filesystem has no O_DIRECT")
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            return direct_write(real_write, fd, data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_device_refusing_the_alignment_gets_the_rest_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = []

    def refuse(real_write: Callable[..., int], fd: int, data: Any) -> int:
        refused.append(len(data))
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    _intercept_direct_writes(tmp_path, monkeypatch, refuse)
    backend = LocalBackend(tmp_path / "store")
    data = _payload((1 << 20) + 5)
    backend.write("objects/ab/x", data, create_only=True)
    assert refused and backend.direct is False
    assert backend.read("objects/ab/x") == data


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_short_direct_write_is_finished_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = []

    def write_short_once(real_write: Callable[..., int], fd: int, data: Any) -> int:
        if not short and len(data) > ALIGN:
            short.append(len(data))
            return real_write(fd, memoryview(data)[:ALIGN])  # as a disk nearly full might
        return real_write(fd, data)

    _intercept_direct_writes(tmp_path, monkeypatch, write_short_once)
    backend = LocalBackend(tmp_path / "store")
    data = _payload((3 << 20) + 11)
    backend.write("objects/ab/x", data, create_only=True)
    assert short
    assert backend.read("objects/ab/x") == data
    assert backend.direct is True  # a short write says nothing against the next file


def test_network_filesystems_get_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On NFS and the like a direct write is a synchronous round trip to the server.
    seen = []

    def on_nfs(path: Any) -> bool:
        seen.append(Path(path))
        return True

    monkeypatch.setattr(local, "network_filesystem", on_nfs)
    backend = LocalBackend(tmp_path / "store")
    assert backend.direct is False and seen == [tmp_path / "store"]
    data = _payload(1 << 20)
    backend.write("objects/ab/x", data, create_only=True)
    assert backend.read("objects/ab/x") == data


def _page_aligned(data: bytes) -> memoryview:
    """``data`` in a buffer that starts on a page, as the store assembles object files."""
    buffer = mmap.mmap(-1, max(1, len(data)))
    buffer[: len(data)] = data
    return memoryview(buffer)[: len(data)]


@pytest.mark.parametrize("size", [1, ALIGN - 1, ALIGN, (256 << 10) + 1, (8 << 20) + ALIGN + 7, (20 << 20) + 3])
def test_a_page_aligned_buffer_goes_to_the_disk_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    def no_bounce(self: Any) -> memoryview:
        raise AssertionError("an aligned buffer was copied through the thread's buffer")

    monkeypatch.setattr(local._AlignedBuffer, "get", no_bounce)
    backend = LocalBackend(tmp_path / "store")
    data = _payload(size, seed=size)
    backend.write("objects/ab/x", _page_aligned(data), create_only=True)
    assert backend.read("objects/ab/x") == data
    assert backend.direct == _direct_supported(tmp_path / "probe-dir")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("aligned", [False, True])
def test_an_unaligned_view_of_an_aligned_buffer_is_copied_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aligned: bool
) -> None:
    # A view that starts one byte into a page must not reach the disk as it is: O_DIRECT
    # would refuse it (EINVAL) and switch direct writes off for good.
    copied = []
    real_get = local._AlignedBuffer.get

    def counting_get(self: Any) -> memoryview:
        copied.append(True)
        return real_get(self)

    monkeypatch.setattr(local._AlignedBuffer, "get", counting_get)
    data = _payload((1 << 20) + 9)
    source = _page_aligned(b"\0" + data)[1:] if not aligned else _page_aligned(data)
    backend = LocalBackend(tmp_path / "store")
    backend.write("objects/ab/x", source, create_only=True)
    assert backend.read("objects/ab/x") == data
    assert bool(copied) == (not aligned and backend.direct)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_short_direct_write_of_an_aligned_buffer_is_finished_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = []

    def write_short_once(real_write: Callable[..., int], fd: int, data: Any) -> int:
        if not short and len(data) > ALIGN:
            short.append(len(data))
            return real_write(fd, memoryview(data)[:ALIGN])
        return real_write(fd, data)

    _intercept_direct_writes(tmp_path, monkeypatch, write_short_once)
    backend = LocalBackend(tmp_path / "store")
    data = _payload((3 << 20) + 11)
    backend.write("objects/ab/x", _page_aligned(data), create_only=True)
    assert short == [3 << 20]  # the aligned head in one write, straight from the buffer
    assert backend.read("objects/ab/x") == data


def test_a_commit_writes_its_object_files_from_where_it_assembled_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store assembles each object file in a page-aligned buffer per thread, which a direct
    # write takes as it is; chunks of different coded sizes share the one mapping.
    import numpy as np

    import ckptrepo

    def no_bounce(self: Any) -> memoryview:
        raise AssertionError("an object file was copied through the thread's buffer")

    monkeypatch.setattr(local._AlignedBuffer, "get", no_bounce)
    rng = np.random.default_rng(3)
    state = {
        "noise": rng.standard_normal(3 << 18).astype(np.float32),  # planes, mostly raw
        "smooth": np.linspace(0, 1, 5 << 18, dtype=np.float32),  # planes, compressed
        "bytes": rng.integers(0, 255, 1 << 20, dtype=np.uint8),  # raw
    }
    with ckptrepo.init(tmp_path / "r") as repo:
        repo.commit(state, step=1)
    with ckptrepo.open(tmp_path / "r") as repo:
        back = repo.checkout(step=1).to_dict()
        assert repo.fsck(read_data=True).ok
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_writing_its_buffers_leaves_the_parents_alone(tmp_path: Path) -> None:
    # The aligned buffers are private memory: a child forked while the parent holds them (a
    # data loader's worker, say) gets copies, and what it writes never reaches the parent's
    # object files in flight.
    from ckptrepo import store as store_module

    blob = store_module._BlobBuffers().getter(0)(1 << 20)
    bounce = local._AlignedBuffer().get()
    blob[:] = 1
    bounce[:16] = b"p" * 16
    pid = os.fork()
    if pid == 0:  # the child: overwrite both, then leave at once
        try:
            blob[:] = 2
            bounce[:16] = b"c" * 16
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert int(blob.min()) == int(blob.max()) == 1
    assert bytes(bounce[:16]) == b"p" * 16
