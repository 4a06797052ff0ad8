"""The codec's element loops in numpy and compiled (ckptrepo/_elements.c), and what the
compiled ones change for a commit and a checkout.

Three measurements, in one run:

1. what loading the compiled loops costs a new process (wall and CPU, in a child process);
2. CPU per GiB of content for each loop (split into byte planes, join them, take the zigzag
   difference to the parent, add it back, and join a difference's planes while adding them
   back, as a checkout decodes a delta), numpy against compiled, on one thread over 16 MiB
   chunks of weight-like float32 data;
3. a fresh commit, a delta commit and the checkout of each, of a ~1 GiB float32 state, with
   the numpy forms and with the compiled ones, alternated, in one process (wall and CPU of
   all threads, medians).

    python benchmarks/bench_element_loops.py [--state-mib 1024] [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import report

import ckptrepo
from ckptrepo import _elements, codec
from ckptrepo.frames import zstd_decompress
from ckptrepo.ids import hash_hex

CHUNK = 16 << 20

_LOAD_SCRIPT = """
import importlib.util, json, os, time
from pathlib import Path
cpu = lambda a, b: b.user - a.user + b.system - a.system
# The extension's file, found without running the package (whose import loads it too).
package = Path(importlib.util.find_spec("ckptrepo").submodule_search_locations[0])
path = next(p for p in package.glob("_elements.*") if p.suffix in (".so", ".pyd"))
t0, c0 = time.perf_counter(), os.times()
spec = importlib.util.spec_from_file_location("ckptrepo._elements", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
t1, c1 = time.perf_counter(), os.times()
import ckptrepo
t2, c2 = time.perf_counter(), os.times()
print(json.dumps({"load": t1 - t0, "load_cpu": cpu(c0, c1), "import_ckptrepo": t2 - t1}))
"""


def load_cost(repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def weights(nbytes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(nbytes // 4) * 0.02).astype(np.float32)


def _cpu_per_gib(fn: Callable[[], None], nbytes: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) / nbytes * 2**30


def _ops(width: int, content: np.ndarray, base: np.ndarray) -> dict[str, Callable[[], None]]:
    """The loops over one chunk of ``width``-byte elements, with their buffers."""
    count = len(content) // width
    planes = [np.empty(count, dtype=np.uint8) for _ in range(width)]
    codec.split_planes_into(content, width, planes)
    tail = np.empty(0, dtype=np.uint8)
    out = np.empty(len(content), dtype=np.uint8)
    z = np.empty(len(content), dtype=np.uint8)
    codec.subtract_zigzag(content, base, width, z)
    acc = np.empty(len(content), dtype=np.uint8)
    scratch = np.empty(len(content), dtype=np.uint8)

    z_planes = [np.empty(count, dtype=np.uint8) for _ in range(width)]
    codec.split_planes_into(z, width, z_planes)

    def add_back() -> None:
        acc[:] = base
        codec.add_unzigzag_into(acc, z.copy(), width, scratch)

    def add_planes_back() -> None:
        acc[:] = base
        codec.add_joined_unzigzag_into(acc, [*z_planes, tail], width)

    return {
        "split into byte planes": lambda: codec.split_planes_into(content, width, planes),
        "join byte planes": lambda: codec.join_planes_into([*planes, tail], width, out),
        "zigzag difference to the parent": lambda: codec.subtract_zigzag(content, base, width, z),
        "add the difference back (with 2 copies)": add_back,
        "join a difference's planes and add them back (with 1 copy)": add_planes_back,
    }


def loop_costs(repeats: int, kernels: ModuleType) -> list[dict[str, Any]]:
    new = weights(CHUNK, 1)
    base = (new + np.float32(2e-5)).view(np.uint8)
    rows = []
    for width in (2, 4, 8):
        for name, fn in _ops(width, new.view(np.uint8), base).items():
            with codec.forced_element_loops(None):
                slow = _cpu_per_gib(fn, CHUNK, repeats)
            with codec.forced_element_loops(kernels):
                fast = _cpu_per_gib(fn, CHUNK, repeats)
            rows.append({"op": name, "width": width, "numpy": slow, "compiled": fast})
    return rows


def checkout_costs(repeats: int, scratch: Path) -> dict[str, float]:
    """CPU per GiB of content, one thread, of what a checkout does to a full float32 chunk
    besides joining its planes: read its object file (from the page cache), decompress its
    compressed planes, and verify its blake3 id."""
    content = weights(CHUNK, 2).view(np.uint8)
    blob = codec.object_file("chunk", codec.encode_chunk(content, codec.CodingPolicy(), 4))
    path = scratch / "object"
    path.write_bytes(blob)
    buffer = np.empty(len(blob), dtype=np.uint8)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.readv(fd, [buffer.data])
        finally:
            os.close(fd)

    header, payload = codec.split_object(blob)
    frames, offset = [], 0
    for plane in header.coding["planes"]:
        if plane["codec"] == "zstd":
            frames.append(payload[offset : offset + plane["length"]])
        offset += plane["length"]
    count = CHUNK // 4

    def decompress() -> None:
        for frame in frames:
            zstd_decompress(frame, count)

    return {
        "read the object file (page cache)": _cpu_per_gib(read, CHUNK, repeats),
        f"decompress its {len(frames)} compressed plane(s)": _cpu_per_gib(decompress, CHUNK, repeats),
        "verify the blake3 id": _cpu_per_gib(lambda: None if hash_hex(content.data) else None, CHUNK, repeats),
    }


Timing = tuple[float, float, float]  # wall, user CPU, system CPU (all threads)


def _timed(fn: Callable[[], Any]) -> Timing:
    c0, t0 = os.times(), time.perf_counter()
    fn()
    wall, c1 = time.perf_counter() - t0, os.times()
    return wall, c1.user - c0.user, c1.system - c0.system


def end_to_end(state_mib: int, repeats: int, kernels: ModuleType, scratch: Path) -> dict[str, dict[str, Timing]]:
    # Tensors of 16 MiB: a checkout's buffers of that size come from memory the process just
    # freed, while larger ones are fresh pages from the kernel each time, whose first touch
    # costs this machine 0.2-3.5 s per GiB and would bury the loops' share.
    tensor = 16 << 20
    names = [f"layer{i}.weight" for i in range(max(1, (state_mib << 20) // tensor))]
    first = {name: weights(tensor, i) for i, name in enumerate(names)}
    second = {name: value + np.float32(2e-5) for name, value in first.items()}
    samples: dict[str, dict[str, list[Timing]]] = {"numpy": {}, "compiled": {}}
    root = scratch / "repo"

    def checkout(step: int) -> None:
        with ckptrepo.open(root) as repo:
            repo.checkout(step=step).to_dict()

    for _ in range(repeats):
        for label, module in (("numpy", None), ("compiled", kernels)):
            shutil.rmtree(root, ignore_errors=True)
            gc.collect()
            got = samples[label]
            with codec.forced_element_loops(module):
                with ckptrepo.init(root) as repo:
                    got.setdefault("fresh commit", []).append(_timed(lambda: repo.commit(first, step=0)))
                    got.setdefault("delta commit", []).append(_timed(lambda: repo.commit(second, step=1)))
                for step, what in ((0, "checkout of the fresh commit"), (1, "checkout of the delta commit")):
                    got.setdefault(what, []).append(_timed(partial(checkout, step)))
                    gc.collect()
    shutil.rmtree(scratch / "repo", ignore_errors=True)
    median = statistics.median
    return {
        label: {what: (median(r[0] for r in runs), median(r[1] for r in runs), median(r[2] for r in runs)) for what, runs in by.items()}
        for label, by in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    scratch = Path(tempfile.mkdtemp(prefix="ckptrepo-element-loops-"))
    try:
        info = report.machine_info(scratch, {"C compiler": _compiler()})
        load = load_cost(3)
        kernels = _elements
        rows = loop_costs(args.repeats * 3, kernels)
        fixed = checkout_costs(args.repeats * 3, scratch)
        e2e = end_to_end(args.state_mib, args.repeats, kernels, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        "## Element loops: numpy and compiled",
        "",
        f"Command: `python benchmarks/bench_element_loops.py --state-mib {args.state_mib} --repeats {args.repeats}` "
        f"(started {started}).",
        "",
        info,
        "",
        f"Loading the compiled loops in a new process (median of 3): {load['load'] * 1e3:.2f} ms of wall time, "
        f"{load['load_cpu'] * 1e3:.0f} ms of CPU (importing the rest of ckptrepo: {load['import_ckptrepo']:.2f} s); "
        "every process that imports the codec has them.",
        "",
        f"CPU per GiB of content, one thread, 16 MiB chunks of weight-like float32 data, median of {args.repeats * 3}:",
        "",
        "| loop | element bytes | numpy | compiled | numpy / compiled |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['width']} | {r['numpy']:.3f} s | {r['compiled']:.3f} s | {r['numpy'] / r['compiled']:.1f}x |")
    join = next(r["compiled"] for r in rows if r["op"] == "join byte planes" and r["width"] == 4)
    floor = join + sum(fixed.values())
    lines += [
        "",
        "What else a checkout of a full float32 chunk costs, per GiB of content, one thread (same chunks):",
        "",
        "| step | CPU per GiB |",
        "|---|---:|",
        *(f"| {name} | {seconds:.3f} s |" for name, seconds in fixed.items()),
        f"| join the planes (compiled, above) | {join:.3f} s |",
        f"| **in all** | **{floor:.3f} s**: at least {floor / 2:.2f} s per GiB on two cores, before any output page is touched |",
    ]
    lines += [
        "",
        f"A {args.state_mib} MiB float32 state (tensors of 16 MiB), committed fresh, then again after every weight "
        f"moved by 2e-5 (a delta commit), and each checked out to a dict; numpy forms and compiled loops "
        f"alternated in one process, medians of {args.repeats}: wall time, then the user and system CPU of all "
        "threads (the loops are user time; system time is mostly the first touch of pages, which varies "
        "from run to run on this machine):",
        "",
        "| operation | numpy forms | compiled loops | wall ratio | user CPU saved |",
        "|---|---:|---:|---:|---:|",
    ]
    for what in e2e["numpy"]:
        (sw, su, ss), (fw, fu, fs) = e2e["numpy"][what], e2e["compiled"][what]
        lines.append(
            f"| {what} | {sw:.2f} s ({su:.2f} + {ss:.2f} s) | {fw:.2f} s ({fu:.2f} + {fs:.2f} s) "
            f"| {sw / fw:.2f}x | {su - fu:.2f} s |"
        )
    lines += ["", f"Load average at the end (1/5/15 min): {report.loadavg()}."]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        report.write_section("bench_element_loops", section)
        print(f"wrote {report.DOC}")


def _compiler() -> str:
    """The first line of the C compiler's version, as the extension was built with it."""
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    done = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else cc


if __name__ == "__main__":
    main()
