"""Pausing Python's cyclic garbage collector while a commit or a checkout builds many objects.

A commit or checkout of a large checkpoint makes tens of thousands of small objects (entries,
chunk references, futures, parsed JSON). Every few hundred of them start a collection of the
young objects, and once enough have survived, a full one walks every object of the process
(in a larger process, less often but for longer: the cost per object made stays the same).
These objects hold no cycles and are freed by reference counting, so the collections find
nothing; they only cost time. While any pause is in effect the collector is off; it comes
back on when the last pause ends, if it was on when the first began (Mercurial does the same
around its manifest parsing). What was held back is collected at the next allocation.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic collector off for the duration (nested and concurrent uses are
    counted; the last one out restores what the first one in found)."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
