"""Core commands: init, commit, show, checkout, tag, branch, switch, steps."""

from __future__ import annotations

import argparse
from typing import Any

from . import UserError, command, open_repo, repo_path
from .format import commit_json, human_bytes, metrics_text, print_json
from .progress import Progress


def register(subparsers: Any) -> None:
    p = command(subparsers, "init", cmd_init, "create a repository")
    p.add_argument("path", nargs="?", help="where (default: -C, $CKPT_REPO or .)")

    p = command(subparsers, "commit", cmd_commit, "commit a checkpoint directory or file")
    p.add_argument("source", help="a directory, a URI, or a .pt/.pth/.ckpt/.safetensors/.npz file")
    p.add_argument("--step", type=int)
    p.add_argument("--branch")
    p.add_argument("-m", "--message", default="")
    p.add_argument("--metric", action="append", default=[], metavar="K=V")
    p.add_argument("--tag", action="append", default=[], metavar="T")
    p.add_argument("--replace", action="store_true", help="replace the step if the branch has it")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "show", cmd_show, "show one commit")
    p.add_argument("rev", nargs="?", default="latest")
    p.add_argument("--json", action="store_true")

    p = command(subparsers, "checkout", cmd_checkout, "write a version to a directory or URI")
    p.add_argument("rev")
    p.add_argument("dest")

    p = command(subparsers, "tag", cmd_tag, "list, create (NAME [REV]) or delete (-d NAME) tags")
    p.add_argument("name", nargs="?")
    p.add_argument("rev", nargs="?", default="latest")
    p.add_argument("-d", "--delete", action="store_true")
    p.add_argument("-f", "--force", action="store_true")

    p = command(subparsers, "branch", cmd_branch, "list branches or create NAME at REV")
    p.add_argument("name", nargs="?")
    p.add_argument("rev", nargs="?", default="latest")

    p = command(subparsers, "switch", cmd_switch, "make BRANCH the current branch")
    p.add_argument("name")

    p = command(subparsers, "steps", cmd_steps, "list the steps of a branch")
    p.add_argument("--branch")
    p.add_argument("--json", action="store_true")


def cmd_init(args: argparse.Namespace) -> None:
    import ckptrepo

    path = args.path or repo_path(args)
    repo = ckptrepo.init(path)
    print(f"initialised empty ckptrepo repository in {repo.location}")


def _parse_metrics(items: list[str]) -> dict[str, float]:
    metrics = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--metric {item!r}: expected NAME=VALUE")
        try:
            metrics[key] = float(value)
        except ValueError:
            raise UserError(f"--metric {item!r}: {value!r} is not a number") from None
    return metrics


def cmd_commit(args: argparse.Namespace) -> None:
    from ..sources import load_source

    repo = open_repo(args)
    source = load_source(args.source)
    with Progress("committing") as progress:
        commit = repo.commit(
            source, step=args.step, branch=args.branch, message=args.message,
            metrics=_parse_metrics(args.metric), tags=args.tag, replace=args.replace,
            progress=progress.update,
        )
    if args.json:
        print_json(commit_json(commit))
        return
    s = commit.stats
    step = f" step {commit.step}" if commit.step is not None else ""
    print(
        f"committed {commit.id[:12]} on {commit.branch}{step}: {human_bytes(s.logical_bytes)} logical, "
        f"{human_bytes(s.stored_bytes)} stored, {s.new_chunks} new / {s.reused_chunks} reused chunks"
    )


def cmd_show(args: argparse.Namespace) -> None:
    repo = open_repo(args, read_only=True)
    commit = repo.resolve(args.rev)
    manifest = repo.load_manifest(commit.manifest_id)
    if args.json:
        doc = commit_json(commit)
        doc["entries"] = {
            path: entry.fields() | {"chunks": len(entry.chunks)}
            for path, entry in manifest.entries.items()
        }
        print_json(doc)
        return
    print(f"commit   {commit.id}")
    print(f"branch   {commit.branch}" + (f"   step {commit.step}" if commit.step is not None else ""))
    print(f"date     {commit.created.isoformat(timespec='seconds')}")
    if commit.parents:
        print(f"parent   {' '.join(commit.parents)}")
    if commit.metrics:
        print(f"metrics  {metrics_text(dict(commit.metrics))}")
    s = commit.stats
    print(f"size     {human_bytes(s.logical_bytes)} logical, {human_bytes(s.stored_bytes)} newly stored")
    if commit.message:
        print(f"\n    {commit.message}\n")
    print(f"{manifest.type} checkpoint, {len(manifest.entries)} entries:")
    for path, entry in manifest.entries.items():
        detail = entry.kind
        if entry.kind == "tensor":
            detail = f"{entry.dtype}{list(entry.shape or ())}"
        elif entry.kind == "symlink":
            detail = f"-> {entry.meta.get('target')}"
        size = human_bytes(entry.size) if entry.chunked else ""
        print(f"  {path:<50} {detail:<28} {size:>10}")


def cmd_checkout(args: argparse.Namespace) -> None:
    repo = open_repo(args, read_only=True)
    snap = repo.checkout(args.rev)
    if "://" in args.dest and not args.dest.startswith("file://"):
        snap.to_uri(args.dest)
    else:
        snap.to_directory(args.dest)
    print(f"checked out {snap.id[:12]} to {args.dest}")


def cmd_tag(args: argparse.Namespace) -> None:
    if args.delete:
        if not args.name:
            raise UserError("tag -d needs a NAME")
        open_repo(args).untag(args.name)
        print(f"deleted tag {args.name}")
        return
    if args.name is None:
        for name, commit_id in open_repo(args, read_only=True).tags().items():
            print(f"{name}\t{commit_id[:12]}")
        return
    commit = open_repo(args).tag(args.name, args.rev, force=args.force)
    print(f"tagged {commit.id[:12]} as {args.name}")


def cmd_branch(args: argparse.Namespace) -> None:
    if args.name is None:
        repo = open_repo(args, read_only=True)
        current = repo.current_branch
        for name, commit_id in repo.branches().items():
            print(f"{'*' if name == current else ' '} {name}\t{commit_id[:12]}")
        return
    commit = open_repo(args).branch(args.name, args.rev)
    print(f"created branch {args.name} at {commit.id[:12]}")


def cmd_switch(args: argparse.Namespace) -> None:
    open_repo(args).switch(args.name)
    print(f"switched to branch {args.name}")


def cmd_steps(args: argparse.Namespace) -> None:
    repo = open_repo(args, read_only=True)
    branch = args.branch or repo.current_branch
    steps = repo.refs.steps(branch)
    if args.json:
        print_json([{"step": s, "commit": c} for s, c in steps.items()])
        return
    for step, commit_id in steps.items():
        commit = repo.load_commit(commit_id)
        print(f"{step:>10}  {commit_id[:12]}  {metrics_text(dict(commit.metrics))}")
