"""The history of every logical path of a resource: each version, and the instance that introduced it.

Derived data, kept in ROOT/index/history.db (SQLite, WAL; docs/format.md, "The history index") so that
the history of one file of a long chain is a few indexed rows, not a read of every instance.json:

  resources   rid -> a small integer, and the last instance the index covers (its id and `seq`)
  instances   one row per covered instance: its place in the chain (`seq`, 1 for the first that exists),
              id, created, label, message, creator, and how many paths it added, changed, removed
  versions    one row per path and instance where the path's entry changed (core.commit.state_changes of
              the two states): the new entry (kind file, link, dir, or deleted) and, for a file, where
              its bytes are stored; keyed by (resource, parent directory, name, seq), so that one path's
              versions, and the names ever seen in one directory, are each one range of the key

Rows are only ever derived from the instances that exist: the commit's `record` phase appends the new
instance (`note_commit`); every reader first compares the index's last covered instance with the
resource's head and catches up from the instance documents when it is behind (an archive made before
the index, another process's commit, a crash between the publish and the index update, an index
deleted or damaged). A covered instance that no longer exists (dynamic mode drops replaced instances; a
purged resource made again) makes the resource's rows be built again from the chain that exists: the
history shows what the archive still holds. Nothing here ever fails a commit or a read of the archive
itself: an index that cannot be written is kept in memory for the process instead.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .commit import state_changes
from .errors import NotFound
from .ids import check_logical_path
from .model import DirEntry, Entry, FileEntry, InstanceDoc, LinkEntry, State

if TYPE_CHECKING:
    from .layout import ArchiveRoot

log = logging.getLogger(__name__)

INDEX_DIR = "index"              # ROOT/index/: derived data, never part of a bag (stays writable in worm mode)
DB_NAME = "history.db"
SCHEMA = "1"                     # an index of another schema is dropped and built again
BUSY_SECONDS = 60.0              # how long a catch-up waits for another process's write to the index
NOTE_WAIT = 2.0                  # ... and a commit, which then leaves its rows to the next reader's catch-up
BATCH_ROWS = 50_000              # version rows written per SQLite transaction while catching up
CACHED_DOCS = 4                  # a catch-up of up to this many instances reads them through the archive's cache

FILE, LINK, DIR, DELETED = "file", "link", "dir", "deleted"
ADDED, CHANGED, REMOVED = "added", "changed", "removed"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources(
    id INTEGER PRIMARY KEY, rid TEXT NOT NULL UNIQUE, last_iid TEXT NOT NULL, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS instances(
    res INTEGER NOT NULL, seq INTEGER NOT NULL, iid TEXT NOT NULL, created TEXT NOT NULL, label TEXT,
    message TEXT NOT NULL, creator TEXT NOT NULL,
    added INTEGER NOT NULL, changed INTEGER NOT NULL, removed INTEGER NOT NULL,
    PRIMARY KEY (res, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions(
    res INTEGER NOT NULL, parent TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL,
    change TEXT NOT NULL, kind TEXT NOT NULL, digest TEXT, size INTEGER, mode INTEGER, mtime_ns INTEGER,
    target TEXT, xattrs TEXT, stored TEXT,
    PRIMARY KEY (res, parent, name, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS versions_by_instance ON versions(res, seq);
"""
_DROP = "DROP TABLE IF EXISTS versions; DROP TABLE IF EXISTS instances; DROP TABLE IF EXISTS resources;"


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a logical path: the entry it had from instance `iid` on (None: deleted there)."""

    path: str
    iid: str
    created: str
    kind: str                    # FILE, LINK, DIR or DELETED
    entry: Entry | None
    stored: str | None           # a file's bytes, relative to the resource directory (instances/<iid>/data/...)
    label: str | None            # the label of instance `iid`
    message: str
    creator: str

    def to_json(self) -> dict:
        doc = {"path": self.path, "instance": self.iid, "created": self.created, "kind": self.kind,
               "label": self.label, "message": self.message, "creator": self.creator}
        if self.entry is not None:
            doc.update(self.entry.to_json())
        if self.stored is not None:
            doc["stored"] = self.stored
        return doc


@dataclass(frozen=True, slots=True)
class Change:
    """What one instance did to one path."""

    path: str
    change: str                  # ADDED, CHANGED or REMOVED
    kind: str                    # the kind of the path's new entry (DELETED when removed)


@dataclass(frozen=True, slots=True)
class InstanceLog:
    """One instance of a resource and how many paths (files, links and directories) it added, changed and
    removed; `changes` lists them when asked for."""

    iid: str
    created: str
    label: str | None
    message: str
    creator: str
    added: int
    changed: int
    removed: int
    changes: tuple[Change, ...] | None = None

    def to_json(self) -> dict:
        doc = {"instance": self.iid, "created": self.created, "label": self.label, "message": self.message,
               "creator": self.creator, "added": self.added, "changed": self.changed, "removed": self.removed}
        if self.changes is not None:
            doc["changes"] = [{"path": c.path, "change": c.change, "kind": c.kind} for c in self.changes]
        return doc


@dataclass(frozen=True, slots=True)
class Covered:
    """How far the index covers a resource."""

    res: int
    iid: str
    seq: int


class HistoryIndex:
    """The history index of one archive (ArchiveRoot.history). One SQLite connection per process, used
    under a lock: every statement is short, and a catch-up writes in batches, so readers of other
    resources wait at most one batch."""

    def __init__(self, archive: ArchiveRoot):
        self.archive = archive
        self.path = archive.root / INDEX_DIR / DB_NAME
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._catching: dict[str, threading.Lock] = {}      # rid -> held while this process catches it up

    def open(self) -> None:
        """Open the database now: a daemon does it at its start, so that its open descriptors stay the
        same from then on (the first commit or history read would open it anyway)."""
        with self._lock:
            self._connection()

    # -- reading -------------------------------------------------------------------------------------
    def versions(self, rid: str, path: str) -> list[Version]:
        """Every version of `path`, oldest first (NotFound: no such resource, or no such path ever)."""
        check_logical_path(path)
        res = self.current(rid)
        parent, _, name = path.rpartition("/")
        rows = self._query(
            "SELECT v.kind, v.digest, v.size, v.mode, v.mtime_ns, v.target, v.xattrs, v.stored, i.iid, i.created, "
            "i.label, i.message, i.creator FROM versions v JOIN instances i ON i.res = v.res AND i.seq = v.seq "
            "WHERE v.res = ? AND v.parent = ? AND v.name = ? ORDER BY v.seq", (res, parent, name))
        if not rows:
            raise NotFound(f"resource {rid!r} has no path {path!r} in any instance")
        return [_version(path, row) for row in rows]

    def children(self, rid: str, directory: str = "") -> list[str]:
        """The names ever seen directly in `directory` ("" for the resource's root), sorted."""
        res = self.current(rid)
        return [name for (name,) in self._query(
            "SELECT DISTINCT name FROM versions WHERE res = ? AND parent = ? ORDER BY name", (res, directory))]

    def seen(self, rid: str, path: str) -> bool:
        """Whether `path` existed in any instance of the resource."""
        res = self.current(rid)
        parent, _, name = path.rpartition("/")
        return bool(self._query("SELECT 1 FROM versions WHERE res = ? AND parent = ? AND name = ? LIMIT 1",
                                (res, parent, name)))

    def labels(self, rid: str) -> dict[str, str]:
        """label -> instance id, for the resource's labelled instances."""
        res = self.current(rid)
        return dict(self._query("SELECT label, iid FROM instances WHERE res = ? AND label IS NOT NULL", (res,)))

    def log(self, rid: str, changes: bool = False) -> list[InstanceLog]:
        """Every instance of the resource, oldest first, with its counts (and with `changes`, its paths)."""
        res = self.current(rid)
        rows = self._query("SELECT seq, iid, created, label, message, creator, added, changed, removed "
                           "FROM instances WHERE res = ? ORDER BY seq", (res,))
        out = []
        for seq, *fields in rows:
            out.append(InstanceLog(*fields, changes=self._changes(res, seq) if changes else None))
        return out

    def _changes(self, res: int, seq: int) -> tuple[Change, ...]:
        rows = self._query("SELECT parent, name, change, kind FROM versions WHERE res = ? AND seq = ?", (res, seq))
        return tuple(sorted((Change(f"{parent}/{name}" if parent else name, change, kind)
                             for parent, name, change, kind in rows), key=lambda c: c.path))

    # -- keeping up ----------------------------------------------------------------------------------
    def current(self, rid: str) -> int:
        """The index's key of the resource, once the index covers its head (caught up here if not);
        NotFound when the resource does not exist."""
        head = self.archive.require(rid)
        covered = self._covered(rid)
        if covered is not None and covered.iid == head:
            return covered.res
        self.catch_up(rid)
        covered = self._covered(rid)
        if covered is None:
            raise NotFound(f"no resource {rid!r} in {self.archive.root}")
        return covered.res

    def note_commit(self, doc: InstanceDoc, before: State, changes: dict[str, Entry | None] | None = None) -> None:
        """(the commit's `record` phase) Append the instance just published, whose previous instance had
        the state `before` (`changes`: what differs from it, when the commit knows), when the index covers
        exactly that previous instance (a new resource: none).
        Anything else is left to the readers' catch-up, which reads the instance documents: a commit does
        not wait for that. Never raises: the instance is published; the index is only derived data."""
        if self.archive.config.mode == "dynamic":
            return      # the previous instance is being dropped: a reader builds the resource's rows anew
        try:
            pending = _pending(doc, before, changes)
            with self._writing(wait=NOTE_WAIT) as db:
                covered = self._covered(doc.resource)
                if (covered.iid if covered else None) != doc.previous:
                    return
                res = covered.res if covered else self._new_resource(db, doc.resource)
                self._append(db, res, covered.seq + 1 if covered else 1, pending)
        except Exception as e:      # (the commit is made: say so, and let the catch-up fix it)
            log.warning("history index %s: could not add instance %s of %s (it is added at the next "
                        "reading): %s", self.path, doc.id, doc.resource, e)

    def catch_up(self, rid: str) -> int:
        """Bring the resource's rows up to its head from the instance documents; the instances added."""
        with self._lock:
            lock = self._catching.setdefault(rid, threading.Lock())
        with lock:
            added = 0
            while True:
                done, n = self._catch_up_once(rid)
                added += n
                if done:
                    return added

    def _catch_up_once(self, rid: str) -> tuple[bool, int]:
        """One pass: (True, instances added) when the index covers the head; (False, n) when another
        process moved the index meanwhile (the caller looks again)."""
        covered = self._covered(rid)
        chain = self.archive.instance_ids(rid)
        if not chain:
            self._forget(rid)
            return True, 0
        if covered is not None and covered.iid == chain[-1]:
            return True, 0
        if covered is not None and covered.iid in chain:
            start, seq, expected = chain.index(covered.iid) + 1, covered.seq, covered.iid
        else:       # nothing covered yet, or a covered instance that is gone: the chain as it exists
            start, seq, expected = 0, 0, None
        added = 0
        for batch in _batches(self._pending(rid, chain[start:], expected)):
            if self._write_batch(rid, expected, seq, batch, anew=start == 0 and added == 0):
                return False, added
            seq += len(batch)
            added += len(batch)
            expected = batch[-1].instance[0]
        return True, added

    def _pending(self, rid: str, chain: list[str], after: str | None) -> Iterator[_Pending]:
        """The rows of each instance of `chain`, which follows the instance `after` (None: the chain starts
        the resource). A few documents are read through the archive's cache (the mount reads a new head
        there too); a long chain as plain JSON, around the cache (a first build would push every cached
        document out), and only the entries that changed are made objects: a first build of 1,000
        instances of 10,000 files took 59 s with InstanceDoc, most of it making 10 million entries."""
        if len(chain) <= CACHED_DOCS:
            before = self.archive.state(rid, after) if after else State()
            for iid in chain:
                doc = self.archive.instance(rid, iid)
                yield _pending(doc, before)
                before = doc.state
            return
        raw = self._document(rid, after) if after else {}
        for iid in chain:
            doc = self._document(rid, iid)
            yield _raw_pending(doc, raw)
            raw = doc

    def _document(self, rid: str, iid: str) -> dict:
        doc = json.loads(self.archive.instance_bytes(rid, iid))
        if doc.get("type") != "tinyfs-instance" or doc.get("format") != 1:
            raise ValueError(f"{rid}: instance {iid}: not a tinyfs-instance document of format 1")
        return doc

    def _write_batch(self, rid: str, expected: str | None, seq: int, batch: list[_Pending], anew: bool) -> bool:
        """Write one batch of instances after `expected` (None: the first of the chain; `anew`: the
        resource's rows are replaced); True when the index no longer covers exactly `expected` (another
        process caught up meanwhile) and nothing was written."""
        with self._writing(wait=BUSY_SECONDS) as db:
            covered = self._covered(rid)
            if anew:
                res = covered.res if covered else self._new_resource(db, rid)
                db.execute("DELETE FROM versions WHERE res = ?", (res,))
                db.execute("DELETE FROM instances WHERE res = ?", (res,))
            elif covered is None or covered.iid != expected:
                return True
            else:
                res = covered.res
            for n, pending in enumerate(batch, start=1):
                self._append(db, res, seq + n, pending)
        return False

    def _forget(self, rid: str) -> None:
        """The resource has no instance (purged): its rows go."""
        with self._writing(wait=BUSY_SECONDS) as db:
            row = db.execute("SELECT id FROM resources WHERE rid = ?", (rid,)).fetchone()
            if row is not None:
                for table in ("versions", "instances"):
                    db.execute(f"DELETE FROM {table} WHERE res = ?", row)
                db.execute("DELETE FROM resources WHERE id = ?", row)

    def missing(self) -> bool:
        """Whether the index file is missing (`tinyfs recover` then says that it built it)."""
        return not self.path.exists()

    def catch_up_all(self) -> tuple[int, int]:
        """Every resource caught up, and the rows of resources that no longer exist dropped:
        (resources caught up, instances added)."""
        rids = self.archive.resource_ids()
        for (rid,) in self._query("SELECT rid FROM resources", ()):
            if rid not in rids:
                self._forget(rid)
        behind = instances = 0
        for rid in rids:
            added = self.catch_up(rid)
            behind += added > 0
            instances += added
        return behind, instances

    # -- rows ----------------------------------------------------------------------------------------
    def _append(self, db: sqlite3.Connection, res: int, seq: int, pending: _Pending) -> None:
        db.executemany("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       [(res, parent, name, seq, *rest) for parent, name, *rest in pending.rows])
        db.execute("INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (res, seq, *pending.instance, *pending.counts))
        db.execute("UPDATE resources SET last_iid = ?, last_seq = ? WHERE id = ?", (pending.instance[0], seq, res))

    def _new_resource(self, db: sqlite3.Connection, rid: str) -> int:
        return db.execute("INSERT INTO resources (rid, last_iid, last_seq) VALUES (?, '', 0)", (rid,)).lastrowid

    def _covered(self, rid: str) -> Covered | None:
        rows = self._query("SELECT id, last_iid, last_seq FROM resources WHERE rid = ?", (rid,))
        return Covered(*rows[0]) if rows else None

    # -- the database --------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    @contextmanager
    def _writing(self, wait: float) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: other processes' writers wait up to `wait` seconds)."""
        if not self._lock.acquire(timeout=wait):
            raise TimeoutError("the history index is busy in this process")
        try:
            db = self._connection()
            db.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            self._lock.release()

    def _connection(self) -> sqlite3.Connection:
        """(under the lock) The open database: ROOT/index/history.db, made when missing, made again when
        it is not a database of this schema; in memory when ROOT cannot hold it (a read-only archive)."""
        if self._db is None:
            try:
                self._db = _open_file(self.path)
            except (OSError, sqlite3.Error) as e:
                log.warning("history index %s cannot be used (%s): kept in memory by this process", self.path, e)
                self._db = _prepared(sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False))
        return self._db


def _open_file(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(exist_ok=True)
    try:
        return _prepared(_connect(path))
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):     # read-only, locked, an I/O error: not ours to remove
            raise
        # not a database (damaged, or something else): derived data, built again
        log.warning("history index %s is damaged (%s): building it again", path, e)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{path}{suffix}")
            except FileNotFoundError:
                pass
        return _prepared(_connect(path))


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_SECONDS)


def _prepared(db: sqlite3.Connection) -> sqlite3.Connection:
    """WAL (readers in other processes never wait for a writer), synchronous=NORMAL (a power loss may
    lose the last rows, never the file's consistency: the catch-up adds them again), this schema."""
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_TABLES)
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None and row[0] != SCHEMA:
            log.warning("history index of schema %s, not %s: building it again", row[0], SCHEMA)
            db.executescript(_DROP + _TABLES)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA,))
    except BaseException:
        db.close()
        raise
    return db


