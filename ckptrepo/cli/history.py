"""History commands: ``log``, ``diff`` and ``du``, with charts drawn in Unicode blocks.

The ``--json`` forms built here are stable and documented in docs/diff.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Sequence
from typing import Any

from . import UserError, command, open_repo
from .format import commit_json, human_bytes, metrics_text, print_json

# Eighths of a block, for bars that grow left to right and columns that grow upwards.
_HORIZONTAL = " ▏▎▍▌▋▊▉█"
_VERTICAL = " ▁▂▃▄▅▆▇█"
BAR_WIDTH = 24
CHART_HEIGHT = 8
# More commits than this are drawn as columns rather than one labelled bar each.
MAX_BAR_ROWS = 40
_STATUS_MARK = {"added": "A", "removed": "R", "modified": "M", "unchanged": "="}


def register(subparsers: Any) -> None:
    p = command(subparsers, "log", cmd_log, "list the commits of a branch, newest first")
    p.add_argument("--branch", help="the branch (default: the current one)")
    p.add_argument("-n", dest="limit", type=_positive, metavar="N", help="show at most N commits")
    p.add_argument("--metric", metavar="NAME", help="also chart metric NAME over the steps")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "diff", cmd_diff, "compare two versions entry by entry")
    p.add_argument("rev_a", metavar="REV_A")
    p.add_argument("rev_b", metavar="REV_B")
    p.add_argument("--numeric", action="store_true", help="how far each modified tensor moved (reads data)")
    p.add_argument("--prefix", metavar="P", help="only entries whose path starts with P")
    p.add_argument("--stat", action="store_true", help="a summary per top-level key only")
    p.add_argument("--all", action="store_true", help="list unchanged entries too")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "du", cmd_du, "where the bytes go: a commit, or the whole repository")
    p.add_argument("rev", nargs="?", metavar="REV", help="a commit (default: the whole repository)")
    p.add_argument("--by-key", action="store_true", help="break the figures down by top-level key")
    p.add_argument("--json", action="store_true")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# --- charts --------------------------------------------------------------------------------


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A left-aligned bar ``fraction`` (0..1, clamped; NaN counts as full) of ``width`` cells."""
    if math.isnan(fraction):
        fraction = 1.0
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    if fraction > 0 and eighths == 0:
        eighths = 1  # anything at all shows
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_HORIZONTAL[rest] if rest else "")
    return text.ljust(width)


