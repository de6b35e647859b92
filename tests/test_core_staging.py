"""The staging overlay (core/staging.py) against a plain in-memory model, without a mount.

A transaction starts from a base state held in memory; only changes become rows. Random
creates, unlinks, renames (files and directories), hard links, chmods, xattr changes and
reopenings (a restarted daemon) must always show exactly the model: names, inode identity,
link counts, modes, xattrs -- through lookup, children, listing and the commit walk.
"""

from __future__ import annotations

import base64
import sqlite3
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tinyfs.core.model import DirEntry, FileEntry, LinkEntry, State
from tinyfs.core.staging import ROOT, Staging

pytestmark = pytest.mark.core

NAMES = st.sampled_from(["a", "b", "c", "d d", "é"])
PICK = st.integers(0, 10**6)

BASE = State(
    dirs={"d1": DirEntry(0o755, 1), "d1/sub": DirEntry(0o700, 2), "d2": DirEntry(0o755, 3)},
    files={"a": FileEntry("aa" * 32, 1, 0o644, 4), "d1/a": FileEntry("bb" * 32, 2, 0o600, 5),
           "d1/sub/x": FileEntry("cc" * 32, 3, 0o644, 6, {"user.k": base64.b64encode(b"v").decode()}),
           "d2/b": FileEntry("aa" * 32, 1, 0o644, 7)},
    links={"l": LinkEntry("a", 8)},
)


def open_staging(path):
    return Staging.open(path, lambda iid: BASE)


def test_opening_a_transaction_writes_nothing_of_the_base(tmp_path):
    staging = Staging.create(tmp_path / "r", "r", "base-iid", lambda iid: BASE, 0, 0)
    db = sqlite3.connect(tmp_path / "r" / "txn.db")
    assert db.execute("SELECT count(*) FROM inodes").fetchone()[0] == 1      # the root only
    assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 0
    assert [name for name, _ino in staging.children(ROOT)] == ["a", "d1", "d2", "l"]
    assert {p for p, _ino, _row in staging.walk()} == set(BASE.entries())


def test_what_make_keeps_in_memory_is_what_the_database_holds(tmp_path):
    """make() caches the new row and its link count instead of reading them back: a restarted
    daemon (a fresh Staging on the same database) must see exactly the same."""
    staging = Staging.create(tmp_path / "r", "r", "base-iid", lambda iid: BASE, 0, 0)
    d1 = staging.lookup(ROOT, "d1")
    made = [staging.make(ROOT, "new.txt", "f", 0o100640, 5, 6),
            staging.make(d1, "newdir", "d", 0o40750, 5, 6),
            staging.make(ROOT, "new-link", "l", 0o777, 5, 6, target="d1/a")]
    cached = [(staging.node(i), staging.nlink(i, staging.node(i).kind)) for i in made]
    reopened = open_staging(tmp_path / "r")
    assert cached == [(reopened.node(i), reopened.nlink(i, reopened.node(i).kind)) for i in made]
    assert [n.mode for n, _ in cached] == [0o640, 0o750, 0o777] and [k for _, k in cached] == [1, 2, 1]
    assert staging.nlink(d1, "d") == reopened.nlink(d1, "d") == 4     # d1/sub and d1/newdir


def test_a_transaction_staged_before_the_overlay_still_opens(tmp_path):
    """Rows for every base entry and no `overlay` key (the format before): read as before, no base needed."""
    staging = Staging.create(tmp_path / "r", "r", None, None, 0, 0)
    staging.set_meta("overlay", "")
    staging.make(ROOT, "f", "f", 0o644, 0, 0)
    staging.db.execute("ALTER TABLE inodes DROP COLUMN atime_ns")    # the schema before atime_ns
    staging.close()
    staging = Staging.open(tmp_path / "r")
    assert [name for name, _ino in staging.children(ROOT)] == ["f"]
    assert staging.node(staging.lookup(ROOT, "f")).atime_ns is None


