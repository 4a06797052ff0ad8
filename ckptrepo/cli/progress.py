"""A progress line on stderr for long operations, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from .format import human_bytes

_REFRESH_S = 0.1


class Progress:
    """Call ``update(n)`` from any thread as bytes are done; ``close()`` clears the line."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < _REFRESH_S:
                return
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-6)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "█" * int(frac * 24) + "░" * (24 - int(frac * 24))
            text = f"{self.label} {bar} {frac:4.0%} {human_bytes(self.done)}/{human_bytes(self.total)}"
        else:
            text = f"{self.label} {human_bytes(self.done)}"
        self.stream.write(f"\r{text} {human_bytes(rate)}/s\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
