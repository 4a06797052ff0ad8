"""Direct (O_DIRECT) writes of the local backend: every size comes back byte for byte, and a
filesystem or device that refuses them gets the same bytes through the page cache."""

from __future__ import annotations

import errno
import fcntl
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
