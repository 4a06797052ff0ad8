"""The ``ckpt`` command line (SPEC section 8).

Each command group lives in its own module under ``ckptrepo.cli`` and registers its
subcommands with :func:`register`; this module parses, opens the repository and maps errors
to exit codes: a user error prints one line and exits 1, a usage error exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import CkptRepoError

# Modules that register subcommands, in the order their commands are listed in --help.
COMMAND_MODULES = ("core", "history", "sync", "maintenance")


class UserError(Exception):
    """A problem with what the user asked for, reported as one line (exit 1)."""


def repo_path(args: argparse.Namespace) -> str:
    return args.repo or os.environ.get("CKPT_REPO") or "."


def open_repo(args: argparse.Namespace, *, read_only: bool = False) -> Any:
    import ckptrepo

    return ckptrepo.open(repo_path(args), read_only=read_only)


def command(
    subparsers: Any, name: str, handler: Callable[[argparse.Namespace], int | None], summary: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose ``handler(args)`` returns the exit code (None: 0)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=summary, description=summary)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="ckpt", description="git for machine-learning checkpoints")
    parser.add_argument("-C", dest="repo", metavar="REPO", help="repository path or URI (default: $CKPT_REPO or .)")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def _version() -> str:
    from .. import __version__

    return f"ckpt {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except (CkptRepoError, UserError, TypeError, ValueError, KeyError, FileNotFoundError) as exc:
        if os.environ.get("CKPT_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"ckpt: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(code or 0)
