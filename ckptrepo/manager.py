"""CheckpointManager: the Orbax manager's interface over a ckptrepo repository.

One save is one commit on the manager's branch, with the step as its step ref; its dict is
``{item_name: state}`` (a single state is stored as the item ``"default"``), so each item can
be restored alone, reading only its own entries. With ``async_save`` (the default) ``save``
copies the state to host memory and returns; hashing, coding and writing run in one
background thread, and the step ref appears only when the step is durable. A background
error is raised by the next call on the manager.

Retention is one policy over the branch's steps: the union of the last ``max_to_keep``, the
``keep_best`` best by ``best_fn``, every ``keep_every``-th, every tagged step, the steps this
manager restored, and always the latest. Steps outside it lose their step ref (``repo.gc()``
reclaims their space); ``item_max_to_keep`` drops single items (say the optimizer state) from
all but the newest retained steps by replacing those steps' commits with smaller ones.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import (
    FormatError,
    RefConflictError,
    RefExistsError,
    RepositoryError,
    RevisionError,
)
from .ids import ObjectId
from .objects import Commit, CommitStats, Manifest, check_metrics, now_utc
from .refs import step_ref, tag_ref, validate_name
from .repository import Repository
from .repository import init as init_repository
from .repository import open as open_repository
from .snapshot import Snapshot
from .values import escape_key, iter_leaf_paths, join_path, leaf_of, unflatten

DEFAULT_ITEM = "default"
META_KEY = "ckptrepo.manager"
BEST_MODES = ("min", "max")


# --- retention -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which steps (and which items of them) a manager keeps. Every field is optional; the
    steps kept are the union of what each field asks for, and the latest step is always kept."""

    max_to_keep: int | None = None  # the newest N steps
    keep_every: int | None = None  # steps that are multiples of M
    keep_best: int | None = None  # the K best steps by the manager's best_fn
    keep_tagged: bool = True  # steps whose commit a tag names
    item_max_to_keep: Mapping[str, int] = field(default_factory=dict)  # item -> newest K steps

    def __post_init__(self) -> None:
        for name in ("max_to_keep", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, not {value!r}")
        for item, count in self.item_max_to_keep.items():
            if not isinstance(item, str):
                raise ValueError(f"item_max_to_keep keys are item names (str), not {item!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"item_max_to_keep[{item!r}] must be an int >= 1, not {count!r}")

    @property
    def prunes_steps(self) -> bool:
        return self.max_to_keep is not None or self.keep_every is not None or self.keep_best is not None

    def kept_steps(
        self,
        steps: Iterable[int],
        *,
        scores: Mapping[int, float] | None = None,
        best_mode: str = "min",
        protected: Iterable[int] = (),
    ) -> set[int]:
        """The steps to keep out of ``steps``. ``scores`` maps a step to its best_fn value
        (steps without one are never "best"); ``protected`` steps (tagged, resumed from) are
        kept whatever else holds."""
        ordered = sorted(set(steps))
        if not ordered:
            return set()
        if not self.prunes_steps:
            return set(ordered)
        kept = {ordered[-1]} | (set(protected) & set(ordered))
        if self.max_to_keep is not None:
            kept.update(ordered[-self.max_to_keep :])
        if self.keep_every is not None:
            kept.update(s for s in ordered if s % self.keep_every == 0)
        if self.keep_best is not None and scores:
            kept.update(best_steps(scores, self.keep_best, best_mode, ordered))
        return kept

    def items_to_drop(self, kept_items: Mapping[int, Iterable[str]], frozen: Iterable[int] = ()) -> dict[int, set[str]]:
        """For each kept step (``kept_items``: step -> its items), the items per-item retention
        removes: an item stays in the newest ``item_max_to_keep[item]`` kept steps only.
        ``frozen`` steps (tagged: the tag keeps the full commit anyway) are left whole."""
        frozen_steps = set(frozen)
        newest_first = sorted(kept_items, reverse=True)
        drops: dict[int, set[str]] = {}
        for item, count in self.item_max_to_keep.items():
            for step in newest_first[count:]:
                if step not in frozen_steps and item in kept_items[step]:
                    drops.setdefault(step, set()).add(item)
        return drops


def best_steps(scores: Mapping[int, float], count: int, mode: str, among: Iterable[int] | None = None) -> list[int]:
    """The ``count`` best steps by score (``mode`` "min" or "max"); nan never wins; on a tie
    the newer step is better."""
    if mode not in BEST_MODES:
        raise ValueError(f"best_mode must be 'min' or 'max', not {mode!r}")
    allowed = None if among is None else set(among)
    candidates = [
        (score if mode == "min" else -score, -step, step)
        for step, score in scores.items()
        if not math.isnan(score) and (allowed is None or step in allowed)
    ]
    return [step for _, _, step in sorted(candidates)[:count]]


# --- metadata ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeafMetadata:
    """What a saved leaf is, read from the manifest without loading any data."""

    kind: str  # "tensor", "int", "float", "str", "bytes", "bool", "none", "numpy_scalar", "pickle"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    framework: str | None = None


# --- host staging --------------------------------------------------------------------------


def _torch() -> Any:
    return sys.modules.get("torch")


# Host copies are cut in pieces of this size, so that two threads share them evenly.
_MEMCPY_PIECE = 8 << 20


class HostStager:
    """Copies a state into host memory that the training loop can no longer touch.

    Buffers are kept between saves, keyed by leaf path, and reused when shape and dtype match:
    the first touch of freshly allocated memory (page faults) costs far more than the copy
    itself, so the second and later saves of a run stall only for a memcpy. Device tensors go
    to pinned buffers with one synchronisation at the end. Containers are rebuilt, so the
    caller may also mutate its dicts and lists at once. Every leaf is checked by the value
    model here, so a bad value raises TypeError naming its key before anything is written.
    """

    def __init__(self, *, allow_pickle: bool = False, reuse_buffers: bool = True) -> None:
        self.allow_pickle = allow_pickle
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[str, Any] = {}
        self._copies: _HostCopies | None = None
        self._helper: ThreadPoolExecutor | None = None
        self.staged_bytes = 0

    def release(self) -> None:
        self._buffers = {}
        if self._helper is not None:
            self._helper.shutdown(wait=False)
            self._helper = None

    def stage(self, state: Mapping[str, Any]) -> dict[str, Any]:
        used: dict[str, Any] = {}
        self.staged_bytes = 0
        device_copies = [False]
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="ckptrepo-stage")
        self._copies = _HostCopies(self._helper)
        try:
            staged = self._copy(state, "", used, set(), device_copies)
        finally:
            # Every piece is copied (also after an error: the buffers are this stager's own)
            # before the caller may touch its state again.
            self._copies.finish()
            self._copies = None
        torch = _torch()
        if device_copies[0] and torch is not None:
            torch.cuda.synchronize()
        # Buffers of leaves that are gone are dropped here, so memory follows the state.
        self._buffers = used if self.reuse_buffers else {}
        return staged  # type: ignore[no-any-return]

    def _copy(self, value: Any, path: str, used: dict[str, Any], active: set[int], device: list[bool]) -> Any:
        if isinstance(value, Mapping):
            if id(value) in active:
                raise TypeError(f"cannot save {path or 'the state'}: it contains itself")
            active.add(id(value))
            keys = list(value.keys())
            for key in keys:
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(
                        f"cannot save {path or 'the state'}: key {key!r} is a {type(key).__name__}; keys must be str or int"
                    )
            int_keys = frozenset(str(k) for k in keys if isinstance(k, int))
            pairs = [(k, self._copy(value[k], join_path(path, escape_key(k, int_keys)), used, active, device)) for k in keys]
            active.discard(id(value))
            return collections.OrderedDict(pairs) if isinstance(value, collections.OrderedDict) else dict(pairs)
        if type(value) in (list, tuple):
            if id(value) in active:
                raise TypeError(f"cannot save {path or 'the state'}: it contains itself")
            active.add(id(value))
            items = [self._copy(v, join_path(path, str(i)), used, active, device) for i, v in enumerate(value)]
            active.discard(id(value))
            return items if type(value) is list else tuple(items)
        torch = _torch()
        if torch is not None and isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path, used, device, torch)
        if isinstance(value, np.ndarray):
            buffer = self._buffer(path, used, np.ndarray, value.shape, value.dtype, lambda: np.empty(value.shape, value.dtype))
            # The value model's dtype check first (on the buffer: no further copy), so that an
            # object array gets its clear TypeError, not numpy's refusal of a byte view.
            leaf_of(buffer, path)
            if value.flags.c_contiguous:
                self._host_copies().add(buffer.reshape(-1).view(np.uint8), value.reshape(-1).view(np.uint8))
            else:
                np.copyto(buffer, value)
            self.staged_bytes += buffer.nbytes
            return buffer
        leaf = leaf_of(value, path, self.allow_pickle)  # TypeError naming the key if refused
        if leaf.entry["kind"] == "pickle":
            return copy.deepcopy(value)
        return value  # None, bool, int, float, str, bytes, numpy scalars, jax arrays: immutable

    def _copy_tensor(self, tensor: Any, path: str, used: dict[str, Any], device: list[bool], torch: Any) -> Any:
        if tensor.layout != torch.strided or tensor.is_quantized:
            leaf_of(tensor, path)  # raises the value model's error for this layout
        on_device = tensor.device.type != "cpu"
        source = tensor.detach()

        def allocate() -> Any:
            return torch.empty(tuple(source.shape), dtype=source.dtype, device="cpu", pin_memory=on_device)

        buffer = self._buffer(path, used, torch.Tensor, tuple(source.shape), source.dtype, allocate, pinned=on_device)
        if not on_device and source.is_contiguous() and not (source.is_conj() or source.is_neg()):
            # A plain memcpy (_HostCopies): torch's own copy_ splits each copy over its
            # intra-op threads, which stalls for many times longer when another process holds
            # a core.
            self._host_copies().add(_byte_view(buffer), _byte_view(source))
        else:
            buffer.copy_(source, non_blocking=on_device)
        device[0] = device[0] or on_device
        self.staged_bytes += buffer.numel() * buffer.element_size()
        return buffer

    def _host_copies(self) -> _HostCopies:
        if self._copies is None:
            raise AssertionError("host copies outside a stage")  # a bug, never bad input
        return self._copies

    def _buffer(
        self, path: str, used: dict[str, Any], kind: Any, shape: tuple[int, ...], dtype: Any,
        allocate: Callable[[], Any], pinned: bool = False,
    ) -> Any:
        old: Any = self._buffers.get(path)
        if (
            isinstance(old, kind)
            and tuple(old.shape) == tuple(shape)
            and old.dtype == dtype
            and bool(getattr(old, "is_pinned", lambda: False)()) == pinned
            and path not in used
        ):
            buffer = old
        else:
            buffer = allocate()
        used[path] = buffer
        return buffer


