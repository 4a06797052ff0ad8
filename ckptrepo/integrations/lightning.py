"""RepoCheckpointIO: a Lightning ``CheckpointIO`` that commits checkpoints to a repository.

``Trainer(plugins=[RepoCheckpointIO(repo)])`` and ``ModelCheckpoint`` work unchanged. Each
checkpoint Lightning saves becomes one commit on the plugin's branch, with the trainer's
``global_step`` as its step and each monitored score as a commit metric. At the path Lightning
asked for, a small JSON *pointer file* names the commit, so everything that looks at the
checkpoint directory (``ModelCheckpoint``'s top-k bookkeeping, ``ckpt_path="last"``,
``save_last="link"``) sees what it expects, while the data lives deduplicated in the
repository. A tag per pointer path keeps the commit alive; ``remove_checkpoint`` (top-k
eviction) removes the pointer, the tag and, once nothing else needs it, the step ref, so
``repo.gc()`` reclaims the space.

No pickle by default: Lightning's own checkpoint contents (weights, optimizer and scheduler
states, loops, callback states, plain hyper-parameters) are all in ckptrepo's value model.
Anything else (say an ``argparse.Namespace`` or a module passed to ``save_hyperparameters``)
makes ``save_checkpoint`` raise a TypeError naming its key, before anything is written. Pass
``allow_pickle=True`` to keep such values pickled; they are unpickled on load only when the
plugin allows pickle and the caller did not ask for ``weights_only=True``.

``load_checkpoint`` takes a pointer file, a revision of the repository (``"steps/100"``, a
tag, a commit id: ``trainer.fit(model, ckpt_path="steps/100")`` resumes from it), or an
ordinary torch checkpoint file (loaded by ``torch.load`` with the given ``weights_only``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.utilities.cloud_io import _load as lightning_load
except ImportError:
    raise ImportError(
        "ckptrepo.integrations.lightning needs the `lightning` package: pip install 'ckptrepo[lightning]'"
    ) from None

from ..errors import FormatError, RefConflictError, RepositoryError, RevisionError
from ..ids import ObjectId
from ..refs import step_ref, tag_ref, validate_name
from ..repository import Repository
from ..repository import init as init_repository
from ..repository import open as open_repository

POINTER_FORMAT = "ckptrepo.lightning-pointer"
_MAX_POINTER_BYTES = 64 << 10
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_STORAGE_OPTIONS = frozenset({"message", "metrics", "tags", "meta"})


@dataclass(frozen=True, slots=True)
class Pointer:
    """What a pointer file at a checkpoint path holds."""

    repository: str
    commit: ObjectId
    branch: str
    step: int | None
    tag: str

    def encode(self) -> bytes:
        doc = {
            "format": POINTER_FORMAT, "version": 1, "repository": self.repository,
            "commit": self.commit.hex, "branch": self.branch, "step": self.step, "tag": self.tag,
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Pointer | None:
        """The pointer in ``raw``, or None when ``raw`` is not a pointer file at all."""
        if not raw.lstrip().startswith(b"{"):
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != POINTER_FORMAT:
            return None
        if doc.get("version") != 1:
            raise FormatError(f"{where}: pointer version {doc.get('version')!r} is not supported")
        try:
            step = doc["step"]
            if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
                raise TypeError("step")
            return cls(str(doc["repository"]), ObjectId(doc["commit"]), validate_name(doc["branch"], "branch"),
                       step, validate_name(doc["tag"], "tag"))
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{where}: malformed pointer ({exc})") from None


class RepoCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` over a ckptrepo repository (``repo_or_path``: a
    :class:`Repository`, or a path or URI, created if missing)."""

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        *,
        branch: str | None = None,
        allow_pickle: bool = False,
        create: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(repo_or_path, Repository):
            self.repo = repo_or_path
        else:
            try:
                self.repo = open_repository(repo_or_path)
            except RepositoryError:
                if not create:
                    raise
                self.repo = init_repository(repo_or_path)
        self.branch = validate_name(branch or self.repo.current_branch, "branch")
        self.allow_pickle = allow_pickle

    def __repr__(self) -> str:
        return f"RepoCheckpointIO({self.repo.location!r}, branch={self.branch!r})"

    # --- save ----------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint`` and write a pointer to it at ``path``.

        ``storage_options`` (``trainer.save_checkpoint(path, storage_options=...)``) may give
        ``message``, ``metrics`` (merged with the monitored scores), ``tags`` and ``meta``.
        """
        options = _storage_options(storage_options)
        text = os.fspath(path)
        name = os.path.basename(text.rstrip("/"))
        step = checkpoint.get("global_step")
        step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
        epoch = checkpoint.get("epoch")
        metrics = {**_monitored_scores(checkpoint), **dict(options.get("metrics", {}))}
        meta = {
            "lightning": {
                "file": name,
                "epoch": epoch if isinstance(epoch, int) else None,
                "version": str(checkpoint.get("pytorch-lightning_version", "")),
            },
            **dict(options.get("meta", {})),
        }
        message = options.get("message") or f"lightning {name}" + (f" (epoch {epoch}, step {step})" if step is not None else "")
        previous = self._read_pointer(text)
        try:
            commit = self.repo.commit(
                checkpoint, step=step, branch=self.branch, message=message, metrics=metrics,
                tags=options.get("tags", ()), meta=meta, replace=True, allow_pickle=self.allow_pickle,
            )
        except TypeError as exc:
            if self.allow_pickle:
                raise
            raise TypeError(
                f"{exc}. RepoCheckpointIO keeps no pickle by default: leave such values out of the checkpoint "
                "(e.g. save_hyperparameters(ignore=[...])) or pass RepoCheckpointIO(..., allow_pickle=True)"
            ) from None
        tag = _tag_for(text)
        self.repo.tag(tag, commit.id.hex, force=True)
        pointer = Pointer(self.repo.location, commit.id, self.branch, step, tag)
        _write_pointer(text, pointer.encode())
        if previous is not None and previous.commit != commit.id:
            self._release(previous.commit)

    # --- load ----------------------------------------------------------------------------

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (a pointer file, a revision, or a torch file).

        ``weights_only=True`` never unpickles anything; ``map_location`` (a device, a string,
        a dict of locations or a function of ``(storage, location)``) moves the tensors.
        """
        text = os.fspath(path)
        pointer = self._read_pointer(text)
        if pointer is not None:
            commit_id = pointer.commit
            if not self.repo.store.has(commit_id):
                raise RepositoryError(
                    f"{text} points to commit {commit_id.short}, which {self.repo.location} does not hold "
                    f"(the pointer was written for {pointer.repository})"
                )
        elif _exists(text):
            return _torch_load(text, map_location, weights_only)
        else:
            try:
                commit_id = self.repo.resolve_id(text)
            except RevisionError:
                raise FileNotFoundError(
                    f"Checkpoint file not found: {text} (nor is it a revision of {self.repo.location})"
                ) from None
        allow = self.allow_pickle and weights_only is not True
        checkpoint = self.repo.checkout(commit_id.hex).to_dict(allow_pickle=allow)
        moved: dict[str, Any] = apply_map_location(checkpoint, map_location)
        return moved

    # --- remove --------------------------------------------------------------------------

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path``: the pointer file, then its tag, then the step ref
        unless another kept checkpoint needs that step (the file goes first, so a crash leaves
        at most an unused ref, never a pointer to nothing)."""
        text = os.fspath(path)
        if "://" not in text and os.path.islink(text):
            os.unlink(text)  # a save_last="link" link: the checkpoint it names stays
            return
        if not _exists(text):
            return
        pointer = self._read_pointer(text)
        fs, local = fsspec.core.url_to_fs(text)
        fs.rm(local, recursive=True)
        if pointer is None:
            return
        ref = tag_ref(pointer.tag)
        if self.repo.refs.get(ref) == pointer.commit:
            try:
                self.repo.refs.update(ref, None, pointer.commit)
            except RefConflictError:
                pass  # re-saved meanwhile: the new checkpoint owns the tag
        self._release(pointer.commit)

    def _release(self, commit_id: ObjectId) -> None:
        """``commit_id`` lost its pointer: drop its step ref, unless a tag still names it; if
        another tagged commit has the same step, the step ref moves there instead."""
        tags = self.repo.refs.tags()
        if commit_id in set(tags.values()):
            return
        steps = self.repo.refs.steps(self.branch)
        held = [step for step, target in steps.items() if target == commit_id]
        for step in held:
            replacement = None
            for target in sorted(set(tags.values())):
                try:
                    other = self.repo.load_commit(target)
                except Exception:  # noqa: BLE001 - an unreadable tag target cannot take the step
                    continue
                if other.branch == self.branch and other.step == step:
                    replacement = target
                    break
            try:
                self.repo.refs.update(step_ref(self.branch, step), replacement, commit_id)
            except RefConflictError:
                continue  # the step moved meanwhile; whoever moved it owns it

    def _read_pointer(self, text: str) -> Pointer | None:
        if not _exists(text):
            return None
        fs, local = fsspec.core.url_to_fs(text)
        if fs.isdir(local):
            return None
        with fs.open(local, "rb") as f:
            head = f.read(_MAX_POINTER_BYTES + 1)
        if len(head) > _MAX_POINTER_BYTES:
            return None
        return Pointer.decode(head, text)

    def teardown(self) -> None:
        # The trainer tears its strategy down after every fit/test; the repository stays open
        # for the next one (it belongs to whoever made this plugin).
        return None


# --- helpers -------------------------------------------------------------------------------


def _storage_options(options: Any) -> Mapping[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"storage_options for RepoCheckpointIO is a dict, not {type(options).__name__}")
    unknown = set(options) - _STORAGE_OPTIONS
    if unknown:
        raise TypeError(f"unknown storage_options {sorted(unknown)}; RepoCheckpointIO takes {sorted(_STORAGE_OPTIONS)}")
    return options


def _monitored_scores(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """Each ModelCheckpoint's monitored metric and its current score, as commit metrics."""
    scores: dict[str, float] = {}
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return scores
    for state in callbacks.values():
        if not isinstance(state, Mapping):
            continue
        monitor, score = state.get("monitor"), state.get("current_score")
        if isinstance(monitor, str) and score is not None:
            try:
                scores[monitor] = float(score)
            except (TypeError, ValueError, RuntimeError):
                continue
    return scores


