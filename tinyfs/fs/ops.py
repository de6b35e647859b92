"""The pyfuse3 Operations adapter: translates kernel requests into view and transaction calls.

Rules learnt the hard way (../shared/GUIDE.md, FUSE section):
- every handler is wrapped: an unexpected exception answers EIO and is logged,
  it never reaches pyfuse3.main (which would take the mount down);
- release drops the writer count before its first await (else a commit sent
  right after close() sees the file as open);
- commit invalidates resources/<rid> from a worker thread *before* replying,
  and queues the invalidation of the moved dentry commit/<rid>;
- fsync, fsyncdir, flush and statfs are implemented (their defaults lie).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import stat

import pyfuse3
import trio

from ..core.commit import commit, state_changes
from ..core.errors import Incomplete, LabelTaken, NameTooLong, NotFound, Stale, TinyfsError
from ..core.ids import check_label, decode_name, is_rid
from ..core.layout import ArchiveRoot
from ..core.limits import EVENT_TEXT_MAX, check_text
from ..core.model import DirEntry, FileEntry
from ..core.staging import ROOT as SROOT
from ..core.staging import Staging, refresh_sizes
from .trees import Trees
from .txn import Opener, OpenFile, OpenTxn, fail, kind_bits, setid_bits_to_clear
from .verify import RUNNING, Damage, Expected, ReadCheck, expected_of_aip, expected_of_state, fixity_failed
from .view import BLKSIZE, LONG, SHORT, TOP, Node, View, shown_iid, state_key, tree_key

log = logging.getLogger(__name__)

FEED_INLINE = 64 * 1024        # smaller buffers are hashed on the loop; larger ones in a worker thread
WRITE_IN_THREAD = 256 * 1024   # larger writes are done in a worker thread
MAX_PENDING = 32               # written buffers waiting for the hasher before writes wait
META = ("message", "creator", "label")
PERMANENT = frozenset(("root", "top", "events"))   # node kinds that live as long as the mount
NEVER_FROM_COMMIT = (errno.EXDEV, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)
# Commit failures that only the transaction's content and the resource's instances decide (ESTALE, a label
# taken, a path too long, a file whose bytes are incomplete): see Operations._known_failure
DECIDED_BY_INPUTS = (Stale, LabelTaken, NameTooLong, Incomplete)
# Memory for caches (`-o cache_mib=`): half for parsed instance documents (core/layout.py), half for the
# nodes of read-only trees the kernel holds (trees.py), at NODE_BYTES each: a node with its key, its path,
# its entry and its places in the inode maps, measured with tracemalloc over 10,000 lookups of an
# instance's files: 240 bytes a node while the instance's document is cached, 709 once it has left.
CACHE_BYTES = 64 << 20
NODE_BYTES = 700
KEYED_INOS = 1 << 62           # inode numbers from here up are derived from node keys (see _new_ino)


def entry_attributes(mode: int, size: int, nlink: int, uid: int, gid: int, mtime_ns: int, atime_ns: int | None,
                     ctime_ns: int, entry_timeout: float, attr_timeout: float) -> pyfuse3.EntryAttributes:
    """EntryAttributes without st_ino (the caller sets it). No atime: the mtime; no ctime: the mtime."""
    e = pyfuse3.EntryAttributes()
    e.st_mode, e.st_size, e.st_nlink = mode, size, nlink
    e.st_uid, e.st_gid = uid, gid
    e.st_mtime_ns = mtime_ns
    e.st_atime_ns = mtime_ns if atime_ns is None else atime_ns
    e.st_ctime_ns = ctime_ns or mtime_ns
    e.st_blksize = BLKSIZE
    e.st_blocks = (size + 511) // 512
    e.entry_timeout, e.attr_timeout = entry_timeout, attr_timeout
    return e


def staged_attributes(txn: OpenTxn, s, nlink: int) -> pyfuse3.EntryAttributes:
    """EntryAttributes (without st_ino) of a staged inode `s` of a transaction other than its root."""
    return entry_attributes(kind_bits(s) | s.mode, txn.size_of(s.id, s), nlink, s.uid, s.gid, s.mtime_ns,
                            s.atime_ns, s.ctime_ns, LONG, LONG)


def handler(fn):
    """Map errors to errno; anything unexpected becomes EIO and a log line, never a dead mount."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except TinyfsError as e:      # the client's business (a name not there, taken, too long...)
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
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:   # the transaction's database: disk full
                log.warning("%s: %s", fn.__name__, e)
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Handle:
    __slots__ = ("node", "fd", "of", "write", "txn", "opener", "check")

    def __init__(self, node: Node, fd: int = -1, of: OpenFile | None = None, write: bool = False,
                 txn: OpenTxn | None = None, opener: Opener | None = None):
        self.node, self.fd, self.of, self.write, self.txn = node, fd, of, write, txn
        self.opener = opener      # a write-only handle's: its writes clear set-id bits (txn.Opener)
        self.check: ReadCheck | bool | None = None    # made at the first read; False: not verified


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
        self.listing: list[tuple[str, Node, pyfuse3.EntryAttributes | None]] | None = None


