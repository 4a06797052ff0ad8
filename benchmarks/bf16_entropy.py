"""How small can the bf16 series' deltas get? Entropy of the difference to the parent, per context.

For each checkpoint of the bf16 series after the first, the difference of every bf16 value
to the parent's (zigzag of the 16-bit difference, as the delta coding stores it) is measured
as order-0 entropy with one probability table per checkpoint, and conditioned on what a
decoder already knows:

- nothing;
- the base's exponent byte (whether a value moves depends on its magnitude);
- the base's exponent and how the value moved between the two checkpoints before (Adam's
  momentum: a value that moved up tends to move up again; from the third checkpoint on);

and next to it what zstd makes of the difference's byte planes (``fast_planes``, as written).
Figures are fractions of the raw bytes. No timing; prints a table only.

    python benchmarks/bf16_entropy.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import series as series_mod  # noqa: E402
import torch  # noqa: E402

from ckptrepo.codec import split_planes, subtract_zigzag  # noqa: E402
from ckptrepo.frames import zstd_compress  # noqa: E402

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ckptrepo-bench" / "series"


def bf16_words(state: dict[str, Any]) -> np.ndarray:
    """Every bf16 tensor of a checkpoint, as one array of 16-bit words (fixed key order)."""
    model = state["model"]
    parts = [
        model[k].contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
        for k in sorted(model)
        if model[k].dtype == torch.bfloat16
    ]
    return np.concatenate(parts)


def zigzag_difference(new: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The difference as the delta coding stores it (``subtract_zigzag``), one word a value."""
    out = np.empty(2 * len(new), dtype=np.uint8)
    subtract_zigzag(new.view(np.uint8), base.view(np.uint8), 2, out)
    return out.view(np.uint16).astype(np.int64)


def conditional_entropy_bytes(symbols: np.ndarray, context: np.ndarray) -> float:
    """Sum over values of -log2 p(symbol | context), in bytes, one table per call."""
    key = context.astype(np.int64) * 65536 + symbols
    values, counts = np.unique(key, return_counts=True)
    _, inverse = np.unique(values // 65536, return_inverse=True)
    totals = np.bincount(inverse, weights=counts)[inverse]
    return float(-(counts * np.log2(counts / totals)).sum() / 8)


def zstd_planes_bytes(z: np.ndarray) -> int:
    planes = split_planes(z.astype(np.uint16).tobytes(), 2)[:2]
    return sum(len(zstd_compress(p, 1, fast_planes=True)) for p in planes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    words = [bf16_words(s) for s in series_mod.build_series("bf16", args.cache_dir)]
    print("| checkpoint | values changed | no context | base exponent | + previous move | zstd planes |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i in range(1, len(words)):
        new, base = words[i], words[i - 1]
        raw = 2 * len(new)
        z = zigzag_difference(new, base)
        exponent = (base.astype(np.int64) >> 7) & 0xFF
        plain = conditional_entropy_bytes(z, np.zeros_like(z))
        by_exponent = conditional_entropy_bytes(z, exponent)
        if i >= 2:
            previous = np.minimum(zigzag_difference(base, words[i - 2]), 4)
            with_move = f"{conditional_entropy_bytes(z, exponent * 8 + previous) / raw:.3f}"
        else:
            with_move = "-"
        print(
            f"| {i + 1} | {np.count_nonzero(z) / len(z):.1%} | {plain / raw:.3f} | {by_exponent / raw:.3f} "
            f"| {with_move} | {zstd_planes_bytes(z) / raw:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
