"""The value model of dict checkpoints: flatten a nested checkpoint into leaves, and back.

A checkpoint is a tree of containers (dict, OrderedDict, list, tuple; dict keys ``str`` or
``int``) whose leaves are arrays (numpy, torch, jax), numpy scalars, or Python ``bool``,
``int``, ``float``, ``str``, ``bytes`` and ``None``. The tree's shape is kept as JSON::

    {"dict": [[key, child], ...]}   {"ordered_dict": [...]}   {"list": [...]}   {"tuple": [...]}
    null                            a leaf: its entry is the manifest entry at this position's path

Each leaf has a path: its keys joined by ``/``; in a key, ``~`` is written ``~0`` and ``/``
``~1``; a ``str`` key that reads like an ``int`` key of the same mapping gets a ``~2`` prefix.
Leaves with bulk data (arrays, ``str``, ``bytes``) are chunked; scalars sit in the entry.
"""

from __future__ import annotations

import collections
import pickle
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_INT_RE = re.compile(r"^-?[0-9]+$")
# numpy dtype kinds that are plain numbers: bool, signed, unsigned, float, complex.
_NUMPY_KINDS = frozenset("biufc")
# Extension float dtypes numpy knows through ml_dtypes (bundled with jax).
_ML_DTYPES = frozenset(
    {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
     "float8_e4m3b11fnuz", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2", "uint2"}
)
FRAMEWORKS = ("numpy", "torch", "jax")


@dataclass(frozen=True, slots=True)
class Leaf:
    """One flattened leaf: metadata for its manifest entry, plus bytes to chunk if any."""

    path: str
    entry: dict[str, Any]  # manifest entry without "chunks" and "size"
    data: memoryview | None = None
    itemsize: int = 1


def escape_key(key: str | int, int_keys: frozenset[str]) -> str:
    if isinstance(key, int):
        return str(key)
    text = key.replace("~", "~0").replace("/", "~1")
    return f"~2{text}" if text in int_keys else text


def join_path(parent: str | None, segment: str) -> str:
    """``parent`` None is the root, so a root key ``""`` and the root itself stay distinct."""
    return segment if parent is None else f"{parent}/{segment}"


def _type_error(path: str | None, message: str) -> TypeError:
    where = "the checkpoint root" if path is None else repr(path)
    return TypeError(f"cannot commit {where}: {message}")


# --- flatten -----------------------------------------------------------------------------


def flatten(checkpoint: Mapping[Any, Any], *, allow_pickle: bool = False) -> tuple[Any, list[Leaf]]:
    """Return the tree JSON and the leaves of ``checkpoint``; raise TypeError on anything
    the value model does not accept, naming its key path, before anything is written."""
    if not isinstance(checkpoint, Mapping):
        raise _type_error(None, f"a dict checkpoint must be a mapping, not {type(checkpoint).__name__}")
    leaves: list[Leaf] = []
    tree = _flatten(checkpoint, None, leaves, set(), allow_pickle)
    return tree, leaves


def _flatten(value: Any, path: str | None, leaves: list[Leaf], active: set[int], allow_pickle: bool) -> Any:
    if isinstance(value, Mapping):
        return _flatten_mapping(value, path, leaves, active, allow_pickle)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        if id(value) in active:
            raise _type_error(path, "the checkpoint contains itself")
        active.add(id(value))
        children = [
            _flatten(item, join_path(path, str(i)), leaves, active, allow_pickle)
            for i, item in enumerate(value)
        ]
        active.discard(id(value))
        return {"list" if type(value) is list else "tuple": children}
    if path is None:
        raise _type_error(None, "a dict checkpoint must be a mapping")
    leaves.append(leaf_of(value, path, allow_pickle))
    return None


def _flatten_mapping(
    value: Mapping[Any, Any], path: str | None, leaves: list[Leaf], active: set[int], allow_pickle: bool
) -> Any:
    if id(value) in active:
        raise _type_error(path, "the checkpoint contains itself")
    active.add(id(value))
    keys = list(value.keys())
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise _type_error(path, f"key {key!r} is a {type(key).__name__}; keys must be str or int")
    int_keys = frozenset(str(k) for k in keys if isinstance(k, int))
    pairs = [
        [key, _flatten(value[key], join_path(path, escape_key(key, int_keys)), leaves, active, allow_pickle)]
        for key in keys
    ]
    active.discard(id(value))
    return {"ordered_dict" if isinstance(value, collections.OrderedDict) else "dict": pairs}


def _torch_module() -> Any:
    # Never import a framework just to look: if it is not imported, no value can be its.
    return sys.modules.get("torch")


def leaf_of(value: Any, path: str, allow_pickle: bool = False) -> Leaf:
    torch = _torch_module()
    if torch is not None and isinstance(value, torch.Tensor):
        return _torch_leaf(value, path, torch)
    if isinstance(value, np.ndarray):
        return _numpy_leaf(value, path, "numpy")
    if _is_jax_array(value):
        return _numpy_leaf(np.asarray(value), path, "jax")
    if isinstance(value, np.generic):
        dtype = _checked_numpy_dtype(value.dtype, path)
        return Leaf(path, {"kind": "numpy_scalar", "dtype": dtype, "value": np.asarray(value).tobytes().hex()})
    if value is None:
        return Leaf(path, {"kind": "none"})
    if isinstance(value, bool):
        return Leaf(path, {"kind": "bool", "value": value})
    if isinstance(value, int) and type(value) is int:
        return Leaf(path, {"kind": "int", "value": str(value)})
    if isinstance(value, float) and type(value) is float:
        return Leaf(path, {"kind": "float", "value": struct.pack("<d", value).hex()})
    if type(value) is str:
        return Leaf(path, {"kind": "str"}, memoryview(value.encode("utf-8", "surrogatepass")))
    if type(value) is bytes:
        return Leaf(path, {"kind": "bytes"}, memoryview(value))
    if allow_pickle:
        return Leaf(path, {"kind": "pickle"}, memoryview(pickle.dumps(value, protocol=5)))
    raise _type_error(
        path,
        f"values of type {type(value).__module__}.{type(value).__qualname__} are not supported "
        "(arrays, tensors, numpy scalars, bool, int, float, str, bytes, None, and dict/list/tuple "
        "of those; pass allow_pickle=True to pickle other objects)",
    )


def _is_jax_array(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("jax") or module.startswith("jaxlib")


def _checked_numpy_dtype(dtype: np.dtype[Any], path: str) -> str:
    if dtype.kind in _NUMPY_KINDS or dtype.name in _ML_DTYPES:
        return dtype.name
    raise _type_error(path, f"numpy dtype {dtype} is not supported (numbers and bool only)")


def _numpy_leaf(array: np.ndarray[Any, Any], path: str, framework: str) -> Leaf:
    dtype = _checked_numpy_dtype(array.dtype, path)
    entry: dict[str, Any] = {"kind": "tensor", "framework": framework, "dtype": dtype, "shape": list(array.shape)}
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        entry["byteorder"] = "big"
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return Leaf(path, entry, memoryview(flat.data), itemsize=array.dtype.itemsize)


def _torch_leaf(tensor: Any, path: str, torch: Any) -> Leaf:
    if tensor.layout != torch.strided:
        raise _type_error(path, f"torch tensors with layout {tensor.layout} are not supported (dense only)")
    if tensor.is_quantized:
        raise _type_error(path, "quantized torch tensors are not supported")
    # Views, non-contiguous and device tensors are copied to contiguous host memory.
    host = tensor.detach().to("cpu").contiguous()
    dtype = str(host.dtype).removeprefix("torch.")
    flat = host.reshape(-1).view(torch.uint8).numpy()
    entry = {"kind": "tensor", "framework": "torch", "dtype": dtype, "shape": list(host.shape)}
    return Leaf(path, entry, memoryview(flat), itemsize=host.element_size())


# --- unflatten ---------------------------------------------------------------------------


def iter_leaf_paths(tree: Any, path: str | None = None) -> list[str]:
    """The paths of every leaf of ``tree``, in order."""
    out: list[str] = []
    _collect_paths(tree, path, out)
    return out


def _collect_paths(tree: Any, path: str | None, out: list[str]) -> None:
    from .errors import FormatError

    if tree is None:
        if path is None:
            raise FormatError("manifest tree: the root must be a container")
        out.append(path)
        return
    if not isinstance(tree, dict) or len(tree) != 1:
        raise FormatError(f"manifest tree at {'root' if path is None else path}: not a container or null")
    (kind, children), = tree.items()
    if kind in ("dict", "ordered_dict"):
        if not isinstance(children, list):
            raise FormatError(f"manifest tree at {'root' if path is None else path}: {kind} needs a list of pairs")
        keys = [pair[0] for pair in children if isinstance(pair, list) and len(pair) == 2]
        if len(keys) != len(children):
            raise FormatError(f"manifest tree at {'root' if path is None else path}: bad key/child pair")
        int_keys = frozenset(str(k) for k in keys if isinstance(k, int) and not isinstance(k, bool))
        for key, child in children:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise FormatError(f"manifest tree at {'root' if path is None else path}: bad key {key!r}")
            _collect_paths(child, join_path(path, escape_key(key, int_keys)), out)
    elif kind in ("list", "tuple"):
        if not isinstance(children, list):
            raise FormatError(f"manifest tree at {'root' if path is None else path}: {kind} needs a list")
        for i, child in enumerate(children):
            _collect_paths(child, join_path(path, str(i)), out)
    else:
        raise FormatError(f"manifest tree at {'root' if path is None else path}: unknown container {kind!r}")


def unflatten(tree: Any, leaf_values: Mapping[str, Any], path: str | None = None) -> Any:
    if tree is None:
        assert path is not None
        return leaf_values[path]
    (kind, children), = tree.items()
    if kind in ("dict", "ordered_dict"):
        int_keys = frozenset(str(k) for k, _ in children if isinstance(k, int))
        pairs = [
            (key, unflatten(child, leaf_values, join_path(path, escape_key(key, int_keys))))
            for key, child in children
        ]
        return collections.OrderedDict(pairs) if kind == "ordered_dict" else dict(pairs)
    items = [unflatten(child, leaf_values, join_path(path, str(i))) for i, child in enumerate(children)]
    return items if kind == "list" else tuple(items)


def scalar_value(entry: Mapping[str, Any], path: str) -> Any:
    """The value of a leaf stored inline in its entry."""
    from .errors import FormatError

    kind = entry["kind"]
    try:
        if kind == "none":
            return None
        if kind == "bool":
            return bool(entry["value"])
        if kind == "int":
            return int(entry["value"])
        if kind == "float":
            return struct.unpack("<d", bytes.fromhex(entry["value"]))[0]
        if kind == "numpy_scalar":
            dtype = numpy_dtype(entry["dtype"])
            raw = bytes.fromhex(entry["value"])
            if len(raw) != dtype.itemsize:
                raise ValueError(f"{len(raw)} bytes for a {dtype}")
            return np.frombuffer(raw, dtype=dtype)[0]
    except (KeyError, ValueError, struct.error) as exc:
        raise FormatError(f"entry {path}: bad {kind} value ({exc})") from None
    raise FormatError(f"entry {path}: {kind} is not a scalar kind")


def numpy_dtype(name: str) -> np.dtype[Any]:
    if name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(
                f"dtype {name} needs the ml_dtypes package for numpy; "
                "install it or check out with framework='torch'"
            ) from None
        extension: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return extension
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise TypeError(f"numpy has no dtype {name}; check out with framework='torch'") from None
    if dtype.kind not in _NUMPY_KINDS:
        raise TypeError(f"dtype {name} is not a numeric dtype")
    return dtype


def decode_bulk(
    entry: Mapping[str, Any], data: bytearray | memoryview, framework: str | None, allow_pickle: bool, path: str
) -> Any:
    """The value of a chunked leaf from its bytes. ``framework`` None keeps the committed one."""
    kind = entry["kind"]
    if kind == "bytes":
        return bytes(data)
    if kind == "str":
        return bytes(data).decode("utf-8", "surrogatepass")
    if kind == "pickle":
        if not allow_pickle:
            raise TypeError(
                f"entry {path} was committed with pickle; pass allow_pickle=True to load it "
                "(only for checkpoints you trust: unpickling can run code)"
            )
        return pickle.loads(bytes(data))
    if kind != "tensor":
        from .errors import FormatError

        raise FormatError(f"entry {path}: unknown kind {kind!r}")
    target = framework or entry.get("framework", "numpy")
    return tensor_from_bytes(data, entry["dtype"], tuple(entry["shape"]), target, entry.get("byteorder"))


def tensor_from_bytes(
    data: bytearray | memoryview, dtype: str, shape: tuple[int, ...], framework: str, byteorder: str | None = None
) -> Any:
    if framework == "torch":
        import torch

        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch has no dtype {dtype}")
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        return raw.view(torch_dtype).reshape(shape)
    np_dtype = numpy_dtype(dtype)
    if byteorder == "big":
        np_dtype = np_dtype.newbyteorder(">")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    if framework != "numpy":
        raise ValueError(f"unknown framework {framework!r}; use one of {', '.join(FRAMEWORKS)}")
    return array
