"""The resource's directory as stored (format.md): resource.json and one BagIt bag per instance under
instances/<iid>/, as the mount's aip/<rid>/ and the server's /aip/<rid>/ show it, read-only.

Where the bags come from is the store's business, and the two stores differ in what they have
(Store.local): a local store's resource is a real directory, served exactly as it is (modes, times);
an object store has no directories, so the tree is made from what the store publishes.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

from .errors import NotFound
from .layout import ArchiveRoot

# (mode, size, mtime_ns, ctime_ns) of a name under aip/<rid>
Stat = tuple[int, int, int, int]


class DiskBags:
    """A local store: the resource directory itself."""

    def __init__(self, archive: ArchiveRoot):
        self.archive = archive

    def present(self, rid: str) -> bool:
        return self.archive.resource_dir(rid).is_dir()

    def where(self, rid: str, path: str) -> str:
        top = self.archive.resource_dir(rid)
        return str(top / path if path else top)

    def stat(self, rid: str, path: str) -> Stat:
        st = os.lstat(self.where(rid, path))
        return st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def exists(self, rid: str, path: str) -> bool:
        return os.path.lexists(self.where(rid, path))

    def names(self, rid: str, path: str) -> list[str]:
        return sorted(os.listdir(self.where(rid, path)))

    def readlink(self, rid: str, path: str) -> str:
        return os.readlink(self.where(rid, path))

    def file(self, rid: str, path: str) -> str:
        return self.where(rid, path)


class StoreBags:
    """An object store: directories are what the names of the published objects imply (each instance's
    from Store.published_files, kept: a published instance never changes), files and directories are
    read-only, a payload file's size is the one instance.json records and a tag file's that of its
    cached copy, and every name under an instance has its `created` as its time (resource.json and the
    directories above: the first instance's). What `children` lists is worked out in a thread; a name
    looked up without a listing first may fetch a small document on the way (as resources/ does)."""

    KEEP = 64       # instances whose names are kept (a 10,000-file instance: about 1 MB)

    def __init__(self, archive: ArchiveRoot):
        self.archive = archive
        self._bags: OrderedDict[tuple[str, str], dict[str, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._firsts: dict[str, str] = {}

    def present(self, rid: str) -> bool:
        return self.archive.exists(rid)

    def _bag(self, rid: str, iid: str) -> dict[str, bool]:
        """Path (relative to the resource) -> is a directory, for instances/<iid>/ and all below it."""
        with self._lock:
            bag = self._bags.get((rid, iid))
            if bag is not None:
                self._bags.move_to_end((rid, iid))
                return bag
        top = f"instances/{iid}"
        bag = {top: True, f"{top}/data": True}          # (a bag that stores nothing new has an empty data/)
        for path in self.archive.store.published_files(rid, iid):
            bag[path] = False
            parent = path.rpartition("/")[0]
            while parent not in bag:
                bag[parent] = True
                parent = parent.rpartition("/")[0]
        with self._lock:
            self._bags[(rid, iid)] = bag
            while len(self._bags) > self.KEEP:
                self._bags.popitem(last=False)
        return bag

    def _kind(self, rid: str, path: str) -> bool | None:
        """True: a directory, False: a file, None: nothing there."""
        if path in ("", "instances"):
            return True
        if path == "resource.json":
            return False
        parts = path.split("/", 2)
        if len(parts) < 2 or parts[0] != "instances":
            return None
        try:
            return self._bag(rid, parts[1]).get(path)
        except NotFound:
            return None

    def stat(self, rid: str, path: str) -> Stat:
        kind = self._kind(rid, path)
        if kind is None:
            raise FileNotFoundError(errno.ENOENT, "not in the store", path)
        parts = path.split("/", 2)
        iid = parts[1] if len(parts) >= 2 else self._first(rid)
        when = int(self.archive.instance_mtime(rid, iid) * 1e9)
        if kind:
            return stat.S_IFDIR | 0o555, 0, when, when
        found = self.archive.instance(rid, iid).payload().get(path) if len(parts) == 3 else None
        size = found[1] if found else self.archive.stored_path(rid, path).stat().st_size
        return stat.S_IFREG | 0o444, size, when, when

    def _first(self, rid: str) -> str:
        """The first instance (it never changes: an object store has no dynamic mode), asked once."""
        first = self._firsts.get(rid)
        if first is None:
            ids = self.archive.instance_ids(rid)
            if not ids:
                raise FileNotFoundError(errno.ENOENT, "no such resource", rid)
            first = self._firsts[rid] = ids[0]
        return first

    def exists(self, rid: str, path: str) -> bool:
        return self._kind(rid, path) is not None

    def names(self, rid: str, path: str) -> list[str]:
        if path == "":
            return ["instances", "resource.json"]
        if path == "instances":
            return self.archive.instance_ids(rid)
        if not self._kind(rid, path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        below = f"{path}/"
        bag = self._bag(rid, path.split("/", 2)[1])
        return sorted({p[len(below):].split("/", 1)[0] for p in bag if p.startswith(below)})

    def readlink(self, rid: str, path: str) -> str:
        raise OSError(errno.EINVAL, "not a symbolic link", path)

    def file(self, rid: str, path: str) -> str:
        return str(self.archive.stored_path(rid, path))


def bags_of(archive: ArchiveRoot) -> DiskBags | StoreBags:
    return DiskBags(archive) if archive.store.local else StoreBags(archive)
