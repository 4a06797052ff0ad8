"""Maintenance commands: fsck, gc, prune."""

from __future__ import annotations

import argparse
from typing import Any

from . import UserError, command, open_repo
from .format import human_bytes, print_json


def register(subparsers: Any) -> None:
    p = command(subparsers, "fsck", cmd_fsck, "check the repository (exit 1 if anything is wrong)")
    p.add_argument("--read-data", action="store_true", help="also decode and hash every chunk")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the index, remove leftovers of crashes, set damaged objects aside "
                        "and fetch them again from a remote that has them")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "gc", cmd_gc, "delete objects that no ref keeps")
    p.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="keep unreferenced objects younger than this (default: config or 900)")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "prune", cmd_prune, "delete step refs a retention policy does not keep")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest steps of each branch")
    p.add_argument("--keep-best", metavar="METRIC:min|max:K", help="keep the K steps with the best METRIC")
    p.add_argument("--keep-every", type=int, metavar="N", help="keep steps that are multiples of N")
    p.add_argument("--branch", help="prune only this branch (default: every branch)")
    p.add_argument("--prune-tagged", action="store_true", help="let tagged steps go too")
    p.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    p.add_argument("--gc", action="store_true", help="run gc afterwards to free the space")
    p.add_argument("--json", action="store_true")


def cmd_fsck(args: argparse.Namespace) -> int:
    repo = open_repo(args, read_only=not args.repair)
    report = repo.fsck(read_data=args.read_data, repair=args.repair)
    if args.json:
        print_json(report.to_json())
        return 0 if report.ok else 1
    for line in report.repairs:
        print(f"repaired: {line}")
    for problem in report.problems:
        print(f"problem: {problem.kind}: {problem}")
    c = report.checked
    verified = (
        f"; decoded and verified {c.verified_objects} chunks ({human_bytes(c.verified_bytes)})"
        if report.read_data else ""
    )
    print(
        f"checked {c.refs} refs, {c.commits} commits ({c.retained_commits} with data), "
        f"{c.manifests} manifests, {c.chunks} chunk headers{verified}"
    )
    if c.unreachable_objects:
        print(f"{c.unreachable_objects} objects are kept by no ref (`ckpt gc` frees them)")
    leftovers = len(report.temp_files) + len(report.stale_locks)
    if leftovers and not args.repair:
        print(f"{leftovers} leftovers of interrupted processes (`ckpt fsck --repair` removes them)")
    print("ok" if report.ok else f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> None:
    repo = open_repo(args, read_only=args.dry_run)
    report = repo.gc(dry_run=args.dry_run, grace_seconds=args.grace)
    if args.json:
        print_json(report.to_json())
        return
    _print_gc(report)


def _print_gc(report: Any) -> None:
    verb = "would free" if report.dry_run else "freed"
    print(f"{verb} {report.freed_objects} objects, {human_bytes(report.freed_bytes)}")
    if report.young_objects:
        print(
            f"kept {report.young_objects} unreferenced objects ({human_bytes(report.young_bytes)}) "
            f"younger than {report.grace_seconds:g}s (--grace 0 frees them)"
        )


def cmd_prune(args: argparse.Namespace) -> None:
    if args.gc and args.dry_run:
        raise UserError("--gc and --dry-run do not go together (use `ckpt gc --dry-run` afterwards)")
    repo = open_repo(args, read_only=args.dry_run)
    report = repo.prune(
        keep_last=args.keep_last, keep_best=args.keep_best, keep_every=args.keep_every,
        keep_tagged=not args.prune_tagged, branch=args.branch, dry_run=args.dry_run,
    )
    gc_report = repo.gc() if args.gc else None
    if args.json:
        doc = report.to_json()
        if gc_report is not None:
            doc["gc"] = gc_report.to_json()
        print_json(doc)
        return
    verb = "would remove" if report.dry_run else "removed"
    for record in report.removed:
        print(f"{verb} {record.branch}/steps/{record.step}  {record.commit[:12]}")
    for record in report.conflicts:
        print(f"left {record.branch}/steps/{record.step}: it moved while pruning")
    print(f"{verb} {len(report.removed)} steps, kept {len(report.kept)}")
    if gc_report is not None:
        _print_gc(gc_report)
    elif report.removed and not report.dry_run:
        print("run `ckpt gc` to free their space")
