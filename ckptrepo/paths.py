"""Path safety for checkouts: nothing a checkpoint names may lead outside its destination."""

from __future__ import annotations

import posixpath

from .errors import PathSafetyError


def safe_relpath(path: str) -> str:
    """Return ``path`` if it is a clean relative posix path, else raise PathSafetyError."""
    if not isinstance(path, str) or not path:
        raise PathSafetyError(f"empty path in checkpoint: {path!r}")
    if "\x00" in path:
        raise PathSafetyError(f"path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise PathSafetyError(f"absolute path {path!r} refused: checkout writes only inside its destination")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise PathSafetyError(f"path {path!r} refused: it has an empty, '.' or '..' segment")
    return path


def check_symlink(path: str, target: str, kinds: dict[str, str]) -> None:
    """A link must stay inside the tree: relative, never above the root at any step, and not
    passing through another link (whose ``..`` would resolve from somewhere else)."""
    refused = f"symlink {path!r} -> {target!r} refused"
    if not target or target.startswith("/") or "\x00" in target:
        raise PathSafetyError(f"{refused}: the target must be a relative path")
    parts = [p for p in posixpath.dirname(path).split("/") if p]
    components = target.split("/")
    for i, component in enumerate(components):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                raise PathSafetyError(f"{refused}: it leads outside the checkout")
            parts.pop()
            continue
        parts.append(component)
        if i < len(components) - 1 and kinds.get("/".join(parts)) == "symlink":
            raise PathSafetyError(f"{refused}: it passes through another symlink")


def check_tree(kinds: dict[str, str], targets: dict[str, str]) -> None:
    """Validate a whole tree of ``path -> kind``: safe paths, links that stay inside, and
    nothing that sits below a symlink or a file (which would write through it)."""
    for path in kinds:
        safe_relpath(path)
    for path, target in targets.items():
        check_symlink(path, target, kinds)
    for path in kinds:
        parent = posixpath.dirname(path)
        while parent:
            kind = kinds.get(parent)
            if kind in ("symlink", "file"):
                raise PathSafetyError(f"path {path!r} refused: {parent!r} is a {kind}, not a directory")
            parent = posixpath.dirname(parent)
