"""Loading the compiled loops (numba modules of this package) without making every process
pay for them.

Loading numba, LLVM and a module's cached machine code costs a process about a second of CPU
and 100 MB or so. Two kinds of module pay that differently:

- the context coder's loops (``ans_kernels``) have no other implementation: :func:`load`
  imports them where first needed;
- the codec's element loops (``element_kernels``) are faster forms of numpy code that gives
  the same bytes, so a process that moves little data never needs them. :func:`warm` starts
  importing them in a background thread once a process has moved enough data to repay the
  load, and :func:`ready` hands them out only once they are fully imported; until then the
  numpy forms run.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_started: set[str] = set()


def load(name: str) -> ModuleType:
    """The compiled module ``name`` of this package, imported now if it is not yet."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f".{name}", __package__)
    return module


def ready(name: str) -> ModuleType | None:
    """The compiled module ``name`` if it has been fully imported, else None (never waits)."""
    return _loaded.get(name)


def warm(name: str) -> threading.Thread | None:
    """Start importing ``name`` in a background thread, unless it is loaded or loading;
    returns the thread it started.

    The thread is a daemon: a process that ends meanwhile has no use for the loops, and
    should not wait a second for them at exit. Stopping it half-way loses nothing (numba
    writes its on-disk cache to a temporary name and renames it into place).
    """
    with _lock:
        if name in _loaded or name in _started:
            return None
        _started.add(name)
    thread = threading.Thread(target=_load_quietly, args=(name,), name=f"ckptrepo-load-{name}", daemon=True)
    thread.start()
    return thread


def _load_quietly(name: str) -> None:
    try:
        load(name)
    except Exception:
        # The numpy forms stay in use: nothing is wrong but speed, so say so and go on.
        _log.warning("could not load the compiled loops %s; using the slower numpy forms", name, exc_info=True)
