"""The read-only trees: what was committed, as it is stored.

- `StateTree`: resources/<rid> (the head's state) and instances/<rid>/<iid> (any instance's);
- `InstancesTree`: instances/<rid>, its instances and label links;
(`AipTree`, aip/<rid>, the stored bags as they are, is in aip.py.)

Node keys identify what a node shows, so that nodes never go stale. The nodes of
`instances/<rid>/<iid>` are keyed by instance id. The nodes of `resources/<rid>` are keyed by a `Head`,
one object shared by the whole current tree of a resource: a commit through the mount moves that head
to the new instance and detaches only the nodes of entries it changed (`StateTree.move_head`); a head
moved by another process gets a new `Head`, so `resources/<rid>` resolves to a new root node and a new
tree.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
import uuid
from collections.abc import Callable
from typing import Protocol

from ..core.commit import state_changes
from ..core.errors import NotFound
from ..core.formats import format_of
from ..core.model import DirEntry, FileEntry, LinkEntry, State
from ..core.staging import ROOT_MODE
from .files import FileHandle, StoredFile
from .tree import LONG, SHORT, Attr, Head, Listing, Node, Services, Tree, fail
from .verify import Expected, expected_of_state

VIRTUAL_FILE_XATTRS = ("user.tinyfs.digest", "user.tinyfs.instance", "user.tinyfs.format")


class Section(Protocol):
    """A tree shown as one directory of the top level with an entry per resource (resources/, instances/,
    aip/): the root of a resource in it, None if the resource has none there; every (rid, root)."""

    def resource_root(self, rid: str) -> Node | None: ...

    def resource_roots(self) -> list[tuple[str, Node]]: ...


def created_ns(iid: str) -> int:
    """An instance's time from its UUIDv7 (48-bit milliseconds): listing resources/ reads no instance.json."""
    return (uuid.UUID(iid).int >> 80) * 1_000_000


def state_key(rid: str, shown: str | Head, path: str) -> tuple:
    """The key of the node showing `path` of an instance (an iid) or of resources/<rid> (its Head)."""
    return ("state", rid, shown, path)


def shown_iid(node: Node) -> str:
    """The instance a state node shows."""
    return node.head.iid if node.head is not None else node.iid


class ReadOnlyTree(Tree):
    """What the read-only trees share: their owner is the mount's, their files open for reading only."""

    def __init__(self, services: Services):
        self.services = services
        self.archive = services.archive

    def _attr(self, mode: int, **fields) -> Attr:
        return Attr(mode, uid=self.services.uid, gid=self.services.gid, **fields)

    def lookup_asks_store(self, parent: Node) -> bool:
        return not self.archive.store.local      # a head query, or an instance.json not cached yet

    def _open_stored(self, node: Node, flags: int, path: Callable[[], str],
                     expect: Callable[[], Expected | None]) -> FileHandle:
        """(path and expect: called at the first read the page cache cannot answer)"""
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise fail(errno.EROFS)
        return StoredFile(self.services, node, path, expect)


