"""Verified reads through the mount (SPEC 5): a file read from offset 0 to its end is hashed on the way,
and the read that delivers its last bytes fails with EIO when the digest does not match.

One `ReadCheck` per open handle of a stored file, made at its first read. The kernel sends reads
concurrently and out of order (async reads, readahead), so the check keeps the taken prefix of the file:
a read that continues it, or starts at most GAP ahead of it (read-ahead), extends it to the read's end;
a read that starts further ahead is random access and ends the check for that handle (its bytes are
served as stored). Reads behind the prefix change nothing.

The prefix is hashed in order by a worker thread, one trio task per handle handing it a few MiB at a
time, so that hashing overlaps with serving (sha512 is ~700 MiB/s a core: on the loop it would halve a
cold read); only the read that reaches the end awaits it. The worker reads the bytes from the stored
file itself, from the page cache the serving reads just filled (see `_drain`). Up to INLINE bytes with
nothing waiting for the worker are hashed on the loop: a thread hand-off costs more than hashing 4 KiB.

No pyfuse3 here; trio only for the feeding task and its waits.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import trio

from ..core.digests import thread_buffer
from ..core.fixity import FixityError, record_failure
from ..core.layout import ArchiveRoot
from ..core.model import FileEntry

log = logging.getLogger(__name__)

GAP = 4 << 20           # a read this far ahead of the hashed prefix is read-ahead, not random access
INLINE = 64 << 10       # buffers up to this size are hashed on the loop when nothing is queued
MAX_QUEUED = 16 << 20   # bytes served but not yet hashed, per handle, before its reads wait for the hasher
STEP = 4 << 20          # waiting reads are woken each time the worker has hashed this much more

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
        self.hashed_to = 0          # the prefix [0, hashed_to) is taken: hashed, or for the worker to hash
        self.hashed = 0             # bytes fed to the hasher (the worker's while it runs)
        self.draining = False
        self.broken = False         # the worker could not read the stored file: the check cannot finish
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
        # a read within GAP ahead takes the gap with it; a stored file longer than recorded is hashed whole
        to = self.limit if last else min(max(end, self.hashed_to), self.limit)
        if to <= self.hashed_to:
            return last                       # behind the prefix
        if not self.draining and self.hashed == self.hashed_to and to - self.hashed_to <= INLINE:
            start = self.hashed_to
            piece = memoryview(data)[start - off:to - off] if off <= start and to <= end else \
                os.pread(fd, to - start, start)
            self.broken |= len(piece) != to - start
            self.hasher.update(piece)
            self.hashed = self.hashed_to = to
        else:
            self.hashed_to = to
            if not self.draining:
                self.draining = True
                nursery.start_soon(self._drain, os.dup(fd))
        return last

    @property
    def behind(self) -> bool:
        """Whether the reads of this handle should wait for the hasher (what it reads again must still be
        in the page cache the serving reads filled)."""
        return self.hashed_to - self.hashed > MAX_QUEUED

    async def wait_for_hasher(self) -> None:
        while self.behind and self.draining:
            await self._progress.wait()

    async def verdict(self) -> bool:
        """(RUNNING, every byte up to the end taken) Wait for the hasher; True when the digest matches."""
        while self.draining:
            await self._progress.wait()
        if self.state != RUNNING:       # abandoned meanwhile
            return True
        if self.broken or self.hashed < self.limit:
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
    async def _drain(self, fd: int) -> None:
        """Have a worker thread hash the taken prefix until it has caught up with it. The worker reads the
        bytes again from the stored file (`fd`, its own descriptor) into a buffer it reuses, from the page
        cache the serving reads just filled: holding the served buffers for it instead made every read
        allocate fresh memory, and the page faults cost the loop more than the hash cost the worker (256
        MiB: 0.27 s of loop CPU against 0.45 s of hashing)."""
        token = trio.lowlevel.current_trio_token()
        try:
            while self.state == RUNNING and not self.broken and self.hashed < self.hashed_to:
                await trio.to_thread.run_sync(self._hash_taken, fd, token)
                self._wake()
        except Exception:
            log.exception("verifying %s of %s", self.expected.path, self.expected.rid)
            self.broken = True
        finally:
            os.close(fd)
            self.draining = False
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _hash_taken(self, fd: int, token: trio.lowlevel.TrioToken) -> None:
        """(worker thread) Hash the stored bytes from `hashed` on, following `hashed_to` as the loop moves
        it, until caught up (or the handle is given up); wake the waiting reads every STEP. One hand-off
        per catch-up rather than per STEP: returning to the loop between steps left the worker idle while
        the busy loop got round to starting the next one."""
        buf, view = thread_buffer()
        pos = woken = self.hashed
        try:
            while self.state == RUNNING and pos < self.hashed_to:
                n = os.preadv(fd, [view[:min(len(buf), self.hashed_to - pos)]], pos)
                if n <= 0:
                    self.broken = True            # the stored file ends early
                    break
                self.hasher.update(view[:n])
                pos += n
                self.hashed = pos
                if pos - woken >= STEP:
                    woken = pos
                    token.run_sync_soon(self._wake)
        except OSError as e:
            log.warning("verifying %s of %s: reading the stored file: %s", self.expected.path,
                        self.expected.rid, e)
            self.broken = True
        self.hashed = pos


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
    found = doc.payload().get(path)
    if found is None:
        return None
    digest, size, logical = found
    return Expected(rid, parts[1], logical, path, doc.digest, digest, size)


def fixity_failed(archive: ArchiveRoot, expected: Expected, found: str) -> None:
    """(worker thread) The `fixity.failed` event of a read through the mount, recorded as `tinyfs cat`,
    `export` and the API record theirs (core.fixity.record_failure)."""
    e = expected
    record_failure(archive, FixityError(resource=e.rid, instance=e.iid, path=e.path, algorithm=e.algorithm,
                                        expected=e.digest, found=found, stored=e.stored), via="mount")
