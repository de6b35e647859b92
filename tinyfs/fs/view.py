"""What the mount shows, as plain Python: nodes, their attributes and their children.

No pyfuse3 here, so the view is testable without a kernel. The adapter
(ops.py) turns `Attr` into EntryAttributes and OSError into FUSEError.

Node keys identify what a node shows, so that nodes never go stale. The
nodes of `instances/<rid>/<iid>` are keyed by instance id. The nodes of
`resources/<rid>` are keyed by a `Head`, one object shared by the whole
current tree of a resource: a commit through the mount moves that head to the
new instance and detaches only the nodes of entries it changed (ops.py,
`_move_current_tree`); a head moved by another process gets a new `Head`, so
`resources/<rid>` resolves to a new root node and a new tree.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
import uuid
from dataclasses import dataclass

from ..core.errors import NotFound
from ..core.ids import is_rid
from ..core.layout import ArchiveRoot
from ..core.model import DirEntry, FileEntry, LinkEntry, State
from ..core.staging import ROOT_MODE

BLKSIZE = 1 << 20          # coreutils sizes its buffers from st_blksize: 1 MiB writes, fewer requests
LONG = 3600.0              # committed trees never change
SHORT = 1.0                # names that move on commit: resources/<rid>, listings
TOP = ("resources", "instances", "aip", "transactions", "commit", "events.jsonl")
VIRTUAL_FILE_XATTRS = ("user.tinyfs.digest", "user.tinyfs.instance")


@dataclass
class Attr:
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
    """One inode of the mount. `kind` says which part of the tree it belongs to."""

    kind: str                       # root, top, state, instances_of, label, aip, txn, events
    key: tuple
    rid: str | None = None
    iid: str | None = None
    path: str = ""                  # logical path (state), relative path (aip), or top-level name
    entry: object = None            # FileEntry | DirEntry | LinkEntry for state nodes
    sino: int = 0                   # staging inode for txn nodes
    txn: object = None              # OpenTxn for txn nodes
    ino: int = 0
    head: Head | None = None        # state nodes of resources/<rid>: the head they show (iid is then None)
    tree: object = None             # the trees.Tree it is counted in, once registered (read-only trees)


def tree_key(node: Node) -> tuple | None:
    """The read-only tree a node belongs to (trees.py), None for the rest of the mount; see tree_root()."""
    if node.kind == "state":
        return ("state", node.rid, node.head or node.iid)
    if node.kind == "aip":
        return ("aip", node.rid)
    return None


def state_key(rid: str, shown: str | Head, path: str) -> tuple:
    """The key of the node showing `path` of an instance (an iid) or of resources/<rid> (its Head)."""
    return ("state", rid, shown, path)


def shown_iid(node: Node) -> str:
    """The instance a state node shows."""
    return node.head.iid if node.head is not None else node.iid


def created_ns(iid: str) -> int:
    """An instance's time from its UUIDv7 (48-bit milliseconds): listing resources/ reads no instance.json."""
    return (uuid.UUID(iid).int >> 80) * 1_000_000


def _state_child(parent: Node, path: str, entry, state: State) -> Node:
    """The node of `path`; every path of a link group gets the node of the group's first path, so the
    group is one inode."""
    group = state.group_of(path)
    if group is not None:
        path = group[0]
    return Node("state", state_key(parent.rid, parent.head or parent.iid, path), rid=parent.rid,
                iid=parent.iid, head=parent.head, path=path, entry=entry)


