"""Revision strings (SPEC section 3) and how they resolve to commits.

Tried in order: ``latest``/``HEAD``; a tag; a branch; ``steps/N``; ``BRANCH/steps/N``; a
commit id or a unique prefix of at least 6 hex digits; any of these followed by ``~K``.
A string that matches more than one of these is an error listing the candidates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RevisionError
from .ids import ObjectId
from .refs import RefStore, branch_ref, step_ref, tag_ref

_STEPS_RE = re.compile(r"^(?:(?P<branch>[A-Za-z0-9_][A-Za-z0-9_.\-]*)/)?steps/(?P<step>[0-9]+)$")
_HEX_RE = re.compile(r"^[0-9a-f]{6,64}$")
_ANCESTOR_RE = re.compile(r"^(?P<base>.+?)~(?P<k>[0-9]+)$")


@dataclass(frozen=True, slots=True)
class Candidate:
    what: str  # "tag v1", "branch main", "commit 1a2b3c…"
    commit: ObjectId


def resolve_revision(
    rev: str,
    refs: RefStore,
    find_commits: Callable[[str], list[ObjectId]],
    first_parent: Callable[[ObjectId], ObjectId | None],
) -> ObjectId:
    if not isinstance(rev, str) or not rev:
        raise RevisionError(f"invalid revision {rev!r}")
    ancestor = _ANCESTOR_RE.match(rev)
    if ancestor:
        commit = resolve_revision(ancestor["base"], refs, find_commits, first_parent)
        for k in range(int(ancestor["k"])):
            parent = first_parent(commit)
            if parent is None:
                raise RevisionError(f"{rev}: {ancestor['base']} has only {k} first-parent ancestors")
            commit = parent
        return commit
    candidates = _candidates(rev, refs, find_commits)
    distinct = {c.commit for c in candidates}
    if not candidates:
        raise RevisionError(f"unknown revision {rev!r} (not latest, a tag, a branch, steps/N or a commit id)")
    if len(distinct) > 1:
        listing = ", ".join(f"{c.what} ({c.commit.short})" for c in candidates)
        raise RevisionError(f"ambiguous revision {rev!r}: it could be {listing}")
    return candidates[0].commit


def _candidates(rev: str, refs: RefStore, find_commits: Callable[[str], list[ObjectId]]) -> list[Candidate]:
    if rev in ("latest", "HEAD"):
        branch = refs.current_branch()
        tip = refs.get(branch_ref(branch))
        if tip is None:
            raise RevisionError(f"{rev}: branch {branch} has no commits yet")
        return [Candidate(f"tip of {branch}", tip)]
    found: list[Candidate] = []
    from .errors import InvalidRefNameError

    try:
        tag = refs.get(tag_ref(rev))
        if tag is not None:
            found.append(Candidate(f"tag {rev}", tag))
        branch_tip = refs.get(branch_ref(rev))
        if branch_tip is not None:
            found.append(Candidate(f"branch {rev}", branch_tip))
    except InvalidRefNameError:
        pass
    steps = _STEPS_RE.match(rev)
    if steps:
        branch = steps["branch"] or refs.current_branch()
        try:
            commit = refs.get(step_ref(branch, int(steps["step"])))
        except InvalidRefNameError:
            commit = None
        if commit is None:
            raise RevisionError(f"{rev}: branch {branch} has no step {int(steps['step'])}")
        found.append(Candidate(f"step {steps['step']} of {branch}", commit))
    if _HEX_RE.match(rev):
        matches = find_commits(rev)
        found.extend(Candidate(f"commit {m.short}", m) for m in matches)
        if len(matches) > 1:
            listing = ", ".join(m.short for m in matches)
            raise RevisionError(f"ambiguous commit prefix {rev!r}: matches {listing}")
    return found
