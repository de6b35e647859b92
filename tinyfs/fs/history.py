"""history/<rid>/...: every version of every logical path of a resource, read-only (core/history.py).

    history/<rid>/              a directory for every name ever seen at the top of the resource
    history/<rid>/<path>/       a directory for every path ever seen; in it, each a directory, the names
                                ever seen in <path> (when it was ever a directory), and its versions (when
                                it was ever a file or a symbolic link):
        <iid>                   the version instance <iid> introduced: a file with its bytes (verified on
                                read, as in resources/), mode, mtime and user xattrs, or a symbolic link
        <iid>.deleted           an empty file: the file or link stopped being there at instance <iid>
                                (removed, or replaced by a directory)
        <label>                 a symbolic link to the <iid> of the version the path had at the instance
                                with that label (when the path was a file or link there)

A directory's own versions (its mode and mtime) are not shown: `tinyfs log` and Resource.history list them.
A name is looked up in that order: a version (`<iid>`, `<iid>.deleted`), then a name ever seen in the
directory, then a label. So a label that is also such a name is hidden (its `<iid>` is still there).

Node keys identify what a node shows, so nodes never go stale: a version is keyed by its path and
instance and never changes; a directory's attributes never change (mode 0555, the mount's time); what a
commit adds are names that did not exist, which the kernel has not cached (FUSE caches no failed
lookup, and lists no directory from its cache). Every listing and lookup reads the index, which the
commit updated before its rename returned, or which catches up with the head first: history/<rid> shows
a commit as soon as resources/<rid> does, with nothing for the kernel to forget.
"""

from __future__ import annotations

import base64
import bisect
import errno
import os
import stat

import trio

from ..core.errors import NotFound
from ..core.history import DELETED, DIR, FILE, LINK, Version
from .files import FileHandle
from .tree import LONG, SHORT, Attr, Listing, Node, fail
from .verify import Expected
from .view import VIRTUAL_FILE_XATTRS, ReadOnlyTree, created_ns

DIRECTORY, VERSION, LABEL = "history", "history-version", "history-label"       # node kinds: key[0]
DELETED_SUFFIX = ".deleted"


class EmptyFile(FileHandle):
    """An `<iid>.deleted` entry: no bytes."""

    async def read(self, off: int, size: int) -> bytes:
        return b""


def shown_versions(versions: list[Version]) -> list[tuple[str, Version]]:
    """(name, version) of the versions a path's directory shows: each file or link version as `<iid>`, and
    `<iid>.deleted` where a file or link stops being there (removed, or replaced by a directory)."""
    out = []
    before = None
    for v in versions:
        if v.kind in (FILE, LINK):
            out.append((v.iid, v))
        elif before in (FILE, LINK):
            out.append((v.iid + DELETED_SUFFIX, v))
        before = v.kind
    return out


def label_targets(versions: list[Version], labels: dict[str, str]) -> dict[str, str]:
    """label -> the iid of the version shown for the path at the labelled instance (instance ids sort in
    chain order), for the labels where the path was a file or link."""
    iids = [v.iid for v in versions]
    out = {}
    for label, at in labels.items():
        n = bisect.bisect_right(iids, at)
        if n and versions[n - 1].kind in (FILE, LINK):
            out[label] = iids[n - 1]
    return out