class View:
    """Read-only parts of the mount over one archive root."""

    def __init__(self, archive: ArchiveRoot, uid: int, gid: int):
        self.archive = archive
        self.uid, self.gid = uid, gid
        st = os.stat(archive.root)
        self.root_mtime = st.st_mtime_ns
        self.heads: dict[str, Head] = {}      # rid -> what its resources/<rid> tree shows

    # -- attributes ------------------------------------------------------
    def attr(self, node: Node) -> Attr:
        k = node.kind
        if k == "root":
            return Attr(stat.S_IFDIR | 0o555, mtime_ns=self.root_mtime, ctime_ns=self.root_mtime,
                        uid=self.uid, gid=self.gid, nlink=2 + 5)
        if k == "top":
            mode = 0o1777 if node.path in ("transactions", "commit") else 0o555
            return Attr(stat.S_IFDIR | mode, mtime_ns=self.root_mtime, ctime_ns=self.root_mtime,
                        uid=self.uid, gid=self.gid, nlink=2, entry_timeout=LONG, attr_timeout=SHORT)
        if k == "events":
            st = os.stat(self.archive.events.path)
            return Attr(stat.S_IFREG | 0o444, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                        uid=self.uid, gid=self.gid, entry_timeout=LONG, attr_timeout=0)
        if k == "state":
            return self._linked(node, self._state_attr(node))
        if k == "instances_of":
            return Attr(stat.S_IFDIR | 0o555, mtime_ns=self.root_mtime, uid=self.uid, gid=self.gid, nlink=2,
                        entry_timeout=SHORT, attr_timeout=SHORT)
        if k == "label":
            return Attr(stat.S_IFLNK | 0o777, size=len(node.iid), mtime_ns=self.root_mtime, uid=self.uid,
                        gid=self.gid, entry_timeout=SHORT, attr_timeout=SHORT)
        if k == "aip":
            st = os.lstat(self._aip_path(node))
            timeout = LONG if stat.S_ISREG(st.st_mode) else SHORT
            return Attr(st.st_mode, size=st.st_size,
                        mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, uid=self.uid, gid=self.gid,
                        entry_timeout=timeout, attr_timeout=timeout)
        raise OSError(errno.EIO, f"no attributes for {k}")

    def _state_attr(self, node: Node) -> Attr:
        e = node.entry
        if e is None:  # the root of a state: resources/<rid> (short timeouts: it moves) or instances/<rid>/<iid>
            iid = shown_iid(node)
            root = self.archive.root_entry(node.rid, iid)
            # none recorded (an instance of the CLI or the API): the mode a transaction starts with, and
            # the instance's time
            mode, mtime = (root.mode, root.mtime_ns) if root else (ROOT_MODE, created_ns(iid))
            timeout = SHORT if node.head is not None else LONG
            return Attr(stat.S_IFDIR | mode, mtime_ns=mtime, ctime_ns=mtime, uid=self.uid, gid=self.gid,
                        nlink=2, entry_timeout=timeout, attr_timeout=timeout)
        if isinstance(e, FileEntry):
            return Attr(stat.S_IFREG | e.mode, size=e.size, mtime_ns=e.mtime_ns,
                        ctime_ns=e.mtime_ns, uid=self.uid, gid=self.gid)
        if isinstance(e, DirEntry):
            return Attr(stat.S_IFDIR | e.mode, mtime_ns=e.mtime_ns, ctime_ns=e.mtime_ns,
                        uid=self.uid, gid=self.gid, nlink=2)
        return Attr(stat.S_IFLNK | 0o777, size=len(os.fsencode(e.target)), mtime_ns=e.mtime_ns,
                    ctime_ns=e.mtime_ns, uid=self.uid, gid=self.gid)

    def _linked(self, node: Node, attr: Attr) -> Attr:
        """A file's link count is the size of its link group in the state shown (else 1)."""
        if isinstance(node.entry, FileEntry):
            group = self.archive.state(node.rid, shown_iid(node)).group_of(node.path)
            if group is not None:
                attr.nlink = len(group)
        return attr

    # -- names -------------------------------------------------------------
    def lookup(self, parent: Node, name: str) -> Node:
        """A child node (not yet registered: the caller gives it an inode)."""
        k = parent.kind
        if k == "top":
            return self._lookup_top(parent.path, name)
        if k == "state":
            return self._lookup_state(parent, name)
        if k == "instances_of":
            return self._lookup_instance(parent.rid, name)
        if k == "aip":
            child = f"{parent.path}/{name}" if parent.path else name
            path = self.archive.resource_dir(parent.rid) / child
            if not os.path.lexists(path):
                raise NotFound(name)
            return Node("aip", ("aip", parent.rid, child), rid=parent.rid, path=child)
        raise NotFound(name)

    def _lookup_top(self, top: str, name: str) -> Node:
        if not is_rid(name):
            raise NotFound(name)
        if top == "resources":
            head = self.archive.head(name)
            if head is None:
                self.heads.pop(name, None)      # purged (dynamic mode): a resource made again starts anew
                raise NotFound(name)
            return self.state_root(name, head, current=True)
        if top == "instances":
            if not self.archive.head(name):
                raise NotFound(name)
            return Node("instances_of", ("instances_of", name), rid=name)
        if top == "aip":
            if not self.archive.resource_dir(name).is_dir():
                raise NotFound(name)
            return Node("aip", ("aip", name, ""), rid=name, path="")
        raise NotFound(name)

    def state_root(self, rid: str, iid: str, current: bool) -> Node:
        """The root of instances/<rid>/<iid>, or (current) of resources/<rid> showing its head `iid`."""
        if not current:
            return Node("state", state_key(rid, iid, ""), rid=rid, iid=iid)
        head = self.current_head(rid, iid)
        return Node("state", state_key(rid, head, ""), rid=rid, head=head)

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

    def _lookup_state(self, parent: Node, name: str) -> Node:
        path = f"{parent.path}/{name}" if parent.path else name
        state = self.archive.state(parent.rid, shown_iid(parent))
        entry = state.get(path)
        if entry is None:
            raise NotFound(name)
        return _state_child(parent, path, entry, state)

    def _lookup_instance(self, rid: str, name: str) -> Node:
        ids = self.archive.instance_ids(rid)
        if name in ids:
            return self.state_root(rid, name, current=False)
        labels = self.archive.labels(rid)
        if name in labels:
            return Node("label", ("label", rid, name, labels[name]), rid=rid, iid=labels[name], path=name)
        raise NotFound(name)

    def children(self, node: Node) -> list[tuple[str, Node]]:
        k = node.kind
        if k == "top":
            if node.path == "resources":
                return [(rid, self.state_root(rid, head, current=True)) for rid in self.archive.resource_ids()
                        if (head := self.archive.head(rid))]
            if node.path == "instances":
                return [(rid, Node("instances_of", ("instances_of", rid), rid=rid))
                        for rid in self.archive.resource_ids()]
            if node.path == "aip":
                return [(rid, Node("aip", ("aip", rid, ""), rid=rid, path="")) for rid in self.archive.resource_ids()]
            return []
        if k == "instances_of":
            out = [(iid, self.state_root(node.rid, iid, current=False))
                   for iid in self.archive.instance_ids(node.rid)]
            out += [(label, Node("label", ("label", node.rid, label, iid), rid=node.rid, iid=iid, path=label))
                    for label, iid in sorted(self.archive.labels(node.rid).items())]
            return out
        if k == "state":
            return self._state_children(node)
        if k == "aip":
            base = self.archive.resource_dir(node.rid) / node.path
            names = sorted(os.listdir(base))
            return [(n, Node("aip", ("aip", node.rid, f"{node.path}/{n}" if node.path else n), rid=node.rid,
                             path=f"{node.path}/{n}" if node.path else n)) for n in names]
        raise OSError(errno.ENOTDIR, "not a directory")

    def _state_children(self, node: Node) -> list[tuple[str, Node]]:
        """Children of a directory of a state; the per-directory index is cached per instance."""
        index = self._index(node.rid, shown_iid(node))
        state = self.archive.state(node.rid, shown_iid(node))
        out = []
        for name, path, entry in index.get(node.path, ()):
            out.append((name, _state_child(node, path, entry, state)))
        return out

    def _index(self, rid: str, iid: str) -> dict[str, list]:
        doc = self.archive.instance(rid, iid)
        index = getattr(doc, "_dir_index", None)
        if index is None:
            index = {}
            for path, entry in sorted(doc.state.entries().items()):
                parent, _, name = path.rpartition("/")
                index.setdefault(parent, []).append((name, path, entry))
            doc._dir_index = index  # immutable document: the index never goes stale
        return index

    # -- contents ----------------------------------------------------------
    def file_path(self, node: Node) -> str:
        """The file on disk whose bytes a read-only file node shows."""
        if node.kind == "state":
            doc = self.archive.instance(node.rid, shown_iid(node))
            return str(self.archive.stored_path(node.rid, doc.stored[node.entry.digest]))
        if node.kind == "aip":
            return str(self._aip_path(node))
        if node.kind == "events":
            return str(self.archive.events.path)
        raise OSError(errno.EISDIR, "not a file")

    def readlink(self, node: Node) -> str:
        if node.kind == "state" and isinstance(node.entry, LinkEntry):
            return node.entry.target
        if node.kind == "label":
            return node.iid
        if node.kind == "aip":
            return os.readlink(self._aip_path(node))
        raise OSError(errno.EINVAL, "not a symbolic link")

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """The recorded user xattrs of a read-only node: what listxattr lists (and `cp -a`, `rsync -X` copy)."""
        if node.kind != "state" or not isinstance(node.entry, FileEntry):
            return {}
        return {name: base64.b64decode(value) for name, value in node.entry.xattrs.items()}

    def virtual_xattr(self, node: Node, name: str) -> bytes | None:
        """A synthetic attribute, readable by name and never listed (as CephFS's `ceph.*`): listed, every
        copy tool would carry it along, and `rsync -anciX` would flag every file against its source."""
        if node.kind != "state" or not isinstance(node.entry, FileEntry) or name not in VIRTUAL_FILE_XATTRS:
            return None
        doc = self.archive.instance(node.rid, shown_iid(node))
        if name == "user.tinyfs.digest":
            return f"{doc.digest}:{node.entry.digest}".encode()
        return doc.stored[node.entry.digest].split("/")[1].encode()     # user.tinyfs.instance

    def _aip_path(self, node: Node):
        return self.archive.resource_dir(node.rid) / node.path if node.path else self.archive.resource_dir(node.rid)
