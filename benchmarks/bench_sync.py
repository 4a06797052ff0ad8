"""Sync benchmark: ckptrepo push/pull against a local S3 server, side by side with
``aws s3 sync`` and ``rclone copy`` of the same checkpoint files.

Data: two consecutive checkpoints of a real fine-tuning run (``series.py``, ``full_fp32``: the
22.7M-parameter MiniLM encoder with its AdamW state, about 271 MB each). The training job of
the scenario saves each checkpoint and ships it to object storage:

- **ckptrepo**: ``repo.commit(state, step=N)`` then ``repo.push()``; the second push sends only
  the objects the remote lacks (chunks delta-coded against the parent and compressed).
- **aws s3 sync / rclone copy**: ``torch.save(state, "ckpts/step-N.pt")`` then a sync of the
  directory; the second sync uploads the new file whole.

Measured: bytes sent and wall time for the first and for the second checkpoint, an up-to-date
push, a full download of both checkpoints (``ckptrepo.clone`` / ``aws s3 sync`` / ``rclone
copy`` the other way), and ckptrepo's incremental pull of the second checkpoint into a clone
that has the first. Bytes for the peers are the sizes of the files they report uploading.

The server is moto in server mode, started here in its own process on 127.0.0.1 (no MinIO can
be installed on these machines; FIELD_NOTES.md). It is a Python server: its speed, not the
clients', bounds every throughput figure, so compare tools within one run, never with real S3.

Usage::

    python benchmarks/bench_sync.py                # writes its section of docs/benchmarks.md
    python benchmarks/bench_sync.py --no-write --checkpoints 0 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsspec.config  # noqa: E402
import report  # noqa: E402
import series as series_mod  # noqa: E402
import torch  # noqa: E402

import ckptrepo  # noqa: E402

DEFAULT_BASE = Path(tempfile.gettempdir()) / "ckptrepo-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Row:
    tool: str
    step: str
    bytes: int
    seconds: float
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


class MotoProcess:
    """moto's S3 server in a process of its own, so it shares no GIL with the clients."""

    def __enter__(self) -> MotoProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("moto server did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def _sent(output: str, directory: Path, pattern: str) -> int:
    """Bytes a peer uploaded: rclone's own count (its JSON stats), else the sizes of the files
    the log names as uploaded (aws prints no total)."""
    if not pattern:
        counts = re.findall(r'"stats":\{"bytes":(\d+)', output)
        return int(counts[-1]) if counts else 0
    names = set(re.findall(pattern, output))
    return sum((directory / name).stat().st_size for name in names)


def bench_ckptrepo(states: list[dict[str, Any]], steps: list[int], bucket: str, work: Path) -> list[Row]:
    rows: list[Row] = []
    uri = f"s3://{bucket}/ckptrepo"
    repo = ckptrepo.init(work / "ckptrepo-local")
    repo.add_remote("origin", uri)
    for i, (state, step) in enumerate(zip(states, steps)):
        commit = repo.commit(state, step=step)
        pushed = repo.push()
        label = "1st checkpoint" if i == 0 else "2nd checkpoint"
        rows.append(Row("ckptrepo push", label, pushed.bytes_sent, pushed.seconds,
                        f"{pushed.objects_sent} objects; commit stored {commit.stats.stored_bytes / 1e6:.0f} MB"))
    again = repo.push()
    rows.append(Row("ckptrepo push", "up to date", again.bytes_sent, again.seconds, "ref comparison only"))
    repo.close()

    start = time.perf_counter()
    clone = ckptrepo.clone(uri, work / "ckptrepo-clone")
    seconds = time.perf_counter() - start
    received = sum(clone.store.stored_size(o) for o in clone.store.ids())
    rows.append(Row("ckptrepo clone", "both checkpoints", received, seconds, "download, every object verified"))
    clone.close()

    first = ckptrepo.clone(uri, work / "ckptrepo-pull", rev=f"steps/{steps[0]}")
    pulled = first.pull()
    rows.append(Row("ckptrepo pull", "2nd checkpoint", pulled.fetch.bytes_received, pulled.fetch.seconds,
                    f"{pulled.fetch.objects_received} objects, into a clone holding the 1st"))
    first.close()
    return rows


def bench_peer(tool: str, states: list[dict[str, Any]], steps: list[int], bucket: str, work: Path,
               endpoint: str) -> list[Row]:
    env = {**os.environ, **CREDENTIALS}
    slug = tool.split()[0]
    src = work / f"{slug}-src"
    src.mkdir()
    if tool == "aws s3 sync":
        target = f"s3://{bucket}/aws"
        push = ["aws", "s3", "sync", str(src), target, "--endpoint-url", endpoint, "--no-progress"]
        pull = ["aws", "s3", "sync", target, str(work / "aws-dst"), "--endpoint-url", endpoint, "--no-progress"]
        uploaded = r"upload: \S*?(step-\d+\.pt) to"
    else:
        env.update({"RCLONE_CONFIG_MOTO_TYPE": "s3", "RCLONE_CONFIG_MOTO_PROVIDER": "Other",
                    "RCLONE_CONFIG_MOTO_ENDPOINT": endpoint, "RCLONE_CONFIG_MOTO_ACCESS_KEY_ID": "testing",
                    "RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY": "testing", "RCLONE_CONFIG_MOTO_REGION": "us-east-1"})
        # rclone's AWS SDK cannot load a custom CA bundle; the endpoint is plain http anyway.
        env.pop("AWS_CA_BUNDLE", None)
        target = f"moto:{bucket}/rclone"
        push = ["rclone", "copy", str(src), target, "-v", "--s3-no-check-bucket", "--use-json-log"]
        pull = ["rclone", "copy", target, str(work / "rclone-dst"), "-v"]
        uploaded = ""  # rclone reports the bytes it moved in its final stats line
    rows = []
    for i, (state, step) in enumerate(zip(states, steps)):
        torch.save(state, src / f"step-{step}.pt")
        seconds, output = _run(push, env)
        label = "1st checkpoint" if i == 0 else "2nd checkpoint"
        rows.append(Row(tool, label, _sent(output, src, uploaded), seconds, "torch.save file, whole"))
    seconds, output = _run(push, env)
    rows.append(Row(tool, "up to date", _sent(output, src, uploaded), seconds, "listing and compare"))
    seconds, _ = _run(pull, env)
    dst = work / ("aws-dst" if tool == "aws s3 sync" else "rclone-dst")
    rows.append(Row(tool, "both checkpoints", sum(p.stat().st_size for p in dst.iterdir()), seconds, "download"))
    return rows


def render(rows: list[Row], raw: int, steps: list[int], machine: str) -> str:
    lines = [
        "## Sync: push and pull against a local S3 server",
        "",
        f"Two consecutive checkpoints (steps {steps[0]} and {steps[1]}) of the `full_fp32` fine-tuning "
        f"series (MiniLM 22.7M parameters + AdamW state, {raw / 1e6:.0f} MB of tensors each), shipped to "
        "a moto S3 server on 127.0.0.1 (own process). ckptrepo commits the state and pushes; the peers "
        "`torch.save` it to `ckpts/step-N.pt` and sync the directory. MB/s is bytes sent over wall time.",
        "",
        "| tool | what | bytes sent | of raw | seconds | MB/s | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = f"{r.bytes / raw:.2f}" if r.step in ("1st checkpoint", "2nd checkpoint") else ""
        lines.append(f"| {r.tool} | {r.step} | {r.bytes / 1e6:,.1f} MB | {share} | {r.seconds:.2f} | "
                     f"{r.mb_per_s:.0f} | {r.note} |")
    lines += [
        "",
        machine,
        "",
        "moto is a Python server and bounds every throughput here; the comparison that carries over to "
        "real object storage is the bytes column: the second checkpoint costs ckptrepo only the objects the "
        "remote lacks, delta-coded against the first and compressed, where a file sync sends the file whole.",
        "",
        "Peers' bytes: the files `aws s3 sync` logs as uploaded; rclone's own transfer count. moto answers "
        "rclone's multipart completion with 400 Bad Request; rclone retries, finds the object complete and "
        "transfers nothing more, so its push times include one retry round.",
        "",
        "Reproduce: `python benchmarks/bench_sync.py` (rewrites this section).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_BASE / "series")
    parser.add_argument("--checkpoints", type=int, nargs=2, default=(4, 5), metavar=("A", "B"),
                        help="indices of the two consecutive checkpoints in the series")
    parser.add_argument("--peers", nargs="*", default=["aws s3 sync", "rclone copy"])
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs alone")
    args = parser.parse_args(argv)

    series = series_mod.build_series("full_fp32", args.cache_dir)
    states = [series[i] for i in args.checkpoints]
    steps = [int(s["step"]) for s in states]
    raw = series_mod.raw_bytes(states[1])
    work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=DEFAULT_BASE if DEFAULT_BASE.exists() else None))
    os.environ.update(CREDENTIALS)
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
    rows: list[Row] = []
    machine = report.machine_info(work, {
        "ckptrepo": getattr(ckptrepo, "__version__", "dev"),
        "moto": __import__("moto").__version__,
        "aws": _version(["aws", "--version"]),
        "rclone": _version(["rclone", "version"]),
    })
    try:
        with MotoProcess() as server:
            fsspec.config.conf["s3"] = {"endpoint_url": server.url}
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=server.url, skip_instance_cache=True)
            fs.mkdir("bench")
            rows += bench_ckptrepo(states, steps, "bench", work)
            for peer in args.peers:
                if shutil.which(peer.split()[0]) is None:
                    print(f"skipping {peer}: not installed", file=sys.stderr)
                    continue
                rows += bench_peer(peer, states, steps, "bench", work, server.url)
        text = render(rows, raw, steps, machine)
        print(text)
        if not args.no_write:
            report.write_section("bench_sync", text)
            print(f"wrote {report.DOC}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError:
        return f"{cmd[0]} not installed"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else cmd[0]


if __name__ == "__main__":
    raise SystemExit(main())
