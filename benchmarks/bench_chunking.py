"""How the content-defined chunk size for files trades dedup against object count and speed.

Commits a 64 MiB file, then the same file with 1 KiB inserted at three places, into fresh
repositories configured with several FastCDC sizes, and reports per size: chunks, bytes
newly stored by the second commit (the smaller, the better the dedup), and commit time.

    python benchmarks/bench_chunking.py [--size-mib 64] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import report

import ckptrepo
from ckptrepo.config import Chunking, Config


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Half random, half repetitive text-like bytes: a mix like a real archive of a run.
    data = rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes()
    data += (b"epoch,step,loss,lr\n" * (size // 38 + 1))[: size - len(data)]
    path.write_bytes(data)
    return data


def measure(avg: int, size: int, root: Path) -> dict[str, float]:
    chunking = Chunking(file_min_size=avg // 4, file_avg_size=avg, file_max_size=avg * 4)
    repo = ckptrepo.init(root / f"repo-{avg}", config=Config(chunking=chunking))
    src = root / f"src-{avg}"
    src.mkdir()
    data = make_file(src / "blob.bin", size)
    times = []
    t = time.perf_counter()
    first = repo.commit(str(src))
    times.append(time.perf_counter() - t)
    edited = bytearray(data)
    for where in (size // 5, size // 2, 4 * size // 5):
        edited[where:where] = os.urandom(1024)
    (src / "blob.bin").write_bytes(bytes(edited))
    t = time.perf_counter()
    second = repo.commit(str(src))
    times.append(time.perf_counter() - t)
    repo.close()
    return {
        "avg": avg,
        "chunks": first.stats.new_chunks,
        "second_new_bytes": second.stats.stored_bytes,
        "second_new_chunks": second.stats.new_chunks,
        "seconds": statistics.median(times),
        "mb_s": size / 1e6 / statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    size = args.size_mib << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for avg in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
            rows.append(measure(avg, size, Path(tmp)))
    lines = [
        f"| FastCDC avg | chunks in {args.size_mib} MiB | stored by the edited commit | new chunks | commit MB/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['avg']) >> 10} KiB | {int(r['chunks'])} | {r['second_new_bytes'] / 2**20:.2f} MiB "
            f"| {int(r['second_new_chunks'])} | {r['mb_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        report.write_section("bench_chunking", "## File chunking (directory checkpoints)\n\n"
                             f"`python benchmarks/bench_chunking.py`: a {args.size_mib} MiB file committed, "
                             "then committed again with 3 × 1 KiB inserted.\n\n" + table)
        print(f"wrote {report.DOC}")


if __name__ == "__main__":
    main()
