"""Loading the numba-compiled loops of this package (the context coder's, ``ans_kernels``)
only where a process needs them.

Loading numba, LLVM and a module's cached machine code costs a process about a second of CPU
and 100 MB or so, which a process that never codes a 16-bit float delta should not pay: the
context coder imports its loops through :func:`load` where first needed. (The codec's element
loops are C, ``_elements.c``, and load with the codec.)
"""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The compiled module ``name`` of this package, imported now if it is not yet."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f".{name}", __package__)
    return module
