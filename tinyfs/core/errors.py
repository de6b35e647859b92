"""Errors of the archive core.

Every error carries an errno so that the mount can answer with it and the
CLI can print one line; the mount never has to guess from a message.
"""

from __future__ import annotations

import errno as _errno


class TinyfsError(Exception):
    """Base of every error the core raises on purpose."""

    errno = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class InvalidName(TinyfsError):
    """A resource id, label or logical path breaks the rules of SPEC section 1/4."""

    errno = _errno.EINVAL


class BadEncoding(InvalidName):
    """A name that is not valid UTF-8."""

    errno = _errno.EILSEQ


class NameTooLong(InvalidName):
    errno = _errno.ENAMETOOLONG


class NotFound(TinyfsError):
    errno = _errno.ENOENT


class AlreadyExists(TinyfsError):
    errno = _errno.EEXIST


class LabelTaken(AlreadyExists):
    """The label is used by another instance of the resource."""


class NotAnArchive(TinyfsError):
    errno = _errno.ENOENT


class Stale(TinyfsError):
    """The head moved and a path changed on both sides (SPEC section 5)."""

    errno = _errno.ESTALE


class Busy(TinyfsError):
    """Someone else holds what the operation needs: a resource being committed, a file still open for
    writing in the transaction being committed."""

    errno = _errno.EBUSY


class NotADirectory(TinyfsError):
    """A path goes through, or names as a directory, something that is not one."""

    errno = _errno.ENOTDIR


class IsADirectory(TinyfsError):
    """A directory where a file is needed (its bytes written or read)."""

    errno = _errno.EISDIR


class NoSpace(TinyfsError):
    """The archive's file system has no room for the bytes (or would keep too little to go on working)."""

    errno = _errno.ENOSPC


class ShortInput(TinyfsError):
    """An upload ended before the length it announced: nothing of it was kept."""

    errno = _errno.EINVAL


class Inconsistent(TinyfsError):
    """What a commit read does not hold together: a file's size is not the one it was hashed at, or paths
    that hard links make one file are recorded differently. Most often bytes changed during the commit;
    nothing was committed, and committing again reads them anew."""

    errno = _errno.EIO


class WriteNotVerified(TinyfsError):
    """A file of a new bag read back from the disk after the flush is not what was written (a commit's
    verified write): nothing was committed, the transaction is kept."""

    errno = _errno.EIO


class Forbidden(TinyfsError):
    """A mode rule (WORM, preservation) forbids the operation."""

    errno = _errno.EPERM


class Incomplete(TinyfsError):
    """A staged file whose stored bytes are known to be incomplete."""

    errno = _errno.EIO


class InvalidBag(TinyfsError):
    """A bag given to `ingest --bag` is not valid; `problems` lists every finding."""

    errno = _errno.EINVAL

    def __init__(self, message: str, problems: list):
        super().__init__(message)
        self.problems = problems


class InvalidOcfl(TinyfsError):
    """An OCFL object `ingest --ocfl` refuses: invalid (ocfl-py's findings, with their codes), or not
    what its tinyfs records say; `problems` lists every finding, one line each."""

    errno = _errno.EINVAL

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class TooLarge(TinyfsError):
    """A value past one of the limits of tinyfs.core.limits (a message, a creator, a bag-info.txt)."""

    errno = _errno.E2BIG


class StoreError(TinyfsError):
    """The object store failed a request; the message names endpoint, bucket and key, never a secret.

    `code` is the store's error code (or the kind of network failure), for logs and tests.
    """

    errno = _errno.EIO

    def __init__(self, message: str, *, code: str = "", path: str | None = None):
        super().__init__(message, path=path)
        self.code = code


class StoreUnreachable(StoreError):
    """No answer from the endpoint (refused, timed out, unknown host) after the retries."""

    errno = _errno.EHOSTUNREACH


class StoreAccessDenied(StoreError):
    """Missing or wrong credentials, or a policy that refuses the request."""

    errno = _errno.EACCES


class NoSuchBucket(StoreError):
    errno = _errno.ENOENT


class NoSuchObject(StoreError, NotFound):
    errno = _errno.ENOENT


class ObjectExists(StoreError, AlreadyExists):
    """A create-only write (If-None-Match: *) found the key taken: another writer was first."""

    errno = _errno.EEXIST


class ObjectRetained(StoreError, Forbidden):
    """The store refuses to delete an object version under Object Lock retention."""

    errno = _errno.EPERM


class NoObjectLock(StoreError):
    """The bucket has no Object Lock, so the store cannot enforce WORM."""

    errno = _errno.EOPNOTSUPP


class NoConditionalWrites(StoreError):
    """The store ignores If-None-Match on writes, so two writers could both take one key."""

    errno = _errno.EOPNOTSUPP


class StoreFull(StoreError):
    """The store says it has no room (507 Insufficient Storage, a quota)."""

    errno = _errno.ENOSPC
