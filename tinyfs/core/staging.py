"""The on-disk staging of one open transaction: transactions/<rid>/.

  txn.db     SQLite (WAL): meta, inodes, entries (names), xattrs
  blobs/<n>  the bytes of inode n once it has its own (created, or a base file written to)

Why SQLite: every operation that returned must survive a kill -9 of the
daemon (SPEC section 5), and a transaction can hold 100,000 entries; a WAL
database commits each small change with a write(2) and no fsync
(synchronous=NORMAL), and `sync()` makes everything durable when a client
fsyncs. Blobs are flat numbered files, so staging never lengthens a logical
path past the kernel's limits, and renames never move bytes.

A base file (from the state the transaction started from) has no blob: its
`base` column holds its digest and its bytes are read from the archive until
the first write or truncate copies them (copy-on-write; never on open).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import AlreadyExists
from .model import DirEntry, FileEntry, LinkEntry, State

ROOT = 1
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


@dataclass(slots=True)
class Node:
    id: int
    kind: str            # "f", "d" or "l"
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


class Staging:
    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path = path
        self.blobs = path / "blobs"
        self.db = db
        # Write-through caches: the database stays the truth, these spare a SELECT per request.
        self._nodes: dict[int, Node] = {}
        self._nlinks: dict[int, int] = {}

    # -- life cycle -----------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path / "txn.db", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @classmethod
    def create(cls, path: Path, rid: str, base: str | None, base_state: State, uid: int, gid: int,
               meta: dict[str, str] | None = None) -> Staging:
        """Make transactions/<rid> showing `base_state`; built aside, then one rename (no torn opens)."""
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
                ("message", ""), ("creator", ""), ("label", ""), *(meta or {}).items()])
            db.execute("INSERT INTO inodes (id, kind, mode, uid, gid, mtime_ns, ctime_ns) VALUES (?,?,?,?,?,?,?)",
                       (ROOT, "d", 0o755, uid, gid, now, now))
            _populate(db, base_state, uid, gid, now)
        db.close()
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AlreadyExists(f"a transaction for {rid!r} is already open") from None
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> Staging:
        if not (path / "txn.db").exists():
            raise FileNotFoundError(f"{path} is not a transaction")
        make_reserve(path)
        return cls(path, cls._connect(path))

    def drop_reserve(self) -> bool:
        try:
            os.unlink(self.path / RESERVE)
            return True
        except FileNotFoundError:
            return False

    def close(self) -> None:
        self.db.close()

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

    def sync(self) -> None:
        """Make every change so far durable (a client's fsync)."""
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    # -- metadata ---------------------------------------------------------
    def get_meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else ""

    @_uses_reserve_when_full
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- the tree -----------------------------------------------------------
    def node(self, ino: int) -> Node | None:
        """The inode's row (cached; callers must not modify it: use `update`)."""
        node = self._nodes.get(ino)
        if node is None:
            row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE id=?", (ino,)).fetchone()
            if row is None:
                return None
            node = self._nodes[ino] = Node(*row)
        return node

    def lookup(self, parent: int, name: str) -> int | None:
        row = self.db.execute("SELECT inode FROM entries WHERE parent=? AND name=?", (parent, name)).fetchone()
        return row[0] if row else None

    def children(self, parent: int) -> list[tuple[str, int]]:
        return self.db.execute("SELECT name, inode FROM entries WHERE parent=? ORDER BY name", (parent,)).fetchall()

    def has_children(self, ino: int) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE parent=? LIMIT 1", (ino,)).fetchone() is not None

    def nlink(self, ino: int, kind: str) -> int:
        n = self._nlinks.get(ino)
        if n is None:
            if kind == "d":
                n = 2 + self.db.execute("SELECT count(*) FROM entries e JOIN inodes i ON i.id=e.inode "
                                        "WHERE e.parent=? AND i.kind='d'", (ino,)).fetchone()[0]
            else:
                n = self.db.execute("SELECT count(*) FROM entries WHERE inode=?", (ino,)).fetchone()[0]
            self._nlinks[ino] = n
        return n

    def _names_changed(self, *inos: int | None) -> None:
        for ino in inos:
            self._nlinks.pop(ino, None)

    def _is_dir(self, *inos: int | None) -> bool:
        """Whether one of these inodes is a directory: only then do their parents' link counts change
        (a recount of a directory of 100,000 files after every create made creates O(n))."""
        return any(ino is not None and (n := self.node(ino)) is not None and n.kind == "d" for ino in inos)

    @_uses_reserve_when_full
    def make(self, parent: int, name: str, kind: str, mode: int, uid: int, gid: int,
             target: str | None = None, create_blob: bool = True) -> int:
        """A new entry. A file's blob is created here unless the caller opens it with O_CREAT at once."""
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute("INSERT INTO inodes (kind, mode, uid, gid, size, mtime_ns, ctime_ns, blob, target) "
                                  "VALUES (?,?,?,?,?,?,?,?,?)",
                                  (kind, mode & 0o7777, uid, gid, len(os.fsencode(target)) if target else 0,
                                   now, now, 1 if kind == "f" else 0, target))
            ino = cur.lastrowid
            self.db.execute("INSERT INTO entries VALUES (?,?,?)", (parent, name, ino))
            self._touch(parent, now)
        if kind == "d":
            self._names_changed(parent)
        if kind == "f" and create_blob:
            fd = os.open(self.blob_path(ino), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.close(fd)
        return ino

    @_uses_reserve_when_full
    def link(self, ino: int, parent: int, name: str) -> None:
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO entries VALUES (?,?,?)", (parent, name, ino))
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
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (parent, name))
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
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN")
            if replaced is not None:
                self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (new_parent, new))
            self.db.execute("UPDATE entries SET parent=?, name=? WHERE parent=? AND name=?",
                            (new_parent, new, old_parent, old))
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))
            self._touch(old_parent, now)
            if new_parent != old_parent:
                self._touch(new_parent, now)
        self._cached(ino, ctime_ns=now)
        parents = (old_parent, new_parent) if self._is_dir(ino, replaced) else ()
        self._names_changed(ino, replaced, *parents)
        return replaced

    def is_ancestor(self, ino: int, of: int) -> bool:
        """True when directory `ino` is `of` or contains it (a rename into itself is EINVAL)."""
        cur = of
        while cur != ROOT:
            if cur == ino:
                return True
            row = self.db.execute("SELECT parent FROM entries WHERE inode=? LIMIT 1", (cur,)).fetchone()
            if not row:
                return False
            cur = row[0]
        return ino == ROOT

    @_uses_reserve_when_full
    def update(self, ino: int, **fields) -> None:
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE inodes SET {sets} WHERE id=?", (*fields.values(), ino))
        self._cached(ino, **fields)

    def _cached(self, ino: int, **fields) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            for key, value in fields.items():
                setattr(node, key, value)

    def _touch(self, parent: int, now: int) -> None:
        self.db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, parent))
        self._cached(parent, mtime_ns=now, ctime_ns=now)

    @_uses_reserve_when_full
    def drop_if_orphan(self, ino: int) -> bool:
        """Delete an inode that no name refers to any more (and its blob)."""
        if ino == ROOT or self.db.execute("SELECT 1 FROM entries WHERE inode=? LIMIT 1", (ino,)).fetchone():
            return False
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
            self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
        self._nodes.pop(ino, None)
        self._nlinks.pop(ino, None)
        try:
            os.unlink(self.blob_path(ino))
        except FileNotFoundError:
            pass
        return True

    def drop_orphans(self) -> int:
        rows = self.db.execute("SELECT id FROM inodes WHERE id != ? AND id NOT IN (SELECT inode FROM entries)",
                               (ROOT,)).fetchall()
        return sum(self.drop_if_orphan(r[0]) for r in rows)

    # -- bytes ----------------------------------------------------------------
    def blob_path(self, ino: int) -> Path:
        return self.blobs / str(ino)

    def copy_base_bytes(self, ino: int, source: Path) -> None:
        """Copy-on-write: put a base file's bytes in blobs/<ino> (copy_file_range: reflinks where the
        file system can). Only the file is written; the caller records it with update(blob=1, base=None)."""
        dest = self.blob_path(ino)
        tmp = self.blobs / f"{ino}.cow"
        with open(source, "rb") as fin, open(tmp, "wb") as fout:
            _copy_range(fin, fout)
        os.rename(tmp, dest)

    # -- xattrs ------------------------------------------------------------
    def xattrs(self, ino: int) -> dict[str, bytes]:
        return dict(self.db.execute("SELECT name, value FROM xattrs WHERE inode=? ORDER BY name", (ino,)))

    def get_xattr(self, ino: int, name: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)).fetchone()
        return row[0] if row else None

    @_uses_reserve_when_full
    def set_xattr(self, ino: int, name: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (ino, name, value))

    @_uses_reserve_when_full
    def remove_xattr(self, ino: int, name: str) -> bool:
        return self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)).rowcount > 0

    # -- the whole tree, for commit ----------------------------------------
    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (logical path, node) below the root, parents before children."""
        nodes = {n.id: n for n in (Node(*r) for r in self.db.execute(f"SELECT {COLUMNS} FROM inodes"))}
        kids: dict[int, list[tuple[str, int]]] = {}
        for parent, name, ino in self.db.execute("SELECT parent, name, inode FROM entries ORDER BY name"):
            kids.setdefault(parent, []).append((name, ino))
        stack = [("", ROOT)]
        while stack:
            prefix, ino = stack.pop()
            for name, child in reversed(kids.get(ino, [])):
                path = f"{prefix}{name}"
                node = nodes[child]
                yield path, node
                if node.kind == "d":
                    stack.append((path + "/", child))

    def all_xattrs(self) -> dict[int, dict[str, str]]:
        """inode -> {name: base64 value} of every recorded (user.*) xattr."""
        out: dict[int, dict[str, str]] = {}
        for ino, name, value in self.db.execute("SELECT inode, name, value FROM xattrs"):
            out.setdefault(ino, {})[name] = base64.b64encode(value).decode()
        return out


def _copy_range(fin, fout) -> None:
    size = os.fstat(fin.fileno()).st_size
    done = 0
    while done < size:
        n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
        if n == 0:
            break
        done += n


def _populate(db: sqlite3.Connection, state: State, uid: int, gid: int, now: int) -> None:
    """Insert the base state's directories, files and links as inodes and names."""
    ids: dict[str, int] = {"": ROOT}
    next_id = ROOT + 1
    inodes, entries, xattrs = [], [], []

    def add(path: str, kind: str, mode: int, mtime_ns: int, size=0, base=None, target=None) -> int:
        nonlocal next_id
        ino = next_id
        next_id += 1
        parent, _, name = path.rpartition("/")
        inodes.append((ino, kind, mode, uid, gid, size, mtime_ns, now, 0, base, None, 0, target, None))
        entries.append((ids[parent], name, ino))
        return ino

    for path in sorted(state.dirs, key=lambda p: (p.count("/"), p)):
        d = state.dirs[path]
        ids[path] = add(path, "d", d.mode, d.mtime_ns)
    for path, f in state.files.items():
        ino = add(path, "f", f.mode, f.mtime_ns, size=f.size, base=f.digest)
        xattrs.extend((ino, k, base64.b64decode(v)) for k, v in f.xattrs.items())
    for path, lk in state.links.items():
        add(path, "l", 0o777, lk.mtime_ns, size=len(os.fsencode(lk.target)), target=lk.target)
    db.executemany(f"INSERT INTO inodes ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", inodes)
    db.executemany("INSERT INTO entries VALUES (?,?,?)", entries)
    db.executemany("INSERT INTO xattrs VALUES (?,?,?)", xattrs)


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


def decode_digests(node: Node) -> dict[str, str] | None:
    return json.loads(node.digests) if node.digests else None


def children_nodes(staging: Staging, parent: int) -> list[tuple[str, Node, int]]:
    """(name, node, nlink) of every entry of a directory, in one query (readdir)."""
    rows = staging.db.execute(
        f"SELECT e.name, {', '.join('i.' + c.strip() for c in COLUMNS.split(','))}, "
        "(SELECT count(*) FROM entries e2 WHERE e2.inode = i.id) "
        "FROM entries e JOIN inodes i ON i.id = e.inode WHERE e.parent=? ORDER BY e.name", (parent,)).fetchall()
    return [(r[0], Node(*r[1:-1]), r[-1]) for r in rows]


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
