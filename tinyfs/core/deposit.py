"""Open transactions addressed by path, for a server (WebDAV, HTTP): the mount's transactions, in its format.

A transaction is transactions/<rid>/ as the mount makes it (core/staging.py); its commit is the mount's
(core/request.py, core/commit.py), and so is the record of a failed commit (core/failures.py). What this
module adds is what a server needs instead of a kernel's inodes and open files:

  - paths: '/'-separated, relative to the transaction root ("" is the root), checked as logical paths
    (core/ids.py) and for their length once placed (Staging.check_room);
  - whole-body writes: `put` copies a request body into a new file in blobs/ while hashing it with every
    configured digest, then makes or replaces the entry in one SQLite transaction with the file moved in
    (Staging.make_file, replace_bytes): a body cut short, or an error, leaves the old file as it was;
  - owners: a transaction opened here records the user ("user" meta) and only that user may commit or roll
    it back (the adapter checks changes with `PathTxn.check_owner`); one opened by the mount has no user
    and is read-only here;
  - threads: a server answers requests in worker threads. Each transaction has one lock; a PUT's body is
    written without it (a slow client holds nothing), and a commit runs without it once its request is
    read, every change meanwhile refused with Busy.

Crash safety is the mount's: every change is in txn.db (WAL) when its call returns, a file's bytes are in
place before an entry points at them, and what an interrupted upload left in blobs/ is swept when the
transaction is next opened (Deposits.get after a restart).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import stat
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

from .commit import CommitResult, commit
from .digests import CHUNK, MultiHash
from .durable import start_writeback
from .errors import (
    AlreadyExists,
    Busy,
    Forbidden,
    InvalidName,
    IsADirectory,
    LabelTaken,
    NoSpace,
    NotADirectory,
    NotFound,
    ShortInput,
    TinyfsError,
)
from .failures import Failure, known_failure, record_failed_commit
from .fixity import open_verified
from .formats import after_commit
from .ids import PATH_MAX, check_label, check_logical_path, check_name, check_rid, is_rid
from .layout import ArchiveRoot
from .limits import EVENT_TEXT_MAX, check_text
from .request import commit_request
from .staging import HEADROOM, ROOT, Node, Staging, free_bytes

log = logging.getLogger(__name__)

VIA = "http"
META = ("message", "creator", "label")
RECEIVE_CHUNK = 1 << 20        # bytes of a body read, written and hashed at a time
# Every WRITEBACK_CHUNK received, the disk is asked to start on the chunk before (as the mount does): a big
# file's bytes reach the disk while it arrives, and the commit's syncfs has little left to do.
WRITEBACK_CHUNK = 16 << 20
PART_SUFFIX = ".part"          # blobs/<uuid>.part: a body being received (swept on reopen)
FILE_MODE = 0o644              # a new file's mode when the client gives none
DIR_MODE = 0o755
XATTR_PREFIX = "user."         # the only namespace an archive records (SPEC 4)
PAX_XATTR = "SCHILY.xattr."


@dataclass(frozen=True, slots=True)
class Info:
    """What a server shows of one entry of a transaction."""

    kind: str                   # "f", "d" or "l"
    size: int
    mode: int                   # permission bits
    mtime_ns: int
    ctime_ns: int
    digest: str | None          # the primary digest of a file's bytes; None when not known yet (or not a file)
    target: str | None = None   # a symbolic link's target


class Deposits:
    """The open transactions of an archive for a server: ROOT/transactions/<rid>, the mount's format.

    The server holds the archive's mount lock (core.layout.lock_archive) for its life: no mount changes
    the same transactions meanwhile."""

    def __init__(self, archive: ArchiveRoot):
        self.archive = archive
        self._open: dict[str, PathTxn] = {}
        self._lock = threading.Lock()          # guards _open (opening, reopening, closing)

    # -- finding and opening ---------------------------------------------------------------------------
    def open(self, rid: str, user: str) -> PathTxn:
        """A new transaction on `rid` owned by `user`, showing the head (nothing, for a new resource)."""
        check_rid(rid)
        if not user:
            raise InvalidName("a transaction opened by the server needs a user")
        if self.get(rid) is not None:
            raise AlreadyExists(f"a transaction for {rid!r} is already open")
        # (not under self._lock: reading a large base takes a while, and every request asks `get`)
        head = self.archive.head(rid)
        root = self.archive.state(rid, head).root if head else None     # the root starts as recorded
        staging = Staging.create(self.archive.transactions / rid, rid, head, self._base_loader(rid),
                                 os.getuid(), os.getgid(), meta={"user": user, "via": VIA}, root=root)
        staging.read_base()
        with self._lock:
            # a request may have found it on disk meanwhile (get): that object is the one to share
            txn = self._open.get(rid)
            if txn is None:
                txn = self._open[rid] = PathTxn(self.archive, rid, staging)
            else:
                staging.close()
        self.archive.events.append("transaction.opened", rid, head, via=VIA, user=user)
        return txn

    def get(self, rid: str) -> PathTxn | None:
        """The open transaction `rid`, or None; one found on disk (a restart, or opened by the mount
        before) is opened, what an interrupted request left of it swept."""
        if not is_rid(rid):
            return None
        with self._lock:
            return self._get_locked(rid)

    def _get_locked(self, rid: str) -> PathTxn | None:
        txn = self._open.get(rid)
        if txn is not None:
            return txn
        path = self.archive.transactions / rid
        if not (path / "txn.db").exists():
            return None
        staging = Staging.reopen(path, self._base_loader(rid))
        swept = staging.sweep_blobs()
        if swept:
            log.info("transaction %s: %d file(s) of interrupted uploads removed", rid, swept)
        txn = self._open[rid] = PathTxn(self.archive, rid, staging)
        return txn

    def rids(self) -> list[str]:
        """The open transactions' resource ids, sorted."""
        names = os.listdir(self.archive.transactions)
        return sorted(n for n in names if is_rid(n) and (self.archive.transactions / n / "txn.db").exists())

    def _base_loader(self, rid: str):
        return lambda iid: self.archive.state(rid, iid)

    def close(self) -> None:
        """Close every open transaction's database (the server stops); they stay on disk, open."""
        with self._lock:
            for txn in self._open.values():
                txn.close()
            self._open.clear()

    # -- ending ------------------------------------------------------------------------------------------
    def _idle(self, rid: str, user: str) -> PathTxn:
        txn = self.get(rid)
        if txn is None:
            raise NotFound(f"no open transaction for {rid!r}")
        txn.check_owner(user)
        return txn

    def rollback(self, rid: str, user: str) -> None:
        """Drop the transaction `rid` of `user` and everything staged in it (uploads still arriving fail)."""
        txn = self._idle(rid, user)
        with txn.lock:
            txn._looking()         # (NotFound if another request ended it meanwhile)
            if txn.committing:
                raise Busy(f"the transaction for {rid!r} is being committed")
            trash = Staging.detach(txn.staging.path)
            self._forget(txn)
        Staging.delete(trash)
        self.archive.events.append("transaction.rolled_back", rid, txn.base, via=VIA, user=user)

    def commit(self, rid: str, user: str) -> CommitResult:
        """Commit the transaction `rid` of `user`: durable when it returns. On failure the transaction
        stays as it was (its state "failed", the error recorded) and the core's typed error is raised."""
        txn = self._idle(rid, user)
        with txn.lock:
            txn._looking()         # (NotFound if another request ended it meanwhile)
            if txn.committing:
                raise Busy(f"the transaction for {rid!r} is being committed")
            if txn.writing:
                raise Busy(f"the transaction for {rid!r} is still receiving {txn.writing} upload(s)")
            known = known_failure(self.archive, txn.staging, rid, txn.failure)
            if known is not None:
                raise known.error
            txn.committing = True
        try:
            return self._commit(txn, user)
        finally:
            txn.committing = False

    def _commit(self, txn: PathTxn, user: str) -> CommitResult:
        rid = txn.rid
        try:
            with txn.lock:
                txn.staging.set_meta("state", "committing")
                request = commit_request(txn.staging, rid, user)
        except TinyfsError as e:
            raise self._failed(txn, e, event=True) from None
        except BaseException as e:       # a bug too: the transaction must not stay "committing"
            self._failed(txn, _internal(e), event=True)
            raise
        try:
            result = commit(self.archive, request)
        except (TinyfsError, OSError) as e:
            raise self._failed(txn, _typed(e)) from None     # (core.commit appended the event)
        except BaseException as e:
            self._failed(txn, _internal(e))
            raise
        after_commit(self.archive, rid, result.instance)
        with txn.lock:
            trash = Staging.detach(txn.staging.path)
            self._forget(txn)
        Staging.delete(trash)
        log.info("committed %s as %s (by %s)", rid, result.instance, user)
        return result

    def _failed(self, txn: PathTxn, error: Exception, event: bool = False) -> Exception:
        with txn.lock:
            txn.failure = record_failed_commit(self.archive, txn.staging, txn.rid, error, event=event, via=VIA)
        return error

    def _forget(self, txn: PathTxn) -> None:
        """(under txn.lock, its directory gone from transactions/)"""
        txn.close()
        with self._lock:
            if self._open.get(txn.rid) is txn:
                del self._open[txn.rid]


