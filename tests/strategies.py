"""Hypothesis strategies for checkpoints: nested dicts of arrays, tensors and values, and
directory trees."""

from __future__ import annotations

import collections
import math
import struct
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool",
                "complex64", "float8_e4m3fn", "float8_e5m2", "uint16", "int16"]


def _bits_array(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """An array of ``dtype`` filled from raw bytes: every bit pattern, nan payloads included."""
    itemsize = np.dtype(dtype).itemsize
    count = math.prod(shape)
    raw = (data * (count * itemsize // max(1, len(data)) + 1))[: count * itemsize] if data else bytes(count * itemsize)
    arr = np.frombuffer(bytearray(raw), dtype=np.uint8).view(dtype).reshape(shape).copy()
    if dtype == "bool":
        arr = arr.view(np.uint8) % 2 == 1
    return arr


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)


@st.composite
def numpy_arrays(draw: Any) -> np.ndarray:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(shapes)
    data = draw(st.binary(min_size=0, max_size=64))
    arr = _bits_array(dtype, shape, data)
    if draw(st.booleans()) and arr.ndim >= 2:
        arr = arr.T  # non-contiguous: must come back with the same values
    return arr


@st.composite
def torch_tensors(draw: Any) -> Any:
    import torch

    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(shapes)
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    count = math.prod(shape)
    data = draw(st.binary(min_size=0, max_size=64))
    raw = (data * (count * itemsize // max(1, len(data)) + 1))[: count * itemsize] if data else bytes(count * itemsize)
    base = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == "bool":
        base = base % 2
    tensor = base.view(torch_dtype).reshape(shape).clone()
    if draw(st.booleans()) and tensor.ndim >= 2:
        tensor = tensor.transpose(0, 1)
    return tensor


floats_any_bits = st.binary(min_size=8, max_size=8).map(lambda b: struct.unpack("<d", b)[0])
keys = st.one_of(st.text(max_size=8), st.integers(min_value=-5, max_value=50))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**200), max_value=2**200),
    floats_any_bits, st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan")]),
    st.text(max_size=20), st.binary(max_size=40),
    st.builds(lambda v: np.float32(v), st.floats(width=32, allow_nan=True)),
    st.builds(np.int64, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.builds(np.bool_, st.booleans()),
)


def leaves(with_torch: bool) -> Any:
    options = [scalars, numpy_arrays()]
    if with_torch:
        options.append(torch_tensors())
    return st.one_of(*options)


def checkpoints(with_torch: bool = True) -> Any:
    tree = st.recursive(
        leaves(with_torch),
        lambda children: st.one_of(
            st.dictionaries(keys, children, max_size=4),
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.text(max_size=5), children, max_size=3).map(collections.OrderedDict),
        ),
        max_leaves=12,
    )
    return st.dictionaries(keys, tree, max_size=5)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal in keys, key types, container types, dtypes, shapes and every bit."""
    import sys

    torch = sys.modules.get("torch")
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for ka, kb in zip(a, b):
            assert type(ka) is type(kb), f"{path}: key type {type(ka)} vs {type(kb)}"
            assert_same(a[ka], b[kb], f"{path}/{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif torch is not None and isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        ab = a.contiguous().reshape(-1).view(torch.uint8)
        bb = b.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(ab, bb), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@st.composite
def directory_trees(draw: Any) -> dict[str, Any]:
    """``{relative path: bytes | ("exec", bytes) | ("link", target) | ("dir",)}``."""
    names = st.text(alphabet="abcdefghij_-.0123", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
    tree: dict[str, Any] = {}
    dirs = [""]
    for _ in range(draw(st.integers(min_value=0, max_value=10))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if path in tree or path in dirs or any(p.startswith(path + "/") for p in tree):
            continue
        kind = draw(st.sampled_from(["file", "file", "exec", "dir", "subdir", "link"]))
        if kind == "file":
            tree[path] = draw(st.binary(max_size=3000))
        elif kind == "exec":
            tree[path] = ("exec", draw(st.binary(max_size=100)))
        elif kind == "dir":
            tree[path] = ("dir",)
        elif kind == "subdir":
            dirs.append(path)
        else:
            files = [p for p, v in tree.items() if not isinstance(v, tuple) or v[0] != "dir"]
            target = draw(st.sampled_from(files)) if files else "missing-target"
            depth = path.count("/")
            tree[path] = ("link", "../" * depth + target)
    # A subdirectory with no children stays empty: record it as a dir.
    for d in dirs[1:]:
        if not any(p.startswith(d + "/") for p in tree) and d not in tree:
            tree[d] = ("dir",)
    return tree


def write_tree(root: Any, tree: dict[str, Any]) -> None:
    import os

    root.mkdir(parents=True, exist_ok=True)
    for path, value in tree.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            full.write_bytes(value)
            full.chmod(0o644)
        elif value[0] == "exec":
            full.write_bytes(value[1])
            full.chmod(0o755)
        elif value[0] == "dir":
            full.mkdir(exist_ok=True)
        else:
            os.symlink(value[1], full)


def read_tree(root: Any) -> dict[str, Any]:
    """The tree under ``root`` in the same form as :func:`directory_trees` (links unresolved)."""
    import os
    import stat

    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        for name in list(dirnames) + filenames:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            path = prefix + name
            if stat.S_ISLNK(st_.st_mode):
                out[path] = ("link", os.readlink(full))
                if name in dirnames:
                    dirnames.remove(name)
            elif stat.S_ISDIR(st_.st_mode):
                if not os.listdir(full):
                    out[path] = ("dir",)
            elif st_.st_mode & stat.S_IXUSR:
                out[path] = ("exec", open(full, "rb").read())
            else:
                out[path] = open(full, "rb").read()
    return out
