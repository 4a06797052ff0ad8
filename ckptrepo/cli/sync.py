"""Sync commands: remote, push, pull, fetch, clone."""

from __future__ import annotations

import argparse
import threading
from typing import Any

import yaml

from ..refs import branch_ref
from . import UserError, command, open_repo
from .format import human_bytes, print_json
from .progress import Progress


def register(subparsers: Any) -> None:
    p = command(subparsers, "remote", cmd_remote, "list remotes, or add / remove one")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("add", help="add remote NAME at URI", description="add remote NAME at URI")
    add.add_argument("name")
    add.add_argument("uri", help="s3://bucket/prefix, gs://..., memory://..., a path, ...")
    add.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a filesystem option stored with the remote, e.g. endpoint_url=http://... "
                          "(never a credential)")
    remove = actions.add_parser("remove", help="forget remote NAME", description="forget remote NAME")
    remove.add_argument("name")
    p.add_argument("-v", "--verbose", action="store_true", help="also show options and refs last seen")

    p = command(subparsers, "push", cmd_push, "send branches, steps and tags to a remote")
    p.add_argument("remote", nargs="?", help="remote name or URI (default: origin)")
    p.add_argument("--ref", action="append", metavar="NAME", help="push only this branch (with its steps) or tag")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "fetch", cmd_fetch, "get what a remote has, moving no local ref")
    p.add_argument("remote", nargs="?", help="remote name or URI (default: origin)")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "pull", cmd_pull, "fetch, then fast-forward local branches, steps and tags")
    p.add_argument("remote", nargs="?", help="remote name or URI (default: origin)")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "clone", cmd_clone, "copy a repository into a new one at DEST")
    p.add_argument("uri")
    p.add_argument("dest")
    p.add_argument("--depth", type=int, metavar="N", help="only the last N commits of each branch")
    p.add_argument("--rev", metavar="REV", help="only this revision (with --depth: N commits ending there)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a filesystem option for the source, kept for remote origin")
    p.add_argument("--json", action="store_true")


def _options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        options[key] = value if isinstance(value, (str, int, float, bool)) else raw
    return options


class _ProgressBridge:
    """Turns sync's cumulative progress reports into the shared progress line."""

    def __init__(self, label: str) -> None:
        self.bar = Progress(label)
        self._seen = 0
        self._lock = threading.Lock()

    def __call__(self, report: Any) -> None:
        with self._lock:
            if report.bytes_total:
                self.bar.total = report.bytes_total
            delta = report.bytes_done - self._seen
            self._seen = report.bytes_done
        if delta > 0:
            self.bar.update(delta)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _ProgressBridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _short(object_id: str | None) -> str:
    return object_id[:12] if object_id else "(none)"


def _describe(updates: Any) -> str:
    parts = []
    counts = {"steps": 0, "tags": 0}
    for update in updates:
        if update.ref.kind == "branches":
            parts.append(f"branch {update.ref.name} {_short(update.old)} -> {_short(update.new)}")
        else:
            counts[update.ref.kind] += 1
    parts += [f"{n} {kind if n != 1 else kind[:-1]}" for kind, n in counts.items() if n]
    return ", ".join(parts)


def cmd_remote(args: argparse.Namespace) -> None:
    from ..sync import add_remote, remove_remote, tracking_refs

    if args.action == "add":
        repo = open_repo(args)
        add_remote(repo, args.name, args.uri, _options(args.option))
        print(f"added remote {args.name} at {args.uri}")
        return
    if args.action == "remove":
        remove_remote(open_repo(args), args.name)
        print(f"removed remote {args.name}")
        return
    repo = open_repo(args, read_only=True)
    for name, remote in sorted(repo.config.remotes.items()):
        print(f"{name}\t{remote.uri}")
        if args.verbose:
            for key, value in sorted(remote.options.items()):
                print(f"    option {key} = {value}")
            for ref, target in sorted(tracking_refs(repo, name).items(), key=lambda kv: kv[0].key):
                if ref.kind != "steps":
                    print(f"    {ref} {_short(target)}")


def cmd_push(args: argparse.Namespace) -> None:
    from ..sync import push

    repo = open_repo(args)  # writable: a push records what the remote now holds
    with _ProgressBridge("pushing") as bridge:
        report = push(repo, args.remote, refs=args.ref, progress=bridge)
    if args.json:
        print_json(report.to_json())
    elif report.up_to_date:
        print(f"{report.remote}: everything up to date")
    else:
        print(f"pushed to {report.remote}: {report.objects_sent} objects, {human_bytes(report.bytes_sent)} "
              f"in {report.seconds:.1f}s ({report.objects_present} there already); {_describe(report.refs_updated)}")


def _fetch_line(report: Any) -> str:
    if not report.objects_received:
        return f"{report.remote}: nothing new"
    return (f"fetched from {report.remote}: {report.objects_received} objects, "
            f"{human_bytes(report.bytes_received)} in {report.seconds:.1f}s")


def cmd_fetch(args: argparse.Namespace) -> None:
    from ..sync import fetch

    repo = open_repo(args)
    with _ProgressBridge("fetching") as bridge:
        report = fetch(repo, args.remote, progress=bridge)
    if args.json:
        print_json(report.to_json())
        return
    print(_fetch_line(report))
    if report.refs:
        print(f"remote refs changed: {_describe(report.refs)}")


def cmd_pull(args: argparse.Namespace) -> None:
    from ..sync import pull

    repo = open_repo(args)
    with _ProgressBridge("pulling") as bridge:
        report = pull(repo, args.remote, progress=bridge)
    if args.json:
        print_json(report.to_json())
        return
    print(_fetch_line(report.fetch))
    print(f"updated {_describe(report.refs_updated)}" if report.refs_updated else "local refs already up to date")


def cmd_clone(args: argparse.Namespace) -> None:
    from ..sync import clone

    if args.depth is not None and args.depth < 1:
        raise UserError(f"--depth must be at least 1, not {args.depth}")
    with _ProgressBridge("cloning") as bridge:
        repo = clone(args.uri, args.dest, depth=args.depth, rev=args.rev, options=_options(args.option),
                     progress=bridge)
    try:
        branch = repo.current_branch
        tip = repo.refs.get(branch_ref(branch))
        if args.json:
            print_json({"location": repo.location, "branch": branch, "tip": tip,
                        "branches": dict(repo.branches()), "tags": dict(repo.tags()),
                        "shallow": sorted(repo.shallow_commits())})
            return
        shallow = " (shallow)" if repo.shallow_commits() else ""
        print(f"cloned {args.uri} into {repo.location}{shallow}: branch {branch} at {_short(tip)}, "
              f"{len(repo.branches())} branches, {len(repo.tags())} tags")
    finally:
        repo.close()

