"""The interface every subtree of the mount answers, and what its nodes are.

The adapter (ops.py) speaks the FUSE protocol and keeps the inode and handle tables; everything a
request means is asked of the tree the node belongs to (`node.tree`), through the calls of `Tree`:
names (lookup, children, readlink), attributes and extended attributes, opening a file, and for a
writable tree making, removing, renaming and linking names and changing attributes. The trees:

- `RootTree` (root.py): the root, resources/, instances/, aip/, events.jsonl, and transactions/ and
  commit/, whose mkdir, rmdir and rename open, roll back and commit transactions;
- the read-only views (view.py): `StateTree` (resources/<rid>, instances/<rid>/<iid>),
  `InstancesTree` (instances/<rid>: instances and label links); `AipTree` (aip.py: aip/<rid>);
- `TxnTree` (txntree.py): one open transaction, transactions/<rid>.

A new tree is one class: subclass `Tree`, override what it answers, and hand out its nodes from the
lookup or children of the tree above it. No pyfuse3 here: trees are driven without a kernel in tests;
`Services.kernel` is how they ask the kernel to forget what it cached.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..core.errors import TinyfsError
from ..core.ids import decode_name

if TYPE_CHECKING:
    from ..core.layout import ArchiveRoot
    from .files import FileHandle

BLKSIZE = 1 << 20          # coreutils sizes its buffers from st_blksize: 1 MiB writes, fewer requests
LONG = 3600.0              # committed trees never change
SHORT = 1.0                # names that move on commit: resources/<rid>, listings


# What trees raise besides OSError: the core's typed errors, each with the errno it is answered with.
TreeError = TinyfsError


def decode(raw: bytes) -> str:
    """A name the kernel sent, as the archive records names (UTF-8): TreeError (EILSEQ) if it is not."""
    return decode_name(raw)


def fail(code: int, message: str = "") -> OSError:
    """The error a request is answered with (the adapter maps OSError to its errno)."""
    return OSError(code, message or os.strerror(code))


@dataclass(slots=True)
class Attr:
    """A node's attributes, as the adapter hands them to the kernel."""

    mode: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    atime_ns: int | None = None   # None: show the mtime
    entry_timeout: float = LONG
    attr_timeout: float = LONG