class Overlay(RuleBasedStateMachine):
    """Model: path -> model inode; model inode -> [kind, mode, xattrs]. Staging inodes map to model inodes."""

    def __init__(self, tmp):
        super().__init__()
        self.path = tmp / f"t{uuid.uuid4().hex}"      # a fresh directory per example (id() is reused)
        self.staging = Staging.create(self.path, "r", "base-iid", lambda iid: BASE, 0, 0)
        self.paths: dict[str, int] = {}
        self.inodes: dict[int, list] = {}
        self.ino_of: dict[int, int] = {}          # model inode -> staging inode
        for n, (path, entry) in enumerate(sorted(BASE.entries().items())):
            kind = "d" if isinstance(entry, DirEntry) else "l" if isinstance(entry, LinkEntry) else "f"
            mode = 0o777 if kind == "l" else entry.mode
            xattrs = {k: base64.b64decode(v) for k, v in entry.xattrs.items()} if kind == "f" else {}
            self.paths[path] = n
            self.inodes[n] = [kind, mode, xattrs]
            self.ino_of[n] = self.staging.lookup(self._dir_ino(path.rpartition("/")[0]), path.rpartition("/")[2])
        self.next = len(self.paths)

    # -- helpers ------------------------------------------------------------------
    def _dir_ino(self, path: str) -> int:
        return ROOT if path == "" else self.ino_of[self.paths[path]]

    def _pick(self, pick: int, kinds: str, with_root: bool = False) -> str | None:
        choices = sorted(p for p, m in self.paths.items() if self.inodes[m][0] in kinds)
        if with_root:
            choices = ["", *choices]
        return choices[pick % len(choices)] if choices else None

    def _join(self, parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    # -- rules --------------------------------------------------------------------
    @rule(pick=PICK, name=NAMES, kind=st.sampled_from("fd"))
    def make(self, pick, name, kind):
        parent = self._pick(pick, "d", with_root=True)
        path = self._join(parent, name)
        if path in self.paths:
            return
        ino = self.staging.make(self._dir_ino(parent), name, kind, 0o640, 0, 0)
        self.paths[path] = self.next
        self.inodes[self.next] = [kind, 0o640, {}]
        self.ino_of[self.next] = ino
        self.next += 1

    @rule(pick=PICK)
    def unlink(self, pick):
        path = self._pick(pick, "fdl")
        if path is None or any(p.startswith(path + "/") for p in self.paths):
            return
        parent, _, name = path.rpartition("/")
        m = self.paths.pop(path)
        ino = self.staging.unlink(self._dir_ino(parent), name)
        assert ino == self.ino_of[m]
        if m not in self.paths.values():
            assert self.staging.drop_if_orphan(ino)
            assert self.staging.node(ino) is None
            del self.inodes[m]

    @rule(pick=PICK, to=PICK, name=NAMES)
    def rename(self, pick, to, name):
        path = self._pick(pick, "fdl")
        parent = self._pick(to, "d", with_root=True)
        if path is None:
            return
        new = self._join(parent, name)
        if new == path or new.startswith(path + "/") or new in self.paths and (
                self.inodes[self.paths[new]][0] == "d" or self.inodes[self.paths[path]][0] == "d"):
            return
        assert not self.staging.is_ancestor(self.ino_of[self.paths[path]], self._dir_ino(parent)) or \
            self.inodes[self.paths[path]][0] != "d"
        replaced_m = self.paths.get(new)
        replaced = self.staging.rename(self._dir_ino(path.rpartition("/")[0]), path.rpartition("/")[2],
                                       self._dir_ino(parent), name)
        assert replaced == (self.ino_of[replaced_m] if replaced_m is not None else None)
        moved = {p: m for p, m in self.paths.items() if p == path or p.startswith(path + "/")}
        for p in moved:
            del self.paths[p]
        for p, m in moved.items():
            self.paths[new + p[len(path):]] = m
        if replaced_m is not None and replaced_m not in self.paths.values():
            assert self.staging.drop_if_orphan(replaced)
            del self.inodes[replaced_m]

    @rule(pick=PICK, to=PICK, name=NAMES)
    def link(self, pick, to, name):
        path = self._pick(pick, "f")
        parent = self._pick(to, "d", with_root=True)
        if path is None or self._join(parent, name) in self.paths:
            return
        m = self.paths[path]
        self.staging.link(self.ino_of[m], self._dir_ino(parent), name)
        self.paths[self._join(parent, name)] = m

    @rule(pick=PICK, mode=st.sampled_from([0o600, 0o755, 0o444]))
    def chmod(self, pick, mode):
        path = self._pick(pick, "fd")
        if path is not None:
            m = self.paths[path]
            self.staging.update(self.ino_of[m], mode=mode)
            self.inodes[m][1] = mode

    @rule(pick=PICK, value=st.binary(max_size=4), remove=st.booleans())
    def xattr(self, pick, value, remove):
        path = self._pick(pick, "f")
        if path is None:
            return
        m = self.paths[path]
        if remove:
            assert self.staging.remove_xattr(self.ino_of[m], "user.k") == ("user.k" in self.inodes[m][2])
            self.inodes[m][2].pop("user.k", None)
        else:
            self.staging.set_xattr(self.ino_of[m], "user.k", value)
            self.inodes[m][2]["user.k"] = value

    @rule()
    def reopen(self):
        self.staging.close()
        self.staging = open_staging(self.path)
        assert self.staging.drop_orphans() == 0

    # -- what must always hold -----------------------------------------------------
    @invariant()
    def listings_match(self):
        dirs = [""] + [p for p, m in self.paths.items() if self.inodes[m][0] == "d"]
        for d in dirs:
            want = sorted((p.rpartition("/")[2], self.ino_of[m]) for p, m in self.paths.items()
                          if p.rpartition("/")[0] == d)
            ino = self._dir_ino(d)
            assert self.staging.children(ino) == want, d
            assert self.staging.has_children(ino) == bool(want)
            subdirs = sum(1 for _n, m in ((p, m) for p, m in self.paths.items() if p.rpartition("/")[0] == d)
                          if self.inodes[m][0] == "d")
            assert self.staging.nlink(ino, "d") == 2 + subdirs
            for name, node, nlink in self.staging.listing(ino):
                m = self.paths[self._join(d, name)]
                assert node.id == self.ino_of[m]
                if node.kind == "d":
                    child = self._join(d, name)
                    assert nlink == 2 + sum(1 for p, k in self.paths.items()
                                            if p.rpartition("/")[0] == child and self.inodes[k][0] == "d"), child
                else:
                    assert nlink == list(self.paths.values()).count(m), (d, name)

    @invariant()
    def inodes_match(self):
        for p, m in self.paths.items():
            kind, mode, xattrs = self.inodes[m]
            ino = self.ino_of[m]
            parent, _, name = p.rpartition("/")
            assert self.staging.lookup(self._dir_ino(parent), name) == ino
            node = self.staging.node(ino)
            assert (node.kind, node.mode) == (kind, mode), p
            assert self.staging.xattrs(ino) == dict(sorted(xattrs.items())), p
            if kind != "d":
                assert self.staging.nlink(ino, kind) == list(self.paths.values()).count(m)

    @invariant()
    def walk_matches(self):
        seen = {}
        for path, ino, row in self.staging.walk():
            seen[path] = ino
            if row is None:             # untouched since the base (its directory may have moved)
                assert ino < 0
        assert seen == {p: self.ino_of[m] for p, m in self.paths.items()}


def test_overlay_matches_a_model(tmp_path):
    run_state_machine_as_test(lambda: Overlay(tmp_path), settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))