@dataclass(slots=True)
class _Pending:
    """The rows of one instance, made before the index is locked to write them."""

    instance: tuple[str, str, str | None, str, str]     # iid, created, label, message, creator
    rows: list[tuple]            # (parent, name, change, kind, digest, size, mode, mtime_ns, target, xattrs, stored)
    counts: tuple[int, int, int]     # paths added, changed, removed


def _pending(doc: InstanceDoc, before: State, changes: dict[str, Entry | None] | None = None) -> _Pending:
    """What instance `doc` changed from the state `before` (`changes`, or found by comparing), as rows."""
    if changes is None:
        changes = state_changes(before, doc.state.entries())
    return _as_rows((doc.id, doc.created, doc.label, doc.message, doc.creator), changes,
                    lambda path: before.get(path) is not None, doc.stored)


_SECTIONS = (("state", FileEntry), ("links", LinkEntry), ("dirs", DirEntry))


def _raw_pending(doc: dict, before: dict) -> _Pending:
    """`_pending` of two parsed instance.json documents (`before` {} for none): entries are compared as
    the JSON objects they are (the same fields FileEntry, LinkEntry and DirEntry compare), and only the
    changed ones are made entries. A path that changed section (a file replaced by a directory) takes
    its new entry."""
    changes: dict[str, Entry | None] = {}
    for section, kind in _SECTIONS:
        old, new = before.get(section) or {}, doc.get(section) or {}
        for path, value in new.items():
            if path and old.get(path) != value:         # ("" in dirs: the resource root, no logical path)
                changes[path] = kind.from_json(value)
        for path in old:
            if path and path not in new:
                changes.setdefault(path, None)

    def existed(path: str) -> bool:
        return any(path in (before.get(section) or ()) for section, _ in _SECTIONS)
    instance = (doc["id"], doc["created"], doc.get("label"), doc.get("message", ""), doc.get("creator", ""))
    return _as_rows(instance, changes, existed, doc["stored"])


