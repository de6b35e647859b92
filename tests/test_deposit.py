"""core.deposit: the mount's transactions addressed by path, as the server uses them."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from test_faults import MIB, fill_rest, needs_root, small_fs  # noqa: F401  (small_fs: a loop-mounted disk)

from tinyfs.core.api import Archive
from tinyfs.core.deposit import Deposits, PathTxn
from tinyfs.core.errors import (
    AlreadyExists,
    Busy,
    Forbidden,
    InvalidName,
    IsADirectory,
    LabelTaken,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotFound,
    ShortInput,
    Stale,
    TooLarge,
    WriteNotVerified,
)
from tinyfs.core.staging import Staging

pytestmark = pytest.mark.core

ALICE, BOB = "alice", "bob"


@pytest.fixture
def based(archive):
    """An archive with resource r1: a.txt, d/b.bin, d/e/c.txt, link -> a.txt."""
    with archive.new("r1", message="first") as t:
        t.add_bytes("a.txt", b"alpha\n")
        t.add_bytes("d/b.bin", bytes(range(256)) * 10)
        t.add_bytes("d/e/c.txt", b"gamma\n", mode=0o600)
    return archive


def deposits(archive: Archive) -> Deposits:
    return Deposits(archive.root)


def committed(archive: Archive, rid: str):
    return archive.get(rid).state()


def read(archive: Archive, rid: str, path: str) -> bytes:
    return archive.get(rid).read(path)


def events(archive: Archive, kind: str) -> list[dict]:
    return [{**e.get("detail", {}), **e} for e in archive.events() if e["event"] == kind]


# -- opening, finding, owning ---------------------------------------------------------------------------------
def test_open_shows_the_head_and_records_the_owner(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    assert (t.rid, t.owner, t.base) == ("r1", ALICE, based.root.head("r1"))
    assert [name for name, _ in t.list("")] == ["a.txt", "d"]
    info = t.stat("a.txt")
    assert (info.kind, info.size, info.mode) == ("f", 6, 0o644)
    assert info.digest == hashlib.sha512(b"alpha\n").hexdigest()
    assert t.stat("d").kind == "d"
    assert d.rids() == ["r1"]
    assert d.get("r1") is t
    opened = events(based, "transaction.opened")[-1]
    assert (opened["resource"], opened["via"], opened["user"]) == ("r1", "http", ALICE)
    meta = t.meta()
    assert meta["state"] == "open" and meta["message"] == "" and meta["error"] == ""


def test_open_refuses_a_bad_rid_and_a_second_open(based):
    d = deposits(based)
    with pytest.raises(InvalidName):
        d.open("../x", ALICE)
    with pytest.raises(InvalidName):
        d.open("", ALICE)
    d.open("r1", ALICE)
    with pytest.raises(AlreadyExists):
        d.open("r1", BOB)
    assert d.get("../x") is None and d.get("nope") is None


def test_a_new_resource_starts_empty_and_commits_with_the_user_as_creator(archive):
    d = deposits(archive)
    t = d.open("fresh", ALICE)
    assert t.base is None and t.list("") == []
    t.mkdir("docs", 0o750)
    assert t.put("docs/readme.txt", io.BytesIO(b"hello"), 5) is True
    result = d.commit("fresh", ALICE)
    assert result.instance == archive.root.head("fresh")
    doc = archive.root.instance("fresh", result.instance)
    assert doc.creator == ALICE
    assert doc.state.dirs["docs"].mode == 0o750
    assert read(archive, "fresh", "docs/readme.txt") == b"hello"
    assert d.rids() == [] and d.get("fresh") is None
    with pytest.raises(NotFound):
        t.stat("docs")            # a committed transaction is gone for its old handles too


def test_another_users_transaction_is_forbidden(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("new.txt", io.BytesIO(b"x"))
    with pytest.raises(Forbidden):
        d.rollback("r1", BOB)
    with pytest.raises(Forbidden):
        d.commit("r1", BOB)
    with pytest.raises(Forbidden):
        t.check_owner(BOB)
    t.check_owner(ALICE)
    assert t.stat("new.txt").size == 1 and d.rids() == ["r1"]
    with pytest.raises(NotFound):
        d.rollback("r2", ALICE)


def test_a_transaction_of_the_mount_is_read_only_here(based):
    root = based.root
    head = root.head("r1")
    Staging.create(root.transactions / "r1", "r1", head, lambda iid: root.state("r1", iid), os.getuid(),
                   os.getgid(), root=root.state("r1", head).root).close()
    d = deposits(based)
    t = d.get("r1")
    assert t.owner is None and t.stat("a.txt").size == 6
    for change in (lambda: t.mkdir("x"), lambda: t.put("y", io.BytesIO(b"")), lambda: t.delete("a.txt"),
                   lambda: t.set_meta("message", "m")):
        with pytest.raises(Forbidden):
            change()
    with pytest.raises(Forbidden):
        d.commit("r1", ALICE)
    with pytest.raises(Forbidden):
        d.rollback("r1", ALICE)


def test_rollback_drops_everything(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("big.bin", io.BytesIO(os.urandom(100_000)))
    path = t.staging.path
    d.rollback("r1", ALICE)
    assert not path.exists() and d.rids() == [] and d.get("r1") is None
    assert events(based, "transaction.rolled_back")[-1]["user"] == ALICE
    assert committed(based, "r1") == based.root.state("r1")
    d.open("r1", ALICE)          # and a new one can be opened


# -- paths --------------------------------------------------------------------------------------------------
def test_paths_are_checked(based):
    t = deposits(based).open("r1", ALICE)
    for bad in ("/a.txt", "d/../a.txt", "d//b.bin", "./a.txt", "d/"):
        with pytest.raises(InvalidName):
            t.stat(bad)
        with pytest.raises(InvalidName):
            t.put(bad, io.BytesIO(b""))
    with pytest.raises(NotFound):
        t.stat("d/missing")
    with pytest.raises(NotADirectory):
        t.stat("a.txt/x")
    with pytest.raises(NotADirectory):
        t.list("a.txt")
    with pytest.raises(NotFound, match="parent directory"):
        t.put("nodir/x.txt", io.BytesIO(b"x"))
    with pytest.raises(NameTooLong):
        t.mkdir("n" * 256)
    parent = ""
    for _ in range(20):                  # 20 levels of 200 bytes: a path of 4,019 bytes
        parent = f"{parent}/{'p' * 200}".lstrip("/")
        t.mkdir(parent)
    with pytest.raises(NameTooLong):     # a name that fits, in a place where the path would not
        t.put(f"{parent}/{'q' * 250}", io.BytesIO(b""))
    t.put(f"{parent}/{'q' * 70}", io.BytesIO(b""))     # 4,090 bytes
    with pytest.raises(NameTooLong):     # moved to a longer name, the file below would be 4,145 bytes
        t.move("p" * 200, "r" * 255, overwrite=False)
    with pytest.raises(NameTooLong):
        t.copy("p" * 200, "r" * 255, overwrite=False)
    t.delete("p" * 200)
    assert [n for n, _ in t.list("")] == ["a.txt", "d"]


# -- put ----------------------------------------------------------------------------------------------------
def test_put_replaces_a_base_file_and_keeps_its_mode(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    body = os.urandom(3 * 128 * 1024 + 17)       # several chunks
    assert t.put("d/e/c.txt", io.BytesIO(body), len(body), mtime_ns=1_600_000_000_123_456_789) is False
    info = t.stat("d/e/c.txt")
    assert (info.size, info.mode, info.mtime_ns) == (len(body), 0o600, 1_600_000_000_123_456_789)
    assert info.digest == hashlib.sha512(body).hexdigest()
    with t.open_read("d/e/c.txt") as f:
        assert f.read() == body
    d.commit("r1", ALICE)
    entry = committed(based, "r1").files["d/e/c.txt"]
    assert (entry.size, entry.mode, entry.mtime_ns) == (len(body), 0o600, 1_600_000_000_123_456_789)
    assert read(based, "r1", "d/e/c.txt") == body
    assert read(based, "r1", "a.txt") == b"alpha\n"


def test_put_creates_with_mode_mtime_and_xattrs(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    assert t.put("d/new.txt", io.BytesIO(b"new bytes"), mode=0o640, mtime_ns=1_000_000_000,
                 xattrs={"user.colour": b"\x00\xffblue"}) is True
    assert t.xattrs("d/new.txt") == {"user.colour": b"\x00\xffblue"}
    with pytest.raises(InvalidName):
        t.put("d/x.txt", io.BytesIO(b""), xattrs={"trusted.no": b"1"})
    with pytest.raises(IsADirectory):
        t.put("d", io.BytesIO(b"over a directory"))
    d.commit("r1", ALICE)
    entry = committed(based, "r1").files["d/new.txt"]
    assert (entry.mode, entry.mtime_ns) == (0o640, 1_000_000_000)
    assert entry.xattrs == {"user.colour": "AP9ibHVl"}


def test_a_short_body_leaves_the_old_file(based):
    t = deposits(based).open("r1", ALICE)
    with pytest.raises(ShortInput):
        t.put("a.txt", io.BytesIO(b"only ten b"), length=1000)
    with pytest.raises(ShortInput):
        t.put("fresh.txt", io.BytesIO(b"abc"), length=4)
    with t.open_read("a.txt") as f:
        assert f.read() == b"alpha\n"
    assert [n for n, _ in t.list("")] == ["a.txt", "d"]
    assert os.listdir(t.staging.blobs) == []          # nothing of the bodies left


def test_a_failing_stream_leaves_nothing(based):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.sent = 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.sent > 300_000:
                raise ConnectionResetError("client went away")
            n = len(b)
            b[:n] = b"x" * n
            self.sent += n
            return n

    t = deposits(based).open("r1", ALICE)
    with pytest.raises(ConnectionResetError):
        t.put("d/b.bin", Broken())
    assert t.stat("d/b.bin").size == 2560 and os.listdir(t.staging.blobs) == []
    assert t.writing == 0


def test_put_refuses_before_reading_when_the_length_does_not_fit(based):
    t = deposits(based).open("r1", ALICE)
    st = os.statvfs(t.staging.path)
    huge = st.f_blocks * st.f_frsize + 1

    class Untouched(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise AssertionError("the body was read")

    with pytest.raises(NoSpace) as caught:
        t.put("huge.bin", Untouched(), length=huge)
    assert caught.value.errno == 28
    with pytest.raises(NotFound):
        t.stat("huge.bin")


def test_put_over_a_hard_link_changes_every_name(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.hardlink("d/a-again.txt", "a.txt")
    t.put("a.txt", io.BytesIO(b"changed"))
    with t.open_read("d/a-again.txt") as f:
        assert f.read() == b"changed"
    d.commit("r1", ALICE)
    state = committed(based, "r1")
    assert state.files["a.txt"] == state.files["d/a-again.txt"]
    assert state.group_of("a.txt") is not None


def test_a_put_in_flight_makes_commit_busy(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    seen = []

    class Slow(io.RawIOBase):
        def __init__(self):
            self.n = 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.n == 0:
                with pytest.raises(Busy):
                    d.commit("r1", ALICE)
                assert t.stat("a.txt").size == 6      # the lock is not held while the body arrives
                seen.append(True)
            if self.n >= 3:
                return 0
            self.n += 1
            b[:3] = b"abc"
            return 3

    t.put("slow.txt", Slow())
    assert seen and t.stat("slow.txt").size == 9
    assert d.commit("r1", ALICE).instance is not None


# -- open_read ---------------------------------------------------------------------------------------------
def test_open_read_verifies_base_bytes(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    with t.open_read("d/b.bin") as f:
        assert f.read() == bytes(range(256)) * 10
    stored = based.root.stored_path("r1", based.root.instance("r1", t.base).stored[t.stat("a.txt").digest])
    os.chmod(stored, 0o644)
    stored.write_bytes(b"alphA\n")
    with pytest.raises(OSError) as caught, t.open_read("a.txt") as f:
        f.read()
    assert caught.value.errno == 5
    assert events(based, "fixity.failed")[-1]["via"] == "http"
    with pytest.raises(IsADirectory):
        t.open_read("d")


# -- mkdir, delete, move --------------------------------------------------------------------------------------
def test_mkdir_and_delete_of_a_base_directory(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.mkdir("empty", 0o700, mtime_ns=1_500_000_000_000_000_000)
    with pytest.raises(AlreadyExists):
        t.mkdir("empty")
    with pytest.raises(AlreadyExists):
        t.mkdir("a.txt")
    t.put("d/e/staged.txt", io.BytesIO(b"staged"))
    t.delete("d")
    with pytest.raises(NotFound):
        t.stat("d/e/c.txt")
    with pytest.raises(NotFound):
        t.delete("d")
    assert [n for n, _ in t.list("")] == ["a.txt", "empty"]
    assert os.listdir(t.staging.blobs) == []     # the staged file's bytes went with it
    t.delete("a.txt")
    d.commit("r1", ALICE)
    state = committed(based, "r1")
    assert set(state.entries()) == {"empty"}
    assert state.dirs["empty"] == type(state.dirs["empty"])(0o700, 1_500_000_000_000_000_000)


def test_move_of_a_tree(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("d/e/new.txt", io.BytesIO(b"new"))
    assert t.move("d", "moved", overwrite=False) is False
    assert [n for n, _ in t.list("moved/e")] == ["c.txt", "new.txt"]
    with pytest.raises(NotFound):
        t.stat("d")
    with pytest.raises(AlreadyExists):
        t.move("moved/e/new.txt", "a.txt", overwrite=False)
    assert t.move("moved/e/new.txt", "a.txt", overwrite=True) is True
    with pytest.raises(Forbidden):
        t.move("moved", "moved/e/inside", overwrite=False)
    with pytest.raises(Forbidden):
        t.move("moved/e", "moved", overwrite=True)    # would remove what moves
    t.mkdir("target")
    t.put("target/x", io.BytesIO(b"x"))
    assert t.move("moved/e", "target", overwrite=True) is True      # a directory replaces a non-empty one
    assert [n for n, _ in t.list("target")] == ["c.txt"]
    d.commit("r1", ALICE)
    state = committed(based, "r1")
    assert set(state.files) == {"a.txt", "moved/b.bin", "target/c.txt"}
    assert read(based, "r1", "a.txt") == b"new"
    assert read(based, "r1", "target/c.txt") == b"gamma\n"


# -- metadata ---------------------------------------------------------------------------------------------
def test_meta_is_checked_and_committed(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.set_meta("message", "second deposit")
    t.set_meta("creator", "Alice A.")
    t.set_meta("label", "v2")
    with pytest.raises(Forbidden):
        t.set_meta("state", "open")
    with pytest.raises(TooLarge):
        t.set_meta("message", "m" * 70_000)
    with pytest.raises(InvalidName):
        t.set_meta("label", "no spaces")
    assert {k: t.meta()[k] for k in ("message", "creator", "label")} == \
        {"message": "second deposit", "creator": "Alice A.", "label": "v2"}
    t.put("a.txt", io.BytesIO(b"v2"))
    iid = d.commit("r1", ALICE).instance
    doc = based.root.instance("r1", iid)
    assert (doc.message, doc.creator, doc.label) == ("second deposit", "Alice A.", "v2")
    t2 = d.open("r1", ALICE)
    with pytest.raises(LabelTaken):
        t2.set_meta("label", "v2")


# -- commit failures ---------------------------------------------------------------------------------------
def test_a_stale_commit_leaves_the_transaction_intact(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.move("a.txt", "z.txt", overwrite=False)
    t.put("b.txt", io.BytesIO(b"b"))
    with based.get("r1", "a") as other:          # someone else changes the same path first
        other.add_bytes("a.txt", b"theirs")
    head = based.root.head("r1")
    with pytest.raises(Stale):
        d.commit("r1", ALICE)
    meta = t.meta()
    assert meta["state"] == "failed" and "a.txt" in meta["error"]
    failed = events(based, "commit.failed")
    with pytest.raises(Stale):                   # known: answered without another try or event
        d.commit("r1", ALICE)
    assert events(based, "commit.failed") == failed
    assert based.root.head("r1") == head and d.rids() == ["r1"]
    with t.open_read("z.txt") as f:
        assert f.read() == b"alpha\n"
    t.move("z.txt", "a.txt", overwrite=False)    # the client gives up its change of a.txt: now it commits
    iid = d.commit("r1", ALICE).instance
    assert set(based.root.state("r1", iid).files) == {"a.txt", "b.txt", "d/b.bin", "d/e/c.txt"}
    assert read(based, "r1", "a.txt") == b"theirs"


def test_a_write_the_disk_did_not_keep_fails_the_commit_and_keeps_the_transaction(based, monkeypatch):
    """The commit reads the new bag back from the device (state `verifying`); bytes that changed on the disk
    after the flush fail it with EIO naming the file, and the transaction stays. The staged file is the
    bag's file (a hard link): once it is written again, the commit succeeds."""
    from tinyfs.core import bagwrite, commit

    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("scan.tif", io.BytesIO(b"the scanned page"))
    real_sync, real_read_back = bagwrite.syncfs, commit.read_back_digest
    states = []

    def sync_then_damage(stage):
        real_sync(stage)
        [stored] = stage.glob("instances/*/data/scan.tif")
        os.chmod(stored, 0o644)
        with open(stored, "r+b") as f:
            f.write(b"T")
            os.fsync(f.fileno())

    def read_back(path, alg):
        states.append(t.meta()["state"])
        return real_read_back(path, alg)

    monkeypatch.setattr(bagwrite, "syncfs", sync_then_damage)
    monkeypatch.setattr(commit, "read_back_digest", read_back)
    head = based.root.head("r1")
    with pytest.raises(WriteNotVerified) as e:
        d.commit("r1", ALICE)
    assert "data/scan.tif" in str(e.value) and e.value.errno == errno.EIO
    assert set(states) == {"verifying"}
    assert based.root.head("r1") == head
    meta = t.meta()
    assert meta["state"] == "failed" and "scan.tif" in meta["error"]
    assert t.stat("d/b.bin").size == 2560                    # the rest of the transaction as it was
    monkeypatch.setattr(bagwrite, "syncfs", real_sync)
    t.put("scan.tif", io.BytesIO(b"the scanned page"))
    iid = d.commit("r1", ALICE).instance
    assert read(based, "r1", "scan.tif") == b"the scanned page" and based.root.head("r1") == iid


