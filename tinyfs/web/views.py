"""The read-only sections over WebDAV: /resources, /instances, /aip and /events.jsonl, as the mount shows them.

Collections and their properties (PROPFIND) come from here; GET and HEAD of a file are answered by
http.py (verified bytes, Range, ETag), which finds the file with `locate` below. Anything that would change
a view (PUT, DELETE, MKCOL, MOVE, PROPPATCH, LOCK on a missing name) is refused by WsgiDAV's defaults with
403 Forbidden, the HTTP form of the mount's EROFS.

WebDAV has no symbolic links: a recorded link is shown as a small file of type `inode/symlink` whose body
is the link's target (the tar and zip forms and `?format=json` carry links exactly). Labels are not listed
in /instances/<rid>/ (the mount shows them as symbolic links), but /instances/<rid>/<label>/ resolves.
"""

from __future__ import annotations

import io
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass

from wsgidav.dav_error import HTTP_FORBIDDEN, DAVError
from wsgidav.dav_provider import DAVCollection, DAVNonCollection

from ..core.bags import bags_of
from ..core.errors import NotFound
from ..core.fixity import open_verified
from ..core.ids import is_rid
from ..core.layout import ArchiveRoot
from ..core.model import DirEntry, FileEntry, InstanceDoc, LinkEntry
from .app import Context
from .errors import etag_of

SYMLINK_TYPE = "inode/symlink"


# -- what a path names, for http.py and the DAV resources alike ---------------------------------------

@dataclass
class Found:
    """A file (or a link, shown as one) of a view: its size, time, digest and how to read it."""
    size: int
    mtime: float                  # seconds
    etag: str | None              # its digest (errors.etag_of), or None
    content_type: str
    open: Callable[[], io.RawIOBase]      # the bytes: verified as they are read when a digest is recorded
    digest_checked: bool          # open() verifies (a recorded digest); False: served as stored


@dataclass
class StateAt:
    """An instance of a resource and a path in its state: what /resources/<rid>/... and
    /instances/<rid>/<iid>/... name."""
    rid: str
    doc: InstanceDoc
    path: str                     # logical path, "" for the resource root


def state_at(archive: ArchiveRoot, parts: list[str]) -> StateAt | None:
    """/resources/<rid>/<path> (the head) or /instances/<rid>/<iid or label>/<path>; None if none."""
    if parts[0] == "resources" and len(parts) >= 2 and is_rid(parts[1]):
        iid, below = archive.head(parts[1]), parts[2:]
    elif parts[0] == "instances" and len(parts) >= 3 and is_rid(parts[1]):
        try:
            iid, below = archive.resolve_instance(parts[1], parts[2]), parts[3:]
        except NotFound:
            return None
    else:
        return None
    if iid is None:
        return None
    return StateAt(parts[1], archive.instance(parts[1], iid), "/".join(below))


def locate(archive: ArchiveRoot, parts: list[str]) -> Found | None:
    """The file a path names in a read-only section, or None (a collection, or nothing)."""
    if parts == ["events.jsonl"]:
        view = archive.events.view()
        st = view.stat()
        return Found(st.st_size, st.st_mtime, None, "application/jsonl",
                     lambda: io.FileIO(view, "r"), False)
    if parts[0] == "aip" and len(parts) >= 3 and is_rid(parts[1]):
        return _aip_file(archive, parts[1], "/".join(parts[2:]))
    at = state_at(archive, parts)
    if at is None or not at.path:
        return None
    return _state_file(archive, at)


def _state_file(archive: ArchiveRoot, at: StateAt) -> Found | None:
    entry = at.doc.state.get(at.path)
    if isinstance(entry, FileEntry):
        return Found(entry.size, entry.mtime_ns / 1e9, etag_of(at.doc.digest, entry.digest), _type_of(at.path),
                     lambda: open_verified(archive, at.rid, at.doc, at.path, "http"), True)
    if isinstance(entry, LinkEntry):
        body = entry.target.encode("utf-8", "surrogateescape")
        return Found(len(body), entry.mtime_ns / 1e9, None, SYMLINK_TYPE, lambda: io.BytesIO(body), False)
    return None


def _aip_file(archive: ArchiveRoot, rid: str, path: str) -> Found | None:
    """A file of the stored bags: a payload file is verified against the digest its instance records (the
    one its manifest lists); tag files, resource.json and the rest are served as stored."""
    bags = bags_of(archive)
    try:
        mode, size, mtime_ns, _ = bags.stat(rid, path)
    except (FileNotFoundError, NotADirectoryError, NotFound):
        return None
    if mode & 0o170000 != 0o100000:
        return None
    parts = path.split("/", 3)
    if len(parts) == 4 and parts[0] == "instances" and parts[2] == "data":
        doc = archive.instance(rid, parts[1])
        payload = doc.payload().get(path)
        if payload is not None:
            digest, _, logical = payload
            return Found(size, mtime_ns / 1e9, etag_of(doc.digest, digest), _type_of(path),
                         lambda: open_verified(archive, rid, doc, logical, "http"), True)
    return Found(size, mtime_ns / 1e9, None, _type_of(path), lambda: io.FileIO(bags.file(rid, path), "r"), False)


