"""Commit a checkpoint series with peer tools and measure what each one costs.

Every peer gets the same series (a list of checkpoint dicts, oldest first) and
a private scratch directory, and reports a :class:`PeerResult`:

``total_bytes``
    Disk usage after all checkpoints, computed like ``du`` (allocated blocks,
    ``st_blocks * 512``, directories included) over the tool's store only:
    the per-checkpoint files for the file-based peers, the repository for
    restic/borg. Staging files and tool caches are not counted.
``commit_s_median`` / ``commit_s_total``
    Wall time to make each checkpoint durable. File peers: serialise + write +
    fsync. restic/borg: the ``backup`` / ``create`` subprocess only; the
    ``torch.save`` into the staging directory that a training job would do
    anyway is timed separately and reported in the note.
``restore_s``
    Wall time from "nothing in memory" to the last checkpoint's tensors in
    memory with every byte resident, so every row has the same end point:
    file peers load their file; restic/borg extract the file and then
    ``torch.load`` it (the extract-only time is in the note). Every restore
    ends by touching one byte per 4 KiB page of every tensor, because
    safetensors' ``load_file`` is zero-copy over ``mmap`` and would otherwise
    be timed before any data is read. The page cache is warm (the data was
    just written): dropping caches is a machine-wide action, so restore
    numbers are an optimistic bound for a cold start. Reported value: the
    median of ``RESTORE_REPEATS`` restores.
``peak_rss_bytes``
    For subprocess tools (restic, borg): the largest max-RSS of any of the
    tool's invocations, as reported by GNU ``/usr/bin/time -f %M``. (Linux
    carries the forking process's high-water RSS into the child's
    ``ru_maxrss``, so ``os.wait4``/``RUSAGE_CHILDREN`` from this large
    Python process would report our RSS, not the tool's; ``time`` is a tiny
    intermediate parent.) For in-process peers (torch.save, safetensors,
    zstd): the peak *growth* of this process's RSS while the peer runs, i.e.
    ``VmHWM - VmRSS`` at start after resetting the high-water mark through
    ``/proc/self/clear_refs`` (after ``gc.collect`` + glibc ``malloc_trim``,
    so memory freed earlier cannot hide growth); the series itself is already
    resident, so this is the memory the tool needs on top of the state a
    trainer holds anyway. If the reset is not allowed, a sampler thread polls
    ``VmRSS`` every 2 ms instead. The two RSS kinds are not the same
    quantity; the note says which.

After each restore the checkpoint is compared with the original tensor by
tensor, so a row is only reported for a tool that round-trips exactly.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import zstandard
from safetensors.torch import load_file, save_file

Checkpoint = dict[str, Any]
Series = Sequence[Checkpoint]

RESTIC_PASSWORD = "ckptrepo-benchmark"
ZSTD_LEVEL = 3
BORG_COMPRESSION = f"zstd,{ZSTD_LEVEL}"
# Restores are repeated and the median reported: on a small shared VM a
# single sub-second timing is dominated by page-fault/reclaim noise.
RESTORE_REPEATS = 3


@dataclass
class PeerResult:
    tool: str
    total_bytes: int
    commit_s_median: float
    commit_s_total: float
    restore_s: float
    peak_rss_bytes: int
    note: str = ""


# --------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------


def disk_usage(path: Path) -> int:
    """Allocated bytes under ``path``, as ``du -s --block-size=1`` reports."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(root, name))
            total += st.st_blocks * 512
    return total + os.lstat(path).st_blocks * 512


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel.

    Without this, memory freed by an earlier peer (or series) stays in the
    allocator, the next peer reuses it without raising RSS, and its growth
    reads as zero. Also breaks reference cycles that keep mmap'd
    safetensors storages alive.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: growth may be under-reported, nothing else breaks


class InProcessPeakRss:
    """Context manager measuring peak RSS growth of this process."""

    def __init__(self, poll_s: float = 0.002) -> None:
        self.poll_s = poll_s
        self.baseline_kib = 0
        self.peak_kib = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.peak_kib = max(self.peak_kib, _proc_status_kib("VmRSS"))

    def __enter__(self) -> InProcessPeakRss:
        _release_free_memory()
        self.baseline_kib = _proc_status_kib("VmRSS")
        self.peak_kib = self.baseline_kib
        if _reset_peak_rss():
            self.method = "VmHWM"
        else:
            self.method = "VmRSS sampler"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_kib = _proc_status_kib("VmHWM")

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_kib - self.baseline_kib) * 1024


