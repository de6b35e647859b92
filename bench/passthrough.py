"""A minimal pyfuse3 passthrough file system: the ceiling tinyfs is measured against.

    python bench/passthrough.py SOURCE MOUNTPOINT      # foreground; stop with `fusermount3 -u MOUNTPOINT`

It mirrors the directory SOURCE with every knob that PERF-NOTES found to matter
for pyfuse3: 60 s entry/attribute timeouts, `keep_cache` on every open file,
the writeback cache, reads and writes done inline with `os.pread`/`os.pwrite`
(no thread per request), `st_blksize` of 1 MiB (so `cp` writes 1 MiB at a time),
and real `fsync`, `fsyncdir`, `flush` and `statfs` handlers (pyfuse3's defaults
answer ENOSYS, after which the kernel silently skips fsync).

Inodes are the source's inode numbers, and each maps to the last path it was
seen under: good enough for cp, rsync, tar, find and ls (a hard-linked inode
shows the attributes of whichever of its names was looked up last), not a
general-purpose file system. It is a benchmark helper, written for this project.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 60.0
BLKSIZE = 1 << 20
log = logging.getLogger("passthrough")


def handler(fn):
    """OSError -> its errno; anything else -> EIO (an exception must never reach pyfuse3.main)."""

    @functools.wraps(fn)
    async def wrapper(*args):
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str):
        super().__init__()
        self.source = os.fsencode(os.path.abspath(source))
        self.root_ino = os.lstat(self.source).st_ino
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: self.source}
        self.lookups: dict[int, int] = {}
        self.listings: dict[int, list] = {}
        self.next_dh = 1

    # -- inodes and attributes ------------------------------------------------
    def _path(self, ino: int) -> bytes:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _attrs(self, path: bytes, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        st = st or os.lstat(path)
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino
        for field in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(e, field, getattr(st, field))
        e.st_blocks = st.st_blocks
        e.st_blksize = BLKSIZE
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def _remember(self, path: bytes) -> pyfuse3.EntryAttributes:
        """A reply that makes the kernel count one more lookup of this inode."""
        e = self._attrs(path)
        self.paths[e.st_ino] = path
        self.lookups[e.st_ino] = self.lookups.get(e.st_ino, 0) + 1
        return e

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self.paths.pop(ino, None)

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        return self._remember(self._child(parent_inode, name))

    @handler
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._path(inode))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            os.truncate(fh if fh is not None else path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(
                path,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
                follow_symlinks=False,
            )
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(path)

    @handler
    async def readlink(self, inode, ctx):
        return os.readlink(self._path(inode))

    # -- directories ------------------------------------------------------------
    @handler
    async def opendir(self, inode, ctx):
        path = self._path(inode)
        with os.scandir(path) as it:
            listing = [(entry.name, entry.stat(follow_symlinks=False)) for entry in it]
        dh, self.next_dh = self.next_dh, self.next_dh + 1
        self.listings[dh] = (path, listing)
        return dh

    @handler
    async def readdir(self, fh, start_id, token):
        path, listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, st = listing[i]
            child = os.path.join(path, name)
            attrs = self._attrs(child, st)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return
            self.paths[attrs.st_ino] = child  # readdirplus counts as a lookup
            self.lookups[attrs.st_ino] = self.lookups.get(attrs.st_ino, 0) + 1

    @handler
    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        fd = os.open(self.listings[fh][0], os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        self._own(path, ctx)
        return self._remember(path)

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(self._child(parent_inode, name))

    @handler
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(self._child(parent_inode, name))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._own(path, ctx)
        return self._remember(path)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._remember(path)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and os.path.lexists(new):
            raise pyfuse3.FUSEError(errno.EEXIST)
        moved = os.lstat(old)
        os.rename(old, new)
        if stat.S_ISDIR(moved.st_mode):  # every known path below moves with it
            prefix = old + b"/"
            for ino, p in list(self.paths.items()):
                if p.startswith(prefix):
                    self.paths[ino] = new + p[len(old) :]
        if moved.st_ino in self.paths:
            self.paths[moved.st_ino] = new

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        self._own(path, ctx)
        return self._remember(path)

    def _own(self, path: bytes, ctx) -> None:
        if (ctx.uid, ctx.gid) != (os.getuid(), os.getgid()):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- files ------------------------------------------------------------------
    @staticmethod
    def _flags(flags: int) -> int:
        """The writeback cache may read from files opened write-only, and appends itself."""
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    @handler
    async def open(self, inode, flags, ctx):
        fd = os.open(self._path(inode), self._flags(flags) & ~(os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, self._flags(flags) | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode) & ~ctx.umask)
        self._own(path, ctx)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._remember(path)

    @handler
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @handler
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    @handler
    async def flush(self, fh):
        return None

    @handler
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    @handler
    async def release(self, fh):
        os.close(fh)

    # -- extended attributes and the file system ---------------------------------
    @handler
    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @handler
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @handler
    async def removexattr(self, inode, name, ctx):
        os.removexattr(self._path(inode), name, follow_symlinks=False)

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for field in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, field, getattr(st, field))
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: passthrough.py SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0)  # modes come from the request (minus its umask)
    ops = Passthrough(argv[0])
    pyfuse3.init(ops, argv[1], set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"})

    async def serve():
        async with trio.open_nursery() as nursery:

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