class HistoryTree(ReadOnlyTree):
    """history/<rid>/...: answered from the archive's history index, in worker threads (SQLite, and a
    look at the resource's head)."""

    # -- nodes ---------------------------------------------------------------------------------------
    def directory(self, rid: str, path: str = "") -> Node:
        return Node(self, (DIRECTORY, rid, path), rid=rid, path=path)

    def _version(self, rid: str, path: str, name: str, version: Version) -> Node:
        return Node(self, (VERSION, rid, path, name), rid=rid, iid=version.iid, path=path, entry=version)

    def _label(self, rid: str, path: str, label: str, iid: str) -> Node:
        return Node(self, (LABEL, rid, path, label, iid), rid=rid, iid=iid, path=path)

    # -- the section history/ ------------------------------------------------------------------------
    def resource_root(self, rid: str) -> Node | None:
        return self.directory(rid) if self.archive.head(rid) else None

    def resource_roots(self) -> list[tuple[str, Node]]:
        return [(rid, self.directory(rid)) for rid in self.archive.resource_ids()]

    # -- the Tree calls ------------------------------------------------------------------------------
    def lookup_asks_store(self, parent: Node) -> bool:
        return True         # the index: SQLite, and the resource's head to compare it with

    def attrs(self, node: Node) -> Attr:
        kind = node.key[0]
        mtime = self.services.root_mtime
        if kind == DIRECTORY:
            return self._attr(stat.S_IFDIR | 0o555, mtime_ns=mtime, nlink=2, entry_timeout=SHORT)
        if kind == LABEL:
            return self._attr(stat.S_IFLNK | 0o777, size=len(node.iid), mtime_ns=mtime, entry_timeout=SHORT,
                              attr_timeout=SHORT)
        v: Version = node.entry
        # in dynamic mode a version goes with the instance that held it: looked up again soon
        timeout = SHORT if self.archive.config.mode == "dynamic" else LONG
        if v.kind == FILE:
            e = v.entry
            return self._attr(stat.S_IFREG | e.mode, size=e.size, mtime_ns=e.mtime_ns, ctime_ns=e.mtime_ns,
                              entry_timeout=timeout)
        if v.kind == LINK:
            e = v.entry
            return self._attr(stat.S_IFLNK | 0o777, size=len(os.fsencode(e.target)), mtime_ns=e.mtime_ns,
                              ctime_ns=e.mtime_ns, entry_timeout=timeout)
        created = created_ns(v.iid)          # an `<iid>.deleted`: the instance's time
        return self._attr(stat.S_IFREG | 0o444, mtime_ns=created, ctime_ns=created, entry_timeout=timeout)

    def lookup(self, parent: Node, name: str) -> Node:
        """(worker thread) In the order of the module's docstring: a version, a name seen, a label."""
        if parent.key[0] != DIRECTORY:
            raise fail(errno.ENOTDIR)
        index, rid, path = self.archive.history, parent.rid, parent.path
        versions = self._versions(rid, path)
        for shown, version in shown_versions(versions):
            if shown == name:
                return self._version(rid, path, name, version)
        child = f"{path}/{name}" if path else name
        if index.seen(rid, child):
            return self.directory(rid, child)
        target = label_targets(versions, index.labels(rid)).get(name) if versions else None
        if target is None:
            raise NotFound(name)
        return self._label(rid, path, name, target)

    async def children(self, node: Node) -> Listing:
        if node.key[0] != DIRECTORY:
            raise fail(errno.ENOTDIR)
        return await trio.to_thread.run_sync(self._listing, node)

    def _listing(self, node: Node) -> Listing:
        """(worker thread) The names ever seen in the path, its versions and its labels, sorted by name,
        each name once (the first in lookup's order)."""
        index, rid, path = self.archive.history, node.rid, node.path
        versions = self._versions(rid, path)
        found: dict[str, Node] = {}
        for name, version in shown_versions(versions):
            found[name] = self._version(rid, path, name, version)
        for name in index.children(rid, path):
            found.setdefault(name, self.directory(rid, f"{path}/{name}" if path else name))
        if versions:
            for label, iid in label_targets(versions, index.labels(rid)).items():
                found.setdefault(label, self._label(rid, path, label, iid))
        return [(name, found[name], None) for name in sorted(found)]

    def _versions(self, rid: str, path: str) -> list[Version]:
        """The path's versions (none for the resource's root, which is no logical path, or for a path the
        index no longer has: a resource purged, or rebuilt in dynamic mode)."""
        if not path:
            return []
        try:
            return self.archive.history.versions(rid, path)
        except NotFound:
            return []

    def readlink(self, node: Node) -> str:
        if node.key[0] == LABEL:
            return node.iid
        if node.key[0] == VERSION and node.entry.kind == LINK:
            return node.entry.entry.target
        raise fail(errno.EINVAL)

    def listxattr(self, node: Node) -> list[str]:
        """A file version's recorded user xattrs (never the virtual ones: see view.StateTree.listxattr)."""
        v = node.entry if node.key[0] == VERSION else None
        return list(v.entry.xattrs) if v is not None and v.kind == FILE else []

    def getxattr(self, node: Node, name: str) -> bytes | None:
        v = node.entry if node.key[0] == VERSION else None
        if v is None or v.kind != FILE:
            return None
        if name in v.entry.xattrs:
            return base64.b64decode(v.entry.xattrs[name])
        if name not in VIRTUAL_FILE_XATTRS:
            return None
        if name == "user.tinyfs.digest":
            return f"{self.archive.config.primary}:{v.entry.digest}".encode()
        return v.stored.split("/")[1].encode()          # user.tinyfs.instance: the instance storing the bytes

    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        v = node.entry if node.key[0] == VERSION else None
        if v is None or v.kind not in (FILE, DELETED, DIR):
            raise fail(errno.EISDIR)
        if v.kind != FILE:          # an `<iid>.deleted` (of a file removed, or replaced by a directory)
            if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
                raise fail(errno.EROFS)
            return EmptyFile()
        return self._open_stored(node, flags, lambda: str(self.archive.stored_path(node.rid, v.stored)),
                                 lambda: self._expected(node.rid, v))

    def _expected(self, rid: str, v: Version) -> Expected:
        return Expected(rid, v.iid, v.path, v.stored, self.archive.config.primary, v.entry.digest, v.entry.size)

    def held_key(self, node: Node) -> tuple:
        return (self, node.rid)

    def held_root(self, key: tuple) -> tuple[int, str]:
        return self.services.top["history"], key[1]