@dataclass
class _ProcRun:
    elapsed_s: float
    maxrss_bytes: int


TIME_BIN = "/usr/bin/time"


def _run_tool(cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> _ProcRun:
    """Run one tool invocation; return wall time and the tool's peak RSS.

    The tool is started under GNU ``/usr/bin/time`` rather than measured
    with ``os.wait4``/``RUSAGE_CHILDREN`` from here: Linux carries the
    forking process's high-water RSS into a child's ru_maxrss across
    fork+exec, so a child of this (multi-GiB) Python process would report
    at least our own RSS. ``time`` is a tiny process, so the figure it
    reports for its child is the tool's own. Output goes to a temporary
    file rather than a pipe so a chatty tool can never block.
    """
    if not os.access(TIME_BIN, os.X_OK):
        raise RuntimeError(f"{TIME_BIN} is required (apt-get install time)")
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "out", "w+b") as out:
        rss_file = Path(tmp) / "rss"
        full = [TIME_BIN, "-f", "%M", "-o", str(rss_file), *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text}")
        # time -o writes "%M" (KiB) on the last line; earlier lines may hold
        # a "Command exited with non-zero status" notice.
        maxrss_kib = int(rss_file.read_text().split()[-1])
    return _ProcRun(elapsed, maxrss_kib * 1024)


