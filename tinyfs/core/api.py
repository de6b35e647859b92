"""The Python API (SPEC section 9): Archive, transactions as context managers, read access."""

from __future__ import annotations

import base64
import io
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from . import tree
from .commit import CommitRequest, CommitResult, NewFile, commit
from .digests import CHUNK
from .errors import Forbidden, InvalidName, NotFound, TinyfsError
from .fixity import FixityError, open_verified
from .history import InstanceLog, Version
from .ids import check_logical_path, check_rid, parent_of
from .layout import ArchiveRoot, init_archive
from .limits import check_metadata
from .model import DirEntry, FileEntry, InstanceDoc, LinkEntry, State, link_groups

log = logging.getLogger(__name__)

InstanceRef = InstanceDoc | str | None     # an instance as Resource takes it: itself, its id or label, or the head


# scheme -> what opens an archive by URL (`Archive("https://...")`): registered by the layers above the
# core (tinyfs/__init__.py registers the HTTP client of tinyfs.web), so that the core knows no protocol.
URL_OPENERS: dict[str, Callable[..., object]] = {}


class Archive:
    """An archive root. `with Archive(path) as a:` or plain use; nothing needs closing today.
    `Archive(url)` opens an archive served elsewhere (an opener registered in URL_OPENERS)."""

    def __new__(cls, root: str | os.PathLike = "", **options):
        scheme, sep, _ = str(root).partition("://")
        if cls is Archive and sep and scheme.lower() in URL_OPENERS:
            return URL_OPENERS[scheme.lower()](str(root), **options)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike, *, copies: int | None = None):
        self.root = ArchiveRoot(root)
        self.copies = copies     # with replicas: stores a commit must reach (None: as replicas.json says)

    @staticmethod
    def init(root: str | os.PathLike, mode: str = "preservation", digests: list[str] | None = None,
             immutable: bool = False, verify_writes: bool = True, identify: bool = True) -> Archive:
        init_archive(root, mode, digests, immutable, verify_writes, identify)
        return Archive(root)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self.root.resource_ids())

    def __contains__(self, rid: str) -> bool:
        return self.root.exists(rid)

    def new(self, rid: str | None = None, *, message: str = "", creator: str = "", label: str | None = None
            ) -> Transaction:
        """A transaction creating a new resource (id: a fresh UUIDv7 when not given)."""
        if rid is None:
            from .ids import new_instance_id
            rid = new_instance_id()
        check_rid(rid)
        if self.root.exists(rid):
            from .errors import AlreadyExists
            raise AlreadyExists(f"resource {rid!r} already exists")
        return Transaction(self.root, rid, None, message=message, creator=creator, label=label,
                           copies=self.copies)

    def get(self, rid: str, mode: str = "r", *, message: str = "", creator: str = "",
            label: str | None = None) -> Resource | Transaction:
        """mode "r": a Resource to read; "a" or "t": a transaction on top of its current state."""
        head = self.root.require(rid)
        if mode == "r":
            return Resource(self.root, rid)
        if mode in ("a", "t"):
            return Transaction(self.root, rid, head, message=message, creator=creator, label=label,
                               copies=self.copies)
        raise InvalidName(f"unknown mode {mode!r} (use 'r', 'a' or 't')")

    def events(self, start: str | None = None) -> Iterator[dict]:
        return self.root.events.read(start)

    def ingest_ocfl(self, rid: str, src: str | os.PathLike, *, progress=None):
        """Import the OCFL object at `src` as resource `rid`, one instance per version in order
        (docs/ocfl.md); an OcflIngestResult says which version made which instance. An invalid object
        raises InvalidOcfl (its codes in the message) and commits nothing. Needs the `ocfl` extra."""
        from .ocflingest import ingest_ocfl
        return ingest_ocfl(self, rid, src, progress=progress)

    def purge(self, rid: str) -> None:
        from .commit import purge
        purge(self.root, rid)

    def formats(self, rids: list[str] | None = None, *, identify: bool = False) -> dict:
        """What `tinyfs formats` says: {"formats": [(Format or None, files)], "pending": [(rid, iid)]} over
        the current states of `rids` (default: every resource); `identify`: identify what is pending first."""
        from . import formats
        if identify:
            todo = formats.pending(self.root, rids)
            if todo:
                with formats.Workers() as workers:
                    for rid, iid in todo:
                        formats.identify_instance(self.root, rid, iid, workers)
        return formats.summary(self.root, rids)

    def premis(self, out: BinaryIO, since: str | None = None) -> int:
        """Write the event log (from event `since`) as PREMIS 3 XML to the binary file `out`, as
        `tinyfs events --premis` does; the number of events written."""
        from .premis import write_premis
        return write_premis(self.root, out, since)