class StateTree(ReadOnlyTree):
    """resources/<rid> and instances/<rid>/<iid>: the logical state of an instance."""

    def __init__(self, services: Services):
        super().__init__(services)
        self.heads: dict[str, Head] = {}      # rid -> what its resources/<rid> tree shows

    # -- roots --------------------------------------------------------------------------------------
    def root(self, rid: str, iid: str, current: bool) -> Node:
        """The root of instances/<rid>/<iid>, or (current) of resources/<rid> showing its head `iid`."""
        if not current:
            return Node(self, state_key(rid, iid, ""), rid=rid, iid=iid)
        head = self.current_head(rid, iid)
        return Node(self, state_key(rid, head, ""), rid=rid, head=head)

    def current_head(self, rid: str, iid: str) -> Head:
        """The Head of resources/<rid> whose head was read (or committed) as `iid`: a new one when `iid` is
        newer than the Head's instance (first seen, or moved on by another process: a new tree), else the
        Head as it is. Instance ids sort in chain order (the head is the greatest), and an older `iid` was
        read before a commit through the mount moved the Head on: a worker thread listing resources/
        reads every head while the loop commits. Replacing the Head then made a root for the previous
        instance, which the listing handed to the kernel after the rename had returned: resources/<rid>
        showed the state before the commit for up to its 1 s entry timeout."""
        head = self.heads.get(rid)
        if head is None or head.iid < iid:
            head = self.heads[rid] = Head(iid)
        return head

    def forget_head(self, rid: str) -> None:
        """resources/<rid> is gone, or starts anew at its next lookup."""
        self.heads.pop(rid, None)

    # -- the section resources/ ------------------------------------------------------------------------
    def resource_root(self, rid: str) -> Node | None:
        head = self.archive.head(rid)
        if head is None:
            self.forget_head(rid)    # purged (dynamic mode): a resource made again starts anew
            return None
        return self.root(rid, head, current=True)

    def resource_roots(self) -> list[tuple[str, Node]]:
        """(worker thread)"""
        rids = self.archive.resource_ids()
        heads = self.archive.heads(rids)        # (an object store: several at once)
        return [(rid, self.root(rid, head, current=True)) for rid in rids if (head := heads[rid])]

    # -- the Tree calls ------------------------------------------------------------------------------
    def attrs(self, node: Node) -> Attr:
        e = node.entry
        if e is None:  # the root of a state: resources/<rid> (short timeouts: it moves) or instances/<rid>/<iid>
            iid = shown_iid(node)
            root = self.archive.root_entry(node.rid, iid)
            # none recorded (an instance of the CLI or the API): the mode a transaction starts with, and
            # the instance's time
            mode, mtime = (root.mode, root.mtime_ns) if root else (ROOT_MODE, created_ns(iid))
            timeout = SHORT if node.head is not None else LONG
            return self._attr(stat.S_IFDIR | mode, mtime_ns=mtime, ctime_ns=mtime, nlink=2,
                              entry_timeout=timeout, attr_timeout=timeout)
        if isinstance(e, FileEntry):
            return self._attr(stat.S_IFREG | e.mode, size=e.size, mtime_ns=e.mtime_ns, ctime_ns=e.mtime_ns,
                              nlink=self._links(node))
        if isinstance(e, DirEntry):
            return self._attr(stat.S_IFDIR | e.mode, mtime_ns=e.mtime_ns, ctime_ns=e.mtime_ns, nlink=2)
        return self._attr(stat.S_IFLNK | 0o777, size=len(os.fsencode(e.target)), mtime_ns=e.mtime_ns,
                          ctime_ns=e.mtime_ns)

    def _links(self, node: Node) -> int:
        """A file's link count: the size of its link group in the state shown (else 1)."""
        group = self.archive.state(node.rid, shown_iid(node)).group_of(node.path)
        return len(group) if group is not None else 1

    def lookup(self, parent: Node, name: str) -> Node:
        path = f"{parent.path}/{name}" if parent.path else name
        state = self.archive.state(parent.rid, shown_iid(parent))
        entry = state.get(path)
        if entry is None:
            raise NotFound(name)
        return self._child(parent, path, entry, state)

    def _child(self, parent: Node, path: str, entry, state: State) -> Node:
        """The node of `path`; every path of a link group gets the node of the group's first path, so the
        group is one inode."""
        group = state.group_of(path)
        if group is not None:
            path = group[0]
        return Node(self, state_key(parent.rid, parent.head or parent.iid, path), rid=parent.rid,
                    iid=parent.iid, head=parent.head, path=path, entry=entry)

    async def children(self, node: Node) -> Listing:
        if node.entry is not None and not isinstance(node.entry, DirEntry):
            raise fail(errno.ENOTDIR)
        state = self.archive.state(node.rid, shown_iid(node))
        return [(name, self._child(node, path, entry, state), None)
                for name, path, entry in state.children(node.path)]

    def readlink(self, node: Node) -> str:
        if isinstance(node.entry, LinkEntry):
            return node.entry.target
        raise fail(errno.EINVAL)

    def listxattr(self, node: Node) -> list[str]:
        """The recorded user xattrs: what `cp -a` and `rsync -X` copy. Never the virtual ones (digest,
        instance): `rsync -X` removes from its destination what the source does not list."""
        return list(node.entry.xattrs) if isinstance(node.entry, FileEntry) else []

    def getxattr(self, node: Node, name: str) -> bytes | None:
        """A recorded xattr, or a virtual one: readable by name and never listed (as CephFS's `ceph.*`):
        listed, every copy tool would carry it along, and `rsync -anciX` would flag every file."""
        e = node.entry
        if not isinstance(e, FileEntry):
            return None
        if name in e.xattrs:
            return base64.b64decode(e.xattrs[name])
        if name not in VIRTUAL_FILE_XATTRS:
            return None
        doc = self.archive.instance(node.rid, shown_iid(node))
        if name == "user.tinyfs.digest":
            return f"{doc.digest}:{e.digest}".encode()
        if name == "user.tinyfs.format":        # absent while the formats are being identified
            fmt = format_of(self.archive, node.rid, doc, node.path)
            return fmt.short().encode() if fmt is not None else None
        return doc.stored[e.digest].split("/")[1].encode()     # user.tinyfs.instance

    def getxattr_blocks(self, name: str) -> bool:
        return name == "user.tinyfs.format"           # a record on disk (core.formats)

    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        if not isinstance(node.entry, FileEntry):
            raise fail(errno.EISDIR)
        return self._open_stored(node, flags, lambda: self.file_path(node), lambda: expected_of_state(
            self.archive, node.rid, shown_iid(node), node.path, node.entry))

    def file_path(self, node: Node) -> str:
        """The stored file whose bytes a file node shows."""
        doc = self.archive.instance(node.rid, shown_iid(node))
        return str(self.archive.stored_path(node.rid, doc.stored[node.entry.digest]))

    def forgotten(self, node: Node) -> None:
        if node.head is not None and not node.path and self.heads.get(node.rid) is node.head:
            # the root of resources/<rid>: the kernel holds no node of that tree any more (each pins its
            # parent), so the next lookup may as well start a new one
            del self.heads[node.rid]

    def held_key(self, node: Node) -> tuple:
        return (self, node.rid, node.head or node.iid)

    def held_root(self, key: tuple) -> tuple[int, str] | None:
        _, rid, shown = key
        if isinstance(shown, Head):
            return self.services.top["resources"], rid
        parent = self.services.inodes.ino_of(instances_key(rid))
        return (parent, shown) if parent is not None else None

    # -- a commit through the mount ------------------------------------------------------------------
    def move_head(self, rid: str, iid: str) -> list[tuple[int, str | None]]:
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
        whole = [(self.services.top["resources"], rid)]
        head, inodes = self.heads.get(rid), self.services.inodes
        doc = self.archive.instance(rid, iid)
        root_ino = inodes.ino_of(state_key(rid, head, "")) if head is not None else None
        if head is None or head.iid != doc.previous or root_ino is None:
            self.current_head(rid, iid)     # (never older than this commit: see current_head)
            return whole
        try:
            before = self.archive.state(rid, head.iid)
        except NotFound:     # dynamic mode dropped the previous instance, and its document is not cached
            self.current_head(rid, iid)
            return whole
        changes = state_changes(before, doc.state.entries())
        if _touches_link_groups(before, doc.state, changes):   # one node stands for several paths: anew
            del self.heads[rid]
            return whole
        stale = [(root_ino, None)] + self._detach_changed(rid, head, root_ino, changes)
        head.iid = iid
        return stale

    def _detach_changed(self, rid: str, head: Head, root_ino: int, changes: dict) -> list[tuple[int, str | None]]:
        """The stale names and attributes of the cached nodes of resources/<rid> a commit changed; a node
        that now shows other bytes is detached from the tree (keyed by its inode: it goes on showing the old
        instance while the kernel holds it)."""
        inodes = self.services.inodes
        stale: list[tuple[int, str | None]] = []
        gone: dict[str, Node] = {}
        for path, new in changes.items():
            ino = inodes.ino_of(state_key(rid, head, path))
            if ino is None:          # not cached, or added by the commit (FUSE caches no failed lookup)
                continue
            node = inodes.nodes[ino]
            if _same_bytes(node.entry, new):    # a cached node holds the entry it shows
                node.entry = new
                stale.append((ino, None))
            else:
                gone[path] = node
        for path in gone:
            parent, _, name = path.rpartition("/")
            if parent not in gone:     # else the parent's invalidation drops this name too
                parent_ino = inodes.ino_of(state_key(rid, head, parent)) if parent else root_ino
                if parent_ino is not None:
                    stale.append((parent_ino, name))
        for node in gone.values():
            inodes.rekey(node, ("detached", node.ino))
            node.head, node.iid = None, head.iid
        return stale