def _tool_output(cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    return subprocess.run(list(cmd), env=env, check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save_durable(state: Checkpoint, path: Path) -> None:
    """torch.save + fsync of the file and its directory (the honest baseline)."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)


def _torch_load(path: Path) -> Checkpoint:
    state: Checkpoint = torch.load(path, weights_only=True)
    return state


def touch_all(state: Any) -> int:
    """Read one byte per 4 KiB page of every tensor; returns a checksum.

    Forces lazily mapped tensors (safetensors mmap) to become resident so
    restore timings compare equal amounts of work.
    """
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            flat = obj.reshape(-1).view(torch.uint8)
            total += int(flat[::4096].sum())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def _ckpt_name(step: int, suffix: str) -> str:
    return f"ckpt_step{step:06d}{suffix}"


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Raise if two nested checkpoint structures differ in any value or dtype."""
    if isinstance(a, torch.Tensor):
        if not (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        ):
            raise AssertionError(f"tensor mismatch at {where or '<root>'}")
    elif isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise AssertionError(f"dict keys differ at {where or '<root>'}")
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            raise AssertionError(f"sequence differs at {where or '<root>'}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif a != b:
        raise AssertionError(f"value differs at {where or '<root>'}: {a!r} != {b!r}")


def _step(ckpt: Checkpoint, index: int) -> int:
    step = ckpt.get("step", index)
    return int(step)


# --------------------------------------------------------------------------
# safetensors flattening
# --------------------------------------------------------------------------


def flatten_for_safetensors(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Split a nested checkpoint into named tensors and a JSON skeleton.

    The skeleton keeps everything safetensors cannot: structure, dict key
    types (the optimizer's state is keyed by int), and non-tensor values
    (step, param_groups). It goes into the file's string metadata.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"tensor name collision: {path}")
            tensors[path] = obj.contiguous()
            return {"t": path}
        if isinstance(obj, dict):
            return {"d": [[k, enc(v, f"{path}/{k}" if path else str(k))] for k, v in obj.items()]}
        if isinstance(obj, list):
            return {"l": [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {"u": [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        return {"v": obj}

    skeleton = json.dumps(enc(state, ""))
    return tensors, skeleton


def unflatten_from_safetensors(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    """Inverse of :func:`flatten_for_safetensors`."""

    def dec(node: dict[str, Any]) -> Any:
        if "t" in node:
            return tensors[node["t"]]
        if "d" in node:
            return {k: dec(v) for k, v in node["d"]}
        if "l" in node:
            return [dec(v) for v in node["l"]]
        if "u" in node:
            return tuple(dec(v) for v in node["u"])
        return node["v"]

    return dec(json.loads(skeleton))


# --------------------------------------------------------------------------
# File-per-checkpoint peers (in-process)
# --------------------------------------------------------------------------


def _median_restore(load: Callable[[], Checkpoint], expected: Checkpoint) -> float:
    """Median wall time of ``RESTORE_REPEATS`` loads, each verified exactly.

    Each restored copy is dropped before the next load so memory never holds
    two restored checkpoints (matters for the 1 GiB series).
    """
    times: list[float] = []
    for _ in range(RESTORE_REPEATS):
        t0 = time.perf_counter()
        restored = load()
        touch_all(restored)
        times.append(time.perf_counter() - t0)
        assert_same(expected, restored)
        del restored
        gc.collect()  # free the copy now, not at some later GC cycle
    return statistics.median(times)


def _file_peer(
    tool: str,
    series: Series,
    store: Path,
    suffix: str,
    write: Callable[[Checkpoint, Path], None],
    read: Callable[[Path], Checkpoint],
    note: str,
) -> PeerResult:
    """Shared driver: one durable file per checkpoint, then load the last."""
    store.mkdir(parents=True, exist_ok=True)
    times: list[float] = []
    with InProcessPeakRss() as rss:
        for i, ckpt in enumerate(series):
            path = store / _ckpt_name(_step(ckpt, i), suffix)
            t0 = time.perf_counter()
            write(ckpt, path)
            times.append(time.perf_counter() - t0)
        last = store / _ckpt_name(_step(series[-1], len(series) - 1), suffix)
        restore_s = _median_restore(lambda: read(last), series[-1])
    return PeerResult(
        tool=tool,
        total_bytes=disk_usage(store),
        commit_s_median=statistics.median(times),
        commit_s_total=sum(times),
        restore_s=restore_s,
        peak_rss_bytes=rss.growth_bytes,
        note=f"{note}; RSS = in-process growth ({rss.method})",
    )


def peer_torch_save(series: Series, scratch: Path) -> PeerResult:
    """torch.save + fsync, one file per checkpoint; restore = torch.load."""
    return _file_peer(
        "torch.save",
        series,
        scratch / "torch_save",
        ".pt",
        _torch_save_durable,
        _torch_load,
        "one .pt per checkpoint, fsync'd",
    )


def _safetensors_write(state: Checkpoint, path: Path) -> None:
    tensors, skeleton = flatten_for_safetensors(state)
    save_file(tensors, str(path), metadata={"skeleton": skeleton})
    fsync_path(path)  # save_file does not fsync
    fsync_path(path.parent)


def _safetensors_read(path: Path) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        skeleton = (f.metadata() or {})["skeleton"]
    state: Checkpoint = unflatten_from_safetensors(load_file(str(path)), skeleton)
    return state


def peer_safetensors(series: Series, scratch: Path) -> PeerResult:
    """One flattened .safetensors per checkpoint (structure in metadata)."""
    return _file_peer(
        "safetensors",
        series,
        scratch / "safetensors",
        ".safetensors",
        _safetensors_write,
        _safetensors_read,
        "one .safetensors per checkpoint, non-tensors as JSON metadata, fsync'd; "
        "load_file is mmap zero-copy, restore includes paging every tensor in",
    )


def _zstd_write(state: Checkpoint, path: Path) -> None:
    # Streaming torch.save straight into the compressor avoids holding the
    # uncompressed serialisation in memory (torch.save needs no seek).
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with open(path, "wb") as f:
        with cctx.stream_writer(f, closefd=False) as w:
            torch.save(state, w)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)


def _zstd_read(path: Path) -> Checkpoint:
    # torch.load needs a seekable file, so decompress into memory first.
    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    state: Checkpoint = torch.load(io.BytesIO(raw), weights_only=True)
    return state


def peer_zstd(series: Series, scratch: Path) -> PeerResult:
    """torch.save output compressed with zstd level 3, one file per checkpoint."""
    return _file_peer(
        f"zstd-{ZSTD_LEVEL} per file",
        series,
        scratch / "zstd",
        ".pt.zst",
        _zstd_write,
        _zstd_read,
        f"torch.save streamed through zstd level {ZSTD_LEVEL} (1 thread), fsync'd",
    )


# --------------------------------------------------------------------------
# Backup-tool peers (subprocess)
# --------------------------------------------------------------------------


@dataclass
class _Staging:
    """A trainer's checkpoint directory that a backup tool snapshots.

    ``per_step_files=True``: each save adds ``ckpt_stepNNNNNN.pt`` and older
    files stay (a "save every N steps" output directory). ``False``: every
    save overwrites ``last.ckpt``.
    """

    root: Path
    per_step_files: bool

    def name_for(self, step: int) -> str:
        return _ckpt_name(step, ".pt") if self.per_step_files else "last.ckpt"

    def write(self, ckpt: Checkpoint, step: int) -> tuple[str, float]:
        self.root.mkdir(parents=True, exist_ok=True)
        name = self.name_for(step)
        t0 = time.perf_counter()
        _torch_save_durable(ckpt, self.root / name)
        return name, time.perf_counter() - t0


@dataclass
class _BackupTimes:
    commit: list[float]
    staging: list[float]
    extract: list[float]
    restore_s: float
    peak_rss: int


def _backup_loop(
    series: Series,
    staging: _Staging,
    commit: Callable[[int], _ProcRun],
    extract: Callable[[int, str, Path], tuple[_ProcRun, Path]],
    restore_dir: Path,
) -> _BackupTimes:
    """Stage each checkpoint, commit it with the tool, then restore the last one."""
    commit_s: list[float] = []
    staging_s: list[float] = []
    extract_s: list[float] = []
    peak = 0
    name = ""
    step = 0
    for i, ckpt in enumerate(series):
        step = _step(ckpt, i)
        name, t_stage = staging.write(ckpt, step)
        staging_s.append(t_stage)
        run = commit(step)
        commit_s.append(run.elapsed_s)
        peak = max(peak, run.maxrss_bytes)

    def restore() -> Checkpoint:
        nonlocal peak
        # A fresh, empty target each time: tools may skip files that exist.
        shutil.rmtree(restore_dir, ignore_errors=True)
        restore_dir.mkdir(parents=True)
        run, path = extract(step, name, restore_dir)
        extract_s.append(run.elapsed_s)
        peak = max(peak, run.maxrss_bytes)
        return _torch_load(path)

    restore_s = _median_restore(restore, series[-1])
    shutil.rmtree(restore_dir, ignore_errors=True)
    return _BackupTimes(commit_s, staging_s, extract_s, restore_s, peak)


def _backup_result(tool: str, repo: Path, t: _BackupTimes, note: str) -> PeerResult:
    note = (
        f"{note}; commit excludes staging torch.save+fsync "
        f"(median {statistics.median(t.staging):.2f}s); "
        f"restore = extract (median {statistics.median(t.extract):.2f}s) + torch.load; "
        "RSS = tool process max (/usr/bin/time)"
    )
    return PeerResult(
        tool=tool,
        total_bytes=disk_usage(repo),
        commit_s_median=statistics.median(t.commit),
        commit_s_total=sum(t.commit),
        restore_s=t.restore_s,
        peak_rss_bytes=t.peak_rss,
        note=note,
    )


def restic_version() -> str:
    return _tool_output(["restic", "version"]).strip()


def borg_version() -> str:
    return _tool_output(["borg", "--version"]).strip()


def _restic_init(base: Path) -> dict[str, str]:
    """A new restic repository (format v2) at ``base/repo``; returns the environment that
    names it, with restic's cache kept under ``base`` (outside the repository, so not counted
    in its bytes)."""
    env = {
        **os.environ,
        "RESTIC_PASSWORD": RESTIC_PASSWORD,
        "RESTIC_REPOSITORY": str(base / "repo"),
        "RESTIC_CACHE_DIR": str(base / "cache"),
    }
    _run_tool(["restic", "init", "--repository-version", "2"], env)
    return env


def _restic_backup(env: dict[str, str], source: Path, step: int) -> _ProcRun:
    return _run_tool(["restic", "backup", "--host", "bench", "--tag", f"step{step}", str(source)], env)


def peer_restic(series: Series, scratch: Path, per_step_files: bool = True) -> PeerResult:
    """restic repository (format v2, default compression) snapshotting a staging dir.

    The per-step-file variant is the main one: it is what a "keep every
    checkpoint" training directory looks like, and restic's parent-snapshot
    change detection means it only reads the new file each time.
    """
    base = scratch / ("restic_per_step" if per_step_files else "restic_overwrite")
    repo = base / "repo"
    staging = _Staging(base / "staging", per_step_files)
    env = _restic_init(base)

    def commit(step: int) -> _ProcRun:
        return _restic_backup(env, staging.root, step)

    def extract(step: int, name: str, target: Path) -> tuple[_ProcRun, Path]:
        wanted = staging.root / name
        cmd = ["restic", "restore", "latest", "--target", str(target), "--include", str(wanted)]
        # restic recreates the absolute source path under the target.
        return _run_tool(cmd, env), target / wanted.relative_to("/")

    times = _backup_loop(series, staging, commit, extract, base / "restore")
    variant = "new file per step" if per_step_files else "overwrite last.ckpt"
    tool = f"restic ({'per-step files' if per_step_files else 'overwrite'})"
    # restic draws a random chunker polynomial per repository, so chunk
    # boundaries, and with them the dedup ratio, vary a little between runs.
    note = f"{variant}, repo v2 compression=auto, random per-repo chunker polynomial"
    return _backup_result(tool, repo, times, note)


def _borg_init(base: Path) -> tuple[dict[str, str], Path]:
    """A new borg repository (no encryption) at ``base/repo``; returns the environment to
    run borg in and the repository's path."""
    env = {
        **os.environ,
        # borg keeps its files cache/security dirs under BORG_BASE_DIR;
        # isolate them in scratch so runs never share state.
        "BORG_BASE_DIR": str(base / "borg_home"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }
    repo = base / "repo"
    _run_tool(["borg", "init", "--encryption=none", str(repo)], env)
    return env, repo


def _borg_create(env: dict[str, str], repo: Path, source: Path, step: int) -> _ProcRun:
    # Archive "." from inside the source directory so archive paths are relative.
    cmd = ["borg", "create", "--compression", BORG_COMPRESSION, f"{repo}::step{step:06d}", "."]
    return _run_tool(cmd, env, cwd=source)


def peer_borg(series: Series, scratch: Path) -> PeerResult:
    """borg repository (no encryption, zstd,3) archiving a per-step-file staging dir."""
    base = scratch / "borg"
    base.mkdir(parents=True, exist_ok=True)
    staging = _Staging(base / "staging", per_step_files=True)
    env, repo = _borg_init(base)

    def commit(step: int) -> _ProcRun:
        return _borg_create(env, repo, staging.root, step)

    def extract(step: int, name: str, target: Path) -> tuple[_ProcRun, Path]:
        cmd = ["borg", "extract", f"{repo}::step{step:06d}", name]
        return _run_tool(cmd, env, cwd=target), target / name

    times = _backup_loop(series, staging, commit, extract, base / "restore")
    return _backup_result("borg", repo, times, f"new file per step, --compression {BORG_COMPRESSION}")


# The backup tools whose fresh backup of one checkpoint the throughput run times.
BACKUP_TOOLS = ("restic", "borg")


def fresh_backup_s(tool: str, source: Path, scratch: Path) -> float:
    """Seconds ``tool`` takes to back up the directory ``source`` into a new, empty
    repository (created beforehand, untimed, and removed after): the same work as a fresh
    ckptrepo commit, timed next to it so that both see the machine in the same minute."""
    if tool not in BACKUP_TOOLS:
        raise ValueError(f"no fresh backup for {tool!r}; one of {', '.join(BACKUP_TOOLS)}")
    base = scratch / f"fresh-{tool}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    try:
        if tool == "restic":
            return _restic_backup(_restic_init(base), source, 0).elapsed_s
        env, repo = _borg_init(base)
        return _borg_create(env, repo, source, 0).elapsed_s
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------

PEERS: dict[str, Callable[[Series, Path], PeerResult]] = {
    "torch.save": peer_torch_save,
    "safetensors": peer_safetensors,
    "zstd": peer_zstd,
    "restic": peer_restic,
    "restic_overwrite": lambda s, d: peer_restic(s, d, per_step_files=False),
    "borg": peer_borg,
}


def run_peers(
    series: Series, scratch: Path, names: Sequence[str] = tuple(PEERS), keep: bool = False
) -> list[PeerResult]:
    """Run the named peers one after another, each in a fresh scratch subdir.

    Each peer's files are deleted afterwards (unless ``keep``) so the big
    series never needs more than one tool's worth of disk at a time.
    """
    results: list[PeerResult] = []
    for name in names:
        work = scratch / name.replace(".", "_")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            results.append(PEERS[name](series, work))
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    return results


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(results: Sequence[PeerResult], raw_bytes: int) -> str:
    """Markdown table; ``raw_bytes`` is the tensor payload of the whole series."""
    header = (
        "| tool | bytes on disk | % of raw | raw/stored | commit median s | commit total s "
        "| commit MiB/s | restore last s | peak RSS | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = [header]
    for r in results:
        pct = 100.0 * r.total_bytes / raw_bytes
        ratio = raw_bytes / r.total_bytes if r.total_bytes else float("inf")
        mibps = raw_bytes / 2**20 / r.commit_s_total if r.commit_s_total else float("inf")
        rows.append(
            f"| {r.tool} | {_fmt_bytes(r.total_bytes)} | {pct:.1f}% | {ratio:.2f}x "
            f"| {r.commit_s_median:.3f} | {r.commit_s_total:.2f} | {mibps:.0f} "
            f"| {r.restore_s:.3f} | {_fmt_bytes(r.peak_rss_bytes)} | {r.note} |"
        )
    return "\n".join(rows)