def _type_of(path: str) -> str:
    return mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"


# -- the DAV resources ------------------------------------------------------------------------------------

def resource(ctx: Context, parts: list[str], path: str, environ: dict):
    archive = ctx.archive
    section = parts[0]
    if section == "events.jsonl":
        found = locate(archive, parts)
        return FileResource(path, environ, found) if found and len(parts) == 1 else None
    if len(parts) == 1:
        return Listing(path, environ, archive.root.stat().st_mtime, archive.resource_ids)
    rid = parts[1]
    if not is_rid(rid) or not archive.exists(rid):
        return None
    if section == "instances" and len(parts) == 2:
        iids = archive.instance_ids(rid)
        if not iids:
            return None
        return Listing(path, environ, archive.instance_mtime(rid, iids[-1]), lambda: archive.instance_ids(rid))
    if section == "aip":
        return _aip_resource(archive, rid, "/".join(parts[2:]), path, environ)
    at = state_at(archive, parts)
    if at is None:
        return None
    return _state_resource(archive, at, path, environ)


def _state_resource(archive: ArchiveRoot, at: StateAt, path: str, environ: dict):
    if not at.path:
        root = at.doc.state.root
        mtime = root.mtime_ns / 1e9 if root else archive.instance_mtime(at.rid, at.doc.id)
        return StateDir(path, environ, archive, at, mtime)
    entry = at.doc.state.get(at.path)
    if isinstance(entry, DirEntry):
        return StateDir(path, environ, archive, at, entry.mtime_ns / 1e9)
    found = _state_file(archive, at)
    return FileResource(path, environ, found) if found else None


def _aip_resource(archive: ArchiveRoot, rid: str, below: str, path: str, environ: dict):
    bags = bags_of(archive)
    try:
        mode, _, mtime_ns, _ = bags.stat(rid, below)
    except (FileNotFoundError, NotADirectoryError, NotFound):
        return None
    if mode & 0o170000 == 0o040000:
        return Listing(path, environ, mtime_ns / 1e9, lambda: bags.names(rid, below))
    found = _aip_file(archive, rid, below)
    return FileResource(path, environ, found) if found else None


class ReadOnly:
    """What a view refuses: every change answers 403 (the mount's EROFS)."""

    def _refuse(self, *_, **__):
        raise DAVError(HTTP_FORBIDDEN, "read-only: changes are made in /transactions/<rid>")

    delete = create_empty_resource = create_collection = begin_write = copy_move_single = move_recursive = _refuse

    def set_property_value(self, name, value, dry_run=False):
        self._refuse()

    def prevent_locking(self) -> bool:
        return True


class Listing(ReadOnly, DAVCollection):
    """A read-only collection whose members are named by `names()` (each resolved from its path)."""

    def __init__(self, path: str, environ: dict, mtime: float, names: Callable[[], list[str]]):
        super().__init__(path, environ)
        self._mtime, self._names = mtime, names

    def get_member_names(self) -> list[str]:
        return list(self._names())

    def get_last_modified(self) -> float:
        return self._mtime

    def get_etag(self):
        return None

    def support_etag(self) -> bool:
        return False


class StateDir(Listing):
    """A directory of a state: members made from the state itself (one PROPFIND of a 10,000-entry
    directory reads nothing more)."""

    def __init__(self, path: str, environ: dict, archive: ArchiveRoot, at: StateAt, mtime: float):
        super().__init__(path, environ, mtime, lambda: [name for name, _, _ in at.doc.state.children(at.path)])
        self.archive, self.at = archive, at

    def get_member_list(self) -> list:
        base = self.path.rstrip("/")
        out = []
        for name, logical, _ in self.at.doc.state.children(self.at.path):
            child = _state_resource(self.archive, StateAt(self.at.rid, self.at.doc, logical),
                                    f"{base}/{name}", self.environ)
            if child is not None:
                out.append(child)
        return out

    def get_member(self, name: str):
        logical = f"{self.at.path}/{name}" if self.at.path else name
        return _state_resource(self.archive, StateAt(self.at.rid, self.at.doc, logical),
                               f"{self.path.rstrip('/')}/{name}", self.environ)


class FileResource(ReadOnly, DAVNonCollection):
    def __init__(self, path: str, environ: dict, found: Found):
        super().__init__(path, environ)
        self.found = found

    def get_content_length(self) -> int:
        return self.found.size

    def get_content_type(self) -> str:
        return self.found.content_type

    def get_last_modified(self) -> float:
        return self.found.mtime

    def get_etag(self):
        return self.found.etag

    def support_etag(self) -> bool:
        return self.found.etag is not None

    def support_ranges(self) -> bool:
        return True

    def get_content(self):
        return self.found.open()
