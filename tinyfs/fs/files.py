"""Open files: what a tree's `open` hands the adapter, which keeps it in its handle table.

- `StoredFile`: a committed file (resources/, instances/, aip/), read from the stored file, verified;
- `PlainFile`: events.jsonl, read as it grows;
- the transaction's files are `txntree.StagedFile`.

A read of a stored file from offset 0 to its end is hashed on the way (verify.py); the read that
delivers the last bytes of a file whose digest does not match fails with EIO, and so does every later
read past the damage, through any handle (`Verifier.damaged`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from .tree import Node, Services, fail
from .verify import RUNNING, Damage, Expected, ReadCheck, fixity_failed

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


class Verifier:
    """The mount's verification of reads: the checks of open handles, and the stored files found
    damaged, by (rid, stored path), for the daemon's life (the kernel may hold the rest of such a file in
    its cache: a read past the damage fails through any handle, without hashing again)."""

    def __init__(self, services: Services):
        self.services = services
        self.damaged: dict[tuple[str, str], Damage] = {}

    async def verified(self, check: ReadCheck, ino: int, fd: int, off: int, size: int, data: bytes) -> bytes:
        """`data`, read from the stored file `fd` at `off`, unless it ends a sequential read of a file whose
        digest does not match, or ends a file known to be damaged: then EIO."""
        last = check.take(off, data, size, fd, self.services.nursery)
        if last and check.state == RUNNING and not await check.verdict():
            await self._failed(check, ino, off)
        if self.damaged:
            damage = self.damaged.get(check.expected.key)
            if damage is not None and (last or off + len(data) > damage.since):
                raise fail(errno.EIO, f"{check.expected.path}: stored bytes do not match their digest")
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
        self.fd = os.open(path(), os.O_RDONLY) if services.archive.config.mode == "dynamic" else -1
        self.check: ReadCheck | None | bool = None     # made at the first read (False: not verified)

    async def read(self, off: int, size: int) -> bytes:
        if self.fd < 0:
            try:        # (the store may say it is missing, or the open)
                self.fd = os.open(self.path(), os.O_RDONLY)
            except FileNotFoundError as e:
                log.error("stored file missing: %s (run tinyfs fsck)", e.filename)
                raise fail(errno.EIO, f"stored file missing: {e.filename}") from None
        data = os.pread(self.fd, size, off)
        if self.check is None:
            self.check = read_check(self.expect(), self.fd) or False
        if self.check is False:
            return data
        return await self.services.verifier.verified(self.check, self.ino, self.fd, off, size, data)

    def release(self) -> None:
        if self.check:
            self.check.abandon()
        if self.fd >= 0:
            os.close(self.fd)
