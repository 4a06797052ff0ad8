"""ckptrepo: git for machine-learning checkpoints.

Commit checkpoints (dicts of tensors and values, or directories) as manifests over
deduplicated, blake3-addressed, zstd-compressed chunks; name versions by step, tag and
branch; get any version back as a dict, a directory or a URI.
"""

from .checkpoint import Checkpoint
from .errors import (
    BackendError,
    CkptRepoError,
    ConfigError,
    FormatError,
    InvalidRefNameError,
    LockError,
    ObjectCorruptError,
    ObjectError,
    ObjectNotFoundError,
    PathSafetyError,
    RefConflictError,
    RefError,
    RefExistsError,
    RemoteError,
    RepositoryError,
    RevisionError,
)
from .manager import CheckpointManager
from .objects import Commit, CommitStats
from .repository import Repository, clone, init, open  # noqa: A004  (SPEC names it ckptrepo.open)
from .snapshot import Snapshot

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Checkpoint",
    "CheckpointManager",
    "CkptRepoError",
    "Commit",
    "CommitStats",
    "ConfigError",
    "FormatError",
    "InvalidRefNameError",
    "LockError",
    "ObjectCorruptError",
    "ObjectError",
    "ObjectNotFoundError",
    "PathSafetyError",
    "RefConflictError",
    "RefError",
    "RefExistsError",
    "RemoteError",
    "Repository",
    "RepositoryError",
    "RevisionError",
    "Snapshot",
    "clone",
    "init",
    "open",
]
