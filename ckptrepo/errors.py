"""The exception tree of ckptrepo.

Every error ckptrepo raises on purpose derives from :class:`CkptRepoError`::

    CkptRepoError
    ├── RepositoryError            no repository here, one already exists, bad config
    │   └── ConfigError            config.yaml is missing a field or holds a bad value
    ├── RevisionError              a revision string names nothing, or several things
    ├── ObjectError
    │   ├── ObjectNotFoundError    an object id is not in the store
    │   ├── ObjectCorruptError     stored bytes do not hash to their id (expected vs actual)
    │   └── FormatError            a document or frame breaks the format (path of the bad field)
    ├── RefError
    │   ├── InvalidRefNameError    a branch or tag name that is not allowed
    │   ├── RefConflictError       a compare-and-swap lost: the ref moved underneath
    │   └── RefExistsError         a tag or step that exists already (use force / replace)
    ├── BackendError               a storage operation failed; ``transient`` says if a retry may help
    ├── LockError                  a lock could not be taken
    ├── PathSafetyError            a checkout would write outside its destination
    └── RemoteError                a remote is missing, diverged or misbehaves

``TypeError`` (not a CkptRepoError) is raised for checkpoint values that the value
model does not accept, as Python users expect for a wrong type.
"""

from __future__ import annotations


class CkptRepoError(Exception):
    """Root of every error raised by ckptrepo on purpose."""


class RepositoryError(CkptRepoError):
    """The repository is missing, exists already, or cannot be used as asked."""


class ConfigError(RepositoryError):
    """config.yaml is invalid."""


class RevisionError(CkptRepoError):
    """A revision names no commit, or is ambiguous."""


class ObjectError(CkptRepoError):
    """Base for problems with stored objects."""


class ObjectNotFoundError(ObjectError):
    def __init__(self, object_id: str, where: str = "") -> None:
        self.object_id = object_id
        suffix = f" in {where}" if where else ""
        super().__init__(f"object {object_id} not found{suffix}")


class ObjectCorruptError(ObjectError):
    def __init__(self, expected: str, actual: str, detail: str = "") -> None:
        self.expected = expected
        self.actual = actual
        extra = f" ({detail})" if detail else ""
        super().__init__(f"object {expected} is corrupt: its content hashes to {actual}{extra}")


class FormatError(ObjectError):
    """A document, frame or file does not follow the format; the message names where."""


class RefError(CkptRepoError):
    """Base for ref problems."""


class InvalidRefNameError(RefError):
    pass


class RefConflictError(RefError):
    """A compare-and-swap on a ref lost: someone else moved it first."""


class RefExistsError(RefError):
    pass


class BackendError(CkptRepoError):
    def __init__(self, message: str, *, transient: bool = False) -> None:
        self.transient = transient
        super().__init__(message)


class LockError(CkptRepoError):
    pass


class PathSafetyError(CkptRepoError):
    """A path in a checkpoint would lead outside the checkout's destination."""


class RemoteError(CkptRepoError):
    pass


class PreconditionFailedError(BackendError):
    """A conditional write lost: the key exists already, or no longer holds what was expected."""


class KeyNotFoundError(BackendError):
    """A backend key does not exist."""
