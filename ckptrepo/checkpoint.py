"""Checkpoint: the Ray AIR ``Checkpoint`` surface, without ray and without pickle.

A checkpoint is held as one of: an in-memory dict, a local directory, a directory under an
fsspec URI, or a version in a ckptrepo repository; the ``from_*``/``to_*`` methods convert
between them. Round trips keep every value and every file:

- dict -> directory -> dict gives the dict back (keys, key types, containers, dtypes, bits);
- directory -> dict -> directory gives the same tree (bytes, executable bits, links, empty
  directories);
- data added on the way survives: a key added to the dict of a directory checkpoint comes
  back after the next directory -> dict, and a file added to the directory of a dict
  checkpoint comes back after the next dict -> directory.

Where Ray pickles, this module uses ckptrepo's value model: a dict becomes a directory of
safetensors files plus ``ckptrepo-checkpoint.json`` (the same layout ``Snapshot.to_directory``
writes, so committing it gives the same manifest), and a directory becomes the dict
``{"fs_checkpoint": {"files": {path: bytes}, "executable": [...], "symlinks": {...},
"empty_dirs": [...]}}``. Keys added next to ``fs_checkpoint`` are written to the directory
as a dict checkpoint under ``.checkpoint-extra/``; files added next to a dict checkpoint
come back in its dict under ``_additional_checkpoint_files`` (packed the same way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dictdir import MARKER, entry_slice, export, file_for, parse_safetensors_header, read_marker
from .errors import FormatError
from .objects import CHUNKED_KINDS, Entry, Manifest
from .paths import check_tree, safe_relpath
from .trees import FsspecTarget, open_source, open_target, resolve_location
from .values import decode_bulk, flatten, iter_leaf_paths, scalar_value, unflatten

if TYPE_CHECKING:
    from .objects import Commit
    from .repository import Repository
    from .snapshot import Snapshot

FS_CHECKPOINT_KEY = "fs_checkpoint"
ADDITIONAL_FILES_KEY = "_additional_checkpoint_files"
EXTRA_DIR = ".checkpoint-extra"
_TEMP_PREFIX = "checkpoint_tmp_"


class Checkpoint:
    """One checkpoint, as a dict, a directory, a URI or a repository version.

    Make one with :meth:`from_dict`, :meth:`from_directory`, :meth:`from_uri` or
    :meth:`from_repo`; the constructor is not public (as in Ray).
    """

    def __init__(
        self,
        *,
        data_dict: Mapping[Any, Any] | None = None,
        local_path: str | os.PathLike[str] | None = None,
        uri: str | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        given = [v for v in (data_dict, local_path, uri, snapshot) if v is not None]
        if len(given) != 1:
            raise ValueError("a Checkpoint holds exactly one of a dict, a local path, a URI or a snapshot")
        self._data_dict = data_dict
        self._local_path = str(Path(os.fspath(local_path)).absolute()) if local_path is not None else None
        self._uri = uri
        self._snapshot = snapshot

    # --- constructors --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[Any, Any]) -> Checkpoint:
        """A checkpoint held in memory. Its values are checked against the value model now
        (a ``TypeError`` names the key of a value that cannot be kept)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Checkpoint.from_dict needs a mapping, not {type(data).__name__}")
        flatten(data)
        return cls(data_dict=data)

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """A checkpoint in a local directory (used in place: it is not copied)."""
        local = Path(os.fspath(path))
        if not local.exists():
            raise FileNotFoundError(f"cannot make a checkpoint from {local}: it does not exist")
        if not local.is_dir():
            raise NotADirectoryError(
                f"cannot make a checkpoint from {local}: not a directory (pass the directory that holds the file)"
            )
        return cls(local_path=local)

    @classmethod
    def from_uri(cls, uri: str) -> Checkpoint:
        """A checkpoint in a directory under an fsspec URI (``s3://``, ``gs://``, ``memory://``;
        ``file://`` gives a local checkpoint)."""
        if not isinstance(uri, str) or "://" not in uri:
            raise ValueError(f"not a URI: {uri!r} (use from_directory for local paths)")
        fs, root = resolve_location(uri)
        if fs is None:
            return cls.from_directory(root)
        if not fs.isdir(root):
            raise FileNotFoundError(f"cannot make a checkpoint from {uri}: no directory there")
        return cls(uri=uri)

    @classmethod
    def from_repo(cls, repo: Repository, rev: str | None = None, *, step: int | None = None) -> Checkpoint:
        """A version in a ckptrepo repository (``rev`` or ``step``; default the latest)."""
        return cls(snapshot=repo.checkout(rev, step=step))

    # --- what it is ----------------------------------------------------------------------

    def __repr__(self) -> str:
        kind, value = self.get_internal_representation()
        return f"{type(self).__name__}({kind}={value if kind != 'data_dict' else '{...}'})"

    def __fspath__(self) -> str:
        raise TypeError("a Checkpoint is not a path: use to_directory() or as_directory()")

    def get_internal_representation(self) -> tuple[str, Any]:
        """``("data_dict", dict)``, ``("local_path", str)``, ``("uri", str)`` or
        ``("snapshot", Snapshot)``."""
        if self._data_dict is not None:
            return "data_dict", self._data_dict
        if self._local_path is not None:
            return "local_path", self._local_path
        if self._uri is not None:
            return "uri", self._uri
        return "snapshot", self._snapshot

    @property
    def path(self) -> str | None:
        """The URI or local path that holds this checkpoint, if any."""
        return self._uri or self._local_path

    @property
    def uri(self) -> str | None:
        """The URI of this checkpoint (``file://`` for a local directory), if any."""
        if self._uri is not None:
            return self._uri
        if self._local_path is not None:
            return f"file://{self._local_path}"
        return None

    # --- to a dict -----------------------------------------------------------------------

    def to_dict(self) -> dict[Any, Any]:
        """The checkpoint's data as a dict (a new dict; arrays come back as they were saved)."""
        if self._data_dict is not None:
            return dict(self._data_dict)
        if self._snapshot is not None and not self._snapshot.is_directory:
            return self._snapshot.to_dict()
        with self.as_directory() as local:
            return _directory_to_dict(open_source(local))

    # --- to a directory ------------------------------------------------------------------

    def to_directory(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the checkpoint into ``path`` (which must not exist or be empty; default: a
        new temporary directory that the caller owns) and return that path."""
        if path is None:
            target_path = os.path.join(tempfile.gettempdir(), f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
        else:
            target_path = str(Path(os.fspath(path)).absolute())
        if self._local_path is not None and Path(target_path) == Path(self._local_path):
            return target_path
        self._write(target_path)
        return target_path

    def to_uri(self, uri: str) -> str:
        """Write the checkpoint under ``uri`` (an empty or missing location) and return it."""
        if not isinstance(uri, str) or "://" not in uri:
            raise ValueError(f"not a URI: {uri!r} (use to_directory for local paths)")
        self._write(uri)
        return uri

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        """The checkpoint as a local directory: its own directory if it has one (treat it as
        read-only), else a temporary copy that is removed when the block ends."""
        if self._local_path is not None:
            yield self._local_path
            return
        temp = tempfile.mkdtemp(prefix=_TEMP_PREFIX)
        try:
            inner = os.path.join(temp, "checkpoint")
            self._write(inner)
            yield inner
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def _write(self, location: str) -> None:
        target = open_target(location)
        if isinstance(target, FsspecTarget):
            # An empty tree writes no object: make the directory itself (where the store has them).
            target.fs.makedirs(target.root, exist_ok=True)
        if self._data_dict is not None:
            _write_dict(self._data_dict, target)
        elif self._snapshot is not None:
            self._snapshot._write(target)
        else:
            source = open_source(self._local_path if self._local_path is not None else self._uri)  # type: ignore[arg-type]
            _copy_tree(source, target)
            target.finish()

    # --- to a repository -----------------------------------------------------------------

    def to_repo(self, repo: Repository, **commit_options: Any) -> Commit:
        """Commit this checkpoint to ``repo`` (options as for ``Repository.commit``): a dict
        as a dict checkpoint, a directory as a directory checkpoint."""
        if self._data_dict is not None and FS_CHECKPOINT_KEY not in self._data_dict:
            return repo.commit(self._data_dict, **commit_options)
        if self._snapshot is not None and not self._snapshot.is_directory:
            return repo.commit(self._snapshot.to_dict(), **commit_options)
        if self._uri is not None:
            return repo.commit(self._uri, **commit_options)
        with self.as_directory() as local:
            return repo.commit(local, **commit_options)


# --- dict -> directory ---------------------------------------------------------------------


class _Within:
    """A target seen from a sub-directory, whose ``finish`` is left to the owner."""

    def __init__(self, target: Any, prefix: str) -> None:
        self.target = target
        self.prefix = prefix

    def _path(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def mkdir(self, path: str) -> None:
        self.target.mkdir(self._path(path))

    def write_file(self, path: str, parts: Iterator[bytes | memoryview], executable: bool = False) -> None:
        self.target.write_file(self._path(path), parts, executable)

    def symlink(self, path: str, target: str) -> None:
        self.target.symlink(self._path(path), target)

    def finish(self) -> None:
        return None


def _write_dict(data: Mapping[Any, Any], target: Any) -> None:
    if FS_CHECKPOINT_KEY in data:
        # A directory checkpoint that went through a dict: the tree, plus any keys added.
        _unpack_tree(data[FS_CHECKPOINT_KEY], target, FS_CHECKPOINT_KEY)
        extras = {k: v for k, v in data.items() if k != FS_CHECKPOINT_KEY}
        if extras:
            _export_values(extras, _Within(target, EXTRA_DIR))
    else:
        values = {k: v for k, v in data.items() if k != ADDITIONAL_FILES_KEY}
        extra_files = data.get(ADDITIONAL_FILES_KEY)
        written = _export_values(values, _Within(target, ""))
        if extra_files is not None:
            clashes = sorted(set(_packed_paths(extra_files, ADDITIONAL_FILES_KEY)) & written)
            if clashes:
                raise ValueError(f"{ADDITIONAL_FILES_KEY} holds files the dict checkpoint itself writes: {clashes}")
            _unpack_tree(extra_files, target, ADDITIONAL_FILES_KEY)
    target.finish()


def _export_values(values: Mapping[Any, Any], target: Any) -> set[str]:
    """Write ``values`` as a dict-checkpoint directory (safetensors + marker); the file names."""
    tree, leaves = flatten(values)
    data: dict[str, memoryview] = {}
    entries: dict[str, Entry] = {}
    for leaf in leaves:
        meta = {k: v for k, v in leaf.entry.items() if k != "kind"}
        if leaf.data is None:
            entries[leaf.path] = Entry(kind=leaf.entry["kind"], meta=meta)
        else:
            entries[leaf.path] = Entry(kind=leaf.entry["kind"], size=len(leaf.data), meta=meta)
            data[leaf.path] = leaf.data
    manifest = Manifest(type="dict", entries=entries, tree=tree)
    export(manifest, target, lambda path: iter([data[path]]))
    return {MARKER} | {file_for(path) for path in data}


# --- directory -> dict ---------------------------------------------------------------------


def _directory_to_dict(source: Any) -> dict[Any, Any]:
    items = source.items()
    paths = {item.path for item in items}
    if MARKER in paths:
        result, used = _load_values(source, "")
        extra = [item for item in items if item.path not in used]
        if extra:
            result[ADDITIONAL_FILES_KEY] = _pack(source, extra, "")
        return result
    extra_prefix = EXTRA_DIR + "/"
    own = [item for item in items if item.path != EXTRA_DIR and not item.path.startswith(extra_prefix)]
    result = {FS_CHECKPOINT_KEY: _pack(source, own, "")}
    if f"{EXTRA_DIR}/{MARKER}" in paths:
        extras, _ = _load_values(source, EXTRA_DIR)
        result.update(extras)
    return result


def _load_values(source: Any, prefix: str) -> tuple[dict[Any, Any], set[str]]:
    """Read a dict-checkpoint directory (at ``prefix`` inside ``source``) back into values."""
    def full(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    marker = read_marker(source.read_bytes(full(MARKER)))
    raw_entries: dict[str, Any] = marker["entries"]
    tree = marker.get("tree")
    leaf_paths = iter_leaf_paths(tree)
    if sorted(leaf_paths) != sorted(raw_entries) or len(set(leaf_paths)) != len(leaf_paths):
        raise FormatError(f"{full(MARKER)}: the tree's leaves and the entries do not match")
    by_file: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for path, raw in raw_entries.items():
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            raise FormatError(f"{full(MARKER)}: entry {path} is not an object with a kind")
        if raw["kind"] in CHUNKED_KINDS:
            name = raw.get("file")
            if not isinstance(name, str):
                raise FormatError(f"{full(MARKER)}: entry {path} names no file")
            by_file.setdefault(safe_relpath(name), []).append(path)
        else:
            values[path] = scalar_value(raw, path)
    for name, paths in by_file.items():
        with source.open(full(name)) as data:
            header, start = parse_safetensors_header(data, name)
            for path in paths:
                begin, end = entry_slice(header, start, len(data), path, name)
                raw = {k: v for k, v in raw_entries[path].items() if k != "file"}
                try:
                    values[path] = decode_bulk(raw, bytearray(data[begin:end]), None, False, path)
                except (KeyError, ValueError) as exc:
                    raise FormatError(f"{name}: entry {path} cannot be decoded: {exc}") from None
    used = {full(MARKER)} | {full(name) for name in by_file}
    return unflatten(tree, values), used


# --- directory trees as dicts --------------------------------------------------------------


def _pack(source: Any, items: list[Any], prefix: str) -> dict[str, Any]:
    files: dict[str, bytes] = {}
    executable: list[str] = []
    symlinks: dict[str, str] = {}
    empty_dirs: list[str] = []
    for item in items:
        path = item.path[len(prefix) + 1 :] if prefix else item.path
        if item.kind == "file":
            files[path] = source.read_bytes(item.path)
            if item.executable:
                executable.append(path)
        elif item.kind == "symlink":
            symlinks[path] = item.target
        else:
            empty_dirs.append(path)
    return {"files": files, "executable": executable, "symlinks": symlinks, "empty_dirs": empty_dirs}


def _packed_paths(packed: Any, key: str) -> list[str]:
    _check_packed(packed, key)
    return list(packed["files"]) + list(packed["symlinks"]) + list(packed["empty_dirs"])


def _check_packed(packed: Any, key: str) -> None:
    shapes = {"files": dict, "executable": list, "symlinks": dict, "empty_dirs": list}
    if not isinstance(packed, Mapping) or set(packed) != set(shapes):
        raise ValueError(f"{key} must be a dict with exactly the keys {sorted(shapes)}")
    for name, kind in shapes.items():
        if not isinstance(packed[name], kind):
            raise ValueError(f"{key}[{name!r}] must be a {kind.__name__}")
    for path, content in packed["files"].items():
        if not isinstance(path, str) or not isinstance(content, (bytes, bytearray, memoryview)):
            raise ValueError(f"{key}['files'] maps paths (str) to bytes; {path!r} does not")
    unknown = set(packed["executable"]) - set(packed["files"])
    if unknown:
        raise ValueError(f"{key}['executable'] names paths that are not files: {sorted(unknown)}")


def _unpack_tree(packed: Any, target: Any, key: str) -> None:
    _check_packed(packed, key)
    kinds = {path: "file" for path in packed["files"]}
    kinds.update({path: "symlink" for path in packed["symlinks"]})
    kinds.update({path: "dir" for path in packed["empty_dirs"]})
    if len(kinds) != len(packed["files"]) + len(packed["symlinks"]) + len(packed["empty_dirs"]):
        raise ValueError(f"{key} lists a path twice")
    check_tree(kinds, dict(packed["symlinks"]))  # refuse the whole tree before writing any of it
    executable = set(packed["executable"])
    for path in packed["empty_dirs"]:
        target.mkdir(safe_relpath(path))
    for path, content in packed["files"].items():
        target.write_file(safe_relpath(path), iter([content]), path in executable)
    for path, link in packed["symlinks"].items():
        target.symlink(safe_relpath(path), link)


def _copy_tree(source: Any, target: Any) -> None:
    for item in source.items():  # a source's listing is checked (paths, links) when made
        if item.kind == "file":
            with source.open(item.path) as data:
                target.write_file(item.path, iter([data]), item.executable)
        elif item.kind == "symlink":
            target.symlink(item.path, item.target)
        else:
            target.mkdir(item.path)