class Operations(pyfuse3.Operations):
    def __init__(self, archive: ArchiveRoot, writeback: bool = False, cache_bytes: int = CACHE_BYTES):
        super().__init__()
        # Off by default: with the kernel's writeback cache a write() returns before the daemon has the
        # bytes, so a killed daemon would lose writes that had returned (SPEC 5). `-o writeback` trades
        # that for speed; its write errors surface at close() and are caught by the incomplete mark.
        self.enable_writeback_cache = writeback
        self.archive = archive
        self.dynamic = archive.config.mode == "dynamic"
        self.view = View(archive, os.getuid(), os.getgid())
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[tuple, int] = {}
        self.lookups: dict[int, int] = {}
        archive.doc_cache_bytes = cache_bytes // 2
        self.trees = Trees(limit=(cache_bytes - cache_bytes // 2) // NODE_BYTES)
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.handles: dict[int, Handle | DirHandle] = {}
        self.next_fh = 1
        self.txns: dict[str, OpenTxn] = {}
        self.busy: dict[str, int] = {}          # rid -> background jobs (hashes) running
        self.copying: dict[tuple, trio.Event] = {}   # copy-on-write copies under way
        self.write_limiter = trio.CapacityLimiter(4)
        self.commits_running = 0
        self.closing = False
        # stored files a read found damaged, by (rid, stored path): a read past the damage fails through
        # any handle, without hashing again (the kernel may hold the rest of the file in its cache)
        self.damaged: dict[tuple[str, str], Damage] = {}
        self.nursery: trio.Nursery | None = None
        root = Node("root", ("root",))
        self._register(root, pyfuse3.ROOT_INODE)
        self.top = {}
        for name in TOP:
            node = Node("events", ("events",), path=name) if name == "events.jsonl" else Node("top", ("top", name), path=name)
            self.top[name] = self._register(node)

    # -- inode table ----------------------------------------------------------
    def _register(self, node: Node, ino: int | None = None) -> int:
        """The inode of the node with this key, a new one if it has none; its tree counts as used."""
        existing = self.by_key.get(node.key)
        if existing is not None:
            tree = self.nodes[existing].tree
            if tree is not None:
                self.trees.touch(tree)
            return existing
        if ino is None:
            ino = self._new_ino(node.key)
        node.ino = ino
        self.nodes[ino] = node
        self.by_key[node.key] = ino
        key = tree_key(node)
        if key is not None:
            node.tree = self.trees.enter(key)
            if len(self.nodes) > self.trees.limit:
                self._let_go_of_old_trees()
        return ino

    def _new_ino(self, key: tuple) -> int:
        """An inode number derived from the node's key, so that a node the kernel forgot (memory pressure,
        drop_caches, a tree let go) and looks up again shows the same number: GNU tar compares a
        directory's inode number after extracting into it with the one it saw at mkdir ("Directory renamed
        before its status could be extracted"), and other tools cache (dev, ino). The rare number taken
        by a live node of another key comes from a counter below KEYED_INOS instead."""
        ino = KEYED_INOS | (hash(key) & (KEYED_INOS - 1))
        if ino in self.nodes:
            ino = self.next_ino
            self.next_ino += 1
        return ino

    def _unregister(self, ino: int, node: Node) -> None:
        """Drop a node the kernel has forgotten (or was never given), and every map's entry for it."""
        del self.nodes[ino]
        if self.by_key.get(node.key) == ino:
            del self.by_key[node.key]
        if node.tree is not None:
            self.trees.leave(node.tree)
        if node.head is not None and not node.path and self.view.heads.get(node.rid) is node.head:
            # the root of resources/<rid>: the kernel holds no node of that tree any more (each pins its
            # parent), so the next lookup may as well start a new one
            del self.view.heads[node.rid]

    def _let_go_of_old_trees(self) -> None:
        """Over the node limit: ask the kernel to forget the read-only trees least recently looked into."""
        for tree in self.trees.to_let_go(len(self.nodes)):
            where = self._tree_root(tree.key)
            if where is not None:
                self._invalidate_later(*where, deleted=0)

    def _tree_root(self, key: tuple) -> tuple[int, str] | None:
        """(parent inode, name) of the root of a read-only tree (view.tree_key)."""
        if key[0] == "aip":
            return self.top["aip"], key[1]
        rid, shown = key[1], key[2]
        if not isinstance(shown, str):          # a Head: resources/<rid>
            return self.top["resources"], rid
        parent = self.by_key.get(("instances_of", rid))
        return (parent, shown) if parent is not None else None

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Register, count one lookup, return attributes (lookup, mkdir, create, ...)."""
        ino = self._register(node)
        attrs = self._attrs(self.nodes[ino])
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return attrs

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.kind == "txn":
            e = self._txn_attrs(node)
        else:
            a = self.view.attr(node)
            e = entry_attributes(a.mode, a.size, a.nlink, a.uid, a.gid, a.mtime_ns, a.atime_ns, a.ctime_ns,
                                 a.entry_timeout, a.attr_timeout)
        e.st_ino = node.ino
        return e

    async def forget(self, inode_list):
        # After a commit the kernel forgets the transaction's whole tree, 10,000 inodes and more in
        # batches: the maps are locals, each looked up once (_unregister drops a node from every map).
        lookups, nodes, unregister = self.lookups, self.nodes, self._unregister
        for ino, n in inode_list:
            left = lookups.pop(ino, 0) - n
            if left > 0:
                lookups[ino] = left
                continue
            node = nodes.get(ino)
            if node is None or node.kind in PERMANENT:
                continue
            unregister(ino, node)
            if node.kind == "txn" and not node.txn.closed and not node.txn.files.get(node.sino):
                try:
                    node.txn.staging.drop_if_orphan(node.sino)
                except Exception:
                    log.exception("dropping orphan %s", node.sino)

    # -- transactions -------------------------------------------------------
    def _txn(self, rid: str) -> OpenTxn | None:
        txn = self.txns.get(rid)
        if txn is None:
            path = self.archive.transactions / rid
            if not (path / "txn.db").exists():
                return None
            staging = Staging.open(path, self._base_loader(rid))
            refresh_sizes(staging)
            staging.drop_orphans()
            txn = self.txns[rid] = OpenTxn(self.archive, rid, staging)
        return txn

    def _base_loader(self, rid: str):
        return lambda iid: self.archive.state(rid, iid)

    def _txn_node(self, txn: OpenTxn, sino: int) -> Node:
        return Node("txn", ("txn", txn.rid, txn.token, sino), rid=txn.rid, sino=sino, txn=txn)

    def _txn_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        txn = node.txn
        if txn.closed:
            raise fail(errno.ENOENT)
        s = txn.staging.node(node.sino)
        if s is None:
            raise fail(errno.ENOENT)
        if node.sino == SROOT:
            # the mode a client set (to be recorded as the resource root's), always usable by its owner:
            # `cp -a` of a 0555 source sets 0555, and that must not stop the owner's later mv or rm -rf
            return entry_attributes(stat.S_IFDIR | s.mode | 0o700, 0, txn.staging.nlink(SROOT, "d"), txn.uid,
                                    txn.gid, s.mtime_ns, s.atime_ns, s.ctime_ns, SHORT, SHORT)
        return staged_attributes(txn, s, txn.staging.nlink(node.sino, s.kind))

    def _in_txn(self, node: Node) -> bool:
        return node.kind == "txn"

    def _readonly_error(self, node: Node) -> OSError:
        if node.kind == "top" and node.path == "commit":
            return fail(errno.EPERM, "nothing can be created in commit/")
        return fail(errno.EROFS)

    # -- names ---------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        raw = bytes(name)
        if raw == b".":
            return self._entry(parent)
        if len(raw) > 255:
            raise fail(errno.ENAMETOOLONG)   # FUSE does not enforce NAME_MAX for us
        try:
            name = decode_name(raw)
        except TinyfsError:
            raise fail(errno.ENOENT) from None   # such a name cannot exist here; creating it is EILSEQ
        if parent.kind == "root":
            if name not in self.top:
                raise fail(errno.ENOENT)
            return self._entry(self.nodes[self.top[name]])
        if parent.kind == "top" and parent.path == "transactions":
            txn = self._txn(name) if is_rid(name) else None
            if txn is None:
                raise fail(errno.ENOENT)
            return self._entry(self._txn_node(txn, SROOT))
        if parent.kind == "top" and parent.path == "commit":
            raise fail(errno.ENOENT)
        if parent.kind == "txn":
            txn = parent.txn
            if txn.closed:
                raise fail(errno.ENOENT)
            sino = txn.staging.lookup(parent.sino, name)
            if sino is None:
                raise fail(errno.ENOENT)
            return self._entry(self._txn_node(txn, sino))
        return self._entry(self.view.lookup(parent, name))

    @handler
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if node.kind != "txn":
            raise fail(errno.EROFS)
        txn = node.txn
        if node.sino == SROOT:
            return self._set_root_attrs(node, attr, fields)
        s = txn.staging.node(node.sino)
        if s is None:
            raise fail(errno.ENOENT)
        changes = {}
        if fields.update_size:
            if s.kind == "d":
                raise fail(errno.EISDIR)
            await self._ensure_blob(txn, node.sino, keep_bytes=attr.st_size > 0)
            txn.truncate(node.sino, attr.st_size)
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        changes["ctime_ns"] = _now()
        txn.staging.update(node.sino, **changes)
        return self._attrs(node)

    def _set_root_attrs(self, node: Node, attr, fields) -> pyfuse3.EntryAttributes:
        """chmod, chown and utimens of the transaction directory succeed (cp -a, rsync -a and tar -x set
        them); its mode and times are kept as the resource root's, its owner stays the transaction's."""
        if fields.update_size:
            raise fail(errno.EISDIR)
        changes = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if changes:
            changes["ctime_ns"] = _now()
            self._live(node).staging.update(SROOT, **changes)
        return self._attrs(node)

    @handler
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if node.kind == "txn":
            s = node.txn.staging.node(node.sino)
            if s is None or s.kind != "l":
                raise fail(errno.EINVAL)
            return os.fsencode(s.target)
        return os.fsencode(self.view.readlink(node))

    # -- directories ---------------------------------------------------------
    @handler
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if node.kind == "txn" and node.txn.closed:
            raise fail(errno.ENOENT)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = DirHandle(node)
        return fh

    async def _listing(self, node: Node) -> list[tuple[str, Node, pyfuse3.EntryAttributes | None]]:
        """A snapshot of (name, node, attributes-or-None), taken by the readdir at offset 0 (not at opendir:
        see DirHandle) and kept for the readdirs that continue it, so that their offsets stay stable."""
        if node.kind == "root":
            return [(name, self.nodes[ino], None) for name, ino in self.top.items()]
        if node.kind == "top" and node.path == "transactions":
            names = sorted(n for n in os.listdir(self.archive.transactions)
                           if is_rid(n) and (self.archive.transactions / n / "txn.db").exists())
            out = []
            for n in names:
                txn = self._txn(n)
                if txn is not None:
                    out.append((n, self._txn_node(txn, SROOT), None))
            return out
        if node.kind == "top" and node.path == "commit":
            return []
        if node.kind == "txn":
            txn = node.txn
            if txn.closed:
                raise fail(errno.ENOENT)
            # attributes made here, with the listing: a fresh transaction's tree is listed whole
            # (readdirplus), 10,000 entries for a 10,000-file base
            return [(name, self._txn_node(txn, s.id), staged_attributes(txn, s, nlink))
                    for name, s, nlink in txn.staging.listing(node.sino)]
        children = await trio.to_thread.run_sync(self.view.children, node) if node.kind == "top" \
            else self.view.children(node)
        return [(name, child, None) for name, child in children]

    @handler
    async def readdir(self, fh, start_id, token):
        h = self.handles[fh]
        if start_id == 0 or h.listing is None:     # (again after a rewinddir: it shows what is there now)
            h.listing = await self._listing(h.node)
        listing = h.listing
        for i in range(start_id, len(listing)):
            name, node, attrs = listing[i]
            if node.kind == "txn" and node.txn.closed:
                continue    # committed or rolled back since offset 0 was listed (between two readdirs)
            new = node.key not in self.by_key
            ino = self._register(node)
            node = self.nodes[ino]
            if attrs is None:
                attrs = self._attrs(node)
            else:
                attrs.st_ino = ino
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                if new and not self.lookups.get(ino):
                    self._unregister(ino, node)
                return
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    @handler
    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        for txn in list(self.txns.values()):
            await trio.to_thread.run_sync(txn.staging.sync)

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._node(parent_inode)
        name = decode_name(bytes(name))
        if parent.kind == "top" and parent.path == "transactions":
            return self._entry(await self._open_transaction(name, ctx))
        txn, sino = self._make(parent, name, "d", mode, ctx)
        return self._entry(self._txn_node(txn, sino))

    def _make(self, parent: Node, name: str, kind: str, mode: int, ctx, **kw) -> tuple[OpenTxn, int]:
        """A new entry in a transaction directory (mkdir, create, mknod), with the caller's umask
        applied to `mode`: EROFS/EPERM outside one, EEXIST when the name is taken."""
        if parent.kind != "txn":
            raise self._readonly_error(parent)
        txn = self._live(parent)
        if txn.staging.lookup(parent.sino, name) is not None:
            raise fail(errno.EEXIST)
        txn.staging.check_room(parent.sino, name)
        return txn, txn.staging.make(parent.sino, name, kind, stat.S_IMODE(mode) & ~ctx.umask, ctx.uid, ctx.gid,
                                     **kw)

    async def _open_transaction(self, rid: str, ctx) -> Node:
        if not is_rid(rid):
            raise fail(errno.EINVAL, f"invalid resource id {rid!r}")
        if self._txn(rid) is not None:
            raise fail(errno.EEXIST)
        if self.closing:
            raise fail(errno.EBUSY)
        head = self.archive.head(rid)

        def create():
            root = self.archive.state(rid, head).root if head else None   # the root starts as recorded
            staging = Staging.create(self.archive.transactions / rid, rid, head, self._base_loader(rid),
                                     ctx.uid, ctx.gid, root=root)
            staging.read_base()       # in this worker thread, not in the first request
            return staging

        staging = await trio.to_thread.run_sync(create)
        txn = self.txns[rid] = OpenTxn(self.archive, rid, staging)
        self.archive.events.append("transaction.opened", rid, head, uid=ctx.uid, via="mount")
        return self._txn_node(txn, SROOT)

    def _live(self, node: Node) -> OpenTxn:
        txn = node.txn
        if txn.closed:
            raise fail(errno.ENOENT)
        if txn.committing:
            raise fail(errno.EBUSY)
        return txn

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        name = decode_name(bytes(name))
        if parent.kind == "top" and parent.path == "transactions":
            return await self._rollback(name)
        txn, sino = self._staged_child(parent, name)
        s = txn.staging.node(sino)
        if s.kind != "d":
            raise fail(errno.ENOTDIR)
        if txn.staging.has_children(sino):
            raise fail(errno.ENOTEMPTY)
        txn.staging.unlink(parent.sino, name)
        self._drop_if_unused(txn, sino)

    def _idle_txn(self, rid: str) -> OpenTxn:
        """The open transaction `rid` for a rollback or a commit: ENOENT if none, EBUSY while committing."""
        txn = self._txn(rid) if is_rid(rid) else None
        if txn is None:
            raise fail(errno.ENOENT)
        if txn.committing:
            raise fail(errno.EBUSY)
        return txn

    async def _rollback(self, rid: str) -> None:
        txn = self._idle_txn(rid)
        if txn.staging.has_children(SROOT):
            raise fail(errno.ENOTEMPTY)
        trash = await trio.to_thread.run_sync(Staging.detach, txn.staging.path)
        self._close_txn(txn)
        await trio.to_thread.run_sync(Staging.delete, trash)
        self.archive.events.append("transaction.rolled_back", rid, txn.base, via="mount")

    def _close_txn(self, txn: OpenTxn) -> None:
        """Forget a committed or rolled-back transaction, once its directory has left transactions/: _txn()
        reopens any transaction it finds there that is not in self.txns (after a restart), and did so with
        one closed a moment too early, by a listing of transactions/ while the directory was being moved
        out (opendir is not held back by the rename). That transaction then stayed open in the daemon
        for good, its files deleted: `mkdir transactions/<rid>` failed with EEXIST from then on.

        Its nodes stay registered until the kernel forgets them (after the invalidations): their keys
        carry the transaction's token, which no later transaction has, and scanning every key here
        cost a commit 1-2 ms."""
        txn.close()
        self.txns.pop(txn.rid, None)

    def _staged_child(self, parent: Node, name: str) -> tuple[OpenTxn, int]:
        """(transaction, staged inode) of an existing name in a live transaction directory (to remove it)."""
        if parent.kind != "txn":
            raise self._readonly_error(parent)
        txn = self._live(parent)
        sino = txn.staging.lookup(parent.sino, name)
        if sino is None:
            raise fail(errno.ENOENT)
        return txn, sino

    def _drop_if_unused(self, txn: OpenTxn, sino: int) -> None:
        if sino not in txn.files:
            txn.staging.drop_if_orphan(sino)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        name = decode_name(bytes(name))
        txn, sino = self._staged_child(parent, name)
        if txn.staging.node(sino).kind == "d":
            raise fail(errno.EISDIR)
        txn.staging.unlink(parent.sino, name)
        self._drop_if_unused(txn, sino)

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._node(parent_inode)
        name = decode_name(bytes(name))
        if parent.kind != "txn":
            raise self._readonly_error(parent)
        txn = self._live(parent)
        try:
            target = bytes(target).decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EILSEQ) from None
        if txn.staging.lookup(parent.sino, name) is not None:
            raise fail(errno.EEXIST)
        txn.staging.check_room(parent.sino, name)
        sino = txn.staging.make(parent.sino, name, "l", 0o777, ctx.uid, ctx.gid, target=target)
        return self._entry(self._txn_node(txn, sino))

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, parent = self._node(inode), self._node(new_parent_inode)
        new_name = decode_name(bytes(new_name))
        if parent.kind != "txn":
            raise self._readonly_error(parent)
        if node.kind != "txn" or node.txn is not parent.txn:
            raise fail(errno.EROFS if _read_only(node) else errno.EXDEV)   # (a new name changes the inode)
        txn = self._live(parent)
        if txn.staging.node(node.sino).kind == "d":
            raise fail(errno.EPERM)
        if txn.staging.lookup(parent.sino, new_name) is not None:
            raise fail(errno.EEXIST)
        txn.staging.check_room(parent.sino, new_name)
        txn.staging.link(node.sino, parent.sino, new_name)
        return self._entry(node)

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._node(parent_inode)
        if parent.kind != "txn":
            raise self._readonly_error(parent)
        if not stat.S_ISREG(mode):
            raise fail(errno.EPERM, "tinyfs archives regular files, directories and symbolic links only")
        # A regular file made by mknod(2): GNU tar --xattrs creates files this way (then sets their
        # xattrs, then opens them), and so does the kernel for a create when the daemon has no create.
        txn, sino = self._make(parent, decode_name(bytes(name)), "f", mode, ctx)
        return self._entry(self._txn_node(txn, sino))

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_parent, new_parent = self._node(parent_inode_old), self._node(parent_inode_new)
        name_old, name_new = decode_name(bytes(name_old)), decode_name(bytes(name_new))
        if old_parent.kind == "top" and old_parent.path == "transactions":
            if new_parent.kind == "top" and new_parent.path == "commit":
                return await self._commit(name_old, name_new, ctx)
            raise fail(errno.EPERM, "a transaction is committed by moving it into commit/")
        if new_parent.kind == "top" and new_parent.path == "commit":
            raise fail(errno.EPERM)
        if old_parent.kind != "txn" or new_parent.kind != "txn":
            # a name leaving or entering a read-only tree would change it: EROFS, as on a read-only mount
            raise fail(errno.EROFS if _read_only(old_parent) or _read_only(new_parent) else errno.EXDEV)
        if old_parent.txn is not new_parent.txn:
            raise fail(errno.EXDEV)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fail(errno.EINVAL)
        txn = self._live(old_parent)
        st = txn.staging
        sino = st.lookup(old_parent.sino, name_old)
        if sino is None:
            raise fail(errno.ENOENT)
        target = st.lookup(new_parent.sino, name_new)
        if target == sino:
            return
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            src_dir, dst_dir = st.node(sino).kind == "d", st.node(target).kind == "d"
            if src_dir and not dst_dir:
                raise fail(errno.ENOTDIR)
            if dst_dir and not src_dir:
                raise fail(errno.EISDIR)
            if dst_dir and st.has_children(target):
                raise fail(errno.ENOTEMPTY)
        if st.node(sino).kind == "d" and st.is_ancestor(sino, new_parent.sino):
            raise fail(errno.EINVAL)
        st.check_room(new_parent.sino, name_new, moving=sino)
        replaced = st.rename(old_parent.sino, name_old, new_parent.sino, name_new)
        if replaced is not None:
            self._drop_if_unused(txn, replaced)

    # -- commit ---------------------------------------------------------------
    async def _commit(self, rid: str, target: str, ctx) -> None:
        txn = self._idle_txn(rid)
        if target != rid:     # (mv transactions/x commit/y: nothing but x itself may be made in commit/)
            raise self._failed(txn, errno.EPERM, f"a transaction is committed as commit/{rid}, not as "
                                                 f"commit/{target}", event=True)
        if self.closing:
            raise fail(errno.EBUSY, "the mount is shutting down")
        txn.committing = True
        self.commits_running += 1
        try:
            await self._commit_txn(txn, ctx.uid)
        except BaseException as e:
            # whatever went wrong (a bug included), the transaction must not stay `committing`
            if not txn.closed and txn.staging.get_meta("state") == "committing":
                self._failed(txn, errno.EIO, f"internal error: {type(e).__name__}: {e}"[:EVENT_TEXT_MAX])
            raise
        finally:
            txn.committing = False
            self.commits_running -= 1

    async def _commit_txn(self, txn: OpenTxn, committer: int) -> None:
        rid = txn.rid
        known = self._known_failure(txn)
        if known is not None:
            raise known
        try:
            writing = txn.open_for_writing()
            if writing:
                path = next((p for p, sino, _row in txn.staging.walk() if sino in writing), "?")
                raise TinyfsError(f"{path}: still open for writing", path=path)
            while self.busy.get(rid):
                await trio.sleep(0.005)
            txn.staging.set_meta("state", "committing")
            # in a worker: the walk of a 10,000-file transaction takes 70-100 ms, which the loop spends
            # serving other clients (every change of this transaction fails with EBUSY meanwhile)
            request = await trio.to_thread.run_sync(txn.commit_request, committer)
        except TinyfsError as e:
            code = errno.EBUSY if "open for writing" in str(e) else e.errno
            raise self._failed(txn, code, e, event=True) from None
        try:
            result = await trio.to_thread.run_sync(commit, self.archive, request)
        except (TinyfsError, OSError) as e:
            code = getattr(e, "errno", None) or errno.EIO
            if code in NEVER_FROM_COMMIT:
                code = errno.EIO
            raise self._failed(txn, code, e) from None     # (core.commit appended the event)
        old_root = self.by_key.get(("txn", rid, txn.token, SROOT))
        trash = await trio.to_thread.run_sync(Staging.detach, txn.staging.path)
        self._close_txn(txn)     # (after the rename out of transactions/: see _close_txn)
        self.nursery.start_soon(trio.to_thread.run_sync, Staging.delete, trash)   # bytes go after the reply
        log.info("committed %s as %s", rid, result.instance)
        if result.instance is not None:
            try:
                stale = self._move_current_tree(rid, result.instance)
            except Exception:    # the commit is made: never answer it with an error
                log.exception("showing commit %s of %s", result.instance, rid)
                self.view.heads.pop(rid, None)
                stale = [(self.top["resources"], rid)]
            await trio.to_thread.run_sync(self._invalidate_all, stale)
        if old_root is not None:
            self._invalidate_later(self.top["commit"], rid, old_root)

    def _failed(self, txn: OpenTxn, code: int, error: Exception | str, event: bool = False) -> OSError:
        """Record a failed commit -- the transaction's state and error, one warning, and (`event`) the
        commit.failed event where core.commit did not append it -- and return the error to answer with."""
        message = str(error)
        txn.staging.set_meta("state", "failed")
        txn.staging.set_meta("error", message)
        log.warning("commit of %s failed: %s", txn.rid, message)
        if event:
            self.archive.events.append("commit.failed", txn.rid, None, error=message, via="mount")
        txn.failure = (code, message, self._inputs(txn)) if isinstance(error, DECIDED_BY_INPUTS) else None
        return fail(code, message)

    def _known_failure(self, txn: OpenTxn) -> OSError | None:
        """The failure of the transaction's last commit, when neither the transaction nor the resource's
        head has changed since and nothing else decided it: the same commit would fail the same way.

        The kernel asks twice for every commit that fails with ESTALE: the VFS retries a path-based call
        once, its lookups revalidated, when the file system answers ESTALE (one `mv`, one renameat2, two
        RENAME requests 20-30 ms apart). Answered from here, the second one is not attempted again and
        adds no warning or event: one failure, logged once."""
        if txn.failure is None:
            return None
        code, message, inputs = txn.failure
        return fail(code, message) if inputs == self._inputs(txn) else None

    def _inputs(self, txn: OpenTxn) -> tuple[int, str | None]:
        """What decides a commit's outcome besides this code: the transaction (its change count) and the
        resource's head."""
        return txn.staging.changes(), self.archive.head(txn.rid)

    def _move_current_tree(self, rid: str, iid: str) -> list[tuple[int, str | None]]:
        """Move the tree of resources/<rid> to the new head `iid`, and return what the kernel must forget
        before the rename is answered: (parent inode, name) for each cached name that went or now shows
        other bytes, (inode, None) for a node that stays with new attributes (the root, whose time is the
        head's; a directory, or a file of the same digest, whose mode or times changed).

        The nodes of that tree share one Head: moving it moves every node the commit left as it was, at
        no cost per node, and the kernel keeps their entries, attributes and page cache (invalidating
        resources/<rid> instead dropped the whole cached tree: for a browsed resource of 10,000 files,
        10,000 forgets and as many lookups at its next reading, however little the commit changed). A
        changed node is detached (it keeps showing the old instance while the kernel holds it) and
        invalidated: a file with other bytes, a symbolic link with another target or a name of another
        kind gets a new node, a new inode (no stale page cache), at its next lookup. When the tree the
        kernel holds is not the previous head's (a new resource, another process committed meanwhile),
        resources/<rid> is invalidated whole and resolves to a new Head."""
        whole = [(self.top["resources"], rid)]
        head = self.view.heads.get(rid)
        doc = self.archive.instance(rid, iid)
        if head is None or head.iid != doc.previous:
            self.view.current_head(rid, iid)     # (never older than this commit: see View.current_head)
            return whole
        root_ino = self.by_key.get(state_key(rid, head, ""))
        if root_ino is None:
            self.view.current_head(rid, iid)     # no tree of it is cached: the next lookup starts a new one
            return whole
        try:
            before, after = self.archive.state(rid, head.iid), doc.state
        except NotFound:     # dynamic mode dropped the previous instance, and its document is not cached
            self.view.current_head(rid, iid)
            return whole
        changes = state_changes(before, after.entries())
        if _touches_link_groups(before, after, changes):   # one node stands for several paths: start anew
            del self.view.heads[rid]
            return whole
        stale: list[tuple[int, str | None]] = [(root_ino, None)]
        gone: dict[str, int] = {}
        for path, new in changes.items():
            ino = self.by_key.get(state_key(rid, head, path))
            if ino is None:          # not cached, or added by the commit (FUSE caches no failed lookup)
                continue
            if _same_bytes(self.nodes[ino].entry, new):    # a cached node holds the entry it shows
                self.nodes[ino].entry = new
                stale.append((ino, None))
            else:
                gone[path] = ino
        for path in gone:
            parent, _, name = path.rpartition("/")
            if parent not in gone:     # else the parent's invalidation drops this name too
                parent_ino = self.by_key.get(state_key(rid, head, parent)) if parent else root_ino
                if parent_ino is not None:
                    stale.append((parent_ino, name))
        for ino in gone.values():
            node = self.nodes[ino]
            del self.by_key[node.key]
            node.key, node.head, node.iid = ("detached", ino), None, head.iid
            self.by_key[node.key] = ino
        head.iid = iid
        return stale

    @staticmethod
    def _invalidate_all(stale: list[tuple[int, str | None]]) -> None:
        """(parent, name): drop that cached name; (inode, None): drop that inode's cached attributes."""
        for ino, name in stale:
            try:
                if name is None:
                    pyfuse3.invalidate_inode(ino, attr_only=True)
                else:
                    pyfuse3.invalidate_entry(ino, os.fsencode(name))
            except Exception:
                pass  # the kernel did not know it (or there is no kernel: view tests)

    def _invalidate_later(self, parent: int, name: str, deleted: int) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), deleted=deleted, ignore_enoent=True)
        except Exception:
            log.debug("could not queue invalidation of %s", name, exc_info=True)

    # -- files ------------------------------------------------------------------
    def _fh(self, handle: Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    @handler
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        if node.kind != "txn":
            if write or flags & os.O_TRUNC:
                raise fail(errno.EROFS)
            # The stored file is opened at the first read that the page cache cannot answer: a warm `cat` of
            # many small files then costs one round trip each and no path building, open or close (40 % of
            # the daemon's time). Dynamic mode opens at once: a commit there deletes the replaced instance,
            # and an open descriptor keeps its bytes readable.
            fd = os.open(self.view.file_path(node), os.O_RDONLY) if self.dynamic else -1
            info = pyfuse3.FileInfo(fh=self._fh(Handle(node, fd)))
            info.keep_cache = node.kind != "events"
            return info
        txn = self._live(node) if write else node.txn
        if txn.closed:
            raise fail(errno.ENOENT)
        s = txn.staging.node(node.sino)
        if s is None:
            raise fail(errno.ENOENT)
        if s.kind != "f":
            raise fail(errno.EISDIR)
        truncate = write and bool(flags & os.O_TRUNC)
        if truncate:
            await self._ensure_blob(txn, node.sino, keep_bytes=False)
        of = txn.open(node.sino, write, truncate=truncate)
        opener = _opener(ctx, s.mode) if write else None
        if truncate:
            self._truncated_by_open(txn, node.sino, opener)
        direct = _write_only(flags)
        info = pyfuse3.FileInfo(fh=self._fh(Handle(node, of=of, write=write, txn=txn,
                                                   opener=opener if direct else None)))
        info.keep_cache = True
        info.direct_io = direct
        return info

    def _truncated_by_open(self, txn: OpenTxn, sino: int, opener: Opener) -> None:
        """What the kernel does for open(O_TRUNC) on a local disk, and leaves to a FUSE daemon that takes
        O_TRUNC at open (atomic_o_trunc): mtime and ctime updated (even for an empty file), set-id bits
        cleared for an opener without CAP_FSETID."""
        s = txn.staging.node(sino)
        now = _now()
        fields = {"mtime_ns": now, "ctime_ns": now}
        clear = setid_bits_to_clear(s.mode, s.gid, opener)
        if clear:
            fields["mode"] = s.mode & ~clear
        txn.staging.update(sino, **fields)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._node(parent_inode)
        txn, sino = self._make(parent, decode_name(bytes(name)), "f", mode, ctx,
                               create_blob=False)    # txn.open below creates it (one open instead of two)
        node = self._txn_node(txn, sino)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        of = txn.open(sino, write, truncate=False)   # (an empty file opened for writing: hashed as it arrives)
        direct = _write_only(flags)
        opener = _opener(ctx, mode) if direct else None
        info = pyfuse3.FileInfo(fh=self._fh(Handle(node, of=of, write=write, txn=txn, opener=opener)))
        info.keep_cache = True
        info.direct_io = direct
        return info, self._entry(node)

    @handler
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if h.of is not None:
            data = os.pread(h.of.fd, size, off)
            if h.of.on_blob:        # staged bytes: nothing recorded to check them against
                if h.check:
                    h.check.abandon()
                return data
            return await self._verified(h, h.of.fd, off, size, data)
        if h.fd < 0:
            path = self.view.file_path(h.node)
            try:
                h.fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                log.error("stored file missing: %s (run tinyfs fsck)", path)
                raise fail(errno.EIO, f"stored file missing: {path}") from None
        return await self._verified(h, h.fd, off, size, os.pread(h.fd, size, off))

    async def _verified(self, h: Handle, fd: int, off: int, size: int, data: bytes) -> bytes:
        """`data`, read from the stored file `fd` at `off`, unless it ends a sequential read of a file whose
        digest does not match, or ends a file known to be damaged: then EIO (SPEC 5, fs/verify.py)."""
        check = h.check
        if check is None:
            check = h.check = self._read_check(h, fd) or False
        if check is False:
            return data
        last = check.take(off, data, size, fd, self.nursery)
        if last and check.state == RUNNING and not await check.verdict():
            await self._fixity_failed(h, check, off)
        if self.damaged:
            damage = self.damaged.get(check.expected.key)
            if damage is not None and (last or off + len(data) > damage.since):
                raise fail(errno.EIO, f"{check.expected.path}: stored bytes do not match their digest")
        if check.behind:
            await check.wait_for_hasher()
        return data

    def _read_check(self, h: Handle, fd: int) -> ReadCheck | None:
        """The verification of a handle's reads, or None for bytes that have no recorded digest."""
        node = h.node
        if node.kind == "state":
            expected = expected_of_state(self.archive, node.rid, shown_iid(node), node.path, node.entry)
        elif node.kind == "aip":
            expected = expected_of_aip(self.archive, node.rid, node.path)
        elif node.kind == "txn" and h.of is not None and not h.of.on_blob:   # a base file, read in place
            txn, s = h.txn, h.txn.staging.node(node.sino)
            # (base_path: from the base's stored map the transaction keeps, whatever the document cache drops)
            stored = os.path.relpath(txn.base_path(s), self.archive.resource_dir(txn.rid))
            expected = Expected(txn.rid, txn.base, txn.staging.tree.path.get(node.sino, stored), stored,
                                self.archive.config.digests[0], s.base, s.size)
        else:
            return None
        if expected is None or expected.size == 0:
            return None
        return ReadCheck(expected, os.fstat(fd).st_size)

    async def _fixity_failed(self, h: Handle, check: ReadCheck, off: int) -> None:
        """A sequential read found the stored bytes damaged: remember the file (no read past `off` is
        answered, through any handle: the kernel retries a failed readahead page by page), drop what the
        kernel cached of this inode (a retry must ask the daemon again), log and record it once per name."""
        e = check.expected
        self.nursery.start_soon(trio.to_thread.run_sync, _drop_cached_bytes, h.node.ino)   # after the reply
        damage = self.damaged.setdefault(e.key, Damage(off, set()))
        damage.since = min(damage.since, off)
        if e.path in damage.reported:
            log.info("%s: %s is still damaged", e.rid, e.path)
            return
        damage.reported.add(e.path)
        log.warning("fixity failed: resource %s, %s (stored as %s): %s expected %s… found %s… (read refused "
                    "with EIO; see events.jsonl)", e.rid, e.path, e.stored, e.algorithm, e.digest[:16],
                    check.found[:16])
        await trio.to_thread.run_sync(fixity_failed, self.archive, e, check.found)

    @handler
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        if h.of is None:
            raise fail(errno.EBADF)
        of = h.of
        if not of.on_blob:
            await self._ensure_blob(h.txn, of.sino, keep_bytes=True)
        txn = h.txn
        if h.opener is not None:
            self._clear_setid_bits(txn, of.sino, h.opener)
        feed = txn.note_write(of, off, len(buf))
        if feed:
            if not of.draining and not of.pending and len(buf) < FEED_INLINE:
                of.hasher.update(buf)
            else:
                of.pending.append((of.hasher, buf))   # for this hasher: a truncate to 0 starts another
                if not of.draining:
                    of.draining = True
                    self.nursery.start_soon(self._drain, txn, of)
        try:
            if len(buf) >= WRITE_IN_THREAD:   # big writes land in a worker: the loop keeps taking requests
                n = await trio.to_thread.run_sync(txn.pwrite, of, off, buf, limiter=self.write_limiter)
            else:
                n = txn.pwrite(of, off, buf)
        except OSError:
            txn.mark_incomplete(of)
            raise
        if not self.enable_writeback_cache:   # else the kernel keeps mtime and sends it with setattr
            now = _now()
            txn.staging.update(of.sino, mtime_ns=now, ctime_ns=now)
        while len(of.pending) > MAX_PENDING:
            await trio.sleep(0.001)
        return n

    @staticmethod
    def _clear_setid_bits(txn: OpenTxn, sino: int, opener: Opener) -> None:
        """Before a direct I/O write: what the kernel does before any other (file_remove_privs)."""
        s = txn.staging.node(sino)
        clear = setid_bits_to_clear(s.mode, s.gid, opener)
        if clear:
            txn.staging.update(sino, mode=s.mode & ~clear, ctime_ns=_now())

    def _job_done(self, rid: str) -> None:
        """A background job of a transaction ended (an entry per resource ever written to would stay)."""
        left = self.busy[rid] - 1
        if left:
            self.busy[rid] = left
        else:
            del self.busy[rid]

    async def _ensure_blob(self, txn: OpenTxn, sino: int, keep_bytes: bool) -> None:
        """Copy-on-write of a base file on its first write or truncate (the copy in a worker thread;
        a second writer meanwhile waits for the same copy)."""
        key = (txn.rid, txn.token, sino)
        while key in self.copying:
            await self.copying[key].wait()
        if not txn.needs_blob(sino):
            return
        done = self.copying[key] = trio.Event()
        try:
            if keep_bytes:
                await trio.to_thread.run_sync(txn.copy_base_bytes, sino)
            txn.adopt_blob(sino, kept_bytes=keep_bytes)
        finally:
            del self.copying[key]
            done.set()

    async def _drain(self, txn: OpenTxn, of: OpenFile) -> None:
        """Feed written buffers to the file's hasher in order, in a worker thread that takes every buffer
        queued meanwhile (one thread hand-off per burst, not per buffer)."""
        self.busy[txn.rid] = self.busy.get(txn.rid, 0) + 1
        try:
            while of.pending:
                await trio.to_thread.run_sync(_feed_hasher, of)
        finally:
            of.draining = False
            self._job_done(txn.rid)

    @handler
    async def flush(self, fh):
        # ENOSYS tells the kernel to stop sending FLUSH on every close(): one round trip less per file.
        # Safe: the kernel still writes dirty pages back and reports their errors at close() without
        # asking us (fuse_flush), and there is nothing for tinyfs to do at flush.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh, datasync):
        h = self.handles[fh]
        if h.of is None:
            return
        await trio.to_thread.run_sync(os.fsync, h.of.fd)
        h.txn.staging.update(h.of.sino, size=h.of.size)
        await trio.to_thread.run_sync(h.txn.staging.sync)

    @handler
    async def release(self, fh):
        h = self.handles.pop(fh)
        if h.check:
            h.check.abandon()
        if h.of is None:
            if h.fd >= 0:
                os.close(h.fd)
            return
        txn, of = h.txn, h.of
        if txn.closed:
            return
        needs_hashing = txn.release(of, h.write)      # before any await: see the module docstring
        if needs_hashing:
            self.busy[txn.rid] = self.busy.get(txn.rid, 0) + 1
            self.nursery.start_soon(self._digest_after_close, txn, of)

    async def _digest_after_close(self, txn: OpenTxn, of: OpenFile) -> None:
        try:
            while of.draining:
                await trio.sleep(0.001)
            if txn.closed:
                return
            job = txn.digest_job(of)
            if job is not None:
                sino, version, digests = await trio.to_thread.run_sync(job)
                if not txn.closed:
                    txn.digest_done(sino, version, digests)
        except FileNotFoundError:
            pass  # deleted meanwhile
        except Exception:
            log.exception("hashing a staged file of %s", txn.rid)
        finally:
            self._job_done(txn.rid)

    # -- xattrs --------------------------------------------------------------
    @handler
    async def getxattr(self, inode, name, ctx):
        name = bytes(name).decode("utf-8", "surrogateescape")
        if not name.startswith("user."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)   # security.capability on every write: answer fast
        node = self._node(inode)
        if node.kind == "txn":
            txn = node.txn
            if txn.closed:
                raise fail(errno.ENOENT)
            if node.sino == SROOT and name.startswith("user.tinyfs."):
                key = name[len("user.tinyfs."):]
                if key in ("state", "error", *META):
                    value = txn.staging.get_meta(key)
                    if value or key == "state":
                        return value.encode()
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            value = txn.staging.get_xattr(node.sino, name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        value = self.view.xattrs(node).get(name)
        if value is None:
            value = self.view.virtual_xattr(node, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode, ctx):
        """Recorded xattrs and the metadata set on a transaction; never the virtual ones (state, error,
        digest, instance): `rsync -X` removes from its destination what the source does not list."""
        node = self._node(inode)
        if node.kind == "txn":
            txn = node.txn
            names = list(txn.staging.xattrs(node.sino))
            if node.sino == SROOT:
                names += [f"user.tinyfs.{k}" for k in META if txn.staging.get_meta(k)]
            return [n.encode() for n in names]
        return [n.encode() for n in self.view.xattrs(node)]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        node, name, txn = self._xattr_target(inode, name)
        value = bytes(value)
        if name.startswith("user.tinyfs."):
            if node.sino == SROOT:
                self._set_meta(txn, name[len("user.tinyfs."):], value)
            return  # copied from a view (cp -a): accepted and ignored
        txn.staging.set_xattr(node.sino, name, value)

    def _xattr_target(self, inode, name) -> tuple[Node, str, OpenTxn]:
        """Where an xattr may change: only user.* names, only inside a live transaction."""
        node = self._node(inode)
        name = bytes(name).decode("utf-8", "surrogateescape")
        if node.kind != "txn":
            raise fail(errno.EROFS)
        if not name.startswith("user."):
            raise fail(errno.ENOTSUP)
        return node, name, self._live(node)

    def _set_meta(self, txn: OpenTxn, key: str, value: bytes) -> None:
        if key not in META:
            if key in ("state", "error"):
                raise fail(errno.EPERM, f"user.tinyfs.{key} is read-only")
            return
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EILSEQ) from None
        if key in ("message", "creator"):
            check_text(key, text, "user.tinyfs.")     # E2BIG past its limit, as for a too-large xattr
        if key == "label" and text:
            check_label(text)
            if text in self.archive.labels(txn.rid):
                raise fail(errno.EEXIST, f"label {text!r} is already used")
        txn.staging.set_meta(key, text)

    @handler
    async def removexattr(self, inode, name, ctx):
        node, name, txn = self._xattr_target(inode, name)
        if node.sino == SROOT and name.startswith("user.tinyfs."):
            key = name[len("user.tinyfs."):]
            if key in ("state", "error"):
                raise fail(errno.EPERM, f"user.tinyfs.{key} is read-only")
            if key in META:
                if not txn.staging.get_meta(key):
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR)    # as for any attribute that is not set
                txn.staging.set_meta(key, "")
                return
        if not txn.staging.remove_xattr(node.sino, name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # -- the file system -----------------------------------------------------
    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.archive.root)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    @handler
    async def access(self, inode, mode, ctx):
        return True