class Resource:
    """Read access to a resource's current state (or any instance's)."""

    def __init__(self, root: ArchiveRoot, rid: str):
        self._root, self.id = root, rid

    @property
    def instances(self) -> list[InstanceDoc]:
        return [self._root.instance(self.id, iid) for iid in self._root.instance_ids(self.id)]

    def state(self, instance: InstanceRef = None) -> State:
        return self._doc(instance).state

    def open(self, path: str, instance: InstanceRef = None) -> BinaryIO:
        """The file's bytes, verified against their recorded digest when read in order to the end: the
        read that reaches the end raises FixityError (an OSError, EIO) if they do not match, and so does
        every later read. Reads after a seek elsewhere than 0 are served as stored, unverified."""
        return io.BufferedReader(open_verified(self._root, self.id, self._doc(instance), path, "api"), CHUNK)

    def read(self, path: str, instance: InstanceRef = None) -> bytes:
        """The whole file, verified (FixityError when the stored bytes are damaged or missing)."""
        with self.open(path, instance) as f:
            return f.read()

    def export_ocfl(self, dest: str | os.PathLike, *, progress=None):
        """Write the resource, every instance, as one OCFL 1.1 object at `dest` (which must not exist):
        one version per instance, the bytes verified as they are copied (docs/ocfl.md). Damaged stored
        bytes raise FixityError and leave nothing at `dest`. Needs the `ocfl` extra."""
        from .ocflexport import export_ocfl
        return export_ocfl(self._root, self.id, dest, progress=progress)

    def format(self, path: str, instance: InstanceRef = None):
        """The file's format (a formats.Format: PUID, MIME type, name, basis), or None while the instance
        that stored its bytes is not identified yet (or for an archive made with --no-identify)."""
        from .formats import format_of
        doc = self._doc(instance)
        if path not in doc.state.files:
            raise NotFound(f"resource {self.id!r} has no file {path!r} in instance {doc.id}")
        return format_of(self._root, self.id, doc, path)

    def history(self, path: str) -> list[Version]:
        """Every version of a logical path, oldest first: the instance that introduced it (`iid`, `created`,
        its `label`, `message`, `creator`), its `kind` ("file", "link", "dir", or "deleted") and `entry`
        (a FileEntry, LinkEntry, DirEntry, or None). NotFound when the path never existed. Answered from
        the history index (core/history.py), caught up first if the resource moved on."""
        return self._root.history.versions(self.id, path)

    def log(self, changes: bool = False) -> list[InstanceLog]:
        """Every instance, oldest first, with how many paths it added, changed and removed (`changes`:
        which, each a Change(path, change, kind))."""
        return self._root.history.log(self.id, changes)

    def _doc(self, instance: InstanceRef) -> InstanceDoc:
        """The instance named by an InstanceDoc (of this resource), an id, a label, or None (the head)."""
        if isinstance(instance, InstanceDoc):
            if instance.resource != self.id:
                raise NotFound(f"instance {instance.id} belongs to {instance.resource!r}, not {self.id!r}")
            instance = instance.id
        return self._root.instance(self.id, self._root.resolve_instance(self.id, instance))

    def __iter__(self) -> Iterator[str]:
        return iter(self.state().files)