def _typed(error: Exception) -> Exception:
    """An OSError of a commit as the core's error for it (a full disk: NoSpace), else as it is."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        typed = NoSpace(f"no room left to commit: {error.strerror or error}")
        typed.errno = error.errno
        return typed
    return error


def _internal(error: BaseException) -> TinyfsError:
    return TinyfsError(f"internal error: {type(error).__name__}: {error}"[:EVENT_TEXT_MAX])


class PathTxn:
    """One open transaction, addressed by path. Every method is thread-safe."""

    def __init__(self, archive: ArchiveRoot, rid: str, staging: Staging):
        self.archive, self.rid, self.staging = archive, rid, staging
        self.base: str | None = staging.get_meta("base") or None
        self.owner: str | None = staging.get_meta("user") or None     # None: opened by the mount
        self.uid, self.gid = int(staging.get_meta("uid") or 0), int(staging.get_meta("gid") or 0)
        self.lock = threading.RLock()
        self.committing = False
        self.writing = 0                   # PUT bodies being received
        self.closed = False
        self.failure: Failure | None = None
        self._base_doc = None              # the base instance's document (read on the first base read)

    def __repr__(self) -> str:
        return f"<PathTxn {self.rid} of {self.owner}>"

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.staging.close()

    # -- checks --------------------------------------------------------------------------------------------
    def check_owner(self, user: str) -> None:
        """Forbidden unless `user` opened this transaction (one the mount opened belongs to nobody here)."""
        if self.owner is None:
            raise Forbidden(f"the transaction for {self.rid!r} was opened by the mount: change it there")
        if user != self.owner:
            raise Forbidden(f"the transaction for {self.rid!r} belongs to another user")

    def _looking(self) -> Staging:
        """(under the lock) The staging, for a look: NotFound once committed or rolled back."""
        if self.closed:
            raise NotFound(f"the transaction for {self.rid!r} is no longer open")
        return self.staging

    def _changing(self) -> Staging:
        """(under the lock) The staging, for a change: also Busy while it commits, Forbidden for the mount's."""
        staging = self._looking()
        if self.committing:
            raise Busy(f"the transaction for {self.rid!r} is being committed")
        if self.owner is None:
            raise Forbidden(f"the transaction for {self.rid!r} was opened by the mount: change it there")
        return staging

    # -- paths ---------------------------------------------------------------------------------------------
    def _resolve(self, path: str) -> int:
        """(under the lock) The inode at `path`: InvalidName for a bad path, NotFound when missing,
        NotADirectory when a parent on the way is not a directory."""
        if path == "":
            return ROOT
        check_logical_path(path)
        staging, ino = self.staging, ROOT
        walked = []
        for name in path.split("/"):
            node = staging.node(ino)
            if node is None or node.kind != "d":
                raise NotADirectory(f"{'/'.join(walked)}: not a directory", path=path)
            child = staging.lookup(ino, name)
            if child is None:
                raise NotFound(f"{path}: no such file or directory in the transaction", path=path)
            walked.append(name)
            ino = child
        return ino

    def _parent(self, path: str) -> tuple[int, str]:
        """(under the lock) (the directory that holds `path`, its last name): the parent must exist
        (NotFound otherwise: a WebDAV client gets 409) and be a directory."""
        if path == "":
            raise InvalidName("the transaction's root has no parent")
        check_logical_path(path)
        parent, _, name = path.rpartition("/")
        try:
            ino = self._resolve(parent)
        except NotFound:
            raise NotFound(f"{path}: its parent directory {parent!r} does not exist", path=path) from None
        if self.staging.node(ino).kind != "d":
            raise NotADirectory(f"{path}: its parent {parent!r} is not a directory", path=path)
        return ino, name

    def _node(self, ino: int) -> Node:
        node = self.staging.node(ino)
        if node is None:
            raise NotFound(f"inode {ino} is gone")
        return node

    def _info(self, node: Node) -> Info:
        digest = None
        if node.kind == "f":
            if not node.blob:
                digest = node.base
            elif node.digests:
                digest = json.loads(node.digests).get(self.archive.config.primary)
        return Info(node.kind, node.size, node.mode, node.mtime_ns, node.ctime_ns, digest, node.target)

    # -- looking -----------------------------------------------------------------------------------------
    def stat(self, path: str) -> Info:
        with self.lock:
            self._looking()
            return self._info(self._node(self._resolve(path)))

    def list(self, path: str) -> list[tuple[str, Info]]:
        with self.lock:
            staging = self._looking()
            ino = self._resolve(path)
            if self._node(ino).kind != "d":
                raise NotADirectory(f"{path}: not a directory", path=path)
            return [(name, self._info(node)) for name, node, _nlink in staging.listing(ino)]

    def walk(self, path: str = "") -> Iterator[tuple[str, Info]]:
        """(path, info) of `path` and of everything below it, parents first (a snapshot, read now)."""
        with self.lock:
            self._looking()
            ino = self._resolve(path)
            out = [(path, self._info(self._node(ino)))]
            self._walk_below(ino, path, out)
        return iter(out)

    def _walk_below(self, ino: int, prefix: str, out: list) -> None:
        stack = [(ino, prefix)]
        while stack:
            directory, prefix = stack.pop()
            for name, node, _nlink in self.staging.listing(directory):
                path = f"{prefix}/{name}" if prefix else name
                out.append((path, self._info(node)))
                if node.kind == "d":
                    stack.append((node.id, path))

    def xattrs(self, path: str) -> dict[str, bytes]:
        with self.lock:
            self._looking()
            return self.staging.xattrs(self._resolve(path))

    def open_read(self, path: str) -> BinaryIO:
        """The bytes of the file at `path`: its staged blob, or the base instance's stored bytes, verified
        as they are read (a damaged stored file fails the read: FixityError, EIO)."""
        with self.lock:
            self._looking()
            ino = self._resolve(path)
            node = self._node(ino)
            if node.kind != "f":
                raise IsADirectory(f"{path}: not a file", path=path) if node.kind == "d" else \
                    InvalidName(f"{path}: a symbolic link has no bytes to read", path=path)
            if node.blob:
                return open(self.staging.blob_path(ino), "rb")    # (a later PUT moves a new file in: this one stays)
            base_path = self._base_path_of(ino, node)
            doc = self._base_doc
        return io.BufferedReader(open_verified(self.archive, self.rid, doc, base_path, via=VIA), CHUNK)

    def _base_path_of(self, ino: int, node: Node) -> str:
        """(under the lock) A path of the base instance whose bytes are the base bytes of `node`."""
        if self._base_doc is None:
            self._base_doc = self.archive.instance(self.rid, self.base)
        path = self.staging.tree.path.get(ino)
        files = self._base_doc.state.files
        if path is None or path not in files or files[path].digest != node.base:   # a copy of a base file
            path = next(p for p, f in files.items() if f.digest == node.base)
        return path

    # -- metadata --------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        """message, creator, label, state ("open", "committing", "verifying" or "failed") and error."""
        with self.lock:
            staging = self._looking()
            out = {k: staging.get_meta(k) for k in (*META, "state", "error")}
        if self.committing and out["state"] != "verifying":
            out["state"] = "committing"
        return out

    def set_meta(self, key: str, value: str) -> None:
        """Set the commit's message, creator or label (checked by core.limits; a label already used by the
        resource: LabelTaken)."""
        if key not in META:
            raise Forbidden(f"{key!r} cannot be set: only {', '.join(META)}")
        if key in ("message", "creator"):
            check_text(key, value)
        if key == "label" and value:
            check_label(value)
            if value in self.archive.labels(self.rid):
                raise LabelTaken(f"label {value!r} is already used by resource {self.rid!r}")
        with self.lock:
            self._changing().set_meta(key, value)

    # -- changes of names ------------------------------------------------------------------------------
    def mkdir(self, path: str, mode: int = DIR_MODE, mtime_ns: int | None = None) -> None:
        with self.lock:
            staging = self._changing()
            parent, name = self._parent(path)
            if staging.lookup(parent, name) is not None:
                raise AlreadyExists(f"{path}: already exists", path=path)
            staging.check_room(parent, name)
            ino = staging.make(parent, name, "d", stat.S_IMODE(mode), self.uid, self.gid)
            if mtime_ns is not None:
                staging.update(ino, mtime_ns=mtime_ns)

    def symlink(self, path: str, target: str, mtime_ns: int | None = None) -> None:
        _check_target(target)
        with self.lock:
            staging = self._changing()
            parent, name = self._parent(path)
            if staging.lookup(parent, name) is not None:
                raise AlreadyExists(f"{path}: already exists", path=path)
            staging.check_room(parent, name)
            ino = staging.make(parent, name, "l", 0o777, self.uid, self.gid, target=target)
            if mtime_ns is not None:
                staging.update(ino, mtime_ns=mtime_ns)

    def hardlink(self, path: str, existing: str) -> None:
        """A further name of the file `existing` (they stay one file: one commit records them linked)."""
        with self.lock:
            staging = self._changing()
            ino = self._resolve(existing)
            if self._node(ino).kind != "f":
                raise Forbidden(f"{existing}: only a file can have more names (hard links)", path=existing)
            parent, name = self._parent(path)
            if staging.lookup(parent, name) is not None:
                raise AlreadyExists(f"{path}: already exists", path=path)
            staging.check_room(parent, name)
            staging.link(ino, parent, name)

    def delete(self, path: str) -> None:
        """Remove a file, a link, or a directory with everything in it."""
        with self.lock:
            staging = self._changing()
            parent, name = self._parent(path)
            ino = staging.lookup(parent, name)
            if ino is None:
                raise NotFound(f"{path}: no such file or directory in the transaction", path=path)
            self._remove(parent, name, ino)

    def _remove(self, parent: int, name: str, ino: int) -> None:
        """(under the lock) Remove a name, and a directory's contents first (as rm -r would)."""
        if self._node(ino).kind == "d":
            self._empty(ino)
        self.staging.unlink(parent, name)
        self.staging.drop_if_orphan(ino)

    def _empty(self, directory: int) -> None:
        """(under the lock) Remove everything in a directory, depth first: no name is left below a
        directory that goes (its number may come back for a new one)."""
        staging = self.staging
        stack = [directory]
        while stack:
            below = None
            for name, child in staging.children(stack[-1]):
                if self._node(child).kind == "d" and staging.has_children(child):
                    below = child
                    break
                staging.unlink(stack[-1], name)
                staging.drop_if_orphan(child)
            if below is None:
                stack.pop()          # empty now: its parent lists it again and removes it
            else:
                stack.append(below)

    def move(self, src: str, dst: str, overwrite: bool) -> bool:
        """Move `src` to `dst`; True when something at `dst` was replaced (removed first, whatever its kind,
        as a WebDAV MOVE with Overwrite: T does). AlreadyExists when `dst` exists and not `overwrite`."""
        with self.lock:
            staging = self._changing()
            old_parent, old = self._parent(src)
            ino = staging.lookup(old_parent, old)
            if ino is None:
                raise NotFound(f"{src}: no such file or directory in the transaction", path=src)
            new_parent, new = self._parent(dst)
            if src == dst:
                raise Forbidden(f"{src}: moved onto itself")
            if self._node(ino).kind == "d" and staging.is_ancestor(ino, new_parent):
                raise Forbidden(f"{src} cannot be moved into itself ({dst})")
            replaced = self._clear_target(new_parent, new, dst, overwrite, old_parent, keep=ino)
            staging.check_room(new_parent, new, moving=ino)
            gone = staging.rename(old_parent, old, new_parent, new)
            if gone is not None:
                staging.drop_if_orphan(gone)
            return replaced

    def _clear_target(self, parent: int, name: str, path: str, overwrite: bool, source_parent: int,
                      keep: int | None = None) -> bool:
        """(under the lock) Make room at (parent, name) for a move (`keep`: what moves) or a copy of
        something in `source_parent`: True when something was there. A file there, replaced by a file,
        is left for the rename to replace in one step; anything else goes first."""
        there = self._check_target(parent, name, path, overwrite, source_parent)
        if there is None:
            return False
        if there == keep:           # another name of the same file: replaced by the move
            return True
        if self._node(there).kind == "d" or keep is None or self._node(keep).kind == "d":
            self._remove(parent, name, there)
        return True

    def _check_target(self, parent: int, name: str, path: str, overwrite: bool, source_parent: int) -> int | None:
        """(under the lock) What is at (parent, name), if it may be replaced by what comes from
        `source_parent`: AlreadyExists without `overwrite`; Forbidden for a directory holding the source."""
        there = self.staging.lookup(parent, name)
        if there is None:
            return None
        if not overwrite:
            raise AlreadyExists(f"{path}: already exists", path=path)
        if self._node(there).kind == "d" and self.staging.is_ancestor(there, source_parent):
            raise Forbidden(f"{path}: replacing it would remove what is moved or copied")
        return there

    # -- bytes -------------------------------------------------------------------------------------------
    def put(self, path: str, stream: BinaryIO, length: int | None = None, mode: int | None = None,
            mtime_ns: int | None = None, xattrs: dict[str, bytes] | None = None) -> bool:
        """Make or replace the file at `path` with the bytes of `stream` (`length` of them when given, else
        to its end); True when it was created. The body goes to a new file first, hashed with every
        configured digest as it arrives; only a whole body replaces anything, in one step. A file replaced
        keeps its other names (hard links), its mode (unless `mode`) and, unless `xattrs`, its xattrs."""
        _check_xattrs(xattrs)
        with self.lock:
            staging = self._changing()
            parent, name = self._parent(path)
            self._check_put_target(parent, name, path)
            staging.check_room(parent, name)
            if length is not None:
                self._check_room_for(length)
            self.writing += 1
        part = self.staging.blobs / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        try:
            size, digests = self._receive(stream, part, length, path)
            with self.lock:
                return self._place(path, part, size, digests, mode, mtime_ns, xattrs)
        finally:
            with self.lock:
                self.writing -= 1
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass

    def _check_put_target(self, parent: int, name: str, path: str) -> int | None:
        there = self.staging.lookup(parent, name)
        if there is not None and self._node(there).kind == "d":
            raise IsADirectory(f"{path}: a directory is there", path=path)
        return there

    def _check_room_for(self, length: int) -> None:
        free = free_bytes(self.staging.path)
        if length + HEADROOM > free:
            raise NoSpace(f"{length:,} bytes do not fit: {max(free - HEADROOM, 0):,} bytes are free for deposits")

    def _receive(self, stream: BinaryIO, part: Path, length: int | None, path: str) -> tuple[int, str]:
        """(without the lock) Copy the body into `part`, hashing it; (its size, its digests as JSON)."""
        hasher = MultiHash(self.archive.config.digests)
        size = 0
        room = 0                 # bytes known to fit without asking the file system again
        buf = memoryview(bytearray(RECEIVE_CHUNK))
        readinto = getattr(stream, "readinto", None)      # (a WSGI input may only have read)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while length is None or size < length:
                want = RECEIVE_CHUNK if length is None else min(RECEIVE_CHUNK, length - size)
                if readinto is not None:
                    data = buf[:readinto(buf[:want]) or 0]
                else:
                    data = memoryview(stream.read(want))
                n = len(data)
                if not n:
                    break
                if n > room:
                    room = free_bytes(fd) - HEADROOM
                    if n > room:
                        raise NoSpace(f"{path}: no room for its bytes ({size:,} received)", path=path)
                view = data
                while view:
                    view = view[os.write(fd, view):]
                hasher.update(data)
                if (size + n) // WRITEBACK_CHUNK > size // WRITEBACK_CHUNK:     # a chunk boundary was crossed
                    start_writeback(fd, ((size + n) // WRITEBACK_CHUNK - 1) * WRITEBACK_CHUNK, WRITEBACK_CHUNK)
                size += n
                room -= n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"{path}: no room for its bytes ({size:,} received)", path=path) from None
            raise
        finally:
            os.close(fd)
        if length is not None and size < length:
            raise ShortInput(f"{path}: the body ended after {size:,} of {length:,} bytes; nothing was kept",
                             path=path)
        return size, json.dumps(hasher.hexdigests())

    def _place(self, path: str, part: Path, size: int, digests: str, mode: int | None, mtime_ns: int | None,
               xattrs: dict[str, bytes] | None) -> bool:
        """(under the lock) The received body as the file at `path` (checked again: the tree may have
        changed while it arrived)."""
        staging = self._changing()
        parent, name = self._parent(path)
        there = self._check_put_target(parent, name, path)
        mtime = time.time_ns() if mtime_ns is None else mtime_ns
        if there is not None and self._node(there).kind == "f":
            staging.replace_bytes(there, part, size, digests, mtime, mode, xattrs)
            return False
        _ino, replaced = staging.make_file(parent, name, FILE_MODE if mode is None else mode, self.uid, self.gid,
                                           part, size, digests, mtime, xattrs)
        if replaced is not None:               # a link was there
            staging.drop_if_orphan(replaced)
        return True

    # -- copies -------------------------------------------------------------------------------------------
    def copy(self, src: str, dst: str, overwrite: bool, recursive: bool = True) -> bool:
        """Copy `src` to `dst` (a directory with everything in it unless not `recursive`: then empty),
        modes, mtimes and xattrs kept, hard links within it kept as links; True when something at `dst`
        was replaced. A base file's copy shares its stored bytes (nothing is copied). The copy is made
        under a name of its own beside `dst`, then moved there: a copy that fails leaves `dst` as it was."""
        with self.lock:
            staging = self._changing()
            ino = self._resolve(src)
            src_parent = self._parent(src)[0] if src else ROOT
            new_parent, new = self._parent(dst)
            if src == dst:
                raise Forbidden(f"{src}: copied onto itself")
            if self._node(ino).kind == "d" and staging.is_ancestor(ino, new_parent):
                raise Forbidden(f"{src or 'the root'} cannot be copied into itself ({dst})")
            self._check_target(new_parent, new, dst, overwrite, src_parent)
            staging.check_room(new_parent, new, moving=ino)     # (every path below it, too)
            aside = f".tinyfs-copy-{uuid.uuid4().hex[:12]}"
            try:
                self._copy(ino, new_parent, aside, recursive)
            except BaseException:
                made = staging.lookup(new_parent, aside)
                if made is not None:
                    self._remove(new_parent, aside, made)
                raise
            replaced = self._clear_target(new_parent, new, dst, overwrite, src_parent)
            gone = staging.rename(new_parent, aside, new_parent, new)
            if gone is not None:
                staging.drop_if_orphan(gone)
            return replaced

    def _copy(self, ino: int, parent: int, name: str, recursive: bool) -> None:
        """(under the lock) The copy itself: directories made first, their mtimes set after their contents."""
        staging = self.staging
        copies: dict[int, int] = {}          # source file -> its copy (hard links stay links)
        dirs: list[tuple[int, int]] = []     # (copy, mtime)
        stack = [(ino, parent, name)]
        while stack:
            source, parent, name = stack.pop()
            node = self._node(source)
            if node.kind == "f" and source in copies:
                staging.link(copies[source], parent, name)
            elif node.kind == "f":
                copies[source] = self._copy_file(source, node, parent, name)
            elif node.kind == "l":
                made = staging.make(parent, name, "l", 0o777, self.uid, self.gid, target=node.target)
                staging.update(made, mtime_ns=node.mtime_ns)
            else:
                made = staging.make(parent, name, "d", node.mode, self.uid, self.gid)
                dirs.append((made, node.mtime_ns))
                if recursive:
                    stack.extend((child, made, child_name) for child_name, child in reversed(staging.children(source)))
        for made, mtime in reversed(dirs):
            staging.update(made, mtime_ns=mtime)

    def _copy_file(self, source: int, node: Node, parent: int, name: str) -> int:
        """(under the lock) A new file with the bytes, mode, mtime and xattrs of `source`, made in one step."""
        staging = self.staging
        xattrs = staging.xattrs(source)
        if not node.blob:     # a base file: the copy names the same stored bytes
            made, _ = staging.make_file(parent, name, node.mode, self.uid, self.gid, None, node.size, None,
                                        node.mtime_ns, xattrs, base=node.base)
            return made
        part = staging.blobs / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        self._check_room_for(node.size)
        try:
            _copy_bytes(staging.blob_path(source), part)
            made, _ = staging.make_file(parent, name, node.mode, self.uid, self.gid, part, node.size,
                                        node.digests, node.mtime_ns, xattrs)
        finally:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
        return made

    # -- attributes ----------------------------------------------------------------------------------------
    def set_mtime(self, path: str, mtime_ns: int) -> None:
        with self.lock:
            staging = self._changing()
            staging.update(self._resolve(path), mtime_ns=mtime_ns, ctime_ns=time.time_ns())

    def set_mode(self, path: str, mode: int) -> None:
        with self.lock:
            staging = self._changing()
            ino = self._resolve(path)
            if self._node(ino).kind == "l":
                raise InvalidName(f"{path}: a symbolic link has no mode of its own", path=path)
            staging.update(ino, mode=stat.S_IMODE(mode), ctime_ns=time.time_ns())

    # -- tar -------------------------------------------------------------------------------------------------
    def extract_tar(self, stream: BinaryIO, under: str = "") -> int:
        """Unpack a tar stream (plain, gzip, bzip2 or xz; ustar, GNU or PAX) into the directory `under`, as
        `tar -x` into the mount would: files, directories, symbolic and hard links with their modes and
        mtimes, user.* xattrs from PAX SCHILY.xattr.user.* records; an entry already there is replaced (a
        directory is kept and merged into). Special files are refused (Forbidden), absolute names and
        names with '..' too (InvalidName), and names are checked as every path is. Returns the number of
        members.

        Not atomic: a failure mid-way keeps what was unpacked before it, as an interrupted `tar -x` would
        (the client rolls the transaction back, or fixes and unpacks again: entries are replaced)."""
        if under:
            with self.lock:
                if self._node(self._resolve(under)).kind != "d":
                    raise NotADirectory(f"{under}: not a directory", path=under)
        dirs: dict[str, tuple[int, int | None]] = {}       # directory -> (mtime, mode) set at the end
        count = 0
        try:
            archive = tarfile.open(fileobj=stream, mode="r|*")
        except tarfile.TarError as e:
            raise InvalidName(f"not a tar stream: {e}") from None
        with archive:
            try:
                for member in archive:
                    count += 1
                    self._extract(archive, member, under, dirs)
            except tarfile.TarError as e:
                raise InvalidName(f"the tar stream is damaged after {count} member(s): {e}") from None
        for path in sorted(dirs, key=lambda p: -p.count("/") if p else 1):    # deepest first; the root last
            mtime, mode = dirs[path]
            with self.lock:
                staging = self._changing()
                ino = self._resolve(path)
                fields = {"mtime_ns": mtime}
                if mode is not None:
                    fields["mode"] = mode
                staging.update(ino, **fields)
        return count

    def _extract(self, archive: tarfile.TarFile, member: tarfile.TarInfo, under: str, dirs: dict) -> None:
        name = _member_path(member.name)
        path = f"{under}/{name}".strip("/") if name else under
        mtime = _member_mtime(member)
        mode = stat.S_IMODE(member.mode)
        if member.isdir():
            if path:
                self._ensure_dirs(path, mode)
            dirs[path] = (mtime, mode)
        elif member.isreg():
            self._ensure_dirs(path.rpartition("/")[0])
            self.put(path, archive.extractfile(member), member.size, mode, mtime, _member_xattrs(member))
        elif member.issym():
            self._ensure_dirs(path.rpartition("/")[0])
            self._replace_name(path)
            self.symlink(path, member.linkname, mtime)
        elif member.islnk():
            target = _member_path(member.linkname)
            if not target:
                raise InvalidName(f"{member.name}: a hard link to the archive's root")
            self._ensure_dirs(path.rpartition("/")[0])
            existing = f"{under}/{target}".strip("/")
            if existing != path:
                self._replace_name(path)
                linked = self.stat(existing)
                if linked.kind == "l":       # a hard link to a symbolic link: recorded as a link of its own
                    self.symlink(path, linked.target, linked.mtime_ns)
                else:
                    self.hardlink(path, existing)
        else:
            raise Forbidden(f"{member.name}: tinyfs archives regular files, directories and symbolic links only "
                            f"(a {_KIND_NAMES.get(member.type, 'special file')} was refused)", path=member.name)

    def _ensure_dirs(self, path: str, mode: int | None = None) -> None:
        """The directory `path` and its missing parents (made with DIR_MODE, as tar makes them); an entry
        in the way that is not a directory is replaced."""
        if not path:
            return
        with self.lock:
            staging = self._changing()
            cur = ROOT
            parts = path.split("/")
            for n, name in enumerate(parts):
                check_name(name)
                child = staging.lookup(cur, name)
                if child is not None and self._node(child).kind != "d":
                    self._remove(cur, name, child)
                    child = None
                if child is None:
                    staging.check_room(cur, name)
                    last = n == len(parts) - 1
                    child = staging.make(cur, name, "d", mode if last and mode is not None else DIR_MODE,
                                         self.uid, self.gid)
                cur = child

    def _replace_name(self, path: str) -> None:
        """What tar does before it makes a link: an entry at `path` (not a directory) is removed."""
        with self.lock:
            staging = self._changing()
            parent, name = self._parent(path)
            there = staging.lookup(parent, name)
            if there is None:
                return
            if self._node(there).kind == "d":
                raise IsADirectory(f"{path}: a directory is there", path=path)
            self._remove(parent, name, there)


_KIND_NAMES = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def _member_path(name: str) -> str:
    """A member's name as a path below where the tar is unpacked: './' and trailing '/' dropped; an
    absolute name or one with '..' refused (InvalidName), as `tar -x` without -P refuses them."""
    if name.startswith("/"):
        raise InvalidName(f"{name!r}: an absolute member name in the tar stream")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidName(f"{name!r}: a member name with '..' in the tar stream")
    return "/".join(parts)


def _member_mtime(member: tarfile.TarInfo) -> int:
    """A member's mtime in ns: exactly, from a PAX record's decimal (say 1700000000.123456789) when there is one."""
    text = member.pax_headers.get("mtime")
    if text:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


def _member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """user.* xattrs of a PAX member (GNU tar --xattrs, bsdtar: SCHILY.xattr.<name>). tarfile decodes
    PAX values as UTF-8 with surrogateescape: encoded back the same way, binary values survive."""
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith(PAX_XATTR + XATTR_PREFIX):
            out[key[len(PAX_XATTR):]] = value.encode("utf-8", "surrogateescape")
    return out


def _check_xattrs(xattrs: dict[str, bytes] | None) -> None:
    for key in xattrs or {}:
        if not key.startswith(XATTR_PREFIX) or len(key) <= len(XATTR_PREFIX):
            raise InvalidName(f"extended attribute {key!r}: an archive records user.* attributes only")


def _check_target(target: str) -> None:
    if not target or "\0" in target:
        raise InvalidName(f"invalid symbolic link target {target!r}")
    try:
        size = len(target.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName(f"symbolic link target is not valid UTF-8: {target!r}") from None
    if size > PATH_MAX:
        raise InvalidName(f"symbolic link target longer than {PATH_MAX} bytes")


def _copy_bytes(source: Path, dest: Path) -> None:
    """A staged blob's bytes into a new file (copy_file_range: a reflink or an in-kernel copy where it can)."""
    with open(source, "rb") as fin, open(dest, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no room to copy {size:,} bytes") from None
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            fin.seek(done)
            fout.seek(done)
            while chunk := fin.read(CHUNK):
                fout.write(chunk)


__all__ = ["Deposits", "Info", "PathTxn"]