def _feed_hasher(of: OpenFile) -> None:
    """(worker thread) Hash queued buffers until none is left; the loop appends meanwhile (deque appends
    and pops are thread-safe). Each buffer goes to the hasher it was queued for: after a truncate to 0 the
    file has a new one, and bytes written before it must not reach it. A hasher the loop has dropped (a
    write broke the order) is fed in vain, and nobody reads it."""
    while of.pending:
        hasher, buf = of.pending[0]
        hasher.update(buf)
        of.pending.popleft()


def _touches_link_groups(before, after, changes: dict) -> bool:
    """Whether a commit changed a link group, or a path of one: the node of a linked file is keyed by
    its group's first path, so moving the tree path by path would miss the others."""
    if not (before.hardlinks or after.hardlinks):
        return False
    return before.hardlinks != after.hardlinks or any(before.group_of(p) for p in changes)


def _drop_cached_bytes(ino: int) -> None:
    """(worker thread) Drop the kernel's cached pages of an inode. Not on the loop: the kernel waits for the
    pages of the read being answered, and the loop must send that answer first."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except Exception:
        pass  # the kernel no longer knows it


def _same_bytes(a, b) -> bool:
    """Whether entry b differs from a only in attributes: two directories, or two files of one digest."""
    return (isinstance(a, DirEntry) and isinstance(b, DirEntry)) or \
        (isinstance(a, FileEntry) and isinstance(b, FileEntry) and a.digest == b.digest)


def _read_only(node: Node) -> bool:
    """Whether a node belongs to a read-only tree: resources/, instances/, aip/, events.jsonl, the root."""
    if node.kind == "top":
        return node.path not in ("transactions", "commit")
    return node.kind != "txn"


def _opener(ctx, mode: int) -> Opener:
    """Who opens a file for writing; their credentials are read now if the file has set-id bits (while
    ctx.pid is surely the opener), else only if it gains some before a write (txn.Opener)."""
    opener = Opener(ctx.uid, ctx.gid, ctx.pid)
    if mode & (stat.S_ISUID | stat.S_ISGID):
        opener.read_credentials()
    return opener


def _write_only(flags: int) -> bool:
    return (flags & os.O_ACCMODE) == os.O_WRONLY


def _now() -> int:
    import time
    return time.time_ns()
