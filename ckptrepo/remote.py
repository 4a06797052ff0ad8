"""Repositories on any fsspec URI, and the backends that sync uses to reach them.

A remote repository has the same layout as a local one (``config.yaml``, ``HEAD``,
``objects/xx/...``, ``refs/...``), so ``ckptrepo.open("s3://bucket/prefix")`` reads it in
place. What is local about it lives in a cache directory on this machine,
``$XDG_CACHE_HOME/ckptrepo/<hash of the URI>/`` (``~/.cache`` when unset): the LMDB index of
the objects seen on the remote and a bounded cache of object files read (``objects/``).
Deleting that directory loses nothing.

Options for a remote (``endpoint_url``, ``profile``, ``anon``, ...) come from fsspec's own
configuration (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/*.json``) and, for a named
remote, from its ``options`` in config.yaml. A few options are ckptrepo's own:
``conditional_writes`` (full | create-only | none; see backends/fsspec.py), ``lock_ttl``
(seconds), ``transfers`` (parallel object transfers during sync) and ``cache_bytes`` (the
read cache's bound). Credentials never go into config.yaml: options that look like secrets
are refused; use the store's usual credential chain (environment, profile, instance role).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb

from .backends.base import Backend, list_sizes
from .backends.cached import DEFAULT_CACHE_BYTES, CachedBackend
from .backends.fsspec import DEFAULT_LOCK_TTL_S, FsspecBackend
from .backends.local import LocalBackend
from .backends.retrying import RetryingBackend
from .config import CONFIG_KEY, Config
from .errors import KeyNotFoundError, RepositoryError
from .ids import hash_hex
from .index import ChunkIndex
from .refs import HEAD_KEY
from .repository import Repository
from .store import OBJECTS_PREFIX, key_to_id

CKPTREPO_OPTIONS = frozenset({"conditional_writes", "lock_ttl", "transfers", "cache_bytes"})
DEFAULT_TRANSFERS = 16
# Substrings of option names that carry secrets; such options are refused outright.
_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "access_key", "account_key",
                 "connection_string", "private_key", "sas_")
_SECRET_NAMES = frozenset({"key", "sas", "client_secret", "session"})


def is_remote_uri(location: str | os.PathLike[str]) -> bool:
    """True for URIs that are not on the local disk (``file://`` and plain paths are local)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(location).removeprefix("file://")).absolute()


def check_options(options: Mapping[str, Any] | None, where: str = "remote options") -> dict[str, Any]:
    """Validate remote options for storing in config.yaml: no credentials, plain values."""
    checked = dict(options or {})
    _refuse_secrets(checked, where)
    for name in CKPTREPO_OPTIONS & set(checked):
        value = checked[name]
        if name in ("transfers", "cache_bytes") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RepositoryError(f"{where}: {name} must be a positive integer, not {value!r}")
        if name == "lock_ttl" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise RepositoryError(f"{where}: lock_ttl must be a positive number of seconds, not {value!r}")
    return checked


def _refuse_secrets(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for name, inner in value.items():
            lowered = str(name).lower()
            if lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS):
                raise RepositoryError(
                    f"{where}: {name!r} looks like a credential; credentials are never stored in the "
                    "repository: use the environment, a profile or fsspec's config instead"
                )
            _refuse_secrets(inner, f"{where}.{name}")
    elif isinstance(value, (list, tuple)):
        for inner in value:
            _refuse_secrets(inner, where)
    elif isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        raise RepositoryError(f"{where}: {value!r} carries a user or password; remove it")
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise RepositoryError(f"{where}: {value!r} is not a plain value (str, number, bool, list, mapping)")


def check_uri(uri: str) -> str:
    """A URI that fsspec can open (its filesystem package installed), or a local path."""
    if not isinstance(uri, str) or not uri:
        raise RepositoryError(f"invalid remote URI {uri!r}")
    if not is_remote_uri(uri):
        return uri
    protocol, _, rest = uri.partition("://")
    if "@" in rest.split("/", 1)[0]:
        raise RepositoryError(f"remote URI {uri!r} carries a user or password; remove it")
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise RepositoryError(f"unknown protocol {protocol!r} in {uri!r}") from None
    except ImportError as exc:
        raise RepositoryError(f"{protocol}:// needs an extra package: {exc}") from None
    return uri


def open_backend(uri: str, options: Mapping[str, Any] | None = None) -> Backend:
    """The backend for ``uri``: the local backend for paths and file://, else fsspec behind
    retries. ``options`` are validated (no credentials) and split: ckptrepo's own keys steer
    the backend, the rest go to the fsspec filesystem."""
    options = check_options(options)
    if not is_remote_uri(uri):
        return LocalBackend(local_path(uri))
    check_uri(uri)
    fs_options = {k: v for k, v in options.items() if k not in CKPTREPO_OPTIONS}
    backend = FsspecBackend.from_uri(
        uri.rstrip("/"), fs_options,
        conditional_writes=options.get("conditional_writes"),
        lock_ttl=float(options.get("lock_ttl", DEFAULT_LOCK_TTL_S)),
    )
    return RetryingBackend(backend)


def cache_dir_for(uri: str) -> Path:
    """This machine's cache directory for the remote repository at ``uri``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckptrepo" / hash_hex(uri.rstrip("/").encode())[:32]


def read_config(backend: Backend, uri: str) -> Config:
    try:
        raw = backend.read(CONFIG_KEY)
    except KeyNotFoundError:
        raise RepositoryError(f"no ckptrepo repository at {uri}") from None
    return Config.load(raw, f"{uri.rstrip('/')}/{CONFIG_KEY}")


def init_remote(uri: str, config: Config | None = None, *, options: Mapping[str, Any] | None = None) -> Repository:
    """Create a repository at a remote URI; error if one exists there."""
    backend = open_backend(uri, options)
    try:
        if backend.stat(CONFIG_KEY) is not None:
            raise RepositoryError(f"a repository exists already at {uri}")
        write_skeleton(backend, config or Config(), "main")
    finally:
        backend.close()
    return open_remote(uri, options=options)


def write_skeleton(backend: Backend, config: Config, head: str) -> None:
    """HEAD, then config.yaml (create-only, last: its presence makes the repository). A
    remote's config names no remotes: those belong to the machine that added them."""
    backend.write(HEAD_KEY, f"{head}\n".encode())
    backend.write(CONFIG_KEY, replace(config, remotes={}).dump(), create_only=True)


def open_remote(
    uri: str, *, options: Mapping[str, Any] | None = None, read_only: bool = False,
    cache_bytes: int | None = None,
) -> Repository:
    """Open the repository at a remote URI in place, with a local index and read cache.

    Opened for writing, the index is rebuilt from one listing of the remote, so chunks that
    another machine deleted are never taken as present; read-only, a ready index is reused
    (an object it does not know is looked up on the remote).
    """
    options = check_options(options)
    backend = open_backend(uri, options)
    try:
        config = read_config(backend, uri)
        cache = cache_dir_for(uri)
        indexed = _prepare_index(cache / "index", backend, fresh=not read_only)
    except BaseException:
        backend.close()
        raise
    limit = cache_bytes or int(options.get("cache_bytes", _env_cache_bytes()))
    cached = CachedBackend(backend, cache / OBJECTS_PREFIX, max_bytes=limit)
    return Repository(cached, config, cache_dir=cache if indexed else None, read_only=read_only)


def _env_cache_bytes() -> int:
    raw = os.environ.get("CKPTREPO_CACHE_BYTES")
    if raw is None:
        return DEFAULT_CACHE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise RepositoryError(f"CKPTREPO_CACHE_BYTES={raw!r} is not a number of bytes") from None
    if value < 1:
        raise RepositoryError(f"CKPTREPO_CACHE_BYTES={raw!r} must be positive")
    return value


def _prepare_index(path: Path, backend: Backend, *, fresh: bool) -> bool:
    """Make the index at ``path`` hold what the remote has; False if it cannot be used now.

    Built here from a listing with sizes (one paged LIST on object stores) rather than by the
    store's rebuild, which would stat every object: a round trip each. LMDB refuses a second
    handle on one environment in a process (the same remote opened twice): that handle then
    goes without an index, asking the remote instead, which is slower but as correct.
    """
    index = ChunkIndex(path)
    try:
        try:
            if index.ready and not fresh:
                return True
        except lmdb.Error:
            return False
        rows = []
        for key, size in list_sizes(backend, OBJECTS_PREFIX).items():
            object_id = key_to_id(key)
            if object_id is not None:
                rows.append((object_id, size, 0))
        index.clear()
        index.add_many(rows)
        index.mark_ready()
        return True
    finally:
        index.close()
