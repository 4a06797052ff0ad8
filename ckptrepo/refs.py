"""Refs: branches, tags and per-branch steps, each a small file holding a commit id.

Layout (keys on the backend)::

    HEAD                          the current branch's name
    refs/branches/NAME            tip commit of branch NAME
    refs/tags/NAME                tagged commit
    refs/steps/BRANCH/N           the commit of step N on BRANCH

Every update is a compare-and-swap on the backend: a lost race raises RefConflictError,
never a silent overwrite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .backends.base import Backend
from .errors import (
    InvalidRefNameError,
    KeyNotFoundError,
    PreconditionFailedError,
    RefConflictError,
    RefExistsError,
)
from .ids import ObjectId

HEAD_KEY = "HEAD"
DEFAULT_BRANCH = "main"
RESERVED_NAMES = frozenset({"latest", "HEAD", "steps", "refs"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_KINDS = ("branches", "tags", "steps")


def validate_name(name: str, what: str = "ref") -> str:
    """Branch and tag names: letters, digits, ``_ . -``; no ``~``, ``/`` or reserved words."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRefNameError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-', at most 200 characters)"
        )
    if name in RESERVED_NAMES or name.endswith(".lock"):
        raise InvalidRefNameError(f"invalid {what} name {name!r}: reserved")
    return name


@dataclass(frozen=True, slots=True)
class Ref:
    kind: str  # "branches" | "tags" | "steps"
    name: str  # branch or tag name; for steps the branch
    step: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidRefNameError(f"unknown ref kind {self.kind!r}")
        validate_name(self.name, "branch" if self.kind != "tags" else "tag")
        if (self.kind == "steps") != (self.step is not None):
            raise InvalidRefNameError("a step ref needs a step number, other refs none")
        if self.step is not None and (isinstance(self.step, bool) or self.step < 0):
            raise InvalidRefNameError(f"invalid step {self.step!r}: must be an integer >= 0")

    @property
    def key(self) -> str:
        if self.kind == "steps":
            return f"refs/steps/{self.name}/{self.step}"
        return f"refs/{self.kind}/{self.name}"

    def __str__(self) -> str:
        if self.kind == "steps":
            return f"{self.name}/steps/{self.step}"
        return f"{self.kind[:-1] if self.kind != 'branches' else 'branch'} {self.name}"


def branch_ref(name: str) -> Ref:
    return Ref("branches", name)


def tag_ref(name: str) -> Ref:
    return Ref("tags", name)


def step_ref(branch: str, step: int) -> Ref:
    return Ref("steps", branch, int(step))


def _encode(commit: ObjectId) -> bytes:
    return f"{commit.hex}\n".encode()


def _decode(raw: bytes, where: str) -> ObjectId:
    from .errors import FormatError

    try:
        return ObjectId(raw.decode("ascii").strip())
    except (UnicodeDecodeError, FormatError):
        raise FormatError(f"ref {where} does not hold a commit id") from None


class RefStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # --- HEAD ----------------------------------------------------------------------------

    def current_branch(self) -> str:
        try:
            raw = self.backend.read(HEAD_KEY).decode("utf-8", "replace").strip()
        except KeyNotFoundError:
            return DEFAULT_BRANCH
        return validate_name(raw, "branch")

    def set_current_branch(self, name: str) -> None:
        self.backend.write(HEAD_KEY, f"{validate_name(name, 'branch')}\n".encode())

    # --- single refs ---------------------------------------------------------------------

    def _raw(self, ref: Ref) -> bytes | None:
        try:
            return self.backend.read(ref.key)
        except KeyNotFoundError:
            return None

    def get(self, ref: Ref) -> ObjectId | None:
        raw = self._raw(ref)
        return None if raw is None else _decode(raw, ref.key)

    def create(self, ref: Ref, commit: ObjectId) -> None:
        try:
            self.backend.write(ref.key, _encode(commit), create_only=True)
        except PreconditionFailedError:
            raise RefExistsError(f"{ref} exists already") from None

    def update(self, ref: Ref, new: ObjectId | None, expected: ObjectId | None) -> None:
        """Move ``ref`` from ``expected`` to ``new`` (None: absent), or raise RefConflictError."""
        old = None if expected is None else _encode(expected)
        try:
            if expected is None and new is not None:
                self.backend.write(ref.key, _encode(new), create_only=True)
            else:
                self.backend.compare_and_swap(ref.key, old, None if new is None else _encode(new))
        except PreconditionFailedError:
            current = self.get(ref)
            raise RefConflictError(
                f"{ref} moved: expected {expected.hex if expected else 'no ref'}, "
                f"found {current.hex if current else 'no ref'}"
            ) from None

    # --- listings ------------------------------------------------------------------------

    def _list(self, prefix: str) -> dict[str, ObjectId]:
        found: dict[str, ObjectId] = {}
        for key in self.backend.list(prefix):
            raw = self._raw_key(key)
            if raw is not None:
                found[key[len(prefix) + 1 :]] = _decode(raw, key)
        return found

    def _raw_key(self, key: str) -> bytes | None:
        try:
            return self.backend.read(key)
        except KeyNotFoundError:
            return None  # deleted between the listing and the read

    def branches(self) -> dict[str, ObjectId]:
        return dict(sorted(self._list("refs/branches").items()))

    def tags(self) -> dict[str, ObjectId]:
        return dict(sorted(self._list("refs/tags").items()))

    def steps(self, branch: str) -> dict[int, ObjectId]:
        found = self._list(f"refs/steps/{validate_name(branch, 'branch')}")
        return dict(sorted((int(name), cid) for name, cid in found.items() if name.isdigit()))

    def all_steps(self) -> dict[tuple[str, int], ObjectId]:
        out: dict[tuple[str, int], ObjectId] = {}
        for name, cid in self._list("refs/steps").items():
            branch, _, step = name.partition("/")
            if step.isdigit():
                out[(branch, int(step))] = cid
        return out

    def all_targets(self) -> set[ObjectId]:
        """Every commit some ref names: the roots of reachability."""
        targets = set(self.branches().values()) | set(self.tags().values())
        return targets | set(self.all_steps().values())
