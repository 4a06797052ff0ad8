"""Directory trees on a local disk or any fsspec filesystem: read them in, write them out.

A tree is regular files (bytes and the executable bit), empty directories and symlinks.
Filesystems without links or modes (object stores, memory://) keep those in a sidecar file,
``.ckptrepo-tree.json``, which committing the tree back reads and hides, so a tree survives
a round trip through any URI.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PathSafetyError, RepositoryError
from .paths import check_tree, safe_relpath

SIDECAR = ".ckptrepo-tree.json"


@dataclass(frozen=True, slots=True)
class TreeItem:
    path: str  # relative posix path
    kind: str  # "file" | "dir" | "symlink"
    size: int = 0
    executable: bool = False
    target: str = ""


def _validate(items: list[TreeItem]) -> list[TreeItem]:
    kinds = {item.path: item.kind for item in items}
    if len(kinds) != len(items):
        raise PathSafetyError("tree lists a path twice")
    check_tree(kinds, {i.path: i.target for i in items if i.kind == "symlink"})
    return items


# --- sources -----------------------------------------------------------------------------


class LocalSource:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise RepositoryError(f"{root} is not a directory")
        self.root = root

    def items(self) -> list[TreeItem]:
        out: list[TreeItem] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            prefix = "" if rel_dir == "." else rel_dir + "/"
            children = 0
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                st = full.lstat()
                path = prefix + name
                children += 1
                if stat.S_ISLNK(st.st_mode):
                    out.append(TreeItem(path, "symlink", target=os.readlink(full)))
                    if name in dirnames:
                        dirnames.remove(name)
                elif stat.S_ISREG(st.st_mode):
                    out.append(TreeItem(path, "file", st.st_size, bool(st.st_mode & stat.S_IXUSR)))
                elif not stat.S_ISDIR(st.st_mode):
                    raise RepositoryError(
                        f"cannot commit {full}: only regular files, directories and symlinks are supported"
                    )
            dirnames.sort()
            if children == 0 and prefix:
                out.append(TreeItem(rel_dir, "dir"))
        return _validate(out)

    @contextmanager
    def open(self, path: str) -> Iterator[memoryview]:
        """The file's bytes, memory-mapped: the data path slices it without copying."""
        with open(self.root / safe_relpath(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                yield memoryview(b"")
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    yield view
                finally:
                    view.release()

    def read_bytes(self, path: str) -> bytes:
        return (self.root / safe_relpath(path)).read_bytes()


class FsspecSource:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        if not fs.isdir(self.root):
            raise RepositoryError(f"{fs.unstrip_protocol(self.root)} is not a directory")

    def _rel(self, full: str) -> str:
        return full[len(self.root) + 1 :] if full.startswith(self.root + "/") else full

    def items(self) -> list[TreeItem]:
        found = self.fs.find(self.root, withdirs=True, detail=True)
        files: dict[str, int] = {}
        dirs: set[str] = set()
        for full, info in found.items():
            rel = self._rel(full.rstrip("/"))
            if not rel or rel == self.root:
                continue
            if info.get("type") == "directory":
                dirs.add(rel)
            else:
                files[rel] = int(info.get("size") or 0)
        sidecar = self._sidecar(files)
        items: list[TreeItem] = []
        for path, size in sorted(files.items()):
            if path == SIDECAR:
                continue
            items.append(TreeItem(path, "file", size, path in sidecar["executable"]))
        for path, target in sorted(sidecar["symlinks"].items()):
            items.append(TreeItem(safe_relpath(path), "symlink", target=target))
        non_empty = {p.rsplit("/", 1)[0] for p in list(files) + list(sidecar["symlinks"]) + list(dirs) if "/" in p}
        empty = (dirs | set(sidecar["empty_dirs"])) - non_empty
        items.extend(TreeItem(safe_relpath(p), "dir") for p in sorted(empty))
        return _validate(sorted(items, key=lambda i: i.path))

    def _sidecar(self, files: dict[str, int]) -> dict[str, Any]:
        empty: dict[str, Any] = {"executable": [], "symlinks": {}, "empty_dirs": []}
        if SIDECAR not in files:
            return empty
        from .validation import parse_json

        doc = parse_json(self.fs.cat_file(f"{self.root}/{SIDECAR}"), SIDECAR)
        if not isinstance(doc, dict):
            raise RepositoryError(f"{SIDECAR} is not a JSON object")
        out = {**empty, **{k: doc[k] for k in empty if k in doc}}
        if not (isinstance(out["executable"], list) and isinstance(out["symlinks"], dict)
                and isinstance(out["empty_dirs"], list)):
            raise RepositoryError(f"{SIDECAR}: malformed")
        out["executable"] = set(out["executable"])
        return out

    @contextmanager
    def open(self, path: str) -> Iterator[memoryview]:
        yield memoryview(self.fs.cat_file(f"{self.root}/{safe_relpath(path)}"))

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(f"{self.root}/{safe_relpath(path)}"))


# --- targets -----------------------------------------------------------------------------


class LocalTarget:
    """Writes a tree under ``root``, which must not exist or be empty (so no link already
    planted there can redirect a write). Links are made last, after every file."""

    def __init__(self, root: Path) -> None:
        if root.is_symlink() or (root.exists() and (not root.is_dir() or any(root.iterdir()))):
            raise RepositoryError(f"checkout destination {root} exists and is not an empty directory")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._links: list[tuple[str, str]] = []

    def _path(self, path: str) -> Path:
        return self.root / safe_relpath(path)

    def mkdir(self, path: str) -> None:
        self._path(path).mkdir(parents=True, exist_ok=True)

    def write_file(self, path: str, parts: Iterator[bytes | memoryview], executable: bool = False) -> None:
        full = self._path(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(full, flags, 0o755 if executable else 0o644)
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            # The umask may have dropped bits; the committed executable bit must come back.
            os.fchmod(fd, 0o755 if executable else 0o644)
        finally:
            os.close(fd)

    def symlink(self, path: str, target: str) -> None:
        self._links.append((path, target))

    def finish(self) -> None:
        for path, target in self._links:
            full = self._path(path)
            full.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, full)


class FsspecTarget:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        if fs.exists(self.root) and (not fs.isdir(self.root) or fs.ls(self.root)):
            raise RepositoryError(f"checkout destination {fs.unstrip_protocol(self.root)} exists and is not empty")
        self._sidecar: dict[str, Any] = {"executable": [], "symlinks": {}, "empty_dirs": []}

    def mkdir(self, path: str) -> None:
        self._sidecar["empty_dirs"].append(safe_relpath(path))

    def write_file(self, path: str, parts: Iterator[bytes | memoryview], executable: bool = False) -> None:
        with self.fs.open(f"{self.root}/{safe_relpath(path)}", "wb") as f:
            for part in parts:
                f.write(part)
        if executable:
            self._sidecar["executable"].append(path)

    def symlink(self, path: str, target: str) -> None:
        self._sidecar["symlinks"][safe_relpath(path)] = target

    def finish(self) -> None:
        if any(self._sidecar.values()):
            body = json.dumps(self._sidecar, sort_keys=True, indent=1).encode()
            self.fs.pipe_file(f"{self.root}/{SIDECAR}", body)


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def open_source(location: str | os.PathLike[str]) -> LocalSource | FsspecSource:
    fs, root = resolve_location(location)
    return LocalSource(Path(root)) if fs is None else FsspecSource(fs, root)


def open_target(location: str | os.PathLike[str]) -> LocalTarget | FsspecTarget:
    fs, root = resolve_location(location)
    return LocalTarget(Path(root)) if fs is None else FsspecTarget(fs, root)


def resolve_location(location: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(None, local path)`` for local paths and file:// URIs, else ``(fs, path)``."""
    text = os.fspath(location)
    if "://" not in text or text.startswith("file://"):
        return None, os.path.abspath(text.removeprefix("file://"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(text)
    if is_local(fs):
        return None, os.path.abspath(path)
    return fs, path
