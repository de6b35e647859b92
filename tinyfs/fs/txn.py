"""An open transaction as the mount sees it: staging plus open files and running hashes.

Pure Python over core.staging (no pyfuse3, no trio): the adapter calls these
methods inline for small work and in worker threads for large work.
Errors are OSError with the errno the SPEC asks for.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..core.commit import CommitRequest
from ..core.digests import MultiHash, hash_file
from ..core.durable import start_writeback
from ..core.failures import Failure
from ..core.fixity import FixityError, record_failure
from ..core.layout import ArchiveRoot
from ..core.request import commit_request
from ..core.staging import HEADROOM, Node, Staging, free_bytes
from .tree import fail

log = logging.getLogger(__name__)


# Every WRITEBACK_CHUNK written, the disk is asked to start on the chunk before (a big file's bytes then
# reach the disk during the copy, and the commit's syncfs has little left to do).
WRITEBACK_CHUNK = 16 << 20


class FreeSpace:
    """Free bytes of the archive's file system, asked again only when a write would come near the
    headroom or the answer is older than MAX_AGE (an fstatvfs per 4 KiB write was 5 % of a small-file
    deposit). Another process may fill the disk meanwhile: then pwrite itself fails with ENOSPC."""

    MAX_AGE = 0.5
    MARGIN = 64 << 20

    def __init__(self):
        self.estimate = 0
        self.checked = 0.0
        self.lock = threading.Lock()     # big writes land from several worker threads

    def allows(self, fd: int, n: int) -> bool:
        with self.lock:
            now = time.monotonic()
            if self.estimate < n + HEADROOM + self.MARGIN or now - self.checked > self.MAX_AGE:
                self.estimate, self.checked = free_bytes(fd), now
            if self.estimate < n + HEADROOM:
                return False
            self.estimate -= n
            return True


CAP_FSETID = 4     # linux/capability.h


@dataclass(eq=False)
class Opener:
    """Who opened a handle for writing. The kernel clears set-id bits on a write by a process without
    CAP_FSETID, but not for direct I/O writes (write-only handles here), whose flag for it pyfuse3 does
    not pass to write(); nor for open(O_TRUNC), which the daemon does itself. The daemon applies the
    kernel's rule with the opener's credentials, read from /proc when a file with such bits is opened
    (or, if it gains them later, at the first write that finds them)."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] | None = None      # supplementary groups, once read
    fsetid: bool = False                       # CAP_FSETID in the effective set, once read

    def read_credentials(self) -> None:
        self.groups, self.fsetid = frozenset(), False    # gone already: treated as without privilege
        try:
            with open(f"/proc/{self.pid}/status") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            if line.startswith("Groups:"):
                self.groups = frozenset(int(g) for g in line.split()[1:])
            elif line.startswith("CapEff:"):
                self.fsetid = bool(int(line.split()[1], 16) >> CAP_FSETID & 1)


def setid_bits_to_clear(mode: int, file_gid: int, opener: Opener) -> int:
    """The set-id bits a write (or O_TRUNC) by `opener` clears, by the kernel's rule
    (setattr_should_drop_suidgid): none for CAP_FSETID; else setuid, and setgid when the file is
    group-executable or the writer is outside the file's group."""
    if not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    if opener.groups is None:
        opener.read_credentials()
    if opener.fsetid:
        return 0
    clear = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or (file_gid != opener.gid and file_gid not in opener.groups)):
        clear |= stat.S_ISGID
    return clear


@dataclass(eq=False)
class OpenFile:
    """The shared state of one staged inode while any handle has it open."""

    sino: int
    fd: int
    on_blob: bool              # False: fd reads the base bytes in the archive (no copy yet)
    readers: int = 0
    writers: int = 0
    hasher: MultiHash | None = None
    hashed_to: int = 0
    size: int = 0
    version: int = 0           # bumped by every change of bytes; a background hash of an older version is dropped
    pending: deque = field(default_factory=deque)   # (hasher, buffer) written, not yet hashed, in order
    draining: bool = False     # a feeder task is running for `pending`
    failed: bool = False       # a write failed: the blob may miss bytes
    generation: int = 0        # OpenTxn.generations[sino] when its latest writer opened it
    progress: object = None    # a trio.Event the feeder sets after each batch it hashed (txntree.py)


class WriteStamp(NamedTuple):
    """Which bytes a background hash read: the writer's generation (OpenTxn.generations) and the file's
    version (OpenFile.version) when it started. Its digests are recorded only if both are still current."""

    generation: int
    version: int


