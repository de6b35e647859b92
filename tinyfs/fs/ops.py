"""The pyfuse3 Operations adapter: the FUSE protocol over the mount's trees (tree.py).

It keeps the inode table (inodes.py) and the handle table, decodes names, turns `Attr` into
EntryAttributes and errors into errno, and asks every request's meaning of the tree its node belongs to.

Rules of FUSE and pyfuse3 it keeps:
- every handler is wrapped: an unexpected exception answers EIO and is logged, it never reaches
  pyfuse3.main (which would take the mount down);
- release hands the file back before its first await (else a commit sent right after close() sees the
  file as open);
- fsync, fsyncdir, flush and statfs are implemented (their defaults lie).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3

import pyfuse3
import trio

from .files import FileHandle, Verifier
from .inodes import Inodes
from .kernel import Kernel
from .root import TOP, RootTree
from .tree import BLKSIZE, Attr, Listing, Node, Services, TreeError, decode, fail

log = logging.getLogger(__name__)

# Memory for caches (`-o cache_mib=`): half for parsed instance documents (core/layout.py), half for the
# nodes of read-only trees the kernel holds (held.py), at NODE_BYTES each: a node with its key, its path,
# its entry and its places in the inode maps, measured with tracemalloc over 10,000 lookups of an
# instance's files: 240 bytes a node while the instance's document is cached, 709 once it has left.
CACHE_BYTES = 64 << 20
NODE_BYTES = 700


def entry_attributes(a: Attr, ino: int) -> pyfuse3.EntryAttributes:
    """No atime: the mtime; no ctime: the mtime."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode, e.st_size, e.st_nlink = a.mode, a.size, a.nlink
    e.st_uid, e.st_gid = a.uid, a.gid
    e.st_mtime_ns = a.mtime_ns
    e.st_atime_ns = a.mtime_ns if a.atime_ns is None else a.atime_ns
    e.st_ctime_ns = a.ctime_ns or a.mtime_ns
    e.st_blksize = BLKSIZE
    e.st_blocks = (a.size + 511) // 512
    e.entry_timeout, e.attr_timeout = a.entry_timeout, a.attr_timeout
    return e