def test_a_removal_in_a_transaction_staged_before_the_overlay_is_committed(tmp_path):
    """Before the overlay every base entry was a row and the commit got the whole tree. Such a
    transaction has no base tree to tell what was removed: it must still hand over its whole tree,
    or a file deleted in it would survive the commit."""
    from tinyfs import Archive
    from tinyfs.core.commit import commit
    from tinyfs.core.layout import ArchiveRoot
    from tinyfs.core.request import commit_request

    archive = Archive.init(tmp_path / "archive")
    with archive.new("r") as txn:
        txn.add_bytes("a.txt", b"a\n")
        txn.add_bytes("d/b.txt", b"b\n")
    root = ArchiveRoot(tmp_path / "archive")
    head = root.head("r")
    staging = Staging.create(root.transactions / "r", "r", head, None, 0, 0)
    staging.set_meta("overlay", "")                     # the old format: rows for every base entry
    d = staging.make(ROOT, "d", "d", 0o755, 0, 0)
    for parent, name, path in ((ROOT, "a.txt", "a.txt"), (d, "b.txt", "d/b.txt")):
        f = root.state("r").files[path]
        ino = staging.make(parent, name, "f", f.mode, 0, 0, create_blob=False)
        staging.update(ino, blob=0, base=f.digest, size=f.size, mtime_ns=f.mtime_ns)
    staging.close()
    staging = Staging.open(root.transactions / "r", lambda iid: root.state("r", iid))
    staging.unlink(staging.lookup(ROOT, "d"), "b.txt")
    result = commit(root, commit_request(staging, "r", 0))
    assert result.removed == 1
    assert sorted(root.state("r").files) == ["a.txt"]


