"""Verified reads through the mount (SPEC 5): a file read from offset 0 to its end is hashed on the way,
and the read that delivers its last bytes fails with EIO when the digest does not match.

One `ReadCheck` per open handle of a stored file, made at its first read. The kernel sends reads
concurrently and out of order (async reads, readahead), so the check keeps the hashed prefix of the
file: a read that continues it feeds the hasher; one that starts a little ahead of it (up to GAP) first
closes the gap by reading those bytes from the stored file; one that starts further ahead is random
access and ends the check for that handle (its bytes are served as stored). Reads behind the prefix
change nothing.

Hashing runs in a worker thread, fed in order by one trio task per handle, so that it overlaps with
serving (sha512 is ~700 MiB/s a core here: hashing on the loop would halve a cold read). Only the read
that reaches the end awaits it. Buffers no larger than INLINE are hashed on the loop when nothing is
queued: a thread hand-off costs more than hashing a 4 KiB file.

No pyfuse3 here; trio only for the feeding task and its waits.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from dataclasses import dataclass

import trio

from ..core.digests import CHUNK
from ..core.fixity import FixityError, record_failure
from ..core.layout import ArchiveRoot
from ..core.model import FileEntry, InstanceDoc

log = logging.getLogger(__name__)

GAP = 4 << 20           # a read this far ahead of the hashed prefix is read-ahead, not random access
INLINE = 64 << 10       # buffers up to this size are hashed on the loop when nothing is queued
MAX_QUEUED = 16 << 20   # bytes served but not yet hashed, per handle, before its reads wait for the hasher

RUNNING, OFF, GOOD, BAD = "running", "off", "good", "bad"


@dataclass(frozen=True, slots=True)
class Expected:
    """What the bytes of one stored file must be, and how to name it when they are not."""

    rid: str
    iid: str | None        # the instance the file was read through
    path: str              # its logical path there
    stored: str            # the stored file, relative to the resource directory (instances/<iid>/data/...)
    algorithm: str         # the archive's first digest (the document's `digest`)
    digest: str
    size: int

    @property
    def key(self) -> tuple[str, str]:
        """The stored file: every view of the same bytes (resources/, instances/, aip/) shares it."""
        return (self.rid, self.stored)


@dataclass(slots=True)
class Damage:
    """A stored file a read found damaged (remembered for the daemon's life)."""

    since: int                  # where the read that found it started: no read past it is answered
    reported: set[str]          # the logical paths a fixity.failed event named


class ReadCheck:
    """The running verification of one open handle."""

    def __init__(self, expected: Expected, stored_size: int):
        self.expected = expected
        # The whole stored file is hashed, so that one of another size than recorded never matches. The
        # last read is the one that reaches the recorded size, or the end of a stored file shorter than that.
        self.limit = stored_size
        self.last_at = min(expected.size, stored_size)
        self.state = RUNNING
        self.hasher = hashlib.new(expected.algorithm)
        self.hashed_to = 0          # bytes [0, hashed_to) are hashed or queued for the hasher, in order
        self.queue: deque = deque() # bytes-like, or (fd, start, length) of a gap to read from the stored file
        self.queued = 0             # bytes held in `queue`
        self.draining = False
        self.broken = False         # the worker could not read a gap: the check cannot finish
        self._progress = trio.Event()
        self.found: str | None = None

    # -- on the loop, in the order reads arrive --------------------------------------------------
    def take(self, off: int, data: bytes, requested: int, fd: int, nursery: trio.Nursery) -> bool:
        """Account for one read served from the stored file (`fd`). True when it delivers the file's
        last bytes: the caller then asks `verdict()` (if still RUNNING) before it replies."""
        end = off + len(data)
        last = end >= self.last_at or len(data) < requested
        if self.state != RUNNING:
            return last
        if off > self.hashed_to + GAP:
            self.state = OFF                  # random access: served as stored
            return last
        if off > self.hashed_to:
            self._gap(fd, min(off, self.limit), nursery)
        if off <= self.hashed_to < min(end, self.limit):
            start, stop = self.hashed_to - off, min(end, self.limit) - off
            piece = data if (start, stop) == (0, len(data)) else memoryview(data)[start:stop]
            self._queue(piece, len(piece), nursery)
            self.hashed_to = off + stop
        if last and self.hashed_to < self.limit:    # a stored file longer than recorded: hash the rest too
            self._gap(fd, self.limit, nursery)
        return last

    def _gap(self, fd: int, to: int, nursery: trio.Nursery) -> None:
        """Hash the bytes [hashed_to, to) from the stored file: a few KiB here, more by the worker (with its
        own descriptor: the handle's may be closed before the worker gets there)."""
        n = to - self.hashed_to
        if n <= 0:
            return
        if n <= INLINE and not self.draining and not self.queue:    # a small gap: read and hashed here
            data = os.pread(fd, n, self.hashed_to)
            self.broken |= len(data) != n
            self.hasher.update(data)
        else:
            self._queue((os.dup(fd), self.hashed_to, n), 0, nursery)
        self.hashed_to = to

    def _queue(self, item, size: int, nursery: trio.Nursery) -> None:
        if not self.draining and not self.queue and isinstance(item, (bytes, memoryview)) and size <= INLINE:
            self.hasher.update(item)
            return
        self.queue.append(item)
        self.queued += size
        if not self.draining:
            self.draining = True
            nursery.start_soon(self._drain)

    @property
    def behind(self) -> bool:
        """Whether the reads of this handle should wait for the hasher (memory bound)."""
        return self.queued > MAX_QUEUED

    async def wait_for_hasher(self) -> None:
        while self.queued > MAX_QUEUED and self.draining:
            await self._progress.wait()

    async def verdict(self) -> bool:
        """(RUNNING, every byte up to the end taken) Wait for the hasher; True when the digest matches."""
        while self.draining:
            await self._progress.wait()
        if self.state != RUNNING:       # abandoned meanwhile
            return True
        if self.broken or self.hashed_to < self.limit:
            self.state = OFF
            return True
        self.found = self.hasher.hexdigest()
        self.state = GOOD if self.found == self.expected.digest else BAD
        return self.state == GOOD

    def abandon(self) -> None:
        """The handle is released (or its bytes are no longer the stored file's): stop hashing."""
        if self.state == RUNNING:
            self.state = OFF

    # -- the feeding task and its worker thread ----------------------------------------------------
    async def _drain(self) -> None:
        """Hand everything queued to a worker thread, batch after batch, until nothing is left."""
        try:
            while self.queue:
                batch = list(self.queue)
                self.queue.clear()
                try:
                    await trio.to_thread.run_sync(self._feed, batch)
                finally:
                    self.queued -= sum(len(i) for i in batch if not isinstance(i, tuple))
                    self._wake()
        except Exception:
            log.exception("verifying %s of %s", self.expected.path, self.expected.rid)
            self.broken = True
            for item in self.queue:
                if isinstance(item, tuple):
                    os.close(item[0])
            self.queue.clear()
        finally:
            self.draining = False
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _feed(self, batch: list) -> None:
        """(worker thread) Hash a batch in order; a gap is read from its own descriptor, then closed."""
        for item in batch:
            if isinstance(item, tuple):
                fd, start, length = item
                try:
                    if self.state == RUNNING and not self.broken:
                        self._hash_range(fd, start, length)
                except OSError as e:
                    log.warning("verifying %s of %s: reading the stored file: %s", self.expected.path,
                                self.expected.rid, e)
                    self.broken = True
                finally:
                    os.close(fd)
            elif self.state == RUNNING:
                self.hasher.update(item)

    def _hash_range(self, fd: int, start: int, length: int) -> None:
        end = start + length
        while start < end:
            data = os.pread(fd, min(CHUNK, end - start), start)
            if not data:
                raise OSError(0, "the stored file ends early")
            self.hasher.update(data)
            start += len(data)


# -- what a read-only node's bytes must be ---------------------------------------------------------------
def expected_of_state(archive: ArchiveRoot, rid: str, iid: str, path: str, entry: FileEntry) -> Expected:
    """A file of resources/<rid> or instances/<rid>/<iid>."""
    doc = archive.instance(rid, iid)
    return Expected(rid, iid, path, doc.stored[entry.digest], doc.digest, entry.digest, entry.size)


def expected_of_aip(archive: ArchiveRoot, rid: str, path: str) -> Expected | None:
    """A payload file of a bag under aip/<rid>/ (instances/<iid>/data/...), checked against the digest its
    instance records for it, which is the one its manifest-<alg>.txt lists; None for tag files and
    anything else, which are served as stored."""
    parts = path.split("/", 3)
    if len(parts) < 4 or parts[0] != "instances" or parts[2] != "data":
        return None
    doc = archive.instance(rid, parts[1])
    found = _payload_index(doc).get(path)
    if found is None:
        return None
    digest, size, logical = found
    return Expected(rid, parts[1], logical, path, doc.digest, digest, size)


def _payload_index(doc: InstanceDoc) -> dict[str, tuple[str, int, str]]:
    """stored path -> (digest, size, a logical path) of the files this instance stores itself; cached on
    the document, which never changes (and goes with it when the archive's cache drops it)."""
    index = getattr(doc, "_payload_index", None)
    if index is None:
        index = {}
        own = f"instances/{doc.id}/"
        for path, entry in doc.state.entries().items():
            if isinstance(entry, FileEntry):
                stored = doc.stored[entry.digest]
                if stored.startswith(own):
                    index.setdefault(stored, (entry.digest, entry.size, path))
        doc._payload_index = index
    return index


def fixity_failed(archive: ArchiveRoot, expected: Expected, found: str) -> None:
    """(worker thread) The `fixity.failed` event of a read through the mount, recorded as `tinyfs cat`,
    `export` and the API record theirs (core.fixity.record_failure)."""
    e = expected
    record_failure(archive, FixityError(resource=e.rid, instance=e.iid, path=e.path, algorithm=e.algorithm,
                                        expected=e.digest, found=found, stored=e.stored), via="mount")