class _HostCopies:
    """The host copies of one stage, in pieces taken from one queue by two threads: a helper
    from the first piece on, while the calling thread is still walking the state (about 10 ms
    of Python for 340 tensors, which the copying used to wait for), then the calling thread
    too. With both cores free the copy (the whole training-loop stall of an async save) takes
    about 0.7x the time of one thread (1 GiB: 0.088 s against 0.124 s); with the other core
    busy the calling thread does nearly all of it and waits at most for the one piece the
    helper holds, so pieces are small."""

    def __init__(self, helper: ThreadPoolExecutor) -> None:
        self._pieces: queue.SimpleQueue[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None] = queue.SimpleQueue()
        self._pool = helper
        self._helper: Future[None] | None = None

    def add(self, dst: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
        for i in range(0, len(dst), _MEMCPY_PIECE):
            self._pieces.put((dst[i : i + _MEMCPY_PIECE], src[i : i + _MEMCPY_PIECE]))
        if self._helper is None:
            self._helper = self._pool.submit(self._drain)

    def _drain(self) -> None:
        # Each thread stops at the first end mark it takes; finish() queues one per thread.
        while (piece := self._pieces.get()) is not None:
            np.copyto(*piece)

    def finish(self) -> None:
        """Copy what is left, with the helper, and return once every piece is copied."""
        self._pieces.put(None)
        if self._helper is not None:
            self._pieces.put(None)
        try:
            self._drain()
        finally:
            if self._helper is not None:
                self._helper.result()


def _byte_view(tensor: Any) -> np.ndarray[Any, Any]:
    """A contiguous CPU tensor's bytes as a numpy array (no copy; any dtype, bfloat16 too)."""
    torch = _torch()
    return tensor.reshape(-1).view(torch.uint8).numpy()  # type: ignore[no-any-return]


# --- the manager ---------------------------------------------------------------------------


@dataclass
class _InFlight:
    step: int
    future: Future[Commit]


class CheckpointManager:
    """Save and restore training state by step, with retention, over a ckptrepo repository.

    ``repo_or_path``: a :class:`Repository`, or a path or URI (a repository is created there if
    none exists and ``create`` is true). The manager works on ``branch`` (default: the
    repository's current branch) and its retention applies to every step of that branch.
    """

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        *,
        branch: str | None = None,
        item_names: Sequence[str] | None = None,
        max_to_keep: int | None = None,
        keep_every: int | None = None,
        best_fn: Callable[[Mapping[str, float]], float] | str | None = None,
        best_mode: str = "min",
        keep_best: int | None = None,
        keep_tagged: bool = True,
        item_max_to_keep: Mapping[str, int] | None = None,
        save_interval_steps: int = 1,
        save_on_steps: Iterable[int] = (),
        async_save: bool = True,
        allow_pickle: bool = False,
        create: bool = True,
        reuse_host_buffers: bool = True,
    ) -> None:
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be 'min' or 'max', not {best_mode!r}")
        if keep_best is not None and best_fn is None:
            raise ValueError("keep_best needs best_fn (a metric name, or a function of a step's metrics)")
        if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be an int >= 1, not {save_interval_steps!r}")
        self.policy = RetentionPolicy(
            max_to_keep=max_to_keep, keep_every=keep_every, keep_best=keep_best, keep_tagged=keep_tagged,
            item_max_to_keep=dict(item_max_to_keep or {}),
        )
        if item_names is not None:
            item_names = tuple(item_names)
            for name in item_names:
                if not isinstance(name, str):
                    raise TypeError(f"item names must be str, not {name!r}")
            unknown = set(self.policy.item_max_to_keep) - set(item_names)
            if unknown:
                raise ValueError(f"item_max_to_keep names items not in item_names: {sorted(unknown)}")
        self.item_names: tuple[str, ...] | None = item_names
        self.best_fn = _metric_getter(best_fn) if isinstance(best_fn, str) else best_fn
        self.best_mode = best_mode
        self.save_interval_steps = save_interval_steps
        self.save_on_steps = frozenset(_check_step(s) for s in save_on_steps)
        self.async_save = async_save
        self.allow_pickle = allow_pickle

        if isinstance(repo_or_path, Repository):
            self.repo = repo_or_path
            self._owns_repo = False
        else:
            self.repo = _open_or_create(repo_or_path, create)
            self._owns_repo = True
        self.branch = validate_name(branch or self.repo.current_branch, "branch")

        self._stager = HostStager(allow_pickle=allow_pickle, reuse_buffers=reuse_host_buffers)
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: _InFlight | None = None
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._commits: dict[ObjectId, Commit] = {}
        self._restored: set[int] = set()  # read by the background thread: copy under the lock
        self._restored_lock = threading.Lock()
        self._last_saved: int | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<CheckpointManager {self.repo.location} branch {self.branch}>"

    # --- Orbax surface: steps ------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self.repo.location

    def all_steps(self, read: bool = False) -> list[int]:
        """Durable steps of the branch, oldest first (always read from the refs; ``read`` is
        accepted for Orbax compatibility)."""
        self._check_usable()
        return sorted(self.repo.refs.steps(self.branch))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best durable step by ``best_fn`` (the latest step when there is no best_fn)."""
        self._check_usable()
        if self.best_fn is None:
            return self.latest_step()
        scores = self._scores(self.repo.refs.steps(self.branch))
        best = best_steps(scores, 1, self.best_mode)
        return best[0] if best else None

    def should_save(self, step: int) -> bool:
        """True when ``step`` is after every saved step and on the save interval (or listed in
        ``save_on_steps``)."""
        self._check_usable()
        step = _check_step(step)
        last = self._last_step_seen()
        if last is not None and step <= last:
            return False
        return step in self.save_on_steps or step % self.save_interval_steps == 0

    def _last_step_seen(self) -> int | None:
        candidates = [s for s in (self.latest_step(), self._last_saved) if s is not None]
        if self._in_flight is not None:
            candidates.append(self._in_flight.step)
        return max(candidates) if candidates else None

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with ``step``; None if the step has none or does not exist."""
        self._check_usable()
        commit_id = self.repo.refs.get(step_ref(self.branch, _check_step(step)))
        if commit_id is None:
            return None
        metrics = dict(self._commit(commit_id).metrics)
        return metrics or None

    def item_metadata(self, step: int) -> Any:
        """The structure of each item of ``step`` with a :class:`LeafMetadata` at every leaf
        (dtype, shape, bytes), read from the manifest alone; a single saved state gives its
        structure directly."""
        self._check_usable()
        snap = self._snapshot(_check_step(step))
        if snap.is_directory:
            raise RepositoryError(f"step {step} is a directory checkpoint, not a dict of items")
        leaves = {
            path: LeafMetadata(
                kind=entry.kind, dtype=entry.dtype, shape=entry.shape, nbytes=entry.size,
                framework=entry.meta.get("framework"),
            )
            for path, entry in snap.manifest.entries.items()
        }
        tree = unflatten(snap.manifest.tree, leaves)
        return tree[DEFAULT_ITEM] if _is_single(snap.commit) else tree

    def reload(self) -> None:
        """Forget cached commit documents (steps are always read afresh from the refs)."""
        self._check_usable()
        self._commits.clear()

    # --- save ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        items: Any,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        *,
        tags: Iterable[str] = (),
        message: str | None = None,
    ) -> bool:
        """Save ``items`` (a mapping of item name to state, or one state) as ``step``.

        Returns False without saving when ``should_save(step)`` says no and ``force`` is false.
        With async saves this returns once the state is copied to host memory; the step
        appears in ``all_steps()`` once it is durable.
        """
        self._check_usable()
        step = _check_step(step)
        if not force and not self.should_save(step):
            return False
        named, single = self._named_items(items)
        if self.best_fn is not None and metrics is None:
            raise ValueError(f"save of step {step}: metrics are required when best_fn is set")
        checked_metrics = check_metrics(metrics)
        tags = [validate_name(t, "tag") for t in tags]
        for tag in tags:
            if self.repo.refs.get(tag_ref(tag)) is not None:
                raise RefExistsError(f"tag {tag} exists already")
        meta = {META_KEY: {"version": 1, "items": sorted(named), "single": single}}
        text = message if message is not None else f"step {step}"
        if not isinstance(text, str):
            raise TypeError("message must be a str")

        if not self.async_save:
            self._ensure_new_step(step)
            self._commit_and_retain(named, step, checked_metrics, tags, meta, text)
            self._last_saved = step
            return True

        self._wait_in_flight()  # its host buffers are reused below
        self.check_for_errors()
        self._ensure_new_step(step)
        staged = self._stager.stage(named)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptrepo-manager")
        future = self._executor.submit(self._commit_and_retain, staged, step, checked_metrics, tags, meta, text)
        self._in_flight = _InFlight(step, future)
        self._last_saved = step
        return True

    def _ensure_new_step(self, step: int) -> None:
        if self.repo.refs.get(step_ref(self.branch, step)) is not None:
            raise RefExistsError(f"step {step} exists already on branch {self.branch}; delete it first to save it again")

    def _named_items(self, items: Any) -> tuple[dict[str, Any], bool]:
        if self.item_names is not None:
            if not isinstance(items, Mapping):
                raise TypeError(f"this manager saves the items {list(self.item_names)}: pass a mapping of name to state")
            unknown = [k for k in items if k not in self.item_names]
            if unknown:
                raise ValueError(f"unknown items {unknown!r}; this manager saves {list(self.item_names)}")
            return dict(items), False
        if isinstance(items, Mapping) and all(isinstance(k, str) for k in items):
            return dict(items), False
        return {DEFAULT_ITEM: items}, True

    def _commit_and_retain(
        self, state: Mapping[str, Any], step: int, metrics: dict[str, float], tags: list[str],
        meta: dict[str, Any], message: str,
    ) -> Commit:
        commit = self.repo.commit(
            state, step=step, branch=self.branch, message=message, metrics=metrics, tags=tags,
            meta=meta, allow_pickle=self.allow_pickle,
        )
        self._commits[commit.id] = commit
        self._apply_retention()
        return commit

    # --- async bookkeeping ---------------------------------------------------------------

    def _wait_in_flight(self) -> None:
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        try:
            pending.future.result()
        except BaseException as exc:  # noqa: BLE001 - recorded and raised by check_for_errors
            if hasattr(exc, "add_note"):
                exc.add_note(f"(while saving step {pending.step} in the background)")
            with self._error_lock:
                if self._error is None:
                    self._error = exc

    def wait_until_finished(self) -> None:
        """Block until the save in flight (if any) is durable; raise its error if it failed."""
        self._wait_in_flight()
        self.check_for_errors()

    def check_for_errors(self) -> None:
        """Raise the error of a background save that failed (once)."""
        pending = self._in_flight
        if pending is not None and pending.future.done():
            self._wait_in_flight()
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _check_usable(self) -> None:
        if self._closed:
            raise RepositoryError("this CheckpointManager is closed")
        self.check_for_errors()

    # --- restore -------------------------------------------------------------------------

    def restore(
        self,
        step: int | None = None,
        items: str | Iterable[str] | None = None,
        *,
        framework: str | None = None,
    ) -> Any:
        """The state saved as ``step`` (default: the latest), in the shape it was saved.

        ``items``: one item name (its state is returned) or several (a dict of them); only
        those items' entries are read. ``framework`` converts arrays ("numpy", "torch", "jax");
        None gives them back as saved. The restored step is protected from this manager's
        retention (it is the step the run resumed from).
        """
        self._check_usable()
        if self._in_flight is not None and (step is None or step == self._in_flight.step):
            self.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise RevisionError(f"no steps saved on branch {self.branch} of {self.repo.location}")
        step = _check_step(step)
        snap = self._snapshot(step)
        single = _is_single(snap.commit)
        if items is None:
            state = snap.to_dict(framework, allow_pickle=self.allow_pickle)
            result = state[DEFAULT_ITEM] if single and not snap.is_directory else state
        else:
            if snap.is_directory:
                raise RepositoryError(f"step {step} is a directory checkpoint; restore it without items")
            names = [items] if isinstance(items, str) else list(items)
            loaded = {name: read_item(snap, name, framework=framework, allow_pickle=self.allow_pickle) for name in names}
            result = loaded[items] if isinstance(items, str) else loaded
        with self._restored_lock:
            self._restored.add(step)
        return result

    def _snapshot(self, step: int) -> Snapshot:
        commit_id = self.repo.refs.get(step_ref(self.branch, step))
        if commit_id is None:
            raise RevisionError(f"branch {self.branch} has no step {step} (steps: {_short_list(self.all_steps())})")
        commit = self._commit(commit_id)
        return Snapshot(self.repo, commit_id, commit, self.repo.load_manifest(commit.manifest_id))

    # --- delete and retention ------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Remove ``step``'s ref (its space is reclaimed by ``repo.gc()``)."""
        self._check_usable()
        step = _check_step(step)
        if self._in_flight is not None and self._in_flight.step == step:
            self.wait_until_finished()
        ref = step_ref(self.branch, step)
        current = self.repo.refs.get(ref)
        if current is None:
            raise RevisionError(f"branch {self.branch} has no step {step}")
        self.repo.refs.update(ref, None, current)
        with self._restored_lock:
            self._restored.discard(step)

    def _apply_retention(self) -> None:
        policy = self.policy
        if not policy.prunes_steps and not policy.item_max_to_keep:
            return
        steps = self.repo.refs.steps(self.branch)
        tagged = set(self.repo.refs.tags().values()) if policy.keep_tagged else set()
        tagged_steps = {s for s, cid in steps.items() if cid in tagged}
        scores = self._scores(steps) if policy.keep_best is not None else {}
        with self._restored_lock:
            resumed = set(self._restored)
        kept = policy.kept_steps(steps, scores=scores, best_mode=self.best_mode, protected=tagged_steps | resumed)
        for step, commit_id in steps.items():
            if step not in kept:
                try:
                    self.repo.refs.update(step_ref(self.branch, step), None, commit_id)
                except RefConflictError:
                    continue  # someone else moved or removed it meanwhile: theirs wins
        if policy.item_max_to_keep:
            kept_items = {s: _items_of(self._commit(steps[s])) for s in kept}
            for step, names in sorted(policy.items_to_drop(kept_items, frozen=tagged_steps).items()):
                self._drop_items(step, steps[step], names)

    def _drop_items(self, step: int, commit_id: ObjectId, names: set[str]) -> None:
        """Replace ``step``'s commit by one whose manifest lacks the items ``names``."""
        repo = self.repo
        commit = self._commit(commit_id)
        manifest = repo.load_manifest(commit.manifest_id)
        smaller = manifest_without_items(manifest, names)
        info = dict(commit.meta.get(META_KEY, {}))
        info["items"] = sorted(_items_of(commit) - names)
        info["dropped"] = sorted(set(info.get("dropped", [])) | names)
        with repo.shared_lock():
            put = repo.store.put_document(smaller.to_document())
            new = replace(
                commit,
                manifest_id=put.id,
                meta={**commit.meta, META_KEY: info},
                created=now_utc(),
                stats=CommitStats(
                    logical_bytes=smaller.logical_bytes, stored_bytes=put.stored_bytes,
                    new_chunks=0,
                    reused_chunks=sum(len(e.stored_chunks) for e in smaller.entries.values()),
                ),
            )
            repo.store.put_document(new.to_document())
            try:
                repo.refs.update(step_ref(self.branch, step), new.id, commit_id)
            except RefConflictError:
                return  # the step changed meanwhile; the next save looks again
        self._commits[new.id] = new

    def _scores(self, steps: Mapping[int, ObjectId]) -> dict[int, float]:
        assert self.best_fn is not None
        scores: dict[int, float] = {}
        for step, commit_id in steps.items():
            metrics = self._commit(commit_id).metrics
            if not metrics:
                continue
            try:
                scores[step] = float(self.best_fn(dict(metrics)))
            except KeyError:
                continue  # a step saved without the metric best_fn reads is never "best"
        return scores

    def _commit(self, commit_id: ObjectId) -> Commit:
        commit = self._commits.get(commit_id)
        if commit is None:
            commit = self.repo.load_commit(commit_id)
            self._commits[commit_id] = commit
        return commit

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight, release host buffers, and close what the manager opened.
        A background error is raised after everything is closed."""
        if self._closed:
            return
        try:
            self._wait_in_flight()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._stager.release()
            if self._owns_repo:
                self.repo.close()
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the body's exception is the one to see
            pass


# --- helpers -------------------------------------------------------------------------------


def _open_or_create(location: str | os.PathLike[str], create: bool) -> Repository:
    try:
        return open_repository(location)
    except RepositoryError:
        if not create:
            raise
        return init_repository(location)


def _metric_getter(name: str) -> Callable[[Mapping[str, float]], float]:
    def get(metrics: Mapping[str, float]) -> float:
        return metrics[name]

    get.__name__ = f"metric_{name}"
    return get


def _check_step(step: Any) -> int:
    if isinstance(step, np.integer):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"step must be an int >= 0, not {step!r}")
    return step


def _is_single(commit: Commit) -> bool:
    info = commit.meta.get(META_KEY)
    return bool(isinstance(info, Mapping) and info.get("single"))


def _items_of(commit: Commit) -> set[str]:
    info = commit.meta.get(META_KEY)
    if isinstance(info, Mapping) and isinstance(info.get("items"), list):
        return {str(name) for name in info["items"]}
    return set()


def _short_list(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]} .. {steps[-1]} ({len(steps)} steps)"


def _top_pairs(tree: Any) -> tuple[str, list[Any]]:
    if not isinstance(tree, dict) or len(tree) != 1:
        raise FormatError("the checkpoint's top level is not a mapping of items")
    ((kind, pairs),) = tree.items()
    if kind not in ("dict", "ordered_dict"):
        raise FormatError(f"the checkpoint's top level is a {kind}, not a mapping of items")
    return kind, pairs


def read_item(snap: Snapshot, name: str, *, framework: str | None = None, allow_pickle: bool = False) -> Any:
    """One top-level item of a dict checkpoint, reading only that item's entries."""
    _, pairs = _top_pairs(snap.manifest.tree)
    int_keys = frozenset(str(k) for k, _ in pairs if isinstance(k, int) and not isinstance(k, bool))
    for key, child in pairs:
        if key == name and isinstance(key, str):
            prefix = escape_key(key, int_keys)
            values = {
                path: snap.get(path, framework=framework, allow_pickle=allow_pickle)
                for path in iter_leaf_paths(child, prefix)
            }
            return unflatten(child, values, prefix)
    present = [k for k, _ in pairs]
    raise KeyError(f"step {snap.step} has no item {name!r} (items: {present})")


def manifest_without_items(manifest: Manifest, names: set[str]) -> Manifest:
    """The manifest of the same dict checkpoint without the top-level items ``names``."""
    kind, pairs = _top_pairs(manifest.tree)
    int_keys = frozenset(str(k) for k, _ in pairs if isinstance(k, int) and not isinstance(k, bool))
    removed: set[str] = set()
    kept_pairs = []
    for key, child in pairs:
        if isinstance(key, str) and key in names:
            removed.update(iter_leaf_paths(child, escape_key(key, int_keys)))
        else:
            kept_pairs.append([key, child])
    smaller = Manifest(
        type="dict",
        entries={p: e for p, e in manifest.entries.items() if p not in removed},
        tree={kind: kept_pairs},
    )
    # A round trip through the validated document form proves entries and tree still agree.
    return Manifest.from_document(smaller.to_document())