def _staged_on_a_head(tmp_path):
    """An archive with resource r (a.txt, b.txt, d/c.txt) and a transaction staged on its head."""
    from tinyfs import Archive
    from tinyfs.core.layout import ArchiveRoot

    archive = Archive.init(tmp_path / "archive")
    with archive.new("r") as txn:
        for path in ("a.txt", "b.txt", "d/c.txt"):
            txn.add_bytes(path, path.encode())
    root = ArchiveRoot(tmp_path / "archive")
    head = root.head("r")
    staging = Staging.create(root.transactions / "r", "r", head, lambda iid: root.state("r", iid), 1000, 1000)
    return root, head, staging


def test_a_commit_request_names_changes_and_removals_only(tmp_path):
    """The walk of a staged tree gives what changed since the base: a new file (its blob, linkable), a
    removal (None), a renamed base file (its base entry at the new path, None at the old), the directory
    it went into (its new mtime); an untouched file is no change. The request carries the transaction's metadata and the uid's name as creator."""
    import pwd

    from tinyfs.core.commit import NewFile, commit
    from tinyfs.core.request import commit_request

    root, head, staging = _staged_on_a_head(tmp_path)
    new = staging.make(ROOT, "new.txt", "f", 0o640, 1000, 1000)
    (staging.blob_path(new)).write_bytes(b"fresh\n")
    staging.update(new, size=6)
    staging.unlink(ROOT, "a.txt")
    staging.rename(ROOT, "b.txt", staging.lookup(ROOT, "d"), "b.txt")
    staging.set_meta("message", "why")
    request = commit_request(staging, "r", 0)

    assert request.rid == "r" and request.base == head and request.walked and not request.full
    assert request.message == "why" and request.label is None
    assert request.creator == pwd.getpwuid(0).pw_name
    assert sorted(request.changes) == ["a.txt", "b.txt", "d", "d/b.txt", "new.txt"]
    assert isinstance(request.changes["d"], DirEntry)          # its mtime: a name came in
    assert request.changes["a.txt"] is None and request.changes["b.txt"] is None
    assert request.changes["d/b.txt"] == root.state("r").files["b.txt"]
    fresh = request.changes["new.txt"]
    assert isinstance(fresh, NewFile) and fresh.linkable and fresh.size == 6 and fresh.mode == 0o640
    assert fresh.source == f"{staging.blobs}/{new}" and fresh.digests is None
    result = commit(root, request)
    assert (result.added, result.changed, result.removed) == (2, 0, 2)
    assert sorted(root.state("r").files) == ["d/b.txt", "d/c.txt", "new.txt"]
    assert Staging.open(staging.path).get_meta("committing") == result.instance   # before_publish marked it


def test_a_commit_request_takes_sizes_from_the_caller_and_refuses_incomplete_bytes(tmp_path):
    """A mount knows a newer size than the row for a file open in it (`size_of`); a blob a write failed
    to fill is refused with its path (Incomplete, EIO), before anything is committed."""
    import errno

    import pytest

    from tinyfs.core.errors import Incomplete
    from tinyfs.core.request import commit_request

    root, head, staging = _staged_on_a_head(tmp_path)
    ino = staging.make(ROOT, "big.bin", "f", 0o644, 1000, 1000)
    request = commit_request(staging, "r", 1000, size_of=lambda i, node: 42 if i == ino else node.size)
    assert request.changes["big.bin"].size == 42
    staging.update(ino, incomplete=1)
    with pytest.raises(Incomplete) as e:
        commit_request(staging, "r", 1000)
    assert e.value.errno == errno.EIO and e.value.path == "big.bin"
    assert root.head("r") == head


def test_a_file_still_open_for_writing_is_busy_with_its_path(tmp_path):
    """What the mount asks before a commit: an inode open for writing makes it EBUSY (Busy), by type."""
    import errno

    import pytest

    from tinyfs.core.errors import Busy
    from tinyfs.core.request import check_not_writing

    _root, _head, staging = _staged_on_a_head(tmp_path)
    ino = staging.make(staging.lookup(ROOT, "d"), "open.bin", "f", 0o644, 1000, 1000)
    check_not_writing(staging, [])
    with pytest.raises(Busy) as e:
        check_not_writing(staging, [ino])
    assert e.value.errno == errno.EBUSY and e.value.path == "d/open.bin"
    staging.unlink(staging.lookup(ROOT, "d"), "open.bin")
    with pytest.raises(Busy) as e:                   # unlinked, still open: its writer is waited for too
        check_not_writing(staging, [ino])
    assert e.value.path == "?"
