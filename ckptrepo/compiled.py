"""The package's compiled code: the C extension (``_elements``, built at install where a C
compiler is found) and the numba loops of the context coder (``ans_kernels``), loaded only
where a process needs them.

The extension loads in under a millisecond with the package. Where it could not be built,
``ELEMENTS`` is None and its callers run their other forms (the codec's numpy forms, the
context coder's numba loops), which give the same results.

Loading numba, LLVM and a module's cached machine code costs a process about a second of CPU
and 100 MB or so, which a process that never codes a 16-bit float delta should not pay: the
context coder imports its loops through :func:`load` where first needed, and only in a
process without the extension.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ELEMENTS: ModuleType | None
try:
    from . import _elements as ELEMENTS
except ImportError:  # only where the extension could not be built
    ELEMENTS = None

_loaded: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The compiled module ``name`` of this package, imported now if it is not yet."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f".{name}", __package__)
    return module