def column_chart(values: Sequence[float], width: int, height: int = CHART_HEIGHT) -> list[str]:
    """Rows (top first) of a column chart of ``values``, at most ``width`` columns: with more
    values than columns, each column shows the mean of its run. Non-finite values leave a gap.
    The lowest value still shows one eighth, so every finite value has a visible column."""
    columns = _resample(values, max(1, width))
    finite = [v for v in columns if math.isfinite(v)]
    if not finite:
        return [" " * len(columns)] * height
    low, high = min(finite), max(finite)
    levels = height * 8
    heights = []
    for value in columns:
        if not math.isfinite(value):
            heights.append(0)
        elif high == low:
            heights.append(levels // 2)
        else:
            heights.append(1 + round((value - low) / (high - low) * (levels - 1)))
    rows = []
    for row in range(height - 1, -1, -1):
        cells = []
        for level in heights:
            filled = min(max(level - row * 8, 0), 8)
            cells.append(_VERTICAL[filled])
        rows.append("".join(cells))
    return rows


def _resample(values: Sequence[float], width: int) -> list[float]:
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        start, end = i * len(values) // width, (i + 1) * len(values) // width
        run = [v for v in values[start:end] if math.isfinite(v)]
        out.append(sum(run) / len(run) if run else math.nan)
    return out


def framed_chart(
    values: Sequence[float], labels: tuple[str, str], format_value: Any, width: int
) -> list[str]:
    """A column chart with its highest and lowest value on the left and the first and last
    x label underneath."""
    finite = [v for v in values if math.isfinite(v)]
    top = format_value(max(finite)) if finite else ""
    bottom = format_value(min(finite)) if finite else ""
    margin = max(len(top), len(bottom))
    room = width - margin - 3
    # A few values get wider columns, so a short run still reads as a chart.
    repeat = max(1, min(6, room // max(1, len(values))))
    rows = column_chart([v for v in values for _ in range(repeat)], room)
    lines = []
    for i, row in enumerate(rows):
        label = top if i == 0 else bottom if i == len(rows) - 1 else ""
        lines.append(f"{label:>{margin}} │{row}")
    span = len(rows[0]) if rows else 0
    lines.append(" " * margin + " └" + "─" * span)
    first, last = labels
    gap = max(1, span - len(first) - len(last))
    lines.append(" " * (margin + 2) + first + " " * gap + last)
    return lines


def _terminal_width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _json_float(value: float) -> float | str:
    # JSON has no NaN or infinity: they are written as the strings "nan", "inf", "-inf".
    return value if math.isfinite(value) else repr(float(value))


# --- log -----------------------------------------------------------------------------------


def cmd_log(args: argparse.Namespace) -> None:
    repo = open_repo(args, read_only=True)
    commits = repo.log(branch=args.branch, limit=args.limit)
    if args.json:
        print_json([commit_json(c) for c in commits])
        return
    if args.metric is not None:
        _print_metric_chart(commits, args.metric)
    for commit in commits:
        s = commit.stats
        step = f"step {commit.step}" if commit.step is not None else "no step"
        when = commit.created.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{commit.id.short}  {step:<12} {when}  {human_bytes(s.logical_bytes):>10} logical  "
            f"{human_bytes(s.stored_bytes):>10} new  {metrics_text(dict(commit.metrics))}"
        )
        if commit.message:
            print(f"    {commit.message.splitlines()[0]}")


def _print_metric_chart(commits: list[Any], metric: str) -> None:
    points = sorted(
        (c.step, c.metrics[metric]) for c in commits if c.step is not None and metric in c.metrics
    )
    if not points:
        recorded = sorted({name for c in commits for name in c.metrics})
        known = f"; recorded metrics: {', '.join(recorded)}" if recorded else "; no commit records any metric"
        raise UserError(f"no commit with a step records metric {metric!r}{known}")
    values = [v for _, v in points]
    finite = [v for v in values if math.isfinite(v)]
    summary = f"{metric} over {len(points)} steps"
    if finite:
        summary += f": first {_number(values[0])}, last {_number(values[-1])}, min {_number(min(finite))}, max {_number(max(finite))}"
    print(summary)
    labels = (f"step {points[0][0]}", f"step {points[-1][0]}")
    for line in framed_chart(values, labels, _number, _terminal_width()):
        print(line)
    print()


# --- diff ----------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> None:
    from ..diff import diff

    repo = open_repo(args, read_only=True)
    result = diff(repo, args.rev_a, args.rev_b, numeric=args.numeric, prefix=args.prefix)
    if args.json:
        print_json(diff_json(result))
        return
    print(f"a: {_side_text(result.a)}")
    print(f"b: {_side_text(result.b)}")
    if args.stat:
        print()
        for line in _stat_lines(result):
            print(line)
    else:
        rows = [e for e in result.entries if args.all or e.status != "unchanged"]
        print()
        for line in diff_table(rows, numeric=result.numeric_computed, width=_terminal_width()):
            print(line)
    print()
    for line in _totals_lines(result):
        print(line)


def _side_text(side: Any) -> str:
    step = f" step {side.step}" if side.step is not None else ""
    return f"{side.commit.short} ({side.rev}; {side.branch}{step}; {side.type} checkpoint)"


def sort_rows(rows: Sequence[Any]) -> list[Any]:
    """Largest change first: tensors compared numerically by rel_l2 (NaN first), then the
    rest by the fraction of their bytes that changed; ties by size, then path."""

    def key(entry: Any) -> tuple[int, float, int, str]:
        group = 0 if entry.numeric is not None else 1
        change = entry.change
        rank = -math.inf if math.isnan(change) else -change
        return group, rank, -max(entry.bytes_a, entry.bytes_b), entry.path

    return sorted(rows, key=key)


def diff_table(rows: Sequence[Any], *, numeric: bool, width: int) -> list[str]:
    """The rows of ``ckpt diff``: status, path, type, size, how much changed, and a bar."""
    if not rows:
        return ["(no entries differ)"]
    ordered = sort_rows(rows)
    largest_rel = max(
        (e.numeric.rel_l2 for e in ordered if e.numeric is not None and math.isfinite(e.numeric.rel_l2)),
        default=0.0,
    )
    types = [_type_text(e) for e in ordered]
    changes = [_change_text(e) for e in ordered]
    type_width = min(max(len(t) for t in types), 34)
    change_width = max(len(c) for c in changes)
    fixed = 2 + 1 + type_width + 1 + 10 + 2 + change_width + 2 + BAR_WIDTH
    # Paths are what people scan for: clipped only past what the terminal leaves, or 48.
    path_width = min(max(len(e.path) for e in ordered), max(48, width - fixed - 1))
    header = f"  {'path':<{path_width}} {'type':<{type_width}} {'size':>10}  {'change':<{change_width}}"
    lines = [header.rstrip()]
    for entry, type_text, change_text in zip(ordered, types, changes):
        size = human_bytes(max(entry.bytes_a, entry.bytes_b))
        if entry.numeric is not None:
            rel = entry.numeric.rel_l2
            fraction = 1.0 if not math.isfinite(rel) else (rel / largest_rel if largest_rel else 0.0)
        else:
            fraction = entry.change
        lines.append(
            f"{_STATUS_MARK[entry.status]} {_clip(entry.path, path_width):<{path_width}} "
            f"{_clip(type_text, type_width):<{type_width}} {size:>10}  {change_text:<{change_width}}  "
            f"{bar(fraction)}".rstrip()
        )
    if numeric:
        lines.append(
            "  (rel: |b - a| / |a| in L2; max|Δ|: largest absolute difference; %: elements that "
            f"changed; bars: rel against the largest, {_number(largest_rel)}, or for other rows the "
            "share of bytes in changed chunks)"
        )
    return lines


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _type_text(entry: Any) -> str:
    def one(kind: str | None, dtype: str | None, shape: tuple[int, ...] | None) -> str:
        if kind == "tensor":
            return f"{dtype}{list(shape or ())}"
        return kind or ""

    before = one(entry.kind_a, entry.dtype_a, entry.shape_a)
    after = one(entry.kind_b, entry.dtype_b, entry.shape_b)
    if entry.a is None:
        return after
    if entry.b is None or before == after:
        return before
    return f"{before}→{after}"


def _change_text(entry: Any) -> str:
    if entry.status in ("added", "removed", "unchanged"):
        return str(entry.status)
    n = entry.numeric
    if n is not None:
        return f"rel {_number(n.rel_l2):>9}  max|Δ| {_number(n.max_abs):>9}  {100 * n.frac_changed:5.1f}%"
    scalar = _scalar_change(entry)
    if scalar is not None:
        return scalar
    what = ", ".join(entry.changes)
    if entry.chunks_b:
        return f"{what}: {entry.chunks_b - entry.shared_chunks}/{entry.chunks_b} chunks new"
    return what


def _scalar_change(entry: Any) -> str | None:
    """``old → new`` for values stored in the manifest (numbers, bool, None)."""
    from ..values import scalar_value

    if entry.a is None or entry.b is None or entry.a.chunked or entry.b.chunked:
        return None
    if entry.a.kind in ("dir", "symlink") or entry.b.kind in ("dir", "symlink"):
        return None
    try:
        before = scalar_value(entry.a.fields(), entry.path)
        after = scalar_value(entry.b.fields(), entry.path)
    except Exception:  # a value the manifest cannot give back is shown as "content"
        return None
    text = f"{_value_text(before)} → {_value_text(after)}"
    return text if len(text) <= 48 else None


def _value_text(value: Any) -> str:
    import numpy as np

    return str(value) if isinstance(value, np.generic) else repr(value)


def _stat_lines(result: Any) -> list[str]:
    """Per top-level key: entries by status, bytes in changed chunks, and a bar of that share."""
    from ..accounting import top_key

    groups: dict[str, list[Any]] = {}
    for entry in result.entries:
        groups.setdefault(top_key(entry.path), []).append(entry)
    if not groups:
        return ["(no entries)"]
    name_width = min(max(len(k) for k in groups), 40)
    lines = []
    for key, entries in groups.items():
        counts = {s: sum(1 for e in entries if e.status == s) for s in _STATUS_MARK}
        total = sum(max(e.bytes_a, e.bytes_b) for e in entries)
        changed = sum(e.changed_bytes for e in entries if e.status != "unchanged")
        parts = [f"{n} {s}" for s, n in counts.items() if n]
        fraction = changed / total if total else (1.0 if counts["unchanged"] < len(entries) else 0.0)
        lines.append(
            f"  {_clip(key, name_width):<{name_width}}  {', '.join(parts):<44} "
            f"{human_bytes(changed):>10} of {human_bytes(total):>10} changed  {bar(fraction)}".rstrip()
        )
    return lines


def _totals_lines(result: Any) -> list[str]:
    t = result.totals
    counts = ", ".join(f"{t.counts[s]} {s}" for s in _STATUS_MARK)
    lines = [
        f"{counts} ({len(result.entries)} entries)",
        f"logical {human_bytes(t.bytes_a)} → {human_bytes(t.bytes_b)}; "
        f"b holds {t.chunks_b} chunks: {t.shared_chunks} shared with a ({human_bytes(t.shared_bytes)}), "
        f"{t.new_chunks} new ({human_bytes(t.new_bytes)})",
    ]
    if result.numeric_computed:
        lines.append(
            f"numeric: {t.numeric_entries} tensors compared; overall rel_l2 {_number(t.rel_l2)} "
            f"(l2 {_number(t.l2)}, norm of a {_number(t.norm_a)})"
        )
    return lines


def diff_json(result: Any) -> dict[str, Any]:
    """The stable ``ckpt diff --json`` document (docs/diff.md)."""

    def side(s: Any) -> dict[str, Any]:
        return {"rev": s.rev, "commit": s.commit.hex, "manifest": s.manifest.hex, "step": s.step,
                "branch": s.branch, "type": s.type}

    def numeric(n: Any) -> dict[str, Any] | None:
        if n is None:
            return None
        return {
            "elements": n.elements, "changed": n.changed, "frac_changed": _json_float(n.frac_changed),
            "l2": _json_float(n.l2), "rel_l2": _json_float(n.rel_l2), "max_abs": _json_float(n.max_abs),
            "norm_a": _json_float(n.norm_a), "norm_b": _json_float(n.norm_b),
        }

    def entry(e: Any) -> dict[str, Any]:
        return {
            "path": e.path, "status": e.status, "changes": list(e.changes),
            "kind_a": e.kind_a, "kind_b": e.kind_b, "dtype_a": e.dtype_a, "dtype_b": e.dtype_b,
            "shape_a": None if e.shape_a is None else list(e.shape_a),
            "shape_b": None if e.shape_b is None else list(e.shape_b),
            "bytes_a": e.bytes_a, "bytes_b": e.bytes_b, "chunks_a": e.chunks_a, "chunks_b": e.chunks_b,
            "shared_chunks": e.shared_chunks, "shared_bytes": e.shared_bytes,
            "numeric": numeric(e.numeric),
        }

    t = result.totals
    return {
        "a": side(result.a),
        "b": side(result.b),
        "numeric": result.numeric_computed,
        "prefix": result.prefix,
        "entries": [entry(e) for e in result.entries],
        "totals": {
            "counts": t.counts, "entries": len(result.entries), "bytes_a": t.bytes_a, "bytes_b": t.bytes_b,
            "chunks_a": t.chunks_a, "chunks_b": t.chunks_b, "shared_chunks": t.shared_chunks,
            "shared_bytes": t.shared_bytes, "new_chunks": t.new_chunks, "new_bytes": t.new_bytes,
            "numeric_entries": t.numeric_entries, "l2": _json_float(t.l2), "norm_a": _json_float(t.norm_a),
            "rel_l2": _json_float(t.rel_l2),
        },
    }


# --- du ------------------------------------------------------------------------------------


def cmd_du(args: argparse.Namespace) -> None:
    from ..accounting import commit_usage, repository_usage

    repo = open_repo(args, read_only=True)
    if args.rev is None:
        whole = repository_usage(repo, by_key=args.by_key)
        if args.json:
            print_json(repository_usage_json(whole))
            return
        lines = _repository_lines(whole, repo.location)
    else:
        one = commit_usage(repo, args.rev, by_key=args.by_key)
        if args.json:
            print_json(commit_usage_json(one))
            return
        lines = _commit_lines(one)
    for line in lines:
        print(line)


def _usage_text(u: Any) -> str:
    objects = f"{u.objects} object{'s' if u.objects != 1 else ''}"
    return f"{human_bytes(u.stored_bytes):>10} stored  {human_bytes(u.logical_bytes):>10} content  ({objects})"


def _inline_text(u: Any) -> str:
    chunks = f"{u.objects} chunk{'s' if u.objects != 1 else ''}"
    # Aligned with _usage_text's columns; their stored bytes are the manifests'.
    return f"{'':>19}{human_bytes(u.logical_bytes):>10} content  ({chunks}, held in the manifests)"


def _ratio_text(value: float) -> str:
    return f"{value:.2f}x" if value else "-"


def _repository_lines(u: Any, location: str) -> list[str]:
    retained = sum(1 for c in u.commits if c.retained)
    lines = [
        f"repository {location}: {len(u.commits)} commits ({retained} with data)",
        f"  logical        {human_bytes(u.logical_bytes):>10}  (sum over commits with data)",
        f"  chunks         {_usage_text(u.chunks)}",
        f"  inline         {_inline_text(u.inline)}",
        f"  delta bases    {_usage_text(u.delta_bases)}",
        f"  metadata       {_usage_text(u.metadata)}",
        f"  unreferenced   {_usage_text(u.unreferenced)}  gc would delete these",
        f"  on disk        {human_bytes(u.stored_bytes):>10}",
        f"  dedup {_ratio_text(u.dedup_ratio)}, compression {_ratio_text(u.compression_ratio)}, "
        f"overall {_ratio_text(u.ratio)} (logical per stored byte)",
    ]
    if u.missing:
        lines.append(f"  missing        {u.missing} objects the repository needs are not stored (run ckpt fsck)")
    lines += ["", "by coding:"]
    lines += _coding_lines(u.codings)
    if u.commits:
        lines += ["", "stored bytes per commit (each object counted at the first commit that needs it):"]
        lines += _commit_chart(u.commits)
    if u.keys is not None:
        lines += ["", "by top-level key (each chunk counted under the first key that names it):"]
        largest = max((k.chunks.stored_bytes for k in u.keys.values()), default=0)
        width = min(max((len(k) for k in u.keys), default=4), 40)
        for key, k in u.keys.items():
            fraction = k.chunks.stored_bytes / largest if largest else 0.0
            lines.append(
                f"  {_clip(key, width):<{width}}  {human_bytes(k.logical_bytes):>10} logical  "
                f"{human_bytes(k.chunks.stored_bytes):>10} stored  {bar(fraction)}".rstrip()
            )
    return lines


def _coding_lines(codings: dict[str, Any]) -> list[str]:
    if not codings:
        return ["  (nothing stored)"]
    width = max(len(c) for c in codings)
    lines = []
    for codec, u in codings.items():
        ratio = u.stored_bytes / u.logical_bytes if u.logical_bytes else 0.0
        lines.append(f"  {codec:<{width}}  {_usage_text(u)}  {100 * ratio:5.1f}% of content")
    return lines


def _commit_label(c: Any) -> str:
    step = f"step {c.step}" if c.step is not None else "no step"
    return f"{c.commit.short} {c.branch} {step}"


def _commit_chart(commits: Sequence[Any]) -> list[str]:
    values = [c.stored.stored_bytes for c in commits]
    if len(commits) > MAX_BAR_ROWS:
        ends = (_commit_label(commits[0]), _commit_label(commits[-1]))
        return ["  " + line for line in framed_chart(values, ends, human_bytes, _terminal_width() - 2)]
    largest = max(values) or 1
    labels = [_commit_label(c) for c in commits]
    width = max(len(label) for label in labels)
    lines = []
    for commit, label, value in zip(commits, labels, values):
        note = "" if commit.retained else "  (pruned: commit document only)"
        lines.append(f"  {label:<{width}}  {human_bytes(value):>10}  {bar(value / largest)}{note}".rstrip())
    return lines


def _commit_lines(u: Any) -> list[str]:
    step = f", step {u.step}" if u.step is not None else ""
    parent = f", parent {u.parent.short}" if u.parent is not None else ", no parent"
    lines = [
        f"commit {u.commit.short} ({u.branch}{step}{parent})",
        f"  logical         {human_bytes(u.logical_bytes):>10}",
        f"  chunks          {_usage_text(u.chunks)}",
        f"  inline          {_inline_text(u.inline)}",
        f"  delta bases     {_usage_text(u.delta_bases)}  (older chunks its deltas need)",
        f"  metadata        {_usage_text(u.metadata)}",
        f"  to read it      {human_bytes(u.stored_bytes):>10} stored",
        f"  unique          {_usage_text(u.unique)}  no other commit needs these",
        f"  vs parent       {_usage_text(u.shared_with_parent)}  shared",
        f"                  {_usage_text(u.not_in_parent)}  not in the parent",
        f"  newly stored    {human_bytes(u.newly_stored_bytes):>10}  when it was committed",
        f"  dedup {_ratio_text(u.dedup_ratio)}, compression {_ratio_text(u.compression_ratio)}",
    ]
    if u.missing:
        lines.append(f"  missing         {u.missing} objects it needs are not stored (run ckpt fsck)")
    lines += ["", "by coding:"]
    lines += _coding_lines(u.codings)
    if u.keys is not None:
        lines += ["", "by top-level key (each chunk counted under the first key that names it):"]
        width = min(max((len(k) for k in u.keys), default=4), 40)
        largest = max((k.chunks.stored_bytes for k in u.keys.values()), default=0)
        lines.append(f"  {'key':<{width}}  {'logical':>10}  {'stored':>10}  {'not in parent':>13}  {'unique':>10}")
        for key, k in u.keys.items():
            fraction = k.chunks.stored_bytes / largest if largest else 0.0
            lines.append(
                f"  {_clip(key, width):<{width}}  {human_bytes(k.logical_bytes):>10}  "
                f"{human_bytes(k.chunks.stored_bytes):>10}  {human_bytes(k.not_in_parent.stored_bytes):>13}  "
                f"{human_bytes(k.unique.stored_bytes):>10}  {bar(fraction)}".rstrip()
            )
    return lines


def _usage_json(u: Any) -> dict[str, int]:
    return {"objects": u.objects, "logical_bytes": u.logical_bytes, "stored_bytes": u.stored_bytes}


def commit_usage_json(u: Any) -> dict[str, Any]:
    """The stable ``ckpt du REV --json`` document (docs/diff.md)."""
    keys = None
    if u.keys is not None:
        keys = {
            key: {"entries": k.entries, "logical_bytes": k.logical_bytes, "chunks": _usage_json(k.chunks),
                  "not_in_parent": _usage_json(k.not_in_parent), "unique": _usage_json(k.unique)}
            for key, k in u.keys.items()
        }
    return {
        "scope": "commit",
        "commit": u.commit.hex,
        "step": u.step,
        "branch": u.branch,
        "parent": None if u.parent is None else u.parent.hex,
        "logical_bytes": u.logical_bytes,
        "stored_bytes": u.stored_bytes,
        "unique_bytes": u.unique_bytes,
        "newly_stored_bytes": u.newly_stored_bytes,
        "chunks": _usage_json(u.chunks),
        "inline": _usage_json(u.inline),
        "delta_bases": _usage_json(u.delta_bases),
        "metadata": _usage_json(u.metadata),
        "unique": _usage_json(u.unique),
        "shared_with_parent": _usage_json(u.shared_with_parent),
        "not_in_parent": _usage_json(u.not_in_parent),
        "missing": u.missing,
        "dedup_ratio": u.dedup_ratio,
        "compression_ratio": u.compression_ratio,
        "codings": {codec: _usage_json(c) for codec, c in u.codings.items()},
        "keys": keys,
    }


def repository_usage_json(u: Any) -> dict[str, Any]:
    """The stable ``ckpt du --json`` document (docs/diff.md)."""
    keys = None
    if u.keys is not None:
        keys = {
            key: {"entries": k.entries, "logical_bytes": k.logical_bytes, "chunks": _usage_json(k.chunks)}
            for key, k in u.keys.items()
        }
    return {
        "scope": "repository",
        "logical_bytes": u.logical_bytes,
        "stored_bytes": u.stored_bytes,
        "reachable_bytes": u.reachable_bytes,
        "chunks": _usage_json(u.chunks),
        "inline": _usage_json(u.inline),
        "delta_bases": _usage_json(u.delta_bases),
        "metadata": _usage_json(u.metadata),
        "unreferenced": _usage_json(u.unreferenced),
        "missing": u.missing,
        "dedup_ratio": u.dedup_ratio,
        "compression_ratio": u.compression_ratio,
        "ratio": u.ratio,
        "codings": {codec: _usage_json(c) for codec, c in u.codings.items()},
        "commits": [
            {
                "commit": c.commit.hex, "step": c.step, "branch": c.branch,
                "created": c.created.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "retained": c.retained, "logical_bytes": c.logical_bytes,
                "stored": _usage_json(c.stored), "newly_stored_bytes": c.newly_stored_bytes,
            }
            for c in u.commits
        ],
        "keys": keys,
    }
