"""Open files: what a tree's `open` hands the adapter, which keeps it in its handle table.

- `StoredFile`: a committed file (resources/, instances/, aip/), read from the stored file, verified;
- `PlainFile`: events.jsonl, read as it grows;
- the transaction's files are `txntree.StagedFile`.

A read of a stored file from offset 0 to its end is hashed on the way (verify.py); the read that
delivers the last bytes of a file whose digest does not match fails with EIO, and so does every later
read past the damage, through any handle (`Verifier.damaged`). With replicas the file is repaired
first (`Verifier._heal`): a read that covered all of it is answered from the repaired file.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from ..core.repair import heal
from ..core.replicas import replicas_of
from .tree import Node, Services, fail
from .verify import GOOD, RUNNING, Damage, Expected, ReadCheck, fixity_failed

log = logging.getLogger(__name__)


class FileHandle:
    """One open file. `keep_cache`: the kernel may keep its cached pages from one open to the next;
    `direct_io`: every read and write goes to the daemon."""

    keep_cache = True
    direct_io = False

    async def read(self, off: int, size: int) -> bytes:
        raise fail(errno.EBADF)

    async def write(self, off: int, buf: bytes) -> int:
        raise fail(errno.EBADF)

    async def fsync(self) -> None:
        pass

    def release(self) -> None:
        pass


class PlainFile(FileHandle):
    """A file read as it is, never cached from one open to the next (events.jsonl grows)."""

    keep_cache = False

    def __init__(self, path: str, direct_io: bool = False):
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_io = direct_io

    async def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    def release(self) -> None:
        os.close(self.fd)


class Healed(Exception):
    """The read that found a stored file damaged covered it from its start to its end, and the file was
    repaired from a replica: nothing of it was handed out, so the caller reads the repaired file."""


class Verifier:
    """The mount's verification of reads: the checks of open handles, and the stored files found
    damaged, by (rid, stored path), for the daemon's life (the kernel may hold the rest of such a file in
    its cache: a read past the damage fails through any handle, without hashing again).

    On an archive with replicas a damaged or missing stored file is repaired from one holding it intact
    (core.repair.heal, in a worker thread); the damaged file's inode is then `stale`: every later read
    of a handle that has it open fails (that handle may have handed out damaged bytes: it never succeeds
    again), and a new open reads the repaired file."""

    def __init__(self, services: Services):
        self.services = services
        self.damaged: dict[tuple[str, str], Damage] = {}
        self.can_heal = bool(replicas_of(services.archive))
        self.stale: set[tuple[int, int]] = set()
        self._healing: dict[tuple[str, str], trio.Lock] = {}
        self._sources: dict[tuple[int, int], str] = {}      # a stale inode -> the store that repaired it
        self._unhealed: set[tuple[int, int]] = set()        # damaged inodes no replica could repair
        self.unchecked_pages: set[int] = set()   # mount inodes whose cached pages a read served unverified

    def note_served(self, ino: int, check: ReadCheck) -> None:
        """After a read is answered: its pages are in the kernel's cache, checked once the whole file is."""
        if check.state == GOOD:
            self.unchecked_pages.discard(ino)
        else:
            self.unchecked_pages.add(ino)

    def cache_is_checked(self, ino: int) -> bool:
        """Whether a new handle of `ino` may keep the kernel's cached pages (FOPEN_KEEP_CACHE): not when a
        read served some of them before its file was verified."""
        return ino not in self.unchecked_pages

    async def verified(self, check: ReadCheck, ino: int, fd: int, off: int, size: int, data: bytes,
                       retry: bool = False) -> bytes:
        """`data`, read from the stored file `fd` at `off`, unless it ends a sequential read of a file whose
        digest does not match, or ends a file known to be damaged: then EIO. `retry`: the caller can
        read again from a repaired file (Healed) when this read covered all of a damaged one."""
        last = check.take(off, data, size, fd, self.services.nursery)
        if last and check.state == RUNNING and not await check.verdict():
            await self._failed(check, ino, off)
            source = await self._heal(check.expected, fd) if self.can_heal else None
            if source is not None:
                if retry and off == 0:
                    raise Healed()
                raise fail(errno.EIO, f"{check.expected.path}: stored bytes damaged; repaired from store "
                                      f"{source}: a new read gives the good bytes")
        if self.damaged:
            damage = self.damaged.get(check.expected.key)
            if damage is not None and (last or off + len(data) > damage.since):
                raise fail(errno.EIO, f"{check.expected.path}: stored bytes do not match their digest")
        if self.stale and _replaced(fd, self.stale):
            raise fail(errno.EIO, f"{check.expected.path}: stored bytes damaged and since repaired: "
                                  "open the file again")
        if check.behind:
            await check.wait_for_hasher()
        return data

    async def _failed(self, check: ReadCheck, ino: int, off: int) -> None:
        """A sequential read found the stored bytes damaged: remember the file (no read past `off` is
        answered, through any handle: the kernel retries a failed readahead page by page), drop what the
        kernel cached of this inode (a retry must ask the daemon again), log and record it once per name."""
        e = check.expected
        services = self.services
        services.nursery.start_soon(trio.to_thread.run_sync, services.kernel.drop_cached_bytes, ino)
        damage = self.damaged.setdefault(e.key, Damage(off, set()))
        damage.since = min(damage.since, off)
        if e.path in damage.reported:
            log.info("%s: %s is still damaged", e.rid, e.path)
            return
        damage.reported.add(e.path)
        log.warning("fixity failed: resource %s, %s (stored as %s): %s expected %s… found %s… (read refused "
                    "with EIO; see events.jsonl)", e.rid, e.path, e.stored, e.algorithm, e.digest[:16],
                    check.found[:16])
        await trio.to_thread.run_sync(fixity_failed, services.archive, e, check.found)

    async def heal_missing(self, e: Expected | None) -> bool:
        """A stored file is missing at open: log it, and repair it from a replica; True when repaired."""
        if e is None or not self.can_heal:
            return False
        await trio.to_thread.run_sync(fixity_failed, self.services.archive, e, None)
        return await self._heal(e, None) is not None

    async def _heal(self, e: Expected, fd: int | None) -> str | None:
        """Repair the stored file from a replica (one repair at a time per file: a handle that waited for
        another's finds its file's inode stale already and takes that repair's store)."""
        damaged = _inode(fd) if fd is not None else None
        lock = self._healing.setdefault(e.key, trio.Lock())
        async with lock:
            if damaged is not None and damaged in self.stale:
                return self._sources.get(damaged)
            if damaged is not None and damaged in self._unhealed:
                return None         # no replica had it intact a moment ago: not every read copies again
            source = await trio.to_thread.run_sync(heal, self.services.archive, e.rid, e.iid, e.stored,
                                                   e.algorithm, e.digest, "mount")
            if source is None:
                if damaged is not None:
                    self._unhealed.add(damaged)
                return None
            self.damaged.pop(e.key, None)
            if damaged is not None:
                self.stale.add(damaged)
                self._sources[damaged] = source
        return source


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _replaced(fd: int, stale: set[tuple[int, int]]) -> bool:
    """Whether `fd` is a damaged stored file a repair replaced (renamed over: no name left; the inode
    number of one long closed may be in use again, by a file that has a name)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) in stale and st.st_nlink == 0


def read_check(expected: Expected | None, fd: int) -> ReadCheck | None:
    """The verification of a handle's reads, None for bytes without a recorded digest (or none at all)."""
    if expected is None or expected.size == 0:
        return None
    return ReadCheck(expected, os.fstat(fd).st_size)