class Head:
    """The instance that resources/<rid> shows, shared by every node of that tree (compared by identity)."""

    __slots__ = ("iid",)

    def __init__(self, iid: str):
        self.iid = iid


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the mount. `key` identifies what it shows (equal keys, one inode); the rest is for its
    tree to read."""

    tree: Tree
    key: tuple
    rid: str | None = None
    iid: str | None = None
    path: str = ""                  # logical path (state), relative path (aip), or a top-level name
    entry: object = None            # FileEntry | DirEntry | LinkEntry of a state node
    sino: int = 0                   # staged inode of a transaction's node
    head: Head | None = None        # state nodes of resources/<rid>: the head they show (iid is then None)
    ino: int = 0
    held: object = None             # the held.HeldTree it is counted in, once registered (read-only trees)


Listing = list[tuple[str, Node, Attr | None]]


class Services:
    """What the trees share with the adapter: the archive, the kernel (to invalidate what it caches), the
    inode table (to move nodes after a commit), a nursery for work that runs after a reply, and the
    shutdown flag."""

    def __init__(self, archive: ArchiveRoot, kernel, inodes, writeback: bool = False):
        self.archive = archive
        self.kernel = kernel
        self.inodes = inodes
        self.uid, self.gid = os.getuid(), os.getgid()        # the owner of everything but transactions
        self.root_mtime = os.stat(archive.root).st_mtime_ns
        self.writeback = writeback       # the kernel's writeback cache: it keeps the mtime of writes
        self.top: dict[str, int] = {}    # inode of each top-level name (root.py)
        self.nursery: trio.Nursery | None = None
        self.write_limiter = trio.CapacityLimiter(4)     # worker threads writing big buffers at once
        self.verifier = None             # files.Verifier
        self.closing = False             # the mount is shutting down: no new transaction or commit


class Tree:
    """A subtree of the mount: read-only unless a subclass says otherwise. Methods that may block or wait
    are async; the others run on the loop and must stay quick."""

    permanent = False      # its nodes live as long as the mount (the kernel's forget is ignored)

    # -- names and attributes --------------------------------------------------------------------------
    def attrs(self, node: Node) -> Attr:
        raise fail(errno.EIO, "no attributes")

    def lookup(self, parent: Node, name: str) -> Node:
        raise fail(errno.ENOENT)

    def lookup_asks_store(self, parent: Node) -> bool:
        """Does a lookup under `parent` ask an object store (a request over the network, seconds when it is
        slow)? Then it runs in a worker thread, so that the loop serves other requests meanwhile. Such
        lookups touch only what is thread-safe: the archive's documents and heads, under their locks."""
        return False

    async def children(self, node: Node) -> Listing:
        """(name, node, attributes or None) of a directory, in the order readdir gives them."""
        raise fail(errno.ENOTDIR)

    def readlink(self, node: Node) -> str:
        raise fail(errno.EINVAL)

    def getxattr(self, node: Node, name: str) -> bytes | None:
        return None

    def getxattr_blocks(self, name: str) -> bool:
        """Does reading xattr `name` read a file (not only documents in memory)? Then it runs in a worker
        thread, as lookup_asks_store's lookups do."""
        return False

    def listxattr(self, node: Node) -> list[str]:
        return []

    def read_only(self, node: Node) -> bool:
        """Whether changes under `node` are refused as on a read-only mount (EROFS, not EXDEV)."""
        return True

    def refusal(self, parent: Node) -> OSError:
        """The error for a name made in `parent` (or moved, linked into it) that this tree does not take."""
        return fail(errno.EROFS)

    def accepts_commits(self, parent: Node) -> bool:
        """Whether `parent` is commit/ (a transaction moved into it commits; nothing else may go there)."""
        return False

    # -- contents ------------------------------------------------------------------------------------
    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        raise fail(errno.EISDIR)

    # -- changes (writable trees) ---------------------------------------------------------------------
    async def make(self, parent: Node, name: str, kind: str, mode: int, ctx, target: str | None = None) -> Node:
        """mkdir ("d"), mknod of a regular file ("f"), symlink ("l", to `target`)."""
        raise self.refusal(parent)

    async def create(self, parent: Node, name: str, mode: int, flags: int, ctx) -> tuple[Node, FileHandle]:
        raise self.refusal(parent)

    async def remove(self, parent: Node, name: str, directory: bool) -> None:
        raise self.refusal(parent)

    async def rename(self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int, ctx) -> None:
        if new_parent.tree.accepts_commits(new_parent):
            raise fail(errno.EPERM, "only a transaction can be moved into commit/")
        raise fail(errno.EROFS)

    def link(self, node: Node, parent: Node, name: str) -> Node:
        raise self.refusal(parent)

    async def setattr(self, node: Node, attr, fields) -> None:
        raise fail(errno.EROFS)

    def setxattr(self, node: Node, name: str, value: bytes) -> None:
        raise fail(errno.EROFS)

    def removexattr(self, node: Node, name: str) -> None:
        raise fail(errno.EROFS)

    # -- the kernel let go of a node -----------------------------------------------------------------
    def forgotten(self, node: Node) -> None:
        """The node left the inode table."""

    # -- read-only trees the kernel holds (held.py) ----------------------------------------------------
    def held_key(self, node: Node) -> tuple | None:
        """The tree, among those the kernel may be asked to let go of, that `node` is counted in."""
        return None

    def held_root(self, key: tuple) -> tuple[int, str] | None:
        """(parent inode, name) whose invalidation makes the kernel let go of the held tree `key`."""
        return None


def not_found(name: str) -> OSError:
    return fail(errno.ENOENT, f"{name}: no such entry")