def _tag_for(path: str) -> str:
    """A tag name per checkpoint path: readable, and unique through a hash of the full path."""
    full = path if "://" in path else os.path.abspath(path)
    digest = hashlib.blake2b(full.encode(), digest_size=4).hexdigest()
    stem = _TAG_UNSAFE.sub("_", os.path.basename(full.rstrip("/")))[:120].lstrip(".-") or "checkpoint"
    return f"pl.{stem}.{digest}"


def _exists(text: str) -> bool:
    fs, local = fsspec.core.url_to_fs(text)
    return bool(fs.exists(local))


def _write_pointer(text: str, body: bytes) -> None:
    fs, local = fsspec.core.url_to_fs(text)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        fs.pipe_file(local, body)  # one request: an object store replaces it atomically
        return
    directory = os.path.dirname(os.path.abspath(local))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".pointer-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, local)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _torch_load(path: str, map_location: Any, weights_only: bool | None) -> dict[str, Any]:
    # Lightning's own loader (torch.load through fsspec), as TorchCheckpointIO uses it.
    loaded: dict[str, Any] = lightning_load(path, map_location=map_location, weights_only=weights_only)
    return loaded


def apply_map_location(value: Any, map_location: Any) -> Any:
    """Move every tensor in ``value`` as ``torch.load(map_location=...)`` would; checked-out
    tensors live on the CPU, so ``"cpu"`` is their location."""
    if map_location is None:
        return value
    import torch

    def move(tensor: Any) -> Any:
        if callable(map_location) and not isinstance(map_location, (str, torch.device)):
            moved = map_location(tensor.untyped_storage(), "cpu")
            device = getattr(moved, "device", tensor.device)
            return tensor if device == tensor.device else tensor.to(device)
        if isinstance(map_location, Mapping):
            target = map_location.get("cpu")
            return tensor if target is None else tensor.to(target)
        return tensor.to(map_location)

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return move(node)
        if isinstance(node, collections.OrderedDict):
            return collections.OrderedDict((k, walk(v)) for k, v in node.items())
        if isinstance(node, Mapping):
            return {k: walk(v) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v) for v in node)
        return node

    return walk(value)
