"""zstd frames as the codecs use them: bounded decompression, per-thread contexts, and the
parameters for byte planes of numbers."""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from .errors import FormatError

# Buffers the codecs read: anything exposing the buffer protocol with byte items.
Buffer = bytes | bytearray | memoryview

DEFAULT_LEVEL = 1
# zstd contexts are reused per thread: making one per call costs more than compressing a
# small plane, and a context must not be shared between threads.
_local = threading.local()


# For byte planes of numbers (config ``fast_planes``): a plane of float exponents or of the
# low bytes of differences is a few symbols in no useful order, so zstd's match finder spends
# its time on short matches that only break up the entropy coding of literals. A 64-entry match
# table and matches of at least 7 bytes keep the long runs (zero planes) and otherwise leave
# the plane to the literal coder: on fp32 weights 2.2x less CPU than level 1 at 0.6% more bytes,
# on the difference planes of bf16 weights 4% fewer bytes (docs/benchmarks.md).
_FAST_PLANES = zstandard.ZstdCompressionParameters(
    window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0,
    strategy=zstandard.STRATEGY_FAST, write_content_size=True,
)


def _compressor(level: int, fast_planes: bool = False) -> zstandard.ZstdCompressor:
    cache: dict[tuple[int, bool], zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    key = (level, fast_planes)
    found = cache.get(key)
    if found is None:
        # write_content_size lets the reader check the declared size before it allocates.
        found = cache[key] = (
            zstandard.ZstdCompressor(compression_params=_FAST_PLANES)
            if fast_planes
            else zstandard.ZstdCompressor(level=level, write_content_size=True)
        )
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def zstd_compress(data: Buffer | np.ndarray, level: int, *, fast_planes: bool = False) -> bytes:
    """One zstd frame of ``data`` at ``level``, or with the parameters for byte planes."""
    return _compressor(level, fast_planes).compress(data.data if isinstance(data, np.ndarray) else data)


def _check_declared(frame: Buffer, expected_size: int) -> None:
    # python-zstandard would otherwise trust the declared size and allocate whatever a
    # hostile frame claims.
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if declared != expected_size:
        raise FormatError(f"zstd frame declares {declared} bytes, expected {expected_size}")


def zstd_decompress(frame: Buffer, expected_size: int) -> bytes:
    """Decompress one frame that must yield exactly ``expected_size`` bytes; the frame's
    declared size is checked first."""
    _check_declared(frame, expected_size)
    if expected_size == 0:
        return b""
    try:
        # Bytes after the frame are damage, as zstd_decompress_into finds too.
        out = _decompressor().decompress(frame, max_output_size=expected_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if len(out) != expected_size:
        raise FormatError(f"zstd frame yielded {len(out)} bytes, expected {expected_size}")
    return out


def zstd_decompress_into(frame: Buffer, out: np.ndarray) -> None:
    """Decompress one frame into ``out`` (uint8), which it must fill exactly, checked as
    :func:`zstd_decompress` checks. A caller's reused buffer instead of a new bytes object
    per frame: a new one of megabytes is fresh memory, a page fault for every 4 KiB of it."""
    expected_size = len(out)
    _check_declared(frame, expected_size)
    if expected_size == 0:
        return
    view = out.reshape(-1).view(np.uint8).data
    done = 0
    try:
        reader = _decompressor().stream_reader(frame)
        while done < expected_size:
            n = reader.readinto(view[done:])
            if n == 0:
                break
            done += n
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if done != expected_size:
        raise FormatError(f"zstd frame yielded {done} bytes, expected {expected_size}")
    if extra:
        raise FormatError(f"zstd frame yields more than the {expected_size} bytes it declares")