def instances_key(rid: str) -> tuple:
    return ("instances_of", rid)


class InstancesTree(ReadOnlyTree):
    """instances/<rid>: every instance by id, and a symbolic link per label."""

    def __init__(self, services: Services, states: StateTree):
        super().__init__(services)
        self.states = states

    def node(self, rid: str) -> Node:
        return Node(self, instances_key(rid), rid=rid)

    def resource_root(self, rid: str) -> Node | None:
        return self.node(rid) if self.archive.head(rid) else None

    def resource_roots(self) -> list[tuple[str, Node]]:
        return [(rid, self.node(rid)) for rid in self.archive.resource_ids()]

    def _label(self, rid: str, label: str, iid: str) -> Node:
        return Node(self, ("label", rid, label, iid), rid=rid, iid=iid, path=label)

    def attrs(self, node: Node) -> Attr:
        mtime = self.services.root_mtime
        if node.iid is None:
            return self._attr(stat.S_IFDIR | 0o555, mtime_ns=mtime, nlink=2, entry_timeout=SHORT,
                              attr_timeout=SHORT)
        return self._attr(stat.S_IFLNK | 0o777, size=len(node.iid), mtime_ns=mtime, entry_timeout=SHORT,
                          attr_timeout=SHORT)

    def lookup(self, parent: Node, name: str) -> Node:
        if parent.iid is not None:
            raise fail(errno.ENOTDIR)
        if name in self.archive.instance_ids(parent.rid):
            return self.states.root(parent.rid, name, current=False)
        labels = self.archive.labels(parent.rid)
        if name in labels:
            return self._label(parent.rid, name, labels[name])
        raise NotFound(name)

    async def children(self, node: Node) -> Listing:
        if node.iid is not None:
            raise fail(errno.ENOTDIR)
        rid = node.rid
        out: Listing = [(iid, self.states.root(rid, iid, current=False), None)
                        for iid in self.archive.instance_ids(rid)]
        out += [(label, self._label(rid, label, iid), None)
                for label, iid in sorted(self.archive.labels(rid).items())]
        return out

    def readlink(self, node: Node) -> str:
        if node.iid is None:
            raise fail(errno.EINVAL)
        return node.iid

    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        raise fail(errno.EISDIR)


def _touches_link_groups(before: State, after: State, changes: dict) -> bool:
    """Whether a commit changed a link group, or a path of one: the node of a linked file is keyed by
    its group's first path, so moving the tree path by path would miss the others."""
    if not (before.hardlinks or after.hardlinks):
        return False
    return before.hardlinks != after.hardlinks or any(before.group_of(p) for p in changes)


def _same_bytes(a, b) -> bool:
    """Whether entry b differs from a only in attributes: two directories, or two files of one digest."""
    return (isinstance(a, DirEntry) and isinstance(b, DirEntry)) or \
        (isinstance(a, FileEntry) and isinstance(b, FileEntry) and a.digest == b.digest)
