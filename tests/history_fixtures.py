"""A real fine-tuning run committed step by step, and a numpy reference for diff figures.

Used by test_diff.py, test_accounting.py and test_cli_history.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

import ckptrepo
from ckptrepo.config import Chunking, Config

# The first layer is frozen (requires_grad=False); the other two are trained.
FROZEN = frozenset({"model/0.weight", "model/0.bias"})
TRAINED = frozenset({"model/2.weight", "model/2.bias", "model/4.weight", "model/4.bias"})
# Small chunks, so that even these small tensors span several chunks each.
# Every entry an object file (none inline), so that small states exercise the store.
SMALL_CHUNKS = Config(chunking=Chunking(tensor_chunk_size=4096, inline_max_size=0))


def small_chunk_repo(path: Path) -> ckptrepo.Repository:
    return ckptrepo.init(path, config=SMALL_CHUNKS)


def fine_tune(
    repo: ckptrepo.Repository,
    steps: int = 3,
    *,
    lr: float = 1e-2,
    model_dtype: Any = None,
    branch: str | None = None,
    seed: int = 0,
) -> list[ckptrepo.Commit]:
    """Train a three-layer MLP for ``steps`` steps with its first layer frozen, committing
    ``{"model": state_dict, "optimizer": opt.state_dict(), "step": n}`` after each step.
    ``model_dtype`` (e.g. torch.bfloat16) casts the model's tensors as they are committed."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    )
    for parameter in model[0].parameters():
        parameter.requires_grad = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs, targets = torch.randn(64, 64), torch.randn(64, 4)
    commits = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        state = model.state_dict()
        if model_dtype is not None:
            state = {k: v.to(model_dtype) for k, v in state.items()}
        commits.append(repo.commit(
            {"model": state, "optimizer": optimizer.state_dict(), "step": step},
            step=step, branch=branch, metrics={"loss": loss.item()}, message=f"step {step}",
        ))
    return commits


def as_float64(value: Any) -> np.ndarray:
    """A checked-out tensor as float64 (or complex128), decoded by torch or numpy/ml_dtypes."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_complex():
            return value.to(torch.complex128).numpy()
        return value.to(torch.float64).numpy()
    array = np.asarray(value)
    return array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)


def _scaled_norm(x: np.ndarray) -> float:
    """np.linalg.norm after scaling by the largest finite magnitude: unscaled, the squares of
    values below 1e-154 underflow to 0 (a norm of 5.9e-205 came out 0) and above 1e154
    overflow. Infinities and NaNs pass through as np.linalg.norm treats them."""
    if not len(x):
        return 0.0
    if np.iscomplexobj(x):
        # np.linalg.norm sums the squares of the real and the imaginary parts; dividing a
        # complex infinity by a real scale would make NaNs of its zero part.
        x = np.concatenate([x.real, x.imag])
    finite = np.abs(x[np.isfinite(x)])
    scale = float(finite.max()) if len(finite) else 0.0
    if scale == 0.0:
        return float(np.linalg.norm(x))
    return scale * float(np.linalg.norm(x / scale))


def reference_figures(a: Any, b: Any) -> dict[str, float]:
    """The diff figures computed the plain way, on whole arrays; integer differences with
    Python ints, so that they are exact before rounding."""
    integers = all(isinstance(x, np.ndarray) and x.dtype.kind in "iu" for x in (a, b))
    if integers:
        exact_a, exact_b = [int(x) for x in a.reshape(-1)], [int(x) for x in b.reshape(-1)]
    a, b = as_float64(a).reshape(-1), as_float64(b).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        if integers:
            same = np.array([x == y for x, y in zip(exact_a, exact_b)], dtype=bool)
            difference = np.array([float(y - x) for x, y in zip(exact_a, exact_b)], dtype=np.float64)
        else:
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            difference = np.where(same, 0, b - a)
        l2 = _scaled_norm(difference)
        norm_a = _scaled_norm(a)
    max_abs = float(np.max(np.abs(difference))) if len(a) else 0.0
    if l2 == 0:
        rel = 0.0
    elif norm_a == 0:
        rel = math.inf
    else:
        rel = l2 / norm_a
    return {
        "l2": l2,
        "rel_l2": rel,
        "max_abs": max_abs,
        "frac_changed": float(np.mean(~same)) if len(a) else 0.0,
        "norm_a": norm_a,
    }


def close(actual: float, expected: float, rel: float = 1e-9) -> bool:
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    if math.isinf(expected) or math.isinf(actual):
        return actual == expected
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-300)


def objects_on_disk(repo_path: Path) -> int:
    """The sum of the sizes of the object files under objects/."""
    total = 0
    for directory, _, files in os.walk(repo_path / "objects"):
        total += sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    return total