class OpenTxn:
    """transactions/<rid> while the mount runs."""

    def __init__(self, archive: ArchiveRoot, rid: str, staging: Staging):
        self.archive, self.rid, self.staging = archive, rid, staging
        self.base = staging.get_meta("base") or None
        self.uid = int(staging.get_meta("uid"))
        self.gid = int(staging.get_meta("gid"))
        self.token = staging.get_meta("created")       # distinguishes successive transactions of one rid
        self.files: dict[int, OpenFile] = {}
        # sino -> count of opens for writing; outlives OpenFile (dropped at the last close), so that the
        # digests of a closed writer's bytes, found after another writer opened the file, are not recorded
        self.generations: dict[int, int] = {}
        self.algorithms = archive.config.digests
        self.closed = False
        self.committing = False
        self.free = FreeSpace()
        self._base_stored: dict[str, str] | None = None   # digest -> stored path, of the base instance
        # the last failed commit, when only the transaction's content and the resource's instances decided
        # it (core.failures)
        self.failure: Failure | None = None

    # -- base bytes -----------------------------------------------------------
    def base_path(self, node: Node) -> str:
        """A local file holding the base bytes of `node` (the stored file, or the store's cached copy)."""
        return str(self.archive.stored_path(self.rid, self.base_stored(node)))

    def base_stored(self, node: Node) -> str:
        """The `stored` value (relative to the resource) of the base bytes of `node`."""
        if self._base_stored is None:
            # kept for the transaction's life: the archive's document cache may evict the base document
            # (another large resource browsed), and re-reading it per open cost 0.25 s at 100,000 files
            self._base_stored = self.archive.instance(self.rid, self.base).stored
        return self._base_stored[node.base]

    # -- open files -------------------------------------------------------------
    def open(self, sino: int, write: bool, truncate: bool) -> OpenFile:
        node = self.staging.node(sino)
        if node is None:
            raise fail(errno.ENOENT)
        of = self.files.get(sino)
        if of is None:
            if node.blob:
                fd = os.open(self.staging.blob_path(sino), os.O_RDWR | os.O_CREAT, 0o600)
            else:
                fd = os.open(self.base_path(node), os.O_RDONLY)
            of = OpenFile(sino, fd, bool(node.blob), size=node.size)
            self.files[sino] = of
        if write:
            if node.digests:
                # the bytes may change from now on: forget their digests first, durably (WAL), so that a
                # kill -9 before the last writer's close cannot leave the new bytes with the old digests
                self.staging.update(sino, digests=None)
            of.generation = self.generations[sino] = self.generations.get(sino, 0) + 1
            of.writers += 1
            if of.writers == 1 and of.on_blob and of.size == 0 and of.hasher is None:
                self.start_hashing(of)    # an empty file (made by mknod, or left empty): hash as bytes arrive
        else:
            of.readers += 1
        if truncate and write:
            self.truncate(sino, 0)
        return of

    def release(self, of: OpenFile, write: bool) -> bool:
        """Drop one handle; True when the last writer left and the file still needs hashing (in the
        background). A file written in order is hashed already: its digests are recorded here, with its
        size, in one update."""
        if write:
            of.writers -= 1
        else:
            of.readers -= 1
        last_writer = write and of.writers == 0
        hashed = False
        if last_writer and of.on_blob:
            fields = {"size": of.size}
            if of.hasher is not None and of.hashed_to == of.size and not of.pending and not of.draining:
                fields["digests"] = json.dumps(of.hasher.hexdigests())
                hashed = True
            self.staging.update(of.sino, **fields)
        if of.readers + of.writers == 0:
            os.close(of.fd)
            del self.files[of.sino]
            if self.staging.nlink(of.sino, "f") == 0:
                self.staging.drop_if_orphan(of.sino)
        return last_writer and not hashed

    def open_for_writing(self) -> list[int]:
        return [sino for sino, of in self.files.items() if of.writers > 0]

    def needs_blob(self, sino: int) -> bool:
        node = self.staging.node(sino)
        return node is not None and node.kind == "f" and not node.blob

    def copy_base_bytes(self, sino: int) -> None:
        """Copy-on-write, the slow half (a worker thread): base bytes into blobs/<sino>, verified. Stored
        bytes that do not match their digest are not copied: FixityError (EIO to the write or truncate
        that needed the copy) and a fixity.failed event; the file stays the base's."""
        node = self.staging.node(sino)
        algorithm = self.archive.config.primary
        found = self.staging.copy_base_bytes(sino, self.base_path(node), algorithm, node.base)
        if found is not None:
            error = FixityError(resource=self.rid, instance=self.base, path=self._base_path_of(sino),
                                algorithm=algorithm, expected=node.base, found=found,
                                stored=self._base_stored[node.base])
            log.warning("copy-on-write refused: %s", error)
            record_failure(self.archive, error, via="mount")
            raise error

    def _base_path_of(self, sino: int) -> str:
        tree = self.staging.tree
        return tree.path.get(sino, "?") if tree is not None else "?"

    def adopt_blob(self, sino: int, kept_bytes: bool) -> None:
        """Copy-on-write, the quick half (the loop): record the blob and move open handles onto it."""
        if not kept_bytes:
            fd = os.open(self.staging.blob_path(sino), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.close(fd)
            self.staging.update(sino, blob=1, base=None, size=0)
        else:
            self.staging.update(sino, blob=1, base=None)
        of = self.files.get(sino)
        if of is not None:
            old = of.fd
            of.fd = os.open(self.staging.blob_path(sino), os.O_RDWR)
            of.on_blob = True
            os.close(old)
            if not kept_bytes:
                of.size = 0

    # -- bytes ------------------------------------------------------------------
    def note_write(self, of: OpenFile, offset: int, length: int) -> bool:
        """Account for a write as it arrives (before its bytes land, which may happen in a worker
        thread); True when its bytes extend the running hash and must be fed to it, in this order."""
        assert of.on_blob, "the adapter gives a base file its blob before writing"
        of.version += 1
        of.size = max(of.size, offset + length)
        if of.hasher is not None:
            if offset == of.hashed_to:
                of.hashed_to += length
                return True
            of.hasher = None
        return False

    def pwrite(self, of: OpenFile, offset: int, data: bytes) -> int:
        """Put the bytes in the blob (any thread). A failure marks the file incomplete (SPEC 5: EIO at commit)."""
        try:
            if not self.free.allows(of.fd, len(data)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = os.pwrite(of.fd, data, offset)
        except OSError as e:
            of.failed = True
            raise fail(e.errno if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else errno.EIO) from e
        if n != len(data):
            of.hasher = None
            of.failed = True   # the kernel retries a short write; until then the blob has a gap
        end = offset + n
        if end // WRITEBACK_CHUNK > offset // WRITEBACK_CHUNK:   # a chunk boundary was crossed
            start = (end // WRITEBACK_CHUNK - 1) * WRITEBACK_CHUNK
            start_writeback(of.fd, start, WRITEBACK_CHUNK)
        return n

    def mark_incomplete(self, of: OpenFile) -> None:
        self.staging.update(of.sino, incomplete=1)

    def truncate(self, sino: int, size: int) -> None:
        of = self.files.get(sino)
        os.truncate(self.staging.blob_path(sino), size)
        fields = {"size": size, "digests": None}
        if size == 0:
            fields["incomplete"] = 0
        self.staging.update(sino, **fields)
        # a hash of the bytes before the truncate, still running after a close, must not be recorded
        generation = self.generations[sino] = self.generations.get(sino, 0) + 1
        if of is not None:
            of.generation = generation
            of.size = size
            of.version += 1
            if size == 0:
                of.hasher, of.hashed_to = MultiHash(self.algorithms), 0
            elif size != of.hashed_to:
                of.hasher = None

    def start_hashing(self, of: OpenFile) -> None:
        of.hasher, of.hashed_to = MultiHash(self.algorithms), 0

    def size_of(self, sino: int, node: Node) -> int:
        of = self.files.get(sino)
        return of.size if of is not None and of.on_blob else node.size

    # -- hashing when the last writer closes ------------------------------------
    def digest_job(self, of: OpenFile):
        """What to do after the last writer closed: a callable to run in a worker thread, or None."""
        sino, version = of.sino, of.version
        if not of.on_blob or self.generations.get(sino, 0) != of.generation:
            return None         # opened for writing again since: that writer's close hashes the file
        if of.hasher is not None and of.hashed_to == of.size:
            digests = of.hasher.hexdigests()
            self.staging.update(sino, digests=json.dumps(digests))
            return None
        path = self.staging.blob_path(sino)
        stamp = WriteStamp(of.generation, version)

        def job():
            return sino, stamp, hash_file(path, self.algorithms)
        return job

    def digest_done(self, sino: int, stamp: WriteStamp, digests: dict[str, str]) -> None:
        if self.generations.get(sino, 0) != stamp.generation:
            return  # opened for writing again meanwhile
        of = self.files.get(sino)
        if of is not None and of.version != stamp.version:
            return  # written again meanwhile
        node = self.staging.node(sino)
        if node is not None and node.blob:
            self.staging.update(sino, digests=json.dumps(digests))

    # -- commit -------------------------------------------------------------------
    def commit_request(self, committer: int) -> CommitRequest:
        """The changes since the base (core.request), with the sizes of files open here. Runs in a worker
        thread while the transaction is committing: every change of it fails with EBUSY until the commit
        ends (the connection is shared with the loop's readers; sqlite3.threadsafety is 3 here)."""
        return commit_request(self.staging, self.rid, committer, self.size_of)

    def close(self) -> None:
        for of in self.files.values():
            try:
                os.close(of.fd)
            except OSError:
                pass
        self.files.clear()
        self.closed = True
        self.staging.close()
        # the kernel may hold nodes of this transaction (and with them this object) for a while yet
        self.generations, self._base_stored = {}, None


_KIND_BITS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}


def kind_bits(node: Node) -> int:
    return _KIND_BITS[node.kind]


__all__ = ["OpenTxn", "OpenFile", "Opener", "WriteStamp", "kind_bits", "setid_bits_to_clear"]
