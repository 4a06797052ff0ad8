"""A backend wrapper that retries transient failures with exponential backoff and jitter.

Only errors a backend marks ``transient`` (timeouts, throttling, 5xx, dropped connections)
are retried; a permanent error, a missing key or a lost precondition is raised at once.

A conditional write whose reply was lost may have been applied: its retry then finds the
precondition failed by its own write. So after a transient failure, a failed precondition
is checked by reading the key back: holding exactly what we wrote means we won.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ..errors import BackendError, KeyNotFoundError, PreconditionFailedError
from .base import Backend, BackendWrapper, KeyStat, list_sizes

T = TypeVar("T")

DEFAULT_ATTEMPTS = 6
DEFAULT_BASE_DELAY_S = 0.05
DEFAULT_MAX_DELAY_S = 5.0


class RetryingBackend(BackendWrapper):
    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY_S,
        max_delay: float = DEFAULT_MAX_DELAY_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        super().__init__(inner)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self.retries = 0  # how many retries were made, for reports and tests

    def _call(self, what: Callable[[], T], *, after_transient: Callable[[], T] | None = None) -> T:
        failed_transiently = False
        for attempt in range(self.attempts):
            try:
                return what()
            except PreconditionFailedError:
                if failed_transiently and after_transient is not None:
                    return after_transient()
                raise
            except BackendError as exc:
                if not exc.transient or attempt == self.attempts - 1:
                    raise
                failed_transiently = True
                self.retries += 1
                # Full jitter: spreads out many clients that failed at the same moment.
                delay = min(self.max_delay, self.base_delay * (2**attempt))
                self._sleep(random.uniform(0, delay))
        raise AssertionError("unreachable")

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.read(key, offset, length))

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        def ours() -> None:
            if self._holds(key, data):
                return
            raise PreconditionFailedError(f"{key} in {self.location} exists already")

        self._call(lambda: self.inner.write(key, data, create_only=create_only), after_transient=ours)

    def compare_and_swap(self, key: str, expected: bytes | None, new: bytes | None) -> None:
        def ours() -> None:
            if self._holds(key, new):
                return
            raise PreconditionFailedError(f"{key} in {self.location} moved")

        self._call(lambda: self.inner.compare_and_swap(key, expected, new), after_transient=ours)

    def _holds(self, key: str, data: bytes | memoryview | None) -> bool:
        try:
            current: bytes | None = self._call(lambda: self.inner.read(key))
        except KeyNotFoundError:
            current = None
        return current == (None if data is None else bytes(data))

    def delete(self, key: str) -> None:
        self._call(lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        # A listing is retried whole, before any key is handed out.
        yield from self._call(lambda: list(self.inner.list(prefix)))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return self._call(lambda: list_sizes(self.inner, prefix))

    def stat(self, key: str) -> KeyStat | None:
        return self._call(lambda: self.inner.stat(key))

