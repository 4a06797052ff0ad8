"""Snapshot: a lazy view of one committed version, as a dict, a directory or a URI."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dictdir import export as export_dict
from .errors import PathSafetyError
from .gcpause import paused_gc
from .ids import ObjectId
from .objects import Commit, Entry, Manifest
from .paths import check_tree
from .trees import open_target
from .values import FRAMEWORKS, decode_bulk, scalar_value, unflatten

if TYPE_CHECKING:
    from .repository import Repository


class Snapshot:
    """One version of a checkpoint. Entries load on access: ``snap[path]`` reads only the
    chunks of that entry."""

    def __init__(self, repo: Repository, commit_id: ObjectId, commit: Commit, manifest: Manifest) -> None:
        self.repo = repo
        self.id = commit_id
        self.commit = commit
        self.manifest = manifest

    def __repr__(self) -> str:
        step = f" step {self.commit.step}" if self.commit.step is not None else ""
        return f"<Snapshot {self.id.short}{step} ({self.manifest.type}, {len(self)} entries)>"

    @property
    def step(self) -> int | None:
        return self.commit.step

    @property
    def is_directory(self) -> bool:
        return self.manifest.type == "directory"

    # --- mapping access ------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Entry paths: the leaves of a dict checkpoint, or the files of a directory."""
        if self.is_directory:
            return [p for p, e in self.manifest.entries.items() if e.kind == "file"]
        return list(self.manifest.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path in self.keys()

    def entry(self, path: str) -> Entry:
        try:
            return self.manifest.entries[path]
        except KeyError:
            raise KeyError(f"{path!r} is not in checkpoint {self.id.short}") from None

    def __getitem__(self, path: str) -> Any:
        return self.get(path)

    def get(self, path: str, *, framework: str | None = None, allow_pickle: bool = False) -> Any:
        entry = self.entry(path)
        if self.is_directory:
            if entry.kind != "file":
                raise KeyError(f"{path!r} is a {entry.kind}, not a file")
            return bytes(self.repo.reader().read_entry(entry))
        return self._value(path, entry, framework, allow_pickle)

    def _value(self, path: str, entry: Entry, framework: str | None, allow_pickle: bool) -> Any:
        if not entry.chunked:
            return scalar_value(entry.fields(), path)
        data = self.repo.reader().read_entry(entry)
        return decode_bulk(entry.fields(), data, framework, allow_pickle, path)

    # --- whole views ---------------------------------------------------------------------

    @paused_gc()
    def to_dict(self, framework: str | None = None, *, allow_pickle: bool = False) -> dict[Any, Any]:
        """The checkpoint as committed (``framework=None``), or with every array as
        ``"numpy"`` / ``"torch"`` / ``"jax"``. A directory checkpoint gives {path: bytes}."""
        if framework is not None and framework not in FRAMEWORKS:
            raise ValueError(f"framework must be None or one of {', '.join(FRAMEWORKS)}, not {framework!r}")
        if self.is_directory:
            return {path: self.get(path) for path in self.keys()}
        entries = self.manifest.entries
        # Every entry's chunks decode in parallel; one at a time, small tensors would not.
        loaded = dict(self.repo.reader().read_entries((p, e) for p, e in entries.items() if e.chunked))
        values = {
            path: decode_bulk(e.fields(), loaded.pop(path), framework, allow_pickle, path)
            if e.chunked else scalar_value(e.fields(), path)
            for path, e in entries.items()
        }
        result: dict[Any, Any] = unflatten(self.manifest.tree, values)
        return result

    def to_directory(self, path: str | os.PathLike[str]) -> Path:
        """Write the checkpoint as files under ``path`` (which must not exist or be empty)."""
        target = open_target(os.fspath(path))
        self._write(target)
        return Path(os.fspath(path))

    def to_uri(self, uri: str) -> str:
        """Write the checkpoint under any fsspec URI (s3://, gs://, memory://, file://)."""
        self._write(open_target(uri))
        return uri

    @contextmanager
    def as_directory(self) -> Iterator[Path]:
        """A temporary directory holding the checkpoint, removed afterwards."""
        tmp = Path(tempfile.mkdtemp(prefix="ckptrepo-"))
        try:
            self._write(open_target(tmp / "checkpoint"))
            yield tmp / "checkpoint"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, target: Any) -> None:
        reader = self.repo.reader()
        if not self.is_directory:
            export_dict(self.manifest, target, lambda p: reader.iter_entry(self.manifest.entries[p]))
            return
        entries = self.manifest.entries
        kinds = {p: e.kind for p, e in entries.items()}
        targets = {p: str(e.meta["target"]) for p, e in entries.items() if e.kind == "symlink"}
        check_tree(kinds, targets)  # refuse the whole checkout before writing anything
        for path, entry in entries.items():
            if entry.kind == "dir":
                target.mkdir(path)
            elif entry.kind == "file":
                target.write_file(path, reader.iter_entry(entry), bool(entry.meta.get("executable")))
            elif entry.kind == "symlink":
                target.symlink(path, targets[path])
            else:
                raise PathSafetyError(f"entry {path}: {entry.kind} cannot be written to a directory")
        target.finish()