def test_commit_of_nothing_changes_nothing(based):
    d = deposits(based)
    d.open("r1", ALICE)
    head = based.root.head("r1")
    assert d.commit("r1", ALICE).instance is None
    assert based.root.head("r1") == head and d.rids() == []


# -- restart ------------------------------------------------------------------------------------------------
def test_reopen_after_a_restart_keeps_everything(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.set_meta("message", "kept")
    t.put("d/new.txt", io.BytesIO(b"kept bytes"), mode=0o600)
    t.mkdir("dir")
    t.delete("d/e")
    d.close()
    d2 = deposits(based)
    assert d2.rids() == ["r1"]
    t2 = d2.get("r1")
    assert t2 is not t and t2.owner == ALICE and t2.meta()["message"] == "kept"
    assert [n for n, _ in t2.list("d")] == ["b.bin", "new.txt"]
    assert t2.stat("d/new.txt").mode == 0o600
    with t2.open_read("d/new.txt") as f:
        assert f.read() == b"kept bytes"
    iid = d2.commit("r1", ALICE).instance
    assert set(based.root.state("r1", iid).entries()) == {"a.txt", "d", "d/b.bin", "d/new.txt", "dir"}


KILLED_PUT = textwrap.dedent("""
    import io, sys, os, signal
    from tinyfs.core.api import Archive
    from tinyfs.core.deposit import Deposits

    class Dies(io.RawIOBase):
        def __init__(self):
            self.n = 0
        def readable(self):
            return True
        def readinto(self, b):
            if self.n >= 5:
                os.kill(os.getpid(), signal.SIGKILL)
            self.n += 1
            b[:len(b)] = b"y" * len(b)
            return len(b)

    d = Deposits(Archive(sys.argv[1]).root)
    t = d.open("r1", "alice")
    t.put("done.txt", io.BytesIO(b"answered"))
    print("answered", flush=True)
    t.put("a.txt", Dies(), length=10 << 20)
""")


def test_a_kill_mid_put_leaves_a_transaction_that_reopens_clean(based, tmp_path, archive_ok):
    script = tmp_path / "put.py"
    script.write_text(KILLED_PUT)
    r = subprocess.run([sys.executable, str(script), str(based.root.root)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -9 and r.stdout == "answered\n", r.stderr
    blobs = based.root.transactions / "r1" / "blobs"
    assert any(n.endswith(".part") for n in os.listdir(blobs))      # the body cut short
    d = deposits(based)
    t = d.get("r1")
    assert not any(n.endswith(".part") for n in os.listdir(blobs))
    with t.open_read("a.txt") as f:
        assert f.read() == b"alpha\n"
    with t.open_read("done.txt") as f:
        assert f.read() == b"answered"
    iid = d.commit("r1", ALICE).instance
    state = based.root.state("r1", iid)
    assert set(state.files) == {"a.txt", "done.txt", "d/b.bin", "d/e/c.txt"}
    assert read(based, "r1", "a.txt") == b"alpha\n"
    archive_ok(based.root.root)


def test_the_committed_bag_validates(based, tmp_path):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("new.bin", io.BytesIO(os.urandom(5000)))
    t.delete("d/e")
    iid = d.commit("r1", ALICE).instance
    bags = list(based.root.root.glob(f"resources/*/*/r1/instances/{iid}"))
    assert len(bags) == 1
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(bags[0])], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((bags[0] / "instance.json").read_text())["id"] == iid


def test_an_idle_transaction_handle_sees_time_pass(based):
    """stat's ctime moves with a change; mtime stays as given."""
    t: PathTxn = deposits(based).open("r1", ALICE)
    before = t.stat("a.txt")
    time.sleep(0.01)
    t.put("a.txt", io.BytesIO(b"x"), mtime_ns=before.mtime_ns)
    after = t.stat("a.txt")
    assert after.mtime_ns == before.mtime_ns and after.ctime_ns > before.ctime_ns


# -- links, copies, times ---------------------------------------------------------------------------------
def test_symlinks_and_hard_links(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.symlink("d/to-a", "../a.txt", mtime_ns=1_234_000_000_000)
    info = t.stat("d/to-a")
    assert (info.kind, info.target, info.mtime_ns, info.digest) == ("l", "../a.txt", 1_234_000_000_000, None)
    with pytest.raises(AlreadyExists):
        t.symlink("d/to-a", "elsewhere")
    with pytest.raises(InvalidName):
        t.symlink("bad", "")
    with pytest.raises(InvalidName):
        t.open_read("d/to-a")
    t.put("n.txt", io.BytesIO(b"linked"))
    t.hardlink("d/e/n2.txt", "n.txt")
    t.hardlink("d/b2.bin", "d/b.bin")             # a base file gets a second name
    with pytest.raises(Forbidden):
        t.hardlink("d2", "d")
    with pytest.raises(AlreadyExists):
        t.hardlink("a.txt", "n.txt")
    with pytest.raises(NotFound):
        t.hardlink("x", "missing")
    t.delete("n.txt")                             # the other name keeps the bytes
    with t.open_read("d/e/n2.txt") as f:
        assert f.read() == b"linked"
    iid = d.commit("r1", ALICE).instance
    state = based.root.state("r1", iid)
    assert state.links["d/to-a"].target == "../a.txt" and state.links["d/to-a"].mtime_ns == 1_234_000_000_000
    assert sorted(state.group_of("d/b.bin")) == ["d/b.bin", "d/b2.bin"]
    assert "n.txt" not in state.files and read(based, "r1", "d/e/n2.txt") == b"linked"


def test_copy_of_a_tree_keeps_modes_times_xattrs_and_links(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("d/e/staged.bin", io.BytesIO(b"staged bytes"), mode=0o640, mtime_ns=42_000_000_000,
          xattrs={"user.k": b"v"})
    t.hardlink("d/e/staged-too.bin", "d/e/staged.bin")
    t.symlink("d/e/ln", "staged.bin")
    t.set_mtime("d/e", 7_000_000_000)
    assert t.copy("d", "copy", overwrite=False) is False
    for path in ("d/e/staged.bin", "d/e/c.txt", "d/b.bin", "d/e", "d/e/ln"):
        a, b = t.stat(path), t.stat("copy" + path[1:])
        assert (a.kind, a.size, a.mode, a.mtime_ns, a.digest, a.target) == \
            (b.kind, b.size, b.mode, b.mtime_ns, b.digest, b.target), path
    assert t.xattrs("copy/e/staged.bin") == {"user.k": b"v"}
    t.put("copy/e/staged.bin", io.BytesIO(b"changed in the copy"))
    with t.open_read("d/e/staged.bin") as f:
        assert f.read() == b"staged bytes"       # the copy has bytes of its own
    with t.open_read("copy/e/staged-too.bin") as f:
        assert f.read() == b"changed in the copy"  # and its hard links are links among themselves
    with pytest.raises(AlreadyExists):
        t.copy("d", "copy", overwrite=False)
    with pytest.raises(Forbidden):
        t.copy("d", "d/e/inside", overwrite=False)
    with pytest.raises(Forbidden):
        t.copy("d/e", "d", overwrite=True)
    assert t.copy("a.txt", "copy/e", overwrite=True) is True     # a file replaces a directory
    assert t.stat("copy/e").kind == "f"
    assert t.copy("d", "shallow", overwrite=False, recursive=False) is False
    assert t.list("shallow") == [] and t.stat("shallow").mode == t.stat("d").mode
    iid = d.commit("r1", ALICE).instance
    state = based.root.state("r1", iid)
    assert state.files["copy/b.bin"] == state.files["d/b.bin"]
    assert state.files["copy/e"].digest == state.files["a.txt"].digest
    assert state.dirs["d/e"].mtime_ns == 7_000_000_000 and "shallow" in state.dirs
    assert read(based, "r1", "d/e/staged.bin") == b"staged bytes"


def test_set_mtime_and_mode(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.set_mtime("a.txt", 123_456_789_000)
    t.set_mtime("", 5_000_000_000)
    t.set_mode("d/e/c.txt", 0o400)
    with pytest.raises(NotFound):
        t.set_mtime("nope", 1)
    iid = d.commit("r1", ALICE).instance
    state = based.root.state("r1", iid)
    assert state.files["a.txt"].mtime_ns == 123_456_789_000
    assert state.files["d/e/c.txt"].mode == 0o400
    assert state.root.mtime_ns == 5_000_000_000


# -- tar -----------------------------------------------------------------------------------------------------
def make_source(top):
    """A tree with what a deposit may hold: nested and empty directories, odd names, modes, symbolic
    links (relative, dangling, to a directory), hard links, user.* xattrs (one binary), exact mtimes."""
    top.mkdir()
    (top / "docs" / "empty").mkdir(parents=True)
    (top / "docs" / "sub dir").mkdir()
    (top / "docs" / "readme.txt").write_bytes(b"read me\n")
    (top / "docs" / "sub dir" / "épreuve ü #1 100%.txt").write_bytes("é".encode() * 1000)
    (top / "docs" / "sub dir" / "tab\tname").write_bytes(b"")
    (top / "big.bin").write_bytes(os.urandom(700_000))
    (top / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(top / "script.sh", 0o750)
    os.chmod(top / "docs" / "readme.txt", 0o444)
    os.link(top / "big.bin", top / "docs" / "big-again.bin")
    os.symlink("../big.bin", top / "docs" / "to-big")
    os.symlink("nowhere/at/all", top / "dangling")
    os.symlink("docs/sub dir", top / "to-dir")
    os.link(top / "dangling", top / "docs" / "dangling-again", follow_symlinks=False)   # a hard link to a link
    os.setxattr(top / "docs" / "readme.txt", "user.dc.title", "Read me ✓".encode())
    os.setxattr(top / "big.bin", "user.binary", b"\x00\x01\xfe\xff")
    stamp = 1_700_000_000_123_456_789
    for n, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(top, topdown=False))):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(stamp + n, stamp + n * 1000 + 7), follow_symlinks=False)
    os.utime(top, ns=(stamp, stamp - 1_000_000_000))
    os.chmod(top / "docs" / "empty", 0o700)


def source_state(top):
    """path -> what the archive must record of it, and the hard link groups, read from the disk."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            path = os.path.relpath(full, top)
            st = os.lstat(full)
            if os.path.islink(full):
                out[path] = ("l", os.readlink(full), st.st_mtime_ns)
            elif os.path.isdir(full):
                out[path] = ("d", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                data = open(full, "rb").read()
                xattrs = {k: os.getxattr(full, k) for k in os.listxattr(full) if k.startswith("user.")}
                out[path] = ("f", hashlib.sha512(data).hexdigest(), st.st_mode & 0o7777, st.st_mtime_ns, xattrs)
                inodes.setdefault(st.st_ino, []).append(path)
    return out, sorted(sorted(g) for g in inodes.values() if len(g) > 1)


def archived_state(state):
    import base64
    out = {}
    for path, e in state.files.items():
        out[path] = ("f", e.digest, e.mode, e.mtime_ns, {k: base64.b64decode(v) for k, v in e.xattrs.items()})
    for path, e in state.dirs.items():
        out[path] = ("d", e.mode, e.mtime_ns)
    for path, e in state.links.items():
        out[path] = ("l", e.target, e.mtime_ns)
    groups = sorted(sorted(g) for g in {tuple(sorted(state.group_of(p))) for p in state.files if state.group_of(p)})
    return out, groups


@pytest.mark.parametrize("compress", ["", "z", "J"])
def test_extract_tar_then_commit_gives_the_source_tree(archive, tmp_path, compress):
    src = tmp_path / "src"
    make_source(src)
    tarball = tmp_path / "src.tar"
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", f"-c{compress}f",
                    str(tarball), "-C", str(src), "."], check=True)
    d = deposits(archive)
    t = d.open("tree", ALICE)
    with open(tarball, "rb") as f:
        members = t.extract_tar(f)
    expected, groups = source_state(src)
    assert members == len(expected) + 1           # and "./"
    iid = d.commit("tree", ALICE).instance
    state = archive.root.state("tree", iid)
    assert archived_state(state) == (expected, groups)
    root = os.lstat(src)
    assert (state.root.mode, state.root.mtime_ns) == (root.st_mode & 0o7777, root.st_mtime_ns)
    assert read(archive, "tree", "big.bin") == (src / "big.bin").read_bytes()
    bag = next(archive.root.root.glob(f"resources/*/*/tree/instances/{iid}"))
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(bag)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_extract_tar_of_a_gnu_tarball_into_a_directory_replaces_what_is_there(based, tmp_path):
    tarball = tmp_path / "doc.tar.bz2"
    subprocess.run(["tar", "--format=gnu", "-cjf", str(tarball), "-C", "/usr/share/doc", "bash"], check=True)
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("d/bash", io.BytesIO(b"a file in the way of a directory"))
    with open(tarball, "rb") as f:
        count = t.extract_tar(f, under="d")
    names = sorted(os.listdir("/usr/share/doc/bash"))
    assert count == len(names) + 1 and [n for n, _ in t.list("d/bash")] == names
    with open(tarball, "rb") as f:        # again: every entry replaced, nothing doubled
        assert t.extract_tar(f, under="d") == count
    iid = d.commit("r1", ALICE).instance
    for name in names:
        full = f"/usr/share/doc/bash/{name}"
        if os.path.isfile(full) and not os.path.islink(full):
            assert read(based, "r1", f"d/bash/{name}") == open(full, "rb").read()
    assert based.root.state("r1", iid).files["a.txt"].size == 6


def tar_with(tmp_path, *members):
    """A tarball made with tarfile of (TarInfo, bytes or None) members."""
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def member(name, kind=None, data=b"", linkname=""):
    import tarfile
    info = tarfile.TarInfo(name)
    info.type = kind or tarfile.REGTYPE
    info.size = len(data) if info.type == tarfile.REGTYPE else 0
    info.linkname = linkname
    info.mtime = 1_600_000_000
    return info, data if info.type == tarfile.REGTYPE else None


@pytest.mark.parametrize("bad, error", [
    ("../x", InvalidName), ("a/../../x", InvalidName), ("/etc/passwd", InvalidName),
    ("dev", Forbidden), ("fifo", Forbidden), ("hardlink-up", InvalidName), ("bad\\x00", InvalidName),
    ("ok/not-utf8-\udcff", InvalidName),
])
def test_extract_tar_refuses_what_tar_x_would_not_make(based, tmp_path, bad, error):
    import tarfile
    kinds = {"dev": member("ok/dev", tarfile.CHRTYPE), "fifo": member("ok/fifo", tarfile.FIFOTYPE),
             "hardlink-up": member("ok/h", tarfile.LNKTYPE, linkname="../../etc/passwd"),
             "bad\\x00": member("ok/" + "n" * 300)}
    bad_member = kinds.get(bad) or member(bad, data=b"evil")
    t = deposits(based).open("r1", ALICE)
    with pytest.raises(error):
        t.extract_tar(tar_with(tmp_path, member("ok/first.txt", data=b"first"), bad_member))
    assert [n for n, _ in t.list("")] == ["a.txt", "d", "ok"]      # what came before stays (documented)
    assert [n for n, _ in t.list("ok")] == ["first.txt"]
    with pytest.raises(InvalidName):
        t.extract_tar(io.BytesIO(b"this is not a tar stream at all" * 100))


# -- threads ---------------------------------------------------------------------------------------------------
def test_puts_from_many_threads_all_land(based):
    from concurrent.futures import ThreadPoolExecutor
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.mkdir("many")
    bodies = {f"many/f{i:03}.bin": os.urandom(1000 + i * 37) for i in range(64)}

    def put(item):
        path, body = item
        assert t.put(path, io.BytesIO(body), len(body)) is True
        return [n for n, _ in t.list("many")]       # readers meanwhile see whole entries only

    with ThreadPoolExecutor(8) as pool:
        for listing in pool.map(put, bodies.items()):
            assert all(t.stat(f"many/{n}").size == len(bodies[f"many/{n}"]) for n in listing)
    iid = d.commit("r1", ALICE).instance
    state = based.root.state("r1", iid)
    for path, body in bodies.items():
        assert state.files[path].digest == hashlib.sha512(body).hexdigest()
    assert read(based, "r1", "many/f063.bin") == bodies["many/f063.bin"]


def test_two_commits_at_once_one_is_busy(based):
    import threading
    d = deposits(based)
    t = d.open("r1", ALICE)
    t.put("big.bin", io.BytesIO(os.urandom(20 << 20)))     # hashed once more by the commit: it takes a while
    outcomes, start = [], threading.Barrier(2)

    def commit():
        start.wait()
        try:
            outcomes.append(d.commit("r1", ALICE).instance)
        except Busy:
            outcomes.append("busy")
        except NotFound:
            outcomes.append("gone")     # the other one had finished already

    threads = [threading.Thread(target=commit) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    head = based.root.head("r1")
    assert head in outcomes and [o for o in outcomes if o != head][0] in ("busy", "gone")
    assert len(based.root.instance_ids("r1")) == 2


def test_a_worm_archive_takes_deposits_and_keeps_every_bag_read_only(tmp_path, archive_ok):
    worm = Archive.init(tmp_path / "worm", mode="worm")
    with worm.new("r1") as t:
        t.add_bytes("kept.txt", b"written once")
    d = deposits(worm)
    for n, body in enumerate((b"written twice", b"written thrice")):
        t = d.open("r1", ALICE)
        t.put("kept.txt", io.BytesIO(body))
        t.put(f"added{n}.txt", io.BytesIO(b"new"))
        iid = d.commit("r1", ALICE).instance
        assert read(worm, "r1", "kept.txt") == body and d.rids() == []
        bag = next(worm.root.root.glob(f"resources/*/*/r1/instances/{iid}"))
        modes = {p.relative_to(bag).as_posix(): p.stat().st_mode & 0o777 for p in bag.rglob("*") if p.is_file()}
        assert set(modes.values()) == {0o444}, modes
    assert len(worm.root.instance_ids("r1")) == 3
    assert not [p for p in worm.root.transactions.iterdir() if p.name not in (".locks",)]
    archive_ok(worm.root.root)


def test_a_copy_that_fails_leaves_the_target_as_it_was(based, monkeypatch):
    import tinyfs.core.deposit as deposit_module
    d = deposits(based)
    t = d.open("r1", ALICE)
    for n in range(3):
        t.put(f"d/staged{n}.bin", io.BytesIO(b"s" * 1000))
    t.mkdir("target")
    t.put("target/kept.txt", io.BytesIO(b"kept"))
    copied = []
    real = deposit_module._copy_bytes

    def copy_bytes(source, dest):        # the disk fills up at the second staged file
        if copied:
            raise NoSpace("no room to copy 1,000 bytes")
        copied.append(source)
        real(source, dest)

    monkeypatch.setattr(deposit_module, "_copy_bytes", copy_bytes)
    blobs = sorted(os.listdir(t.staging.blobs))
    with pytest.raises(NoSpace):
        t.copy("d", "target", overwrite=True)
    assert copied and [n for n, _ in t.list("")] == ["a.txt", "d", "target"]
    assert [n for n, _ in t.list("target")] == ["kept.txt"]
    assert sorted(os.listdir(t.staging.blobs)) == blobs
    monkeypatch.setattr(deposit_module, "_copy_bytes", real)
    assert t.copy("d", "target", overwrite=True) is True
    assert [n for n, _ in t.list("target")] == ["b.bin", "e", "staged0.bin", "staged1.bin", "staged2.bin"]


# -- a full disk ---------------------------------------------------------------------------------------------


class Endless(io.RawIOBase):
    """A body of random bytes that never ends (the client sends no length)."""

    def readable(self):
        return True

    def readinto(self, b):
        b[:len(b)] = os.urandom(len(b))
        return len(b)


@needs_root
def test_a_full_disk_refuses_puts_and_commits_and_leaves_the_transaction(small_fs):  # noqa: F811
    archive = Archive.init(small_fs / "archive")
    with archive.new("r1") as t:
        t.add_bytes("a.txt", b"alpha\n")
    d = deposits(archive)
    t = d.open("r1", ALICE)
    blobs = t.staging.blobs
    with pytest.raises(NoSpace):                          # no length: refused once the disk fills up
        t.put("a.txt", Endless())
    assert os.listdir(blobs) == []
    with t.open_read("a.txt") as f:
        assert f.read() == b"alpha\n"
    kept, spare = os.urandom(6 * MIB), os.urandom(8 * MIB)
    t.put("kept.bin", io.BytesIO(kept), len(kept))
    t.put("spare.bin", io.BytesIO(spare), len(spare))
    t.mkdir("many")
    for i in range(3000):     # manifests and instance.json of a few MiB: more than the disk will have left
        t.put(f"many/{i:05d}-{'x' * 200}.txt", io.BytesIO(f"small {i}\n".encode()))
    fill_rest(small_fs)                                   # another process fills the disk
    with pytest.raises(NoSpace):
        d.commit("r1", ALICE)
    assert t.meta()["state"] == "failed" and archive.root.state("r1").files.keys() == {"a.txt"}
    assert not [n for n in os.listdir(archive.root.transactions) if n.startswith(".commit-")]
    t.delete("spare.bin")                                 # room made by deleting from the transaction
    iid = d.commit("r1", ALICE).instance
    state = archive.root.state("r1", iid)
    assert len(state.files) == 3002 and read(archive, "r1", "kept.bin") == kept


def test_a_rollback_during_an_upload_ends_it_cleanly(based):
    d = deposits(based)
    t = d.open("r1", ALICE)
    path = t.staging.path

    class RolledBackMidway(io.RawIOBase):
        def __init__(self):
            self.n = 0

        def readable(self):
            return True

        def readinto(self, b):
            self.n += 1
            if self.n == 2:
                d.rollback("r1", ALICE)
            if self.n > 4:
                return 0
            b[:4] = b"data"
            return 4

    with pytest.raises(NotFound):
        t.put("late.txt", RolledBackMidway())
    assert not path.exists() and d.rids() == []
    assert not [n for n in os.listdir(based.root.transactions) if n.startswith(".trash-")]
    t2 = d.open("r1", ALICE)
    with pytest.raises(NotFound):
        t2.stat("late.txt")