def _as_rows(instance: tuple, changes: dict[str, Entry | None], existed, stored: dict[str, str]) -> _Pending:
    rows = [_row(path, entry, existed(path), stored) for path, entry in changes.items()]
    counts = {ADDED: 0, CHANGED: 0, REMOVED: 0}
    for row in rows:
        counts[row[2]] += 1
    return _Pending(instance, rows, (counts[ADDED], counts[CHANGED], counts[REMOVED]))


def _batches(pending: Iterator[_Pending]) -> Iterator[list[_Pending]]:
    """Instances in lists of about BATCH_ROWS rows, each written in one transaction: a long first build
    keeps its progress, and lets other users of the index in between."""
    batch: list[_Pending] = []
    rows = 0
    for one in pending:
        batch.append(one)
        rows += len(one.rows) + 1
        if rows >= BATCH_ROWS:
            yield batch
            batch, rows = [], 0
    if batch:
        yield batch


def _row(path: str, entry: Entry | None, existed: bool, stored: dict[str, str]) -> tuple:
    parent, _, name = path.rpartition("/")
    change = REMOVED if entry is None else CHANGED if existed else ADDED
    if isinstance(entry, FileEntry):
        xattrs = json.dumps(entry.xattrs, sort_keys=True) if entry.xattrs else None
        return (parent, name, change, FILE, entry.digest, entry.size, entry.mode, entry.mtime_ns, None, xattrs,
                stored.get(entry.digest))
    if isinstance(entry, LinkEntry):
        return (parent, name, change, LINK, None, None, None, entry.mtime_ns, entry.target, None, None)
    if isinstance(entry, DirEntry):
        return (parent, name, change, DIR, None, None, entry.mode, entry.mtime_ns, None, None, None)
    return (parent, name, change, DELETED, None, None, None, None, None, None, None)


def _version(path: str, row: tuple) -> Version:
    kind, digest, size, mode, mtime_ns, target, xattrs, stored, iid, created, label, message, creator = row
    entry: Entry | None = None
    if kind == FILE:
        entry = FileEntry(digest, size, mode, mtime_ns, json.loads(xattrs) if xattrs else {})
    elif kind == LINK:
        entry = LinkEntry(target, mtime_ns)
    elif kind == DIR:
        entry = DirEntry(mode, mtime_ns)
    return Version(path, iid, created, kind, entry, stored, label, message, creator)