class Transaction:
    """Changes to one resource, committed on a clean `with` exit, dropped on an exception.

    Bytes are read at commit (copied into the new bag while they are hashed, one pass).
    """

    def __init__(self, root: ArchiveRoot, rid: str, base: str | None, *, message: str = "",
                 creator: str = "", label: str | None = None, copies: int | None = None):
        self._root, self.rid, self.base = root, rid, base
        self.copies = copies
        self.message, self.creator = message, creator
        check_metadata(message, creator, label)
        self.label = label
        self._base_state = root.state(rid, base) if base else State()
        self._changes: dict[str, object] = {}
        # Link groups added: the (path, NewFile) pairs that were one inode, whether in the sources
        # (found by st_dev/st_ino) or in a recorded state; a pair counts while its path still holds it.
        self._linked: list[list[tuple[str, NewFile]]] = []
        self._inodes: dict[tuple[int, int], list[tuple[str, NewFile]]] = {}
        self.root: DirEntry | None = None      # the resource root's mode and mtime; None: the head's
        self.result: CommitResult | None = None
        self._done = False
        root.events.append("transaction.opened", rid, base, via="api")

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # -- what exists in the transaction so far ------------------------------
    def _current(self, path: str):
        if path in self._changes:
            return self._changes[path]
        return self._base_state.get(path)

    def _paths(self) -> set[str]:
        live = {p for p in self._base_state.entries() if self._changes.get(p, True) is not None}
        return live | {p for p, c in self._changes.items() if c is not None}

    def _ensure_parents(self, path: str) -> None:
        """Make the missing directories above `path`, the highest first (a loop: a path may have
        2,000 components)."""
        missing = []
        parent = parent_of(path)
        while parent:
            existing = self._current(parent)
            if isinstance(existing, DirEntry):
                break
            if existing is not None:
                raise InvalidName(f"{parent!r} exists and is not a directory")
            missing.append(parent)
            parent = parent_of(parent)
        for directory in reversed(missing):
            self._changes[directory] = DirEntry(0o755, _now_ns())

    # -- changes ---------------------------------------------------------
    def add(self, source: str | os.PathLike, path: str | None = None) -> None:
        """Add a file, symlink or directory tree at `path` (default: its base name)."""
        self._check_open()
        source = Path(source)
        path = check_logical_path(path if path is not None else _name_of(source))
        st = os.lstat(source)
        self._remove_tree(path)
        self._ensure_parents(path)
        self._add_one(source, path, st)
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirs, files in tree.walk(source):
                rel_dir = os.path.relpath(dirpath, source)
                for name in sorted(dirs + files):
                    full = Path(dirpath, name)
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    self._add_one(full, check_logical_path(f"{path}/{_decoded(rel)}"), os.lstat(full))

    def _add_one(self, source: Path, path: str, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode):
            new = self._changes[path] = NewFile(source, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                                                _user_xattrs(source), linkable=False)
            if st.st_nlink > 1:      # hard-linked: other paths of this transaction may be the same inode
                group = self._inodes.get((st.st_dev, st.st_ino))
                if group is None:
                    group = self._inodes[(st.st_dev, st.st_ino)] = []
                    self._linked.append(group)
                group.append((path, new))
        elif stat.S_ISDIR(st.st_mode):
            self._changes[path] = DirEntry(stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        elif stat.S_ISLNK(st.st_mode):
            self._changes[path] = LinkEntry(os.readlink(source), st.st_mtime_ns)
        else:
            raise Forbidden(f"{source}: only regular files, directories and symbolic links can be archived")

    def add_recorded(self, state: State, payload: str | os.PathLike) -> None:
        """Put a recorded state in place as it was recorded (a tinyfs export's instance.json, checked
        against its payload by the caller): each of its top-level names replaces whatever the transaction
        has there; directories, symbolic links, modes, mtimes, user xattrs and link groups are the
        record's, and each file's bytes are read from `payload/<its path>` at commit."""
        self._check_open()
        payload = Path(payload)
        entries = state.entries()
        for top in sorted({path.split("/", 1)[0] for path in entries}):
            self._remove_tree(check_logical_path(top))
        for path in sorted(entries, key=lambda p: p.split("/")):      # parents first
            entry = entries[path]
            check_logical_path(path)
            if isinstance(entry, FileEntry):
                self._changes[path] = NewFile(payload / path, entry.size, entry.mode, entry.mtime_ns,
                                              dict(entry.xattrs), linkable=False)
            else:
                self._changes[path] = entry
        self._linked += [[(path, self._changes[path]) for path in group] for group in state.hardlinks]
        if state.root is not None:
            self.root = state.root

    def _link_groups(self) -> tuple[tuple[str, ...], ...]:
        """The link groups of the state this transaction makes: the base's, less the paths it changed,
        and the groups it added, less the paths changed again since."""
        kept = [[p for p in group if p not in self._changes] for group in self._base_state.hardlinks]
        added = [[p for p, new in group if self._changes.get(p) is new] for group in self._linked]
        return link_groups(kept + added)

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a file from memory (written to a temporary file read again at commit)."""
        import tempfile
        self._check_open()
        check_logical_path(path)
        fd, tmp = tempfile.mkstemp(prefix=".api-", dir=self._root.transactions)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._remove_tree(path)
        self._ensure_parents(path)
        self._changes[path] = NewFile(Path(tmp), len(data), mode, _now_ns(), linkable=True)

    def remove(self, path: str) -> None:
        """Remove a file, symlink or directory (with everything below it)."""
        self._check_open()
        if self._current(path) is None:
            raise NotFound(f"{self.rid}: no {path!r} to remove")
        self._remove_tree(path)

    def _remove_tree(self, path: str) -> None:
        current = self._current(path)
        if current is None:
            return          # nothing there, so nothing below it either (every child has its directory)
        if not isinstance(current, DirEntry):
            self._drop(path)
            return
        prefix = path + "/"
        for p in [p for p in self._paths() if p == path or p.startswith(prefix)]:
            self._drop(p)

    def _drop(self, path: str) -> None:
        """Forget a path: a removal when the base has it, else just drop the pending change."""
        if self._base_state.get(path) is not None:
            self._changes[path] = None
        else:
            self._changes.pop(path, None)

    # -- ending ------------------------------------------------------------
    def commit(self, progress: Callable[[int], None] | None = None,
               verify: Callable[[dict[str, NewFile]], None] | None = None) -> CommitResult:
        """Commit. `progress(n)` is told of bytes read; `verify(new_files)` sees every new file's
        digests (path -> NewFile) after they are hashed and before the instance is published, and
        aborts the commit by raising."""
        self._check_open()
        self._done = True
        new_files = {p: c for p, c in self._changes.items() if isinstance(c, NewFile)}
        req = CommitRequest(self.rid, self.base, dict(self._changes), message=self.message,
                            creator=self.creator, label=self.label,
                            before_publish=(lambda _iid: verify(new_files)) if verify else None,
                            hardlinks=self._link_groups(), root=self.root, copies=self.copies)
        try:
            self.result = commit(self._root, req, progress)
        finally:
            self._cleanup()
        if self.result.instance is not None:
            identify_committed(self._root, self.rid, self.result.instance)
        return self.result

    def rollback(self) -> None:
        if not self._done:
            self._done = True
            self._cleanup()
            self._root.events.append("transaction.rolled_back", self.rid, None)

    def _cleanup(self) -> None:
        for change in self._changes.values():
            if isinstance(change, NewFile) and change.linkable:
                try:
                    os.unlink(change.source)
                except FileNotFoundError:
                    pass

    def _check_open(self) -> None:
        if self._done:
            raise TinyfsError("this transaction is already committed or rolled back")


def identify_committed(root: ArchiveRoot, rid: str, iid: str) -> None:
    """After a commit through the API (or the CLI), the formats of its new files, before the call returns:
    a script's process may end right after it. A failure leaves the instance pending, never fails the
    commit that is made."""
    from . import formats

    if not formats.wants_identification(root):
        return
    try:
        if len(root.instance(rid, iid).payload()) > formats.IN_PROCESS:
            with formats.Workers() as workers:
                formats.identify_instance(root, rid, iid, workers)
        else:
            formats.identify_instance(root, rid, iid)
    except Exception:
        log.exception("identifying the formats of %s %s (it stays pending: tinyfs formats --identify)", rid, iid)


def _name_of(source: Path) -> str:
    name = os.path.basename(os.path.normpath(os.path.abspath(source)))
    return _decoded(name)


def _decoded(name: str) -> str:
    """A name from os.listdir; one that was not UTF-8 is refused (EILSEQ)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        from .errors import BadEncoding
        raise BadEncoding(f"name is not valid UTF-8: {os.fsencode(name)!r}") from None
    return name


def _user_xattrs(source: Path) -> dict[str, str]:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("user.") and not name.startswith("user.tinyfs."):
            try:
                out[name] = base64.b64encode(os.getxattr(source, name, follow_symlinks=False)).decode()
            except OSError:
                pass
    return out


def _now_ns() -> int:
    import time
    return time.time_ns()


__all__ = ["Archive", "Resource", "Transaction", "FileEntry", "FixityError"]
