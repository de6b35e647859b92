"""The on-disk staging of one open transaction: transactions/<rid>/.

  txn.db     SQLite (WAL): meta, inodes, entries (names), xattrs
  blobs/<n>  the bytes of inode n once it has its own (created, or a base file written to)

Why SQLite: every operation that returned must survive a kill -9 of the
daemon (SPEC section 5), and a transaction can hold 100,000 entries; a WAL
database commits each small change with a write(2) and no fsync
(synchronous=NORMAL), and `sync()` makes everything durable when a client
fsyncs. Blobs are flat numbered files, so staging never lengthens a logical
path past the kernel's limits, and renames never move bytes.

The database holds only what changed since the base state (an overlay):
  - The base state (the head the transaction started from) is read into memory
    (`BaseTree`): every base entry gets a fixed negative inode number, its place
    in the sorted list of base paths, so a restarted daemon finds the same numbers.
  - A base inode gets a row in `inodes` (with its xattrs in `xattrs`) only when it
    is first changed ("copy-up", one SQLite transaction); new inodes have positive ids.
  - A row in `entries` overrides the base listing of its directory at that name:
    inode 0 means the base name was removed (a whiteout). A row at a base name is
    never deleted, only pointed elsewhere or set to 0.
So opening a transaction on 100,000 files writes nothing, and a commit reads
only the changes from SQLite. Transactions staged before the overlay (no
`overlay` meta key) have every base entry as a row: they read as an overlay on
an empty base.

A base file has no blob: its `base` column (or base entry) holds its digest and
its bytes are read from the archive until the first write or truncate copies
them (copy-on-write; never on open).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .digests import CHUNK
from .errors import AlreadyExists, NameTooLong, NotFound
from .ids import PATH_MAX
from .model import DirEntry, FileEntry, LinkEntry, State, group_index

ROOT = 1
ROOT_MODE = 0o755     # a transaction root's mode until a client sets one, when the base recorded none
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, blob INTEGER NOT NULL DEFAULT 0, base TEXT, digests TEXT,
    incomplete INTEGER NOT NULL DEFAULT 0, target TEXT, atime_ns INTEGER);
CREATE TABLE entries (parent INTEGER NOT NULL, name TEXT NOT NULL, inode INTEGER NOT NULL,
    PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE INDEX entries_by_inode ON entries (inode);
CREATE TABLE xattrs (inode INTEGER NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (inode, name)) WITHOUT ROWID;
"""
log = logging.getLogger(__name__)
# A disk filled to the last block must not freeze a transaction: every change of txn.db (even an unlink,
# the way to free space) needs a few pages of WAL. `reserve` holds 1 MiB the database gives up the first
# time it finds the disk full, so that it can go on recording changes and space can be freed.
RESERVE = "reserve"
RESERVE_BYTES = 1 << 20
COLUMNS = "id, kind, mode, uid, gid, size, mtime_ns, ctime_ns, blob, base, digests, incomplete, target, atime_ns"
OPENING_PREFIX = ".opening-"
OVERLAY = "overlay"   # meta key: "1" when base entries live in memory, not as rows (see the module docstring)
GONE = "-"            # the kind of a dropped base inode's row: its number must not come back from the base


@dataclass(slots=True)
class Node:
    id: int
    kind: str            # "f", "d" or "l" ("-" in the row of a dropped base inode, never in a Node)
    mode: int            # permission bits only (st_mode & 0o7777)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    blob: int            # 1 when blobs/<id> holds the bytes
    base: str | None     # digest of the base bytes while there is no blob
    digests: str | None  # JSON {alg: hex} of the blob, when hashed as it was written
    incomplete: int      # 1 when a write of the blob failed (e.g. ENOSPC): commit refuses it
    target: str | None   # symlink target
    atime_ns: int | None = None   # shown while staged (as a local disk does), never recorded