def handler(fn):
    """Map errors to errno by type; anything unexpected becomes EIO and a log line, never a dead mount."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except TreeError as e:      # the client's business (a name not there, taken, too long...)
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            if e.errno is None:
                log.exception("%s failed", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise pyfuse3.FUSEError(e.errno) from None
        except trio.Cancelled:
            raise
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:   # a transaction's database: disk full
                log.warning("%s: %s", fn.__name__, e)
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def name_of(raw) -> str:
    """A name the kernel sent, to make: EILSEQ if it is not UTF-8 (tinyfs records names as text)."""
    return decode(bytes(raw))


class DirHandle:
    """An open directory. Its listing is taken by the first readdir, not by opendir: the kernel does not
    hold a directory's lock for opendir, only for readdir (as for the rename, mkdir or rmdir in it). A
    listing of transactions/ taken at opendir while a commit's rename held the directory was read only
    after the rename had returned, and showed the directory as it was before: with the committed
    transaction in it, whose attributes then failed with ENOENT, which glibc's readdir takes for the end of
    an empty directory (`ls` printed nothing, every other open transaction hidden). Taken at readdir, a
    listing of transactions/ follows every rename, mkdir and rmdir that returned before it, and one of
    resources/ every commit that returned before it."""

    __slots__ = ("node", "listing")

    def __init__(self, node: Node):
        self.node = node
        self.listing: Listing | None = None


class Operations(pyfuse3.Operations):
    def __init__(self, archive, writeback: bool = False, cache_bytes: int = CACHE_BYTES):
        super().__init__()
        # Off by default: with the kernel's writeback cache a write() returns before the daemon has the
        # bytes, so a killed daemon would lose writes that had returned (SPEC 5). `-o writeback` trades
        # that for speed; its write errors surface at close() and are caught by the incomplete mark.
        self.enable_writeback_cache = writeback
        self.archive = archive
        archive.doc_cache_bytes = cache_bytes // 2
        self.inodes = Inodes(Kernel, node_limit=(cache_bytes - cache_bytes // 2) // NODE_BYTES)
        self.services = Services(archive, Kernel, self.inodes, writeback=writeback)
        self.services.verifier = Verifier(self.services)
        self.root = RootTree(self.services)
        self.inodes.register(self.root.root, pyfuse3.ROOT_INODE)
        self.top = self.services.top            # inode of each top-level name
        for name in TOP:
            self.top[name] = self.inodes.register(self.root.top[name]).ino
        self.handles: dict[int, FileHandle | DirHandle] = {}
        self.next_fh = 1

    @property
    def nursery(self) -> trio.Nursery | None:
        return self.services.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery) -> None:
        """Where work that runs after a reply goes (mount.py sets it)."""
        self.services.nursery = nursery

    def close(self) -> None:
        """Refuse new transactions and commits (a shutdown)."""
        self.services.closing = True

    async def commits_done(self) -> None:
        await self.root.commits.idle()

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Register, count one lookup, return attributes (lookup, mkdir, create, ...)."""
        node = self.inodes.counted(node)
        return entry_attributes(node.tree.attrs(node), node.ino)

    def _handle(self, handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    # -- names ------------------------------------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.node(parent_inode)
        raw = bytes(name)
        if raw == b".":
            return self._entry(parent)
        if len(raw) > 255:
            raise fail(errno.ENAMETOOLONG)   # FUSE does not enforce NAME_MAX for us
        try:
            name = decode(raw)
        except TreeError:
            raise fail(errno.ENOENT) from None   # such a name cannot exist here; creating it is EILSEQ
        tree = parent.tree
        if tree.lookup_asks_store(parent):
            return self._entry(await trio.to_thread.run_sync(tree.lookup, parent, name))
        return self._entry(tree.lookup(parent, name))

    async def forget(self, inode_list):
        self.inodes.forget(inode_list)

    @handler
    async def getattr(self, inode, ctx=None):
        node = self.inodes.node(inode)
        return entry_attributes(node.tree.attrs(node), inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.inodes.node(inode)
        await node.tree.setattr(node, attr, fields)
        return entry_attributes(node.tree.attrs(node), inode)

    @handler
    async def readlink(self, inode, ctx):
        node = self.inodes.node(inode)
        return os.fsencode(node.tree.readlink(node))

    # -- directories --------------------------------------------------------------------------------------
    @handler
    async def opendir(self, inode, ctx):
        node = self.inodes.node(inode)
        node.tree.attrs(node)           # ENOENT for a transaction that has ended
        return self._handle(DirHandle(node))

    @handler
    async def readdir(self, fh, start_id, token):
        h = self.handles[fh]
        if start_id == 0 or h.listing is None:     # (again after a rewinddir: it shows what is there now)
            h.listing = await h.node.tree.children(h.node)
        inodes = self.inodes
        for i in range(start_id, len(h.listing)):
            name, node, attrs = h.listing[i]
            new = node.key not in inodes.by_key
            node = inodes.register(node)
            try:
                attrs = attrs or node.tree.attrs(node)
            except OSError:
                if new:
                    inodes.not_given(node)
                continue    # gone since offset 0 was listed (a transaction committed between two readdirs)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry_attributes(attrs, node.ino), i + 1):
                if new:
                    inodes.not_given(node)
                return
            inodes.lookups[node.ino] = inodes.lookups.get(node.ino, 0) + 1

    @handler
    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        for tree in self.root.open_transactions():
            await tree.sync()

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self.inodes.node(parent_inode)
        return self._entry(await parent.tree.make(parent, name_of(name), "d", mode, ctx))

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        # A regular file made by mknod(2): GNU tar --xattrs creates files this way (then sets their
        # xattrs, then opens them), and so does the kernel for a create when the daemon has no create.
        parent = self.inodes.node(parent_inode)
        kind = "f" if (mode & 0o170000) == 0o100000 else "special"
        return self._entry(await parent.tree.make(parent, name_of(name), kind, mode, ctx))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self.inodes.node(parent_inode)
        name = name_of(name)
        if parent.tree.read_only(parent):
            raise parent.tree.refusal(parent)
        try:
            target = bytes(target).decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EILSEQ) from None
        return self._entry(await parent.tree.make(parent, name, "l", 0o777, ctx, target=target))

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        parent = self.inodes.node(parent_inode)
        await parent.tree.remove(parent, name_of(name), directory=True)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        parent = self.inodes.node(parent_inode)
        await parent.tree.remove(parent, name_of(name), directory=False)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, parent = self.inodes.node(inode), self.inodes.node(new_parent_inode)
        return self._entry(parent.tree.link(node, parent, name_of(new_name)))

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_parent, new_parent = self.inodes.node(parent_inode_old), self.inodes.node(parent_inode_new)
        await old_parent.tree.rename(old_parent, name_of(name_old), new_parent, name_of(name_new), flags, ctx)

    # -- files ----------------------------------------------------------------------------------------------
    def _file_info(self, handle: FileHandle) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo(fh=self._handle(handle))
        info.keep_cache, info.direct_io = handle.keep_cache, handle.direct_io
        return info

    @handler
    async def open(self, inode, flags, ctx):
        node = self.inodes.node(inode)
        return self._file_info(await node.tree.open(node, flags, ctx))

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self.inodes.node(parent_inode)
        node, handle = await parent.tree.create(parent, name_of(name), mode, flags, ctx)
        return self._file_info(handle), self._entry(node)

    @handler
    async def read(self, fh, off, size):
        return await self.handles[fh].read(off, size)

    @handler
    async def write(self, fh, off, buf):
        return await self.handles[fh].write(off, buf)

    @handler
    async def flush(self, fh):
        # ENOSYS tells the kernel to stop sending FLUSH on every close(): one round trip less per file.
        # Safe: the kernel still writes dirty pages back and reports their errors at close() without
        # asking us (fuse_flush), and there is nothing for tinyfs to do at flush.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh, datasync):
        await self.handles[fh].fsync()

    @handler
    async def release(self, fh):
        self.handles.pop(fh).release()

    # -- extended attributes ----------------------------------------------------------------------------------
    @handler
    async def getxattr(self, inode, name, ctx):
        name = bytes(name).decode("utf-8", "surrogateescape")
        if not name.startswith("user."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)   # security.capability on every write: answer fast
        node = self.inodes.node(inode)
        if node.tree.getxattr_blocks(name):
            value = await trio.to_thread.run_sync(node.tree.getxattr, node, name)
        else:
            value = node.tree.getxattr(node, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode, ctx):
        node = self.inodes.node(inode)
        return [n.encode("utf-8", "surrogateescape") for n in node.tree.listxattr(node)]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        node = self.inodes.node(inode)
        node.tree.setxattr(node, bytes(name).decode("utf-8", "surrogateescape"), bytes(value))

    @handler
    async def removexattr(self, inode, name, ctx):
        node = self.inodes.node(inode)
        node.tree.removexattr(node, bytes(name).decode("utf-8", "surrogateescape"))

    # -- the file system ------------------------------------------------------------------------------------------
    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.services.archive.root)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    @handler
    async def access(self, inode, mode, ctx):
        return True