class StoredFile(FileHandle):
    """A committed file. The stored file is opened at the first read that the page cache cannot answer:
    a warm `cat` of many small files then costs one round trip each and no path building, open or close
    (40 % of the daemon's time). Dynamic mode opens at once: a commit there deletes the replaced
    instance, and an open descriptor keeps its bytes readable."""

    def __init__(self, services: Services, node: Node, path: Callable[[], str],
                 expect: Callable[[], Expected | None]):
        self.services, self.ino, self.path, self.expect = services, node.ino, path, expect
        # Pages another handle served unverified (a partial read, random access) are dropped at this open:
        # else a later `cat` gets them from the kernel's cache, its own reads start past them, and the
        # whole file is never checked (head -c 55M f; cat f handed out a damaged byte with exit 0).
        self.keep_cache = services.verifier.cache_is_checked(self.ino)
        self.fd = os.open(path(), os.O_RDONLY) if services.archive.config.mode == "dynamic" else -1
        self.check: ReadCheck | None | bool = None     # made at the first read (False: not verified)
        self.opening: trio.Lock | None = None
        self.retried = False    # a read served from a file repaired under it (once per handle)

    async def read(self, off: int, size: int) -> bytes:
        verifier = self.services.verifier
        if self.fd < 0:
            await self._open()
        data = os.pread(self.fd, size, off)
        if self.check is None:
            self.check = read_check(self.expect(), self.fd) or False
        if self.check is False:
            return data
        try:
            served = await verifier.verified(self.check, self.ino, self.fd, off, size, data, retry=not self.retried)
            verifier.note_served(self.ino, self.check)
            return served
        except Healed:
            self.retried = True
            self._reopen()
            return await self.read(off, size)

    def _reopen(self) -> None:
        self.check.abandon()
        os.close(self.fd)
        self.fd, self.check = -1, None

    async def _open(self) -> None:
        try:
            await self._open_stored_file()
        except FileNotFoundError as e:
            if not await self.services.verifier.heal_missing(self.expect()):
                log.error("stored file missing: %s (run tinyfs fsck)", e.filename)
                raise fail(errno.EIO, f"stored file missing: {e.filename}") from None
            await self._open_stored_file()

    async def _open_stored_file(self) -> None:
        """On an object store the stored file's path is a download into the read cache (seconds for a big
        file): it is made in a worker thread, once per handle, while the loop serves other requests."""
        if self.services.archive.store.local:
            self.fd = os.open(self.path(), os.O_RDONLY)
            return
        self.opening = self.opening or trio.Lock()
        async with self.opening:
            if self.fd < 0:     # (another read of this handle may have opened it meanwhile)
                self.fd = await trio.to_thread.run_sync(lambda: os.open(self.path(), os.O_RDONLY))

    def release(self) -> None:
        if self.check:
            self.check.abandon()
        if self.fd >= 0:
            os.close(self.fd)