def _uses_reserve_when_full(fn):
    """A change of the database that finds the disk full gives up the reserve and is tried once more
    (a failed change is rolled back whole, so trying it again is safe)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL or not self.drop_reserve():
                raise
            log.warning("%s: disk full; the transaction's reserved space is used", self.path)
            return fn(self, *args, **kw)
    return wrapper


# Staged bytes never take the last HEADROOM bytes of the file system: txn.db needs a few pages to go on
# recording changes (an unlink is how a user frees space), and a commit needs room for its tag files.
HEADROOM = 2 << 20


def free_bytes(fd_or_path: int | str | os.PathLike) -> int:
    """Free bytes of the file system holding an open file or a path (root may use the reserved blocks)."""
    st = os.fstatvfs(fd_or_path) if isinstance(fd_or_path, int) else os.statvfs(fd_or_path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def make_reserve(path: Path) -> None:
    """Best effort: (re)create the reserve of a transaction directory."""
    target = path / RESERVE
    if target.exists():
        return
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        os.close(fd)
        fd = -1
        os.unlink(target)
    finally:
        if fd >= 0:
            os.close(fd)


class BaseTree:
    """The base state as the staging sees it: fixed inode numbers, names and listings, in memory.

    Base inode numbers are -1, -2, ... in sorted path order (a parent sorts before its children), so
    the same base state always gets the same numbers. The root is ROOT, as in the database. The paths
    of a link group are one inode, the number of the group's first path (the others' numbers are
    skipped): its home is that first path, and `group` lists all of them."""

    def __init__(self, state: State):
        self.entry: dict[int, FileEntry | LinkEntry | DirEntry] = {}
        self.path: dict[int, str] = {}                       # inode -> its path in the base (a group: the first)
        self.group: dict[int, tuple[str, ...]] = {}          # inode -> every base path of a link group
        self.kids: dict[int, dict[str, int]] = {ROOT: {}}     # directory -> {name: inode}, names sorted
        self.root = state.root                               # the root's recorded mode and mtime, or None
        self.dirs: dict[str, int] = {"": ROOT}               # directory path -> inode
        self.subdirs: dict[int, int] = {}                    # directory -> how many directories it holds
        dirs, subdirs = self.dirs, self.subdirs
        entries = state.entries()
        linked = group_index(g for g in state.hardlinks if all(p in state.files for p in g))
        firsts: dict[str, int] = {}
        for n, path in enumerate(sorted(entries), 1):
            ino = -n
            entry = entries[path]
            parent, _, name = path.rpartition("/")
            pino = dirs[parent]
            group = linked.get(path) if linked else None
            if group is not None:
                ino = firsts.setdefault(group[0], ino)    # sorted: the group's first path comes first
                self.group[ino] = group
                if ino != -n:             # a further path of the group: one more name of that inode
                    self.kids[pino][name] = ino
                    continue
            self.entry[ino] = entry
            self.path[ino] = path
            self.kids[pino][name] = ino
            if isinstance(entry, DirEntry):
                dirs[path] = ino
                self.kids[ino] = {}
                subdirs[pino] = subdirs.get(pino, 0) + 1

    def child(self, parent: int, name: str) -> int | None:
        kids = self.kids.get(parent)
        return kids.get(name) if kids else None

    def where(self, ino: int) -> tuple[int, str] | None:
        """(parent inode, name) of a base inode in the base (derived: a map per entry cost 100 bytes each)."""
        path = self.path.get(ino)
        if path is None:
            return None
        parent, _, name = path.rpartition("/")
        return self.dirs[parent], name

    def places(self, ino: int) -> list[tuple[int, str]]:
        """(parent inode, name) of every base name of a base inode: one, or each path of its link group."""
        group = self.group.get(ino)
        if group is None:
            where = self.where(ino)
            return [where] if where is not None else []
        return [(self.dirs[parent], name) for parent, _, name in (p.rpartition("/") for p in group)]


def _base_tree(staging: Staging, load_base: Callable[[str], State] | None) -> BaseTree:
    if not staging.overlay:
        return BaseTree(State())          # staged before the overlay: every base entry is a row
    base = staging.get_meta("base")
    if not base:
        return BaseTree(State())
    if load_base is None:
        raise RuntimeError(f"{staging.path}: the base state is needed to read this transaction's tree")
    try:
        return BaseTree(load_base(base))
    except NotFound:
        # dynamic mode dropped the instance the transaction started from: it shows its own changes
        # (so that it can be read and rolled back); its commit fails with ESTALE
        log.warning("%s: base instance %s no longer exists; only the transaction's own changes show",
                    staging.path, base)
        return BaseTree(State())


class Staging:
    def __init__(self, path: Path, db: sqlite3.Connection, load_base: Callable[[str], State] | None = None):
        self.path = path
        self.blobs = path / "blobs"
        self.db = db
        self._load_base = load_base
        self._tree: BaseTree | None = None
        # False for a transaction staged before the overlay: every base entry is a row (see _base_tree)
        self.overlay = self.get_meta(OVERLAY) == "1"
        self._created = int(self.get_meta("created") or 0)
        self._uid = int(self.get_meta("uid") or 0)
        self._gid = int(self.get_meta("gid") or 0)
        # base inodes with a row of their own, and base inodes some row names (a hard link or a rename)
        self._owned = {r[0] for r in db.execute("SELECT id FROM inodes WHERE id < 0")}
        self._base_named = {r[0] for r in db.execute("SELECT DISTINCT inode FROM entries WHERE inode < 0")}
        # Write-through caches: the database stays the truth, these spare a SELECT per request.
        self._nodes: dict[int, Node] = {}
        self._nlinks: dict[int, int] = {}
        self._dir_bytes: dict[int, int] = {}     # directory -> bytes of its logical path with a "/" (see room)

    # -- life cycle -----------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path / "txn.db", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Transactions outlive upgrades: bring an older txn.db up to this schema (idempotent)."""
        columns = {r[1] for r in db.execute("PRAGMA table_info(inodes)")}
        if "atime_ns" not in columns:
            db.execute("ALTER TABLE inodes ADD COLUMN atime_ns INTEGER")

    @classmethod
    def create(cls, path: Path, rid: str, base: str | None, load_base: Callable[[str], State] | None,
               uid: int, gid: int, meta: dict[str, str] | None = None, root: DirEntry | None = None) -> Staging:
        """Make transactions/<rid> showing the base instance `base`; built aside, then one rename (no torn
        opens). Nothing of the base state is written: `load_base(base)` gives it when it is first needed,
        except the mode and mtime of its root (`root`), which the root row starts with."""
        if path.exists():
            raise AlreadyExists(f"a transaction for {rid!r} is already open")
        tmp = path.with_name(f"{OPENING_PREFIX}{rid}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        (tmp / "blobs").mkdir()
        make_reserve(tmp)
        db = cls._connect(tmp)
        db.executescript(SCHEMA)
        now = time.time_ns()
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("rid", rid), ("base", base or ""), ("uid", str(uid)), ("gid", str(gid)),
                ("created", str(now)), ("state", "open"), ("error", ""), ("committing", ""),
                ("message", ""), ("creator", ""), ("label", ""), (OVERLAY, "1"), *(meta or {}).items()])
            mode, mtime = (root.mode, root.mtime_ns) if root else (ROOT_MODE, now)
            db.execute("INSERT INTO inodes (id, kind, mode, uid, gid, mtime_ns, ctime_ns) VALUES (?,?,?,?,?,?,?)",
                       (ROOT, "d", mode, uid, gid, mtime, now))
        db.close()
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AlreadyExists(f"a transaction for {rid!r} is already open") from None
        return cls.open(path, load_base)

    @classmethod
    def open(cls, path: Path, load_base: Callable[[str], State] | None = None) -> Staging:
        """Open a transaction. Without `load_base` only its metadata and blobs can be used (recovery)."""
        if not (path / "txn.db").exists():
            raise FileNotFoundError(f"{path} is not a transaction")
        make_reserve(path)
        db = cls._connect(path)
        cls._migrate(db)
        return cls(path, db, load_base)

    @classmethod
    def reopen(cls, path: Path, load_base: Callable[[str], State]) -> Staging:
        """An open transaction found on disk by a new process (after a restart or a crash): its sizes
        taken from its blobs, the entries an interrupted request left unlinked dropped."""
        staging = cls.open(path, load_base)
        refresh_sizes(staging)
        staging.drop_orphans()
        return staging

    @property
    def tree(self) -> BaseTree:
        """The base state in memory, read the first time the tree is used."""
        return self._tree if self._tree is not None else self.read_base()

    def read_base(self) -> BaseTree:
        """Read the base state into memory now (a caller in a worker thread spares the first request)."""
        if self._tree is None:
            self._tree = _base_tree(self, self._load_base)
        return self._tree

    def drop_reserve(self) -> bool:
        try:
            os.unlink(self.path / RESERVE)
            return True
        except FileNotFoundError:
            return False

    def close(self) -> None:
        """Close the database and drop what was read into memory (the base tree, the inode caches): a
        closed transaction's nodes stay in the mount while the kernel still holds them."""
        self.db.close()
        self._tree, self._load_base = None, None
        self._nodes, self._nlinks = {}, {}
        self._owned, self._base_named = set(), set()

    def changes(self) -> int:
        """Rows written through this connection since it opened: every change of the transaction (its
        entries, inodes, xattrs, metadata, a file's size or digests) moves it."""
        return self.db.total_changes

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a transaction: one rename makes it disappear, then the bytes go."""
        Staging.delete(Staging.detach(path))

    @staticmethod
    def detach(path: Path) -> Path:
        """The quick half of `remove`: rename the transaction out of sight (recovery deletes .trash-*)."""
        trash = path.with_name(f".trash-{uuid.uuid4().hex}")
        os.rename(path, trash)
        return trash

    @staticmethod
    def delete(trash: Path) -> None:
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def mark_committing(path: Path, iid: str) -> None:
        """Durably note that instance `iid` is about to be renamed in (own connection: any thread)."""
        db = sqlite3.connect(path / "txn.db", isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("UPDATE meta SET value=? WHERE key='committing'", (iid,))
            db.execute("PRAGMA wal_checkpoint(FULL)")
        finally:
            db.close()

    @staticmethod
    def mark_state(path: Path, state: str) -> None:
        """Set the transaction's state (`verifying` during a commit) from any thread (own connection)."""
        db = sqlite3.connect(path / "txn.db", isolation_level=None)
        try:
            db.execute("UPDATE meta SET value=? WHERE key='state'", (state,))
        finally:
            db.close()

    def sync(self) -> None:
        """Make every change so far durable (a client's fsync)."""
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def root_entry(self) -> DirEntry | None:
        """The mode and mtime of the transaction's root, to be recorded as the resource root's (the client
        sets them: `cp -a src/. t/`, `rsync -a src/ t/`, `touch -d`), or None when there is nothing to
        record: the base recorded none and the root is as the transaction made it (untouched)."""
        node = self.node(ROOT)
        entry = DirEntry(node.mode, node.mtime_ns)
        if self.tree.root is None and entry == DirEntry(ROOT_MODE, self._created):
            return None
        return entry

    # -- metadata ---------------------------------------------------------
    def get_meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else ""

    @_uses_reserve_when_full
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- inodes -------------------------------------------------------------
    def node(self, ino: int) -> Node | None:
        """The inode (cached; callers must not modify it: use `update`)."""
        node = self._nodes.get(ino)
        if node is None:
            if ino > 0 or ino in self._owned:
                row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE id=?", (ino,)).fetchone()
                if row is None or row[1] == GONE:
                    return None
                node = Node(*row)
            else:
                node = self._base_node(ino)
                if node is None:
                    return None
            self._nodes[ino] = node
        return node

    def _base_node(self, ino: int) -> Node | None:
        """An untouched base inode, made from its base entry (ctime: when the transaction opened)."""
        entry = self.tree.entry.get(ino)
        if isinstance(entry, FileEntry):
            return Node(ino, "f", entry.mode, self._uid, self._gid, entry.size, entry.mtime_ns, self._created,
                        0, entry.digest, None, 0, None)
        if isinstance(entry, DirEntry):
            return Node(ino, "d", entry.mode, self._uid, self._gid, 0, entry.mtime_ns, self._created,
                        0, None, None, 0, None)
        if isinstance(entry, LinkEntry):
            return Node(ino, "l", 0o777, self._uid, self._gid, len(os.fsencode(entry.target)), entry.mtime_ns,
                        self._created, 0, None, None, 0, entry.target)
        return None

    def _has_row(self, ino: int) -> bool:
        return ino > 0 or ino in self._owned

    @_uses_reserve_when_full
    def _own(self, *inos: int | None) -> None:
        """Copy-up: give base inodes a row of their own (with their xattrs, in one SQLite transaction)
        before their first change. Call outside any other SQLite transaction."""
        for ino in inos:
            if ino is None or self._has_row(ino):
                continue
            node = self.node(ino)
            if node is None:
                continue
            entry = self.tree.entry[ino]
            xattrs = entry.xattrs if isinstance(entry, FileEntry) else {}
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(f"INSERT INTO inodes ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                (node.id, node.kind, node.mode, node.uid, node.gid, node.size, node.mtime_ns,
                                 node.ctime_ns, node.blob, node.base, node.digests, node.incomplete, node.target,
                                 node.atime_ns))
                self.db.executemany("INSERT INTO xattrs VALUES (?,?,?)",
                                    [(ino, k, base64.b64decode(v)) for k, v in xattrs.items()])
            self._owned.add(ino)

    # -- names ----------------------------------------------------------------
    def _row_at(self, parent: int, name: str) -> tuple[int] | None:
        """The entries row at (parent, name): (inode,) with 0 for a whiteout, or None (the base decides)."""
        return self.db.execute("SELECT inode FROM entries WHERE parent=? AND name=?", (parent, name)).fetchone()

    def lookup(self, parent: int, name: str) -> int | None:
        row = self._row_at(parent, name)
        if row is not None:
            return row[0] or None
        return self.tree.child(parent, name)

    def children(self, parent: int) -> list[tuple[str, int]]:
        """(name, inode) of every entry of a directory, sorted by name."""
        return self._children(parent)[0]

    def _children(self, parent: int) -> tuple[list[tuple[str, int]], set[str]]:
        """The listing, and the names in it that rows decide (the others are base names at home)."""
        rows = self.db.execute("SELECT name, inode FROM entries WHERE parent=?", (parent,)).fetchall()
        kids = self.tree.kids.get(parent)
        if not rows:
            return (list(kids.items()) if kids else []), set()
        merged = dict(kids) if kids else {}
        for name, ino in rows:
            if ino:
                merged[name] = ino
            else:
                merged.pop(name, None)
        return sorted(merged.items()), {name for name, _ino in rows}

    def has_children(self, ino: int) -> bool:
        if not self.tree.kids.get(ino):
            return self.db.execute("SELECT 1 FROM entries WHERE parent=? AND inode != 0 LIMIT 1",
                                   (ino,)).fetchone() is not None
        return bool(self.children(ino))

    def _names_of(self, ino: int) -> int:
        """How many names an inode has: rows naming it, plus its base names that no row overrides."""
        n = 0
        if ino > 0 or ino in self._base_named:
            n = self.db.execute("SELECT count(*) FROM entries WHERE inode=?", (ino,)).fetchone()[0]
        if ino < 0 and ino in self.tree.group:
            return n + sum(1 for place in self.tree.places(ino) if self._row_at(*place) is None)
        if self._home(ino) is not None:
            n += 1
        return n

    def _home(self, ino: int) -> tuple[int, str] | None:
        """A base inode's base (parent, name) while no row overrides that name, else None."""
        where = self.tree.where(ino) if ino < 0 else None
        return where if where is not None and self._row_at(*where) is None else None

    def nlink(self, ino: int, kind: str) -> int:
        n = self._nlinks.get(ino)
        if n is None:
            if kind == "d" and ino < 0 and not self._has_rows_under(ino):
                n = 2 + self.tree.subdirs.get(ino, 0)      # its base listing: no node per child needed
            elif kind == "d":
                n = 2 + sum(1 for _name, child in self.children(ino) if self._kind(child) == "d")
            else:
                n = self._names_of(ino)
            self._nlinks[ino] = n
        return n

    def _has_rows_under(self, ino: int) -> bool:
        """Whether any row names (or hides) an entry in this directory: else its base listing holds."""
        return self.db.execute("SELECT 1 FROM entries WHERE parent=? LIMIT 1", (ino,)).fetchone() is not None

    def _kind(self, ino: int) -> str | None:
        node = self.node(ino)
        return node.kind if node is not None else None

    def parent_of(self, ino: int) -> int | None:
        """The directory holding a (directory) inode's one name."""
        row = self.db.execute("SELECT parent FROM entries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        if row:
            return row[0]
        home = self._home(ino)
        return home[0] if home is not None else None

    def _set_name(self, parent: int, name: str, ino: int) -> None:
        """(in the caller's SQLite transaction)"""
        self.db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?)", (parent, name, ino))
        if ino < 0:
            self._base_named.add(ino)

    def _clear_name(self, parent: int, name: str) -> None:
        """(in the caller's SQLite transaction) a base name becomes a whiteout, any other row goes."""
        if self.tree.child(parent, name) is not None:
            self.db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,0)", (parent, name))
        else:
            self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (parent, name))

    def _names_changed(self, *inos: int | None) -> None:
        for ino in inos:
            self._nlinks.pop(ino, None)

    def _is_dir(self, *inos: int | None) -> bool:
        """Whether one of these inodes is a directory: only then do their parents' link counts change
        (a recount of a directory of 100,000 files after every create made creates O(n))."""
        return any(ino is not None and self._kind(ino) == "d" for ino in inos)

    # -- changes of the tree ----------------------------------------------------
    @_uses_reserve_when_full
    def make(self, parent: int, name: str, kind: str, mode: int, uid: int, gid: int,
             target: str | None = None, create_blob: bool = True) -> int:
        """A new entry. A file's blob is created here unless the caller opens it with O_CREAT at once."""
        self._own(parent)
        now = time.time_ns()
        size, blob = (len(os.fsencode(target)) if target else 0), (1 if kind == "f" else 0)
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("INSERT INTO inodes (kind, mode, uid, gid, size, mtime_ns, ctime_ns, blob, target) "
                                  "VALUES (?,?,?,?,?,?,?,?,?)",
                                  (kind, mode & 0o7777, uid, gid, size, now, now, blob, target))
            ino = cur.lastrowid
            self._set_name(parent, name, ino)
            self._touch(parent, now)
        # the row as SELECT would read it, and its one name: the create's reply and the open, getattr and
        # release that follow ask for both (two queries a file saved in a `cp -a` of small files)
        self._nodes[ino] = Node(ino, kind, mode & 0o7777, uid, gid, size, now, now, blob, None, None, 0, target)
        self._nlinks[ino] = 2 if kind == "d" else 1
        if kind == "d":
            self._names_changed(parent)
        if kind == "f" and create_blob:
            fd = os.open(self.blob_path(ino), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.close(fd)
        return ino

    @_uses_reserve_when_full
    def make_file(self, parent: int, name: str, mode: int, uid: int, gid: int, bytes_from: Path | None, size: int,
                  digests: str | None, mtime_ns: int, xattrs: dict[str, bytes] | None = None,
                  base: str | None = None) -> tuple[int, int | None]:
        """A new file at (parent, name) whose bytes are the finished file `bytes_from` (in blobs/), moved in
        as its blob within the SQLite transaction that makes the entry (`bytes_from` stays for the caller
        to remove): a crash leaves the entry with its
        bytes, or no entry (and a blob file no row claims: see `sweep_blobs`). Without `bytes_from`, its
        bytes are the base's stored bytes of digest `base` (a copy of a base file: nothing to copy). A name
        already there (not a directory: the caller checks) is replaced. Returns (the new inode, the
        replaced one or None)."""
        replaced = self.lookup(parent, name)
        self._own(parent, replaced)
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("INSERT INTO inodes (kind, mode, uid, gid, size, mtime_ns, ctime_ns, blob, base, "
                                  "digests) VALUES ('f',?,?,?,?,?,?,?,?,?)",
                                  (mode & 0o7777, uid, gid, size, mtime_ns, now, 0 if bytes_from is None else 1,
                                   base, digests))
            ino = cur.lastrowid
            self._set_name(parent, name, ino)
            if replaced is not None:
                self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, replaced))
            self.db.executemany("INSERT INTO xattrs VALUES (?,?,?)", [(ino, k, v) for k, v in (xattrs or {}).items()])
            self._touch(parent, now)
            if bytes_from is not None:
                self._move_in(bytes_from, ino)
        self._nlinks[ino] = 1
        self._names_changed(replaced)
        if replaced is not None:
            self._cached(replaced, ctime_ns=now)
        return ino, replaced

    @_uses_reserve_when_full
    def replace_bytes(self, ino: int, bytes_from: Path, size: int, digests: str | None, mtime_ns: int,
                      mode: int | None = None, xattrs: dict[str, bytes] | None = None) -> None:
        """Give file `ino` (every name of it) the finished file `bytes_from` (in blobs/; it stays for the
        caller to remove) as its bytes, in one SQLite transaction with its new size and digests: a crash leaves the old bytes or the new ones
        whole. The digests recorded for the old bytes are forgotten first (durably), so that no crash can
        pair the new bytes with them. `xattrs`, when given, replace the file's."""
        self._own(ino)
        node = self.node(ino)
        if node.digests:
            self.update(ino, digests=None)
        now = time.time_ns()
        fields = {"blob": 1, "base": None, "size": size, "digests": digests, "mtime_ns": mtime_ns, "ctime_ns": now,
                  "incomplete": 0}
        if mode is not None:
            fields["mode"] = mode & 0o7777
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(f"UPDATE inodes SET {sets} WHERE id=?", (*fields.values(), ino))
            if xattrs is not None:
                self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
                self.db.executemany("INSERT INTO xattrs VALUES (?,?,?)", [(ino, k, v) for k, v in xattrs.items()])
            self._move_in(bytes_from, ino)
        self._cached(ino, **fields)

    def _move_in(self, bytes_from: Path, ino: int) -> None:
        """(in the caller's SQLite transaction, its last step) Make `bytes_from` the blob of `ino`: a hard
        link under a name of its own, renamed over the blob. `bytes_from` stays (its caller removes it),
        so that a change tried again (`_uses_reserve_when_full`) can move it in again."""
        aside = self.blobs / f"{ino}.in"
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass
        os.link(bytes_from, aside)
        os.rename(aside, self.blob_path(ino))

    def sweep_blobs(self) -> int:
        """After a crash: delete files in blobs/ that no row claims as its bytes (an upload or a copy cut
        short, a blob moved in by a change that never committed). Returns how many went."""
        owned = {str(r[0]) for r in self.db.execute("SELECT id FROM inodes WHERE kind='f' AND blob=1")}
        gone = 0
        for name in os.listdir(self.blobs):
            if name not in owned:
                try:
                    os.unlink(self.blobs / name)
                    gone += 1
                except (FileNotFoundError, IsADirectoryError):
                    pass
        return gone

    @_uses_reserve_when_full
    def link(self, ino: int, parent: int, name: str) -> None:
        self._own(ino, parent)
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            self._set_name(parent, name, ino)
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))
            self._touch(parent, now)
        self._cached(ino, ctime_ns=now)
        self._names_changed(ino)                       # a file: its parent's link count is unchanged

    @_uses_reserve_when_full
    def unlink(self, parent: int, name: str) -> int | None:
        """Remove a name; returns its inode. The inode itself stays until `drop_if_orphan`."""
        ino = self.lookup(parent, name)
        if ino is None:
            return None
        self._own(ino, parent)
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            self._clear_name(parent, name)
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))
            self._touch(parent, now)
        self._cached(ino, ctime_ns=now)
        self._names_changed(ino, *((parent,) if self._is_dir(ino) else ()))
        return ino

    @_uses_reserve_when_full
    def rename(self, old_parent: int, old: str, new_parent: int, new: str) -> int | None:
        """Move a name; a name already at the target is replaced and its inode returned."""
        ino = self.lookup(old_parent, old)
        replaced = self.lookup(new_parent, new)
        # a replaced file with other hard links lost a name: its ctime moves, as they show (pjdfstest
        # rename/23.t); one without goes (no copy-up of a base file for a ctime nobody sees: rsync's renames)
        linked = replaced is not None and self._kind(replaced) == "f" and self.nlink(replaced, "f") > 1
        self._own(ino, old_parent, new_parent, replaced if linked else None)
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            self._clear_name(old_parent, old)
            self._set_name(new_parent, new, ino)
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))
            if linked:
                self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, replaced))
            self._touch(old_parent, now)
            if new_parent != old_parent:
                self._touch(new_parent, now)
        self._cached(ino, ctime_ns=now)
        if self._dir_bytes and self._is_dir(ino):
            self._dir_bytes.clear()       # every directory below it moved too
        if linked:
            self._cached(replaced, ctime_ns=now)
        parents = (old_parent, new_parent) if self._is_dir(ino, replaced) else ()
        self._names_changed(ino, replaced, *parents)
        return replaced

    # -- path lengths ----------------------------------------------------------
    def check_room(self, parent: int, name: str, moving: int | None = None) -> None:
        """NameTooLong (ENAMETOOLONG) when `name` in directory `parent` would have a logical path longer
        than PATH_MAX, or -- `moving`, a directory renamed there -- would give one of its entries one.
        Each request of the kernel names one component, so nothing else stops such a path before the
        commit, which would refuse it (SPEC 4: paths of up to 4,095 bytes)."""
        length = self._path_bytes(parent) + len(name.encode("utf-8", "surrogateescape"))
        if moving is not None and self._kind(moving) == "d":
            now = self._path_bytes(moving) - 1
            if length > now:                 # its entries' paths grow: the longest must still fit
                below = self._longest_below(moving)
                length += 1 + below if below else 0
        if length > PATH_MAX:
            raise NameTooLong(f"{name[:40]}...: the path would be {length} bytes long, more than {PATH_MAX}")

    def _path_bytes(self, ino: int) -> int:
        """Bytes of directory `ino`'s logical path, with a "/" after it (0 for the root). Cached per
        directory (a create costs no query per level); a rename of a directory clears the cache."""
        steps: list[tuple[int, int]] = []       # (directory, bytes of its name and a "/"), going up
        cur, total = ino, 0
        while cur != ROOT:
            known = self._dir_bytes.get(cur)
            if known is not None:
                total = known
                break
            where = self._where_dir(cur)
            if where is None:                   # (no name: nothing to add)
                break
            parent, name = where
            steps.append((cur, len(name.encode("utf-8", "surrogateescape")) + 1))
            cur = parent
        for directory, size in reversed(steps):
            total += size
            self._dir_bytes[directory] = total
        return total

    def _where_dir(self, ino: int) -> tuple[int, str] | None:
        """(parent, name) of a directory's one name."""
        row = self.db.execute("SELECT parent, name FROM entries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        if row:
            return row[0], row[1]
        return self._home(ino)

    def _longest_below(self, ino: int) -> int:
        """Bytes of the longest path below directory `ino`, relative to it (a stack, not recursion)."""
        longest = 0
        stack = [(ino, 0)]
        while stack:
            directory, prefix = stack.pop()
            for name, child in self.children(directory):
                length = prefix + len(name.encode("utf-8", "surrogateescape"))
                longest = max(longest, length)
                if self._kind(child) == "d":
                    stack.append((child, length + 1))
        return longest

    def is_ancestor(self, ino: int, of: int) -> bool:
        """True when directory `ino` is `of` or contains it (a rename into itself is EINVAL)."""
        cur: int | None = of
        while cur != ROOT:
            if cur == ino:
                return True
            cur = self.parent_of(cur)
            if cur is None:
                return False
        return ino == ROOT

    @_uses_reserve_when_full
    def update(self, ino: int, **fields) -> None:
        if not fields:
            return
        self._own(ino)
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE inodes SET {sets} WHERE id=?", (*fields.values(), ino))
        self._cached(ino, **fields)

    def _cached(self, ino: int, **fields) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            for key, value in fields.items():
                setattr(node, key, value)

    def _touch(self, parent: int, now: int) -> None:
        """(in the caller's SQLite transaction, after `_own(parent)`)"""
        self.db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, parent))
        self._cached(parent, mtime_ns=now, ctime_ns=now)

    @_uses_reserve_when_full
    def drop_if_orphan(self, ino: int) -> bool:
        """Delete an inode that no name refers to any more (and its blob). A base inode keeps a row
        marked GONE, so that its number does not come back from the base state."""
        if ino == ROOT or self.node(ino) is None or self._names_of(ino) > 0:
            return False
        with self.db:
            self.db.execute("BEGIN")
            if ino > 0:
                self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
            else:
                self.db.execute(f"INSERT OR REPLACE INTO inodes ({COLUMNS}) "
                                "VALUES (?,?,0,0,0,0,0,0,0,NULL,NULL,0,NULL,NULL)", (ino, GONE))
            self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
        if ino < 0:
            self._owned.add(ino)
        self._nodes.pop(ino, None)
        self._nlinks.pop(ino, None)
        self._dir_bytes.pop(ino, None)     # (a new inode may get its number)
        try:
            os.unlink(self.blob_path(ino))
        except FileNotFoundError:
            pass
        return True

    def drop_orphans(self) -> int:
        """After a crash: drop inodes left without a name (the kernel forgot them with the daemon)."""
        rows = self.db.execute("SELECT id FROM inodes WHERE id > ? AND id NOT IN (SELECT inode FROM entries)",
                               (ROOT,)).fetchall()
        rows += self.db.execute("SELECT id FROM inodes WHERE id < 0 AND kind != ?", (GONE,)).fetchall()
        return sum(self.drop_if_orphan(r[0]) for r in rows)

    # -- bytes ----------------------------------------------------------------
    def blob_path(self, ino: int) -> Path:
        return self.blobs / str(ino)

    def copy_base_bytes(self, ino: int, source: Path, algorithm: str, expected: str) -> str | None:
        """Copy-on-write: put a base file's bytes in blobs/<ino>, hashing them on the way (`algorithm`).
        Only bytes that match their recorded digest `expected` are put in place: a damaged stored file
        copied here would be committed as new bytes with a digest of their own, the damage laundered.
        Returns None when the copy is in place, else the digest found (nothing is left behind). Only the
        file is written; the caller records it with update(blob=1, base=None)."""
        dest = self.blob_path(ino)
        tmp = self.blobs / f"{ino}.cow"
        hasher = hashlib.new(algorithm)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(source, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            while n := fin.readinto(buf):
                chunk = view[:n]
                hasher.update(chunk)
                while chunk:
                    chunk = chunk[fout.write(chunk):]
        found = hasher.hexdigest()
        if found != expected:
            os.unlink(tmp)
            return found
        os.rename(tmp, dest)
        return None

    # -- xattrs ------------------------------------------------------------
    def _base_xattrs(self, ino: int) -> dict[str, bytes]:
        entry = self.tree.entry.get(ino)
        if not isinstance(entry, FileEntry):
            return {}
        return {k: base64.b64decode(v) for k, v in sorted(entry.xattrs.items())}

    def xattrs(self, ino: int) -> dict[str, bytes]:
        if not self._has_row(ino):
            return self._base_xattrs(ino)
        return dict(self.db.execute("SELECT name, value FROM xattrs WHERE inode=? ORDER BY name", (ino,)))

    def get_xattr(self, ino: int, name: str) -> bytes | None:
        if not self._has_row(ino):
            return self._base_xattrs(ino).get(name)
        row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)).fetchone()
        return row[0] if row else None

    @_uses_reserve_when_full
    def set_xattr(self, ino: int, name: str, value: bytes) -> None:
        self._own(ino)
        self.db.execute("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (ino, name, value))

    @_uses_reserve_when_full
    def remove_xattr(self, ino: int, name: str) -> bool:
        if self.get_xattr(ino, name) is None:
            return False
        self._own(ino)
        return self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)).rowcount > 0

    # -- the whole tree, for commit ----------------------------------------
    def walk(self) -> Iterator[tuple[str, int, Node | None]]:
        """Every (logical path, inode, row) below the root, parents before children. `row` is None for
        an inode untouched since the base: its entry is `tree.entry[inode]`, unchanged."""
        tree = self.tree
        rows = {r[0]: Node(*r) for r in self.db.execute(f"SELECT {COLUMNS} FROM inodes")}
        named: dict[int, list[tuple[str, int]]] = {}
        for parent, name, ino in self.db.execute("SELECT parent, name, inode FROM entries"):
            named.setdefault(parent, []).append((name, ino))
        stack = [("", ROOT)]
        while stack:
            prefix, ino = stack.pop()
            kids = tree.kids.get(ino)
            listing = kids.items() if kids else ()
            if ino in named:
                merged = dict(listing)
                for name, child in named[ino]:
                    if child:
                        merged[name] = child
                    else:
                        merged.pop(name, None)
                listing = merged.items()
            for name, child in listing:
                path = f"{prefix}{name}"
                row = rows.get(child)
                yield path, child, row
                if (row.kind == "d") if row is not None else isinstance(tree.entry[child], DirEntry):
                    stack.append((path + "/", child))

    def all_xattrs(self) -> dict[int, dict[str, str]]:
        """inode -> {name: base64 value} of every xattr of an inode with a row (others: their base entry)."""
        out: dict[int, dict[str, str]] = {}
        for ino, name, value in self.db.execute("SELECT inode, name, value FROM xattrs"):
            out.setdefault(ino, {})[name] = base64.b64encode(value).decode()
        return out

    def listing(self, parent: int) -> list[tuple[str, Node, int]]:
        """(name, node, nlink) of every entry of a directory (readdir): the rows of its entries and their
        name counts come in two queries, not two per entry."""
        children, decided = self._children(parent)
        wanted = [ino for _name, ino in children if ino not in self._nodes and self._has_row(ino)]
        if wanted:
            for row in self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE id IN "
                                       "(SELECT inode FROM entries WHERE parent=?)", (parent,)):
                if row[0] not in self._nodes and row[1] != GONE:
                    self._nodes[row[0]] = Node(*row)
        counts: dict[int, int] = {}
        if any(ino > 0 and ino not in self._nlinks for _name, ino in children):
            counts = dict(self.db.execute(
                "SELECT inode, count(*) FROM entries WHERE inode IN (SELECT inode FROM entries WHERE parent=?) "
                "GROUP BY inode", (parent,)))
        out = []
        for name, ino in children:
            node = self.node(ino)
            if node is None:
                continue
            if node.kind == "d":
                out.append((name, node, self.nlink(ino, "d")))   # as getattr says: the kernel keeps this one
                continue
            if ino > 0 and ino in counts:      # a new inode has names in rows only
                self._nlinks.setdefault(ino, counts[ino])
            elif ino < 0 and ino not in self._base_named and name not in decided and ino not in self.tree.group:
                self._nlinks.setdefault(ino, 1)    # a base inode at home, named by no row
            out.append((name, node, self.nlink(ino, node.kind)))
        return out


def node_entry(node: Node, xattrs: dict[str, str]) -> FileEntry | LinkEntry | DirEntry | None:
    """The recorded entry of a node whose content is known without reading bytes (dirs, links,
    untouched base files); None for a file with its own blob."""
    if node.kind == "d":
        return DirEntry(node.mode, node.mtime_ns)
    if node.kind == "l":
        return LinkEntry(node.target, node.mtime_ns)
    if not node.blob:
        return FileEntry(node.base, node.size, node.mode, node.mtime_ns, xattrs)
    return None


def refresh_sizes(staging: Staging) -> None:
    """After a crash, a blob on disk is the truth for its size (writes that returned are in it)."""
    rows = staging.db.execute("SELECT id, size FROM inodes WHERE kind='f' AND blob=1").fetchall()
    for ino, size in rows:
        try:
            real = os.stat(staging.blob_path(ino)).st_size
        except FileNotFoundError:   # created, then the daemon died before its first open
            os.close(os.open(staging.blob_path(ino), os.O_CREAT | os.O_WRONLY, 0o600))
            real = 0
        if real != size:
            staging.update(ino, size=real, digests=None)
