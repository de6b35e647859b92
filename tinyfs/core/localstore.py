"""An archive's committed instances in its own directory: format tinyfs/1 on disk (SPEC section 4).

    ROOT/resources/XX/YY/<rid>/resource.json           XX/YY: the first hex digits of sha256(rid)
    ROOT/resources/XX/YY/<rid>/instances/<iid>/...     one BagIt bag per instance

An instance is published by ONE rename of its staged bag (for a new resource: of
the whole staged resource directory) into resources/, and the directory that
gained the name is fsynced: it exists whole or not at all. Committers of one
resource are ordered by the caller's flock (ArchiveRoot.resource_lock), so the
head check before the rename never races with another local committer; it only
turns a caller's mistake into Stale instead of a fork.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path

from . import tree
from .digests import CHUNK
from .durable import fsync_dir, write_new
from .errors import Forbidden, InvalidName, NotFound, Stale
from .ids import check_rid, is_instance_id, is_rid
from .store import StoreConfig

TRASH_PREFIX = ".trash-"      # in ROOT/transactions/: renamed out of resources/, to be deleted (recover sweeps)


class LocalStore:
    """The committed side of a local archive: ROOT/resources/, with the rules of format tinyfs/1."""

    local = True

    def __init__(self, root: Path, config: StoreConfig, immutable: bool = False):
        self.root = root
        self.config = config
        self.immutable = immutable              # worm --immutable: published files carry chattr +i
        self.resources = root / "resources"
        self.trash = root / "transactions"      # same file system: a rename out of resources/ is atomic

    def __repr__(self) -> str:
        return f"LocalStore({self.root})"

    def resource_dir(self, rid: str) -> Path:
        """The resource's directory itself (created by its first publish)."""
        h = hashlib.sha256(rid.encode()).hexdigest()
        return self.resources / h[:2] / h[2:4] / rid

    # -- what is published ---------------------------------------------------------------------

    def exists(self, rid: str) -> bool:
        return is_rid(rid) and (self.resource_dir(rid) / "resource.json").exists()

    def resource_ids(self) -> list[str]:
        """Every resource directory, sorted: a walk of the fan-out, meant for listings, not hot paths."""
        found = []
        for a in _listdir(self.resources):
            for b in _listdir(self.resources / a):
                found.extend(r for r in _listdir(self.resources / a / b) if is_rid(r))
        return sorted(found)

    def instance_ids(self, rid: str) -> list[str]:
        """The instance directories, in chain order (UUIDv7 sorts by time)."""
        return sorted(i for i in _listdir(self.resource_dir(rid) / "instances") if is_instance_id(i))

    def head(self, rid: str) -> str | None:
        ids = self.instance_ids(rid)
        return ids[-1] if ids else None

    def heads(self, rids: list[str]) -> dict[str, str | None]:
        return {rid: self.head(rid) for rid in rids}

    # -- reading ---------------------------------------------------------------------------------

    def stored_file(self, rid: str, relpath: str) -> Path:
        """The stored file itself (no copy: the caller reads the archive's own bytes)."""
        path = self.resource_dir(rid) / _checked(relpath)
        if not os.path.isfile(path):
            raise NotFound(f"no stored file {relpath!r} in resource {rid!r}")
        return path

    def read_document(self, rid: str, relpath: str) -> bytes:
        try:
            return (self.resource_dir(rid) / _checked(relpath)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no stored file {relpath!r} in resource {rid!r}") from None

    def forget(self, rid: str, relpath: str) -> None:
        """Nothing is cached: a file that failed verification is damaged in the archive (fsck says so)."""

    def published_files(self, rid: str, iid: str) -> list[str]:
        """Every file of the instance's bag, relative to the resource; NotFound for no such instance."""
        bag = self.resource_dir(rid) / "instances" / iid
        if not is_instance_id(iid) or not bag.is_dir():
            raise NotFound(f"no instance {iid} of resource {rid!r}")
        top = self.resource_dir(rid)
        return sorted(os.path.relpath(os.path.join(d, name), top)
                      for d, _dirs, files in tree.walk(bag) for name in files)

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, rid: str, iid: str, previous: str | None, bag: Path,
                resource_json: bytes | None = None) -> None:
        """Rename the staged bag into place. `bag` is `<stage>/instances/<iid>` on this file system, made
        durable by the caller; for a first instance the whole stage becomes the resource directory, so it
        holds resource.json (written here from `resource_json` if the caller has not)."""
        check_rid(rid)
        if not is_instance_id(iid) or (previous is not None and iid <= previous):
            raise InvalidName(f"instance id {iid!r} must be a UUIDv7 after {previous!r}")
        if previous is None:
            self._publish_first(rid, iid, Path(bag), resource_json)
            return
        resource_dir = self.resource_dir(rid)
        if self.head(rid) != previous:
            raise Stale(f"resource {rid!r}: {previous} is no longer the head")
        os.rename(bag, resource_dir / "instances" / iid)    # the atomic step for a new instance
        fsync_dir(resource_dir / "instances")

    def _publish_first(self, rid: str, iid: str, bag: Path, resource_json: bytes | None) -> None:
        stage = bag.parent.parent
        if bag != stage / "instances" / iid:
            raise InvalidName(f"a first instance is published from <stage>/instances/{iid}, not {bag}")
        if not (stage / "resource.json").exists():
            if resource_json is None:
                raise InvalidName(f"the first instance of {rid!r} needs its resource.json")
            write_new(stage / "resource.json", resource_json, 0o444 if self.config.mode == "worm" else 0o644)
            fsync_dir(stage)
        resource_dir = self.resource_dir(rid)
        resource_dir.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(resource_dir.parent.parent)
        fsync_dir(resource_dir.parent)
        try:
            os.rename(stage, resource_dir)                  # the atomic step for a new resource
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise Stale(f"resource {rid!r} already has a first instance") from None
            raise
        fsync_dir(resource_dir.parent)

    # -- repairing -------------------------------------------------------------------------------

    def restore(self, rid: str, relpath: str, source: Path) -> None:
        """A copy of `source` renamed over the stored file: a temporary file beside it, fsynced, with the
        mode of its siblings (worm: 0444); a read-only (worm) directory is made writable for the rename
        only, and an --immutable archive's file and directory lose chattr +i around it and get it back."""
        relpath = _checked(relpath)
        parts = relpath.split("/")
        if len(parts) < 3 or parts[0] != "instances" or not is_instance_id(parts[1]):
            if relpath != "resource.json":
                raise NotFound(f"no stored file {relpath!r} in resource {rid!r}")
        top = self.resource_dir(rid) / (f"instances/{parts[1]}" if len(parts) >= 3 else "")
        if not top.is_dir():
            raise NotFound(f"no published instance holds {relpath!r} in resource {rid!r}")
        path = self.resource_dir(rid) / relpath
        folder = self._make_parents(top, path.parent)
        immutable = self.immutable
        with _writable(folder, immutable):
            if immutable and path.exists():
                _set_immutable(path, False)
            tmp = folder / f".restore-{uuid.uuid4().hex}"
            try:
                _copy_synced(source, tmp, _sibling_mode(folder, path.name, self.config.mode))
                os.rename(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(folder)
            if immutable:
                _set_immutable(path, True)

    def _make_parents(self, top: Path, folder: Path) -> Path:
        """The stored file's directory, made again (with the bag's directory mode) if it went missing."""
        missing = []
        d = folder
        while not d.is_dir() and d != top:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            with _writable(d.parent, self.immutable):
                d.mkdir()
                fsync_dir(d.parent)
            if self.config.mode == "worm":
                os.chmod(d, 0o555)
        return folder

    def recover(self, older_than: float = 0) -> list[str]:
        """Nothing to do: an unpublished attempt leaves only its stage in ROOT/transactions/ (never in
        resources/), which recover.py sweeps with the other leftovers there."""
        return []

    def purge(self, rid: str) -> None:
        """Delete a resource (dynamic mode only): one rename out of resources/ first, so it is gone at once.
        The caller holds the resource lock."""
        if self.config.mode != "dynamic":
            raise Forbidden(f"purge is allowed in dynamic mode only; this archive is {self.config.mode}")
        if self.head(rid) is None and not self.exists(rid):
            raise NotFound(f"no resource {rid!r}")
        self._discard(self.resource_dir(rid))

    def drop_instance(self, rid: str, iid: str) -> None:
        """Dynamic mode: remove one (replaced) instance, by one rename out of resources/ first."""
        self._discard(self.resource_dir(rid) / "instances" / iid)

    def _discard(self, path: Path) -> None:
        trash = self.trash / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(path, trash)
        fsync_dir(path.parent)
        tree.rmtree(trash, force=True)


def _sibling_mode(folder: Path, name: str, mode: str) -> int:
    """0444 in worm mode; else the permission bits of another stored file in `folder` (a bag's files
    share theirs)."""
    if mode == "worm":
        return 0o444
    for entry in os.scandir(folder):
        if entry.name != name and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
            return stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
    return 0o644


def _copy_synced(source: Path, dest: Path, mode: int) -> None:
    with open(source, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while chunk := fin.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _writable(folder: Path, immutable: bool):
    """`folder` writable by its owner for the block (a worm bag's directories are 0555, and chattr +i
    on an --immutable archive), its mode and flag put back afterwards."""
    if immutable:
        _set_immutable(folder, False)
    before = stat.S_IMODE(os.stat(folder).st_mode)
    if not before & stat.S_IWUSR:
        os.chmod(folder, before | stat.S_IWUSR)
    try:
        yield
    finally:
        if not before & stat.S_IWUSR:
            os.chmod(folder, before)
        if immutable:
            _set_immutable(folder, True)


def _set_immutable(path: Path, on: bool) -> None:
    from .commit import set_immutable
    set_immutable(path, on)


def _checked(relpath: str) -> str:
    """A stored path inside the resource (instance.json comes from disk: never let it point out)."""
    parts = relpath.split("/")
    if ".." in parts or "" in parts or "." in parts:
        raise InvalidName(f"invalid stored path {relpath!r}")
    return relpath


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
