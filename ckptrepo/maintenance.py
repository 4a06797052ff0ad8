"""Maintenance: ``fsck`` (check and repair), ``gc`` (sweep what no ref keeps) and ``prune``
(drop step refs by a retention policy). ``Repository.fsck``, ``.gc`` and ``.prune`` delegate
here; the work is in :mod:`ckptrepo.fsck`, :mod:`ckptrepo.gc` and, for what counts as live,
:mod:`ckptrepo.reachability`.
"""

from __future__ import annotations

from .fsck import Checked, FsckReport, Problem, fsck
from .gc import GcReport, KeepBest, PruneReport, RetentionPolicy, StepRecord, gc, prune
from .reachability import live_objects, mark

__all__ = [
    "Checked",
    "FsckReport",
    "GcReport",
    "KeepBest",
    "Problem",
    "PruneReport",
    "RetentionPolicy",
    "StepRecord",
    "fsck",
    "gc",
    "live_objects",
    "mark",
    "prune",
]
