"""transactions/<rid>: one open transaction as a writable tree, and its open files.

The names, attributes and bytes live in the transaction's staging (core/staging.py) through `OpenTxn`
(txn.py); this tree answers the adapter's calls with them, SPEC 5's errno choices included. Background
work of the transaction (hashing written bytes) is counted in `jobs`, which a commit waits on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import trio

from ..core.ids import check_label
from ..core.limits import check_text
from ..core.staging import ROOT as SROOT
from .files import FileHandle, read_check
from .tree import LONG, SHORT, Attr, Listing, Node, Services, Tree, fail
from .txn import Opener, OpenFile, OpenTxn, kind_bits, setid_bits_to_clear
from .verify import Expected

log = logging.getLogger(__name__)

FEED_INLINE = 64 * 1024        # smaller buffers are hashed on the loop; larger ones in a worker thread
FEED_BATCH = 8                 # buffers a worker thread hashes per hand-off (writers waiting are woken then)
WRITE_IN_THREAD = 256 * 1024   # larger writes are done in a worker thread
MAX_PENDING = 32               # written buffers waiting for the hasher before writes wait
META = ("message", "creator", "label")
READ_ONLY_META = ("state", "error")
PREFIX = "user.tinyfs."


class Jobs:
    """Background jobs of a transaction (hashing); a commit waits until none runs."""

    def __init__(self):
        self.running = 0
        self._idle: trio.Event | None = None

    def start(self) -> None:
        self.running += 1

    def done(self) -> None:
        self.running -= 1
        if not self.running and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def idle(self) -> None:
        while self.running:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


class TxnTree(Tree):
    def __init__(self, services: Services, txn: OpenTxn):
        self.services = services
        self.txn = txn
        self.staging = txn.staging
        self.jobs = Jobs()
        self.copying: dict[int, trio.Event] = {}    # copy-on-write copies under way, by staged inode

    # -- nodes ----------------------------------------------------------------------------------------
    def node(self, sino: int) -> Node:
        return Node(self, ("txn", self.txn.rid, self.txn.token, sino), rid=self.txn.rid, sino=sino)

    def root(self) -> Node:
        return self.node(SROOT)

    def _open(self) -> OpenTxn:
        """The transaction, for a look: ENOENT once it was committed or rolled back."""
        if self.txn.closed:
            raise fail(errno.ENOENT)
        return self.txn

    def _live(self) -> OpenTxn:
        """The transaction, for a change: ENOENT once it ended, EBUSY while it commits."""
        txn = self._open()
        if txn.committing:
            raise fail(errno.EBUSY)
        return txn

    def _staged(self, sino: int):
        s = self._open().staging.node(sino)
        if s is None:
            raise fail(errno.ENOENT)
        return s

    # -- names and attributes -----------------------------------------------------------------------------
    def attrs(self, node: Node) -> Attr:
        s = self._staged(node.sino)
        if node.sino == SROOT:
            # the mode a client set (to be recorded as the resource root's), always usable by its owner:
            # `cp -a` of a 0555 source sets 0555, and that must not stop the owner's later mv or rm -rf
            return Attr(stat.S_IFDIR | s.mode | 0o700, 0, s.mtime_ns, s.ctime_ns, self.txn.uid, self.txn.gid,
                        self.staging.nlink(SROOT, "d"), s.atime_ns, SHORT, SHORT)
        return self._attr_of(s, self.staging.nlink(node.sino, s.kind))

    def _attr_of(self, s, nlink: int) -> Attr:
        return Attr(kind_bits(s) | s.mode, self.txn.size_of(s.id, s), s.mtime_ns, s.ctime_ns, s.uid, s.gid,
                    nlink, s.atime_ns, LONG, LONG)

    def lookup(self, parent: Node, name: str) -> Node:
        sino = self._open().staging.lookup(parent.sino, name)
        if sino is None:
            raise fail(errno.ENOENT)
        return self.node(sino)

    async def children(self, node: Node) -> Listing:
        # attributes made here, with the listing: a fresh transaction's tree is listed whole
        # (readdirplus), 10,000 entries for a 10,000-file base
        return [(name, self.node(s.id), self._attr_of(s, nlink))
                for name, s, nlink in self._open().staging.listing(node.sino)]

    def readlink(self, node: Node) -> str:
        s = self._staged(node.sino)
        if s.kind != "l":
            raise fail(errno.EINVAL)
        return s.target

    def read_only(self, node: Node) -> bool:
        return False

    def refusal(self, parent: Node) -> OSError:
        return fail(errno.EXDEV)      # (a name moved or linked in from another transaction)

    # -- extended attributes, and the transaction's metadata on its root --------------------------------
    def getxattr(self, node: Node, name: str) -> bytes | None:
        staging = self._open().staging
        if node.sino == SROOT and name.startswith(PREFIX):
            key = name[len(PREFIX):]
            if key in READ_ONLY_META or key in META:
                value = staging.get_meta(key)
                if value or key == "state":
                    return value.encode()
            return None
        return staging.get_xattr(node.sino, name)

    def listxattr(self, node: Node) -> list[str]:
        """Recorded xattrs, and the metadata set on the transaction; never state or error."""
        names = list(self.staging.xattrs(node.sino))
        if node.sino == SROOT:
            names += [f"{PREFIX}{k}" for k in META if self.staging.get_meta(k)]
        return names

    def setxattr(self, node: Node, name: str, value: bytes) -> None:
        txn = self._writable_xattr(name)
        if name.startswith(PREFIX):
            if node.sino == SROOT:
                self._set_meta(txn, name[len(PREFIX):], value)
            return  # copied from a view (cp -a): accepted and ignored
        txn.staging.set_xattr(node.sino, name, value)

    def _set_meta(self, txn: OpenTxn, key: str, value: bytes) -> None:
        if key in READ_ONLY_META:
            raise fail(errno.EPERM, f"{PREFIX}{key} is read-only")
        if key not in META:
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EILSEQ) from None
        if key in ("message", "creator"):
            check_text(key, text, PREFIX)     # E2BIG past its limit, as for a too-large xattr
        if key == "label" and text:
            check_label(text)
            if text in self.services.archive.labels(txn.rid):
                raise fail(errno.EEXIST, f"label {text!r} is already used")
        txn.staging.set_meta(key, text)

    def _writable_xattr(self, name: str) -> OpenTxn:
        if not name.startswith("user."):
            raise fail(errno.ENOTSUP)
        return self._live()

    def removexattr(self, node: Node, name: str) -> None:
        txn = self._writable_xattr(name)
        if node.sino == SROOT and name.startswith(PREFIX):
            key = name[len(PREFIX):]
            if key in READ_ONLY_META:
                raise fail(errno.EPERM, f"{PREFIX}{key} is read-only")
            if key in META:
                if not txn.staging.get_meta(key):
                    raise fail(errno.ENODATA)    # as for any attribute that is not set
                txn.staging.set_meta(key, "")
                return
        if not txn.staging.remove_xattr(node.sino, name):
            raise fail(errno.ENODATA)

    # -- names made, removed, moved -------------------------------------------------------------------
    async def make(self, parent: Node, name: str, kind: str, mode: int, ctx, target: str | None = None) -> Node:
        if kind not in ("d", "f", "l"):
            raise fail(errno.EPERM, "tinyfs archives regular files, directories and symbolic links only")
        if kind == "l":
            return self.node(self._make(parent, name, "l", 0o777, ctx, umask=0, target=target))
        return self.node(self._make(parent, name, kind, mode, ctx))

    def _make(self, parent: Node, name: str, kind: str, mode: int, ctx, umask: int | None = None, **kw) -> int:
        """A new entry, with the caller's umask applied to `mode`; EEXIST when the name is taken."""
        staging = self._live().staging
        if staging.lookup(parent.sino, name) is not None:
            raise fail(errno.EEXIST)
        staging.check_room(parent.sino, name)
        umask = ctx.umask if umask is None else umask
        return staging.make(parent.sino, name, kind, stat.S_IMODE(mode) & ~umask, ctx.uid, ctx.gid, **kw)

    async def remove(self, parent: Node, name: str, directory: bool) -> None:
        staging = self._live().staging
        sino = staging.lookup(parent.sino, name)
        if sino is None:
            raise fail(errno.ENOENT)
        is_dir = staging.node(sino).kind == "d"
        if directory and not is_dir:
            raise fail(errno.ENOTDIR)
        if is_dir and not directory:
            raise fail(errno.EISDIR)
        if is_dir and staging.has_children(sino):
            raise fail(errno.ENOTEMPTY)
        staging.unlink(parent.sino, name)
        self._drop_if_unused(sino)

    def _drop_if_unused(self, sino: int) -> None:
        if sino not in self.txn.files:
            self.staging.drop_if_orphan(sino)

    def link(self, node: Node, parent: Node, name: str) -> Node:
        if node.tree is not self:
            raise fail(errno.EROFS if node.tree.read_only(node) else errno.EXDEV)  # (a new name changes the inode)
        staging = self._live().staging
        if staging.node(node.sino).kind == "d":
            raise fail(errno.EPERM)
        if staging.lookup(parent.sino, name) is not None:
            raise fail(errno.EEXIST)
        staging.check_room(parent.sino, name)
        staging.link(node.sino, parent.sino, name)
        return node

    async def rename(self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int, ctx) -> None:
        if new_parent.tree is not self:
            if new_parent.tree.accepts_commits(new_parent):
                raise fail(errno.EPERM, "only a transaction can be moved into commit/")
            raise fail(errno.EROFS if new_parent.tree.read_only(new_parent) else errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise fail(errno.EINVAL)
        st = self._live().staging
        sino = st.lookup(old_parent.sino, old)
        if sino is None:
            raise fail(errno.ENOENT)
        target = st.lookup(new_parent.sino, new)
        if target == sino:
            return
        if target is not None:
            _check_replace(st, sino, target, flags)
        if st.node(sino).kind == "d" and st.is_ancestor(sino, new_parent.sino):
            raise fail(errno.EINVAL)
        st.check_room(new_parent.sino, new, moving=sino)
        replaced = st.rename(old_parent.sino, old, new_parent.sino, new)
        if replaced is not None:
            self._drop_if_unused(replaced)

    # -- attributes changed ------------------------------------------------------------------------------
    async def setattr(self, node: Node, attr, fields) -> None:
        if node.sino == SROOT:
            return self._set_root_attrs(attr, fields)
        txn = self._live()
        s = self._staged(node.sino)
        changes = {}
        if fields.update_size:
            if s.kind == "d":
                raise fail(errno.EISDIR)
            await self.ensure_blob(node.sino, keep_bytes=attr.st_size > 0)
            txn.truncate(node.sino, attr.st_size)
        for name, field in (("mode", "update_mode"), ("uid", "update_uid"), ("gid", "update_gid"),
                            ("mtime_ns", "update_mtime"), ("atime_ns", "update_atime")):
            if getattr(fields, field):
                changes[name] = _attr_value(attr, name)
        changes["ctime_ns"] = time.time_ns()
        txn.staging.update(node.sino, **changes)

    def _set_root_attrs(self, attr, fields) -> None:
        """chmod, chown and utimens of the transaction directory succeed (cp -a, rsync -a and tar -x set
        them); its mode and times are kept as the resource root's, its owner stays the transaction's."""
        if fields.update_size:
            raise fail(errno.EISDIR)
        changes = {name: _attr_value(attr, name) for name, field in
                   (("mode", "update_mode"), ("mtime_ns", "update_mtime"), ("atime_ns", "update_atime"))
                   if getattr(fields, field)}
        if changes:
            changes["ctime_ns"] = time.time_ns()
            self._live().staging.update(SROOT, **changes)

    # -- files --------------------------------------------------------------------------------------------
    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        txn = self._live() if write else self._open()
        s = self._staged(node.sino)
        if s.kind != "f":
            raise fail(errno.EISDIR)
        truncate = write and bool(flags & os.O_TRUNC)
        if truncate:
            await self.ensure_blob(node.sino, keep_bytes=False)
        of = txn.open(node.sino, write, truncate=truncate)
        opener = _opener(ctx, s.mode) if write else None
        if truncate:
            self._truncated_by_open(node.sino, opener)
        return StagedFile(self, node, of, write, flags, opener)

    async def create(self, parent: Node, name: str, mode: int, flags: int, ctx) -> tuple[Node, FileHandle]:
        sino = self._make(parent, name, "f", mode, ctx, create_blob=False)  # txn.open creates it (one open, not two)
        node = self.node(sino)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        of = self.txn.open(sino, write, truncate=False)   # (an empty file opened for writing: hashed as it arrives)
        opener = _opener(ctx, mode) if (flags & os.O_ACCMODE) == os.O_WRONLY else None
        return node, StagedFile(self, node, of, write, flags, opener)

    def _truncated_by_open(self, sino: int, opener: Opener) -> None:
        """What the kernel does for open(O_TRUNC) on a local disk, and leaves to a FUSE daemon that takes
        O_TRUNC at open (atomic_o_trunc): mtime and ctime updated (even for an empty file), set-id bits
        cleared for an opener without CAP_FSETID."""
        s = self.staging.node(sino)
        now = time.time_ns()
        fields = {"mtime_ns": now, "ctime_ns": now}
        clear = setid_bits_to_clear(s.mode, s.gid, opener)
        if clear:
            fields["mode"] = s.mode & ~clear
        self.staging.update(sino, **fields)

    async def ensure_blob(self, sino: int, keep_bytes: bool) -> None:
        """Copy-on-write of a base file on its first write or truncate (the copy in a worker thread;
        a second writer meanwhile waits for the same copy)."""
        while sino in self.copying:
            await self.copying[sino].wait()
        if not self.txn.needs_blob(sino):
            return
        done = self.copying[sino] = trio.Event()
        try:
            if keep_bytes:
                await trio.to_thread.run_sync(self.txn.copy_base_bytes, sino)
            self.txn.adopt_blob(sino, kept_bytes=keep_bytes)
        finally:
            del self.copying[sino]
            done.set()

    def background(self, job, *args) -> None:
        """Run `job(*args)` after the reply being made, counted in `jobs`."""
        self.jobs.start()
        self.services.nursery.start_soon(self._counted, job, args)

    async def _counted(self, job, args) -> None:
        try:
            await job(*args)
        finally:
            self.jobs.done()

    async def sync(self) -> None:
        await trio.to_thread.run_sync(self.staging.sync)

    def forgotten(self, node: Node) -> None:
        txn = self.txn
        if not txn.closed and not txn.files.get(node.sino):
            try:
                txn.staging.drop_if_orphan(node.sino)
            except Exception:
                log.exception("dropping orphan %s", node.sino)


RENAME_EXCHANGE = 2     # linux/fs.h (renameat2 flags)
RENAME_NOREPLACE = 1


def _check_replace(st, sino: int, target: int, flags: int) -> None:
    """Whether a rename may replace `target` with `sino`, by rename(2)'s rules."""
    if flags & RENAME_NOREPLACE:
        raise fail(errno.EEXIST)
    src_dir, dst_dir = st.node(sino).kind == "d", st.node(target).kind == "d"
    if src_dir and not dst_dir:
        raise fail(errno.ENOTDIR)
    if dst_dir and not src_dir:
        raise fail(errno.EISDIR)
    if dst_dir and st.has_children(target):
        raise fail(errno.ENOTEMPTY)


def _attr_value(attr, name: str) -> int:
    return stat.S_IMODE(attr.st_mode) if name == "mode" else getattr(attr, f"st_{name}")


def _expected_of_base(txn: OpenTxn, sino: int) -> Expected:
    """What a base file read in place must be: its digest in the base instance."""
    s = txn.staging.node(sino)
    # (from the base's stored map the transaction keeps, whatever the document cache drops)
    stored = txn.base_stored(s)
    return Expected(txn.rid, txn.base, txn.staging.tree.path.get(sino, stored), stored,
                    txn.archive.config.digests[0], s.base, s.size)


def _opener(ctx, mode: int) -> Opener:
    """Who opens a file for writing; their credentials are read now if the file has set-id bits (while
    ctx.pid is surely the opener), else only if it gains some before a write (txn.Opener)."""
    opener = Opener(ctx.uid, ctx.gid, ctx.pid)
    if mode & (stat.S_ISUID | stat.S_ISGID):
        opener.read_credentials()
    return opener


class StagedFile(FileHandle):
    """An open file of a transaction: its staged bytes, or until its first write the base file's (read in
    place, verified as stored files are). Written bytes are hashed as they arrive when they come in
    order (`OpenFile.hasher`, fed in a worker thread for large buffers), else after the last close.

    Write-only handles use direct I/O: every write reaches the daemon, which then clears set-id bits as
    the kernel would (pyfuse3 does not pass the kernel's flag for it)."""

    keep_cache = True

    def __init__(self, tree: TxnTree, node: Node, of: OpenFile, write: bool, flags: int, opener: Opener | None):
        self.tree, self.txn, self.node, self.of, self.writes = tree, tree.txn, node, of, write
        self.direct_io = (flags & os.O_ACCMODE) == os.O_WRONLY
        self.opener = opener if self.direct_io else None
        self.check = None          # the verification of base bytes read in place, made at the first read

    async def read(self, off: int, size: int) -> bytes:
        of = self.of
        data = os.pread(of.fd, size, off)
        if of.on_blob:        # staged bytes: nothing recorded to check them against
            if self.check:
                self.check.abandon()
            return data
        if self.check is None:
            self.check = read_check(_expected_of_base(self.txn, self.node.sino), of.fd) or False
        if self.check is False:
            return data
        return await self.tree.services.verifier.verified(self.check, self.node.ino, of.fd, off, size, data)

    async def write(self, off: int, buf: bytes) -> int:
        tree, txn, of = self.tree, self.txn, self.of
        if not of.on_blob:
            await tree.ensure_blob(of.sino, keep_bytes=True)
        if self.opener is not None:
            self._clear_setid_bits()
        if txn.note_write(of, off, len(buf)):
            self._feed(buf)
        try:
            if len(buf) >= WRITE_IN_THREAD:   # big writes land in a worker: the loop keeps taking requests
                n = await trio.to_thread.run_sync(txn.pwrite, of, off, buf, limiter=tree.services.write_limiter)
            else:
                n = txn.pwrite(of, off, buf)
        except OSError:
            txn.mark_incomplete(of)
            raise
        if not tree.services.writeback:   # else the kernel keeps mtime and sends it with setattr
            now = time.time_ns()
            txn.staging.update(of.sino, mtime_ns=now, ctime_ns=now)
        while len(of.pending) > MAX_PENDING and of.draining:
            await self._progress()
        return n

    def _feed(self, buf: bytes) -> None:
        """Hand written bytes to the file's running hash, in order."""
        of = self.of
        if not of.draining and not of.pending and len(buf) < FEED_INLINE:
            of.hasher.update(buf)
            return
        of.pending.append((of.hasher, buf))   # for this hasher: a truncate to 0 starts another
        if not of.draining:
            of.draining = True
            self.tree.background(self._drain)

    async def _drain(self) -> None:
        """Feed written buffers to the file's hasher in order, in a worker thread, a batch per hand-off."""
        of = self.of
        try:
            while of.pending:
                await trio.to_thread.run_sync(_feed_hasher, of)
                _wake(of)
        finally:
            of.draining = False
            _wake(of)

    async def _progress(self) -> None:
        if self.of.progress is None:
            self.of.progress = trio.Event()
        await self.of.progress.wait()

    def _clear_setid_bits(self) -> None:
        """Before a direct I/O write: what the kernel does before any other (file_remove_privs)."""
        staging, sino = self.txn.staging, self.of.sino
        s = staging.node(sino)
        clear = setid_bits_to_clear(s.mode, s.gid, self.opener)
        if clear:
            staging.update(sino, mode=s.mode & ~clear, ctime_ns=time.time_ns())

    async def fsync(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.of.fd)
        self.txn.staging.update(self.of.sino, size=self.of.size)
        await self.tree.sync()

    def release(self) -> None:
        """(on the loop, before any await: a commit sent right after close() must not see the file open)"""
        if self.check:
            self.check.abandon()
        if self.txn.closed:
            return
        if self.txn.release(self.of, self.writes):
            self.tree.background(self._digest_after_close)

    async def _digest_after_close(self) -> None:
        txn, of = self.txn, self.of
        try:
            while of.draining:
                await self._progress()
            if txn.closed:
                return
            job = txn.digest_job(of)
            if job is not None:
                sino, stamp, digests = await trio.to_thread.run_sync(job)
                if not txn.closed:
                    txn.digest_done(sino, stamp, digests)
        except FileNotFoundError:
            pass  # deleted meanwhile
        except Exception:
            log.exception("hashing a staged file of %s", txn.rid)


def _wake(of: OpenFile) -> None:
    if of.progress is not None:
        of.progress.set()
        of.progress = None


def _feed_hasher(of: OpenFile) -> None:
    """(worker thread) Hash up to FEED_BATCH queued buffers; the loop appends meanwhile (deque appends
    and pops are thread-safe). Each buffer goes to the hasher it was queued for: after a truncate to 0 the
    file has a new one, and bytes written before it must not reach it. A hasher the loop has dropped (a
    write broke the order) is fed in vain, and nobody reads it."""
    for _ in range(FEED_BATCH):
        if not of.pending:
            return
        hasher, buf = of.pending[0]
        hasher.update(buf)
        of.pending.popleft()
