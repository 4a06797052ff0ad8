"""Helpers for the reliability tests: deterministic checkpoints, bit-exact comparison, and
forked worker processes that report what they finished and can be SIGKILLed at any instant.

Workers are forked from the test process (imports already done), so a kill loop costs
milliseconds per kill instead of an interpreter start. A worker never returns into pytest: it
always leaves through ``os._exit``.
"""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ckptrepo
from ckptrepo.config import Chunking, Config

# Small chunks: a checkpoint of a few hundred KiB becomes many objects, so kills land between
# many more writes.
# Every entry an object file (none inline), so that small states exercise the store.
SMALL_CHUNKS = Config(chunking=Chunking(tensor_chunk_size=64 << 10, inline_max_size=0))


def env_int(name: str, default: int) -> int:
    """A test size that a benchmark run can raise through the environment."""
    return int(os.environ.get(name, default))


def make_state(seed: int, step: int, size: int = 1 << 16) -> dict[str, Any]:
    """A training-like checkpoint of ``step``: the weights drift a little from step to step
    (so chunks are stored as deltas against the parent's), the optimizer state changes fully."""
    base = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    drift = np.random.default_rng((seed, step)).integers(0, size, 64)
    base[drift] += np.float32(step)
    moment = np.random.default_rng((seed, step, 1)).standard_normal(size // 4).astype(np.float32)
    return {
        "model": {"w": base, "b": np.arange(16, dtype=np.int64) * step},
        "optimizer": {"state": {0: {"exp_avg": moment}}, "param_groups": [{"lr": 1e-3 / (step + 1)}]},
        "step": step,
        "note": f"seed {seed} step {step}",
    }


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal in keys, key types, container types, dtypes, shapes and every bit."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}/{i}")
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
    elif isinstance(expected, float):
        assert np.float64(actual).tobytes() == np.float64(expected).tobytes(), path
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@dataclass
class Worker:
    """A forked process running ``body(report)``; ``report(line)`` sends one line home."""

    pid: int
    fd: int
    lines: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    status: int | None = None

    @classmethod
    def start(cls, body: Callable[[Callable[[str], None]], None]) -> Worker:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(read_fd)

                def report(line: str) -> None:
                    os.write(write_fd, (line + "\n").encode())

                body(report)
            except BaseException:
                code = 1
                try:
                    os.write(write_fd, ("error " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(write_fd)
        return cls(pid, read_fd)

    def _drain(self, timeout: float = 0.0) -> bool:
        """Read what is there; False once the worker closed its end."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        data = os.read(self.fd, 1 << 16)
        if not data:
            return False
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines.extend(line.decode() for line in complete)
        return True

    def kill_after(self, seconds: float, *, once: str | None = None, limit: float = 5.0) -> None:
        """SIGKILL the worker ``seconds`` from now, or, with ``once``, ``seconds`` after it
        reports a line starting with ``once`` (or after ``limit`` seconds if it never does)."""
        if once is not None:
            give_up = time.monotonic() + limit
            seen = len(self.lines)
            while time.monotonic() < give_up and not any(
                line.startswith(once) for line in self.lines[seen:]
            ):
                if not self._drain(0.01):
                    break
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self._drain(max(0.0, deadline - time.monotonic())):
                break
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()

    def wait(self, timeout: float = 120.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while self._drain(0.05):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                break
        os.close(self.fd)
        _, self.status = os.waitpid(self.pid, 0)
        errors = [line for line in self.lines if line.startswith("error ")]
        assert not errors, errors[0]
        return self.lines


def open_repo(root: Path) -> ckptrepo.Repository:
    return ckptrepo.open(root)


def committed(lines: list[str]) -> list[tuple[str, int, str]]:
    """``(branch, step, commit id)`` of every ``done`` line a worker reported."""
    out = []
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "done":
            out.append((parts[1], int(parts[2]), parts[3]))
    return out
