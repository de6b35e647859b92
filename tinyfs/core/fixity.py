"""Verified reads (SPEC section 5): bytes handed out by `cat`, `export` and the Python API are checked
against their recorded digest in the same pass that reads them, and never handed out as good when they
do not match.

A stored file is verified when it is read sequentially from its start to its end: the read that reaches
the end raises `FixityError` when the digest of everything read differs from the one instance.json
records, and every later read raises it again. A reader that seeks elsewhere reads the bytes as stored
(random access cannot be verified without reading the whole file); seeking back to 0 starts over.

`record_failure` logs the `fixity.failed` event of one damaged or missing stored file. Every reader of
stored bytes calls it (the mount too, with via="mount"), so the log names each file a client was refused.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from collections.abc import Callable

from .digests import CHUNK
from .errors import NotFound, TinyfsError
from .layout import ArchiveRoot
from .model import InstanceDoc

log = logging.getLogger(__name__)

SHOWN = 16     # hex digits of a digest in a message (as fsck shows them)


class FixityError(TinyfsError, OSError):
    """Stored bytes that do not match their recorded digest (`found` is their digest), or a stored file
    that is missing (`found` is None).

    Also an OSError with errno EIO, what reading a damaged disk or a verified mount read gives: code that
    copies with shutil.copyfileobj or catches OSError around I/O sees an I/O error, not something new."""

    errno = errno.EIO

    def __init__(self, *, resource: str, instance: str, path: str, algorithm: str, expected: str,
                 found: str | None, stored: str | None):
        self.resource, self.instance, self.algorithm = resource, instance, algorithm
        self.expected, self.found, self.stored = expected, found, stored
        self.repaired: str | None = None    # the replica the stored file was repaired from, if it was
        OSError.__init__(self, errno.EIO, self._describe(resource, path))
        self.path = path            # TinyfsError's `path`: the logical path

    @property
    def missing(self) -> bool:
        return self.found is None

    def _describe(self, resource: str, path: str) -> str:
        alg, expected = self.algorithm, _short(self.expected)
        if self.stored is None:
            return f"{resource}/{path}: no stored copy recorded ({alg} {expected})"
        if self.found is None:
            return f"{resource}/{path}: stored file missing ({alg} {expected}, expected at {self.stored})"
        return (f"{resource}/{path}: stored bytes damaged ({alg} expected {expected} found "
                f"{_short(self.found)}, stored at {self.stored})")

    def __str__(self) -> str:
        return self.strerror

    def repaired_from(self, store: str) -> None:
        """The stored file was repaired from replica `store` after some of its damaged bytes were handed
        out: this read still fails, a new one gets the good bytes."""
        self.repaired = store
        self.strerror += f"; repaired from store {store}: a new read gives the good bytes"

    def event_detail(self, via: str) -> dict:
        return {"path": self.path, "stored": self.stored, "algorithm": self.algorithm,
                "expected": self.expected, "found": self.found, "via": via}


def record_failure(archive: ArchiveRoot, error: FixityError, via: str) -> None:
    """Log the `fixity.failed` event of one damaged or missing stored file met by a reader (`via`: "cat",
    "export", "api", "mount"). Blocking (append + fsync): the mount calls it from a worker thread. An
    archive that cannot be written to (read-only) is still read; the event is then only logged here."""
    try:
        archive.events.append("fixity.failed", error.resource, error.instance, **error.event_detail(via))
    except OSError as e:
        log.warning("could not log fixity.failed for %s: %s", error.path, e.strerror or e)


def open_verified(archive: ArchiveRoot, rid: str, doc: InstanceDoc, path: str, via: str) -> VerifiedReader:
    """The stored bytes of `path` in instance `doc`, verified as they are read; a missing stored file
    raises FixityError at once. Either failure is logged as a fixity.failed event naming `via`. On an
    archive with replicas a damaged or missing stored file is first repaired from one that holds it
    intact (`heal`): the reader gets the good bytes when none of the bad ones were handed out yet."""
    entry = doc.state.files.get(path)
    if entry is None:
        raise NotFound(f"{rid}: no file {path!r} in instance {doc.id}")

    def fail(found: str | None, stored: str | None) -> FixityError:
        error = FixityError(resource=rid, instance=doc.id, path=path, algorithm=doc.digest,
                            expected=entry.digest, found=found, stored=stored)
        record_failure(archive, error, via)
        return error

    def heal() -> str | None:
        from .repair import heal
        return heal(archive, rid, doc.id, rel, doc.digest, entry.digest, via)

    def reopen() -> io.FileIO:
        return io.FileIO(archive.stored_path(rid, rel), "r")

    rel = doc.stored.get(entry.digest)
    if rel is None:
        raise fail(None, None)
    try:
        raw = reopen()
    except FileNotFoundError:
        error = fail(None, rel)
        if heal() is None:
            raise error from None
        raw = reopen()
    return VerifiedReader(raw, doc.digest, entry.digest, lambda found: fail(found, rel), heal=heal, reopen=reopen)


class VerifiedReader(io.RawIOBase):
    """An unbuffered, read-only stored file whose bytes are hashed as they pass (see the module's
    docstring). `failure(found_digest)` makes the error raised on a mismatch."""

    def __init__(self, raw: io.FileIO, algorithm: str, expected: str,
                 failure: Callable[[str], FixityError], heal: Callable[[], str | None] | None = None,
                 reopen: Callable[[], io.FileIO] | None = None):
        super().__init__()
        self._raw, self._algorithm, self._expected, self._failure = raw, algorithm, expected, failure
        self._heal, self._reopen = heal, reopen
        self._end = os.fstat(raw.fileno()).st_size     # stored files never change
        self._pos = 0
        self._hasher: hashlib._Hash | None = hashlib.new(algorithm)
        self._verified = False
        self._error: FixityError | None = None

    @property
    def name(self) -> str:
        return self._raw.name

    @property
    def verified(self) -> bool:
        """Every byte of the stored file was read in order and matched its digest."""
        return self._verified

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer) -> int:
        if self._error is not None:
            raise self._error
        start = self._pos
        n = self._raw.readinto(buffer)
        if self._hasher is not None:
            with memoryview(buffer) as view:
                self._hasher.update(view[:n])
                asked = len(view)
            self._pos += n
            if self._pos >= self._end or (n == 0 and asked):   # the end: all of it, or a file cut short
                if not self._check(whole=start == 0):
                    return self.readinto(buffer)    # repaired before a byte was handed out: read it
        else:
            self._pos += n
        return n

    def readall(self) -> bytes:
        """Everything left, read (and hashed) in CHUNKs; RawIOBase's default reads 8 KiB at a time."""
        parts = []
        buf = bytearray(CHUNK)
        while n := self.readinto(buf):
            parts.append(bytes(buf[:n]))
        return b"".join(parts)

    def finish(self) -> None:
        """Read what is left, so that a stored file longer than its consumer wanted (tar copies exactly
        the recorded size) is verified too; raises FixityError when it does not match. Nothing to do
        once verified, or after a seek gave up verifying."""
        buf = bytearray(CHUNK)
        while self._hasher is not None and self.readinto(buf):
            pass

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._raw.seek(offset, whence)
        if pos != self._pos:
            # back to the start: verify again (unless done); anywhere else: random reads, served as stored
            self._hasher = hashlib.new(self._algorithm) if pos == 0 and not self._verified else None
            self._pos = pos
        return pos

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()

    def _check(self, whole: bool) -> bool:
        """True when the bytes read match. Else (damaged) the stored file is repaired from a replica if
        one holds it intact: False when this read covered the file from its start, so that the caller
        reads the repaired file instead; otherwise the FixityError says the next read gets good bytes."""
        found = self._hasher.hexdigest()
        self._hasher = None
        if found == self._expected:
            self._verified = True
            return True
        self._error = self._failure(found)
        source = self._heal() if self._heal is not None else None
        if source is None:
            raise self._error
        if whole:
            self._restart(self._reopen())
            return False
        self._error.repaired_from(source)
        raise self._error

    def _restart(self, raw: io.FileIO) -> None:
        """Read the repaired stored file from its start (nothing of the damaged one was handed out)."""
        self._raw.close()
        self._raw, self._error, self._heal = raw, None, None    # (one repair per reader)
        self._end = os.fstat(raw.fileno()).st_size
        self._pos = 0
        self._hasher = hashlib.new(self._algorithm)


def _short(digest: str) -> str:
    return f"{digest[:SHOWN]}…" if len(digest) > SHOWN else digest
