"""Speed of the context coder (``ans``) on real bf16 deltas: nanoseconds per element.

Takes the bf16 values of the last two checkpoints of the bf16 series (``series.py``), forms
the difference as the delta coding stores it, with the base's own moves (its difference to
the checkpoint before), and times whole calls of ``entropy.encode`` (counts, models and
stream) and ``entropy.decode_into`` on a slice of it, in this thread only, with the coder's
loops in C (``_elements.c``, where the extension is built) and with numba's
(``ans_kernels.py``, what a process without the extension runs), alternated round by round.
Medians of ``--repeats`` calls; the first call of each is left out (it loads the loops).

    python benchmarks/bench_context_coder.py [--elements 4194304] [--repeats 7]

Used to measure a change to the coder's loops (docs/benchmarks.md, "The context coder"); the
coded size is printed too, so that a faster coder that codes worse shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import series as series_mod  # noqa: E402
from bf16_entropy import DEFAULT_CACHE, bf16_words, zigzag_difference  # noqa: E402

from ckptrepo import compiled, entropy  # noqa: E402


def _zigzag(new: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The difference as the delta coding stores it, in the coder's 16-bit words."""
    return zigzag_difference(new, base).astype(np.uint16)


def _seconds(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--elements", type=int, default=4 << 20)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    words = [bf16_words(s) for s in series_mod.build_series("bf16", args.cache_dir)[-3:]]
    n = min(args.elements, len(words[-1]))
    grand, base, new = (w[:n] for w in words)
    moves = entropy.moves_of(_zigzag(base, grand))
    z = _zigzag(new, base)
    field = entropy.exponent_field("bfloat16")
    assert field is not None

    def encode() -> entropy.ContextCoded:
        coded = entropy.encode(z, base, moves, field, float("inf"))
        assert coded is not None
        return coded

    loops = {"C": compiled.ELEMENTS, "numba": None} if compiled.ELEMENTS is not None else {"numba": None}
    out = np.empty(n, dtype=np.uint16)
    coded: dict[str, entropy.ContextCoded] = {}
    for name, module in loops.items():  # each checked, and its loops loaded, before any timing
        entropy._LOOPS = module
        coded[name] = encode()
        entropy.decode_into(coded[name].coding, memoryview(b"".join(coded[name].sections)), base, moves, out)
        if not np.array_equal(out, z):
            raise SystemExit(f"{name}: the decoded differences are not the coded ones")
    if any(c != coded["numba"] for c in coded.values()):
        raise SystemExit("the loops in C and numba's code different streams")
    coding, payload = coded["numba"].coding, memoryview(b"".join(coded["numba"].sections))
    times: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in loops}
    for _ in range(args.repeats):
        for name, module in loops.items():
            entropy._LOOPS = module
            times[name]["encode"].append(_seconds(encode))
            times[name]["decode"].append(
                _seconds(lambda: entropy.decode_into(coding, payload, base, moves, out))
            )
    print(f"{n} bf16 differences (last checkpoint of the bf16 series, with the base's moves), "
          f"medians of {args.repeats} alternated rounds:")
    print(f"- coded size: {len(payload) / (2 * n):.4f} of raw (the same stream from every loop set)")
    for name, by_call in times.items():
        encode_ns, decode_ns = (statistics.median(by_call[c]) / n * 1e9 for c in ("encode", "decode"))
        print(f"- loops in {name}: encode {encode_ns:.1f} ns, decode {decode_ns:.1f} ns per element")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
