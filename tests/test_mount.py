"""The mount with real clients: cp -a, rsync, tar, mv, gio; every result compared and validated."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import check_archive_ok, mounted, run_tinyfs
from mounting import Mounted, check_archive, listing, tinyfs_argv, tree

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]


def source_tree(base: Path, n: int = 30) -> Path:
    (base / "a" / "b").mkdir(parents=True)
    (base / "empty-dir").mkdir()
    for i in range(n):
        (base / "a" / f"f{i:03d}.txt").write_text(f"file {i}\n" * (i + 1))
    (base / "a" / "b" / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    (base / "empty.txt").write_bytes(b"")
    (base / "name with spaces & ümlauts.txt").write_text("odd name\n")
    os.symlink("a/b/big.bin", base / "link")
    os.link(base / "a" / "f000.txt", base / "hard.txt")
    os.chmod(base / "a" / "f001.txt", 0o600)
    os.utime(base / "a" / "b", ns=(1_500_000_000_111_222_333, 1_500_000_000_111_222_333))
    os.utime(base / "empty.txt", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_001))
    age_dirs(base)
    return base


def age_dirs(base: Path, stamp: int = 1_300_000_000_000_000_007) -> None:
    """Give every directory an old time: rsync compares directory times to the second and
    leaves a just-made directory alone when its time is in the same second as the source's."""
    for i, (dirpath, _dirs, _files) in enumerate(sorted(os.walk(base), reverse=True)):
        os.utime(dirpath, ns=(stamp + i * 1_000_000_001, stamp + i * 1_000_000_001))


def same_listing(a: Path, b: Path) -> None:
    left, right = listing(a), listing(b)
    assert left.keys() == right.keys()
    for path, (kind, mode, mtime, extra) in left.items():
        rk, rmode, rmtime, rextra = right[path]
        assert (kind, extra) == (rk, rextra), path
        if kind != "l":
            assert rmode == mode, path          # views show the recorded mode exactly, write bits included
            assert rmtime == mtime, path


def test_cp_a_commit_and_views(mnt, tmp_path, root):
    src = source_tree(tmp_path / "src")
    t = mnt / "transactions" / "book"
    os.mkdir(t)
    subprocess.run(["cp", "-a", f"{src}/.", str(t)], check=True)
    same_listing(src, t)
    mnt.commit("book")
    view = mnt / "resources" / "book"
    assert tree(view) == tree(src)
    same_listing(src, view)
    (iid,) = os.listdir(mnt / "instances" / "book")
    same_listing(src, mnt / "instances" / "book" / iid)
    assert (mnt / "aip" / "book" / "instances" / iid / "bagit.txt").read_bytes().startswith(b"BagIt-Version: 1.0")
    assert json.loads((mnt / "aip" / "book" / "instances" / iid / "instance.json").read_text())["id"] == iid


def test_rsync_plain_delete_inplace(mnt, tmp_path, root):
    """rsync into a transaction ends exactly like the same rsync into a native directory."""
    src = source_tree(tmp_path / "src", n=50)
    native = tmp_path / "native"
    t = mnt / "transactions" / "data"

    def both(*opts):
        os.mkdir(t)
        for dest in (native, t):
            subprocess.run(["rsync", "-a", *opts, f"{src}/", f"{dest}/"], check=True)
        mnt.commit("data")
        assert tree(mnt / "resources" / "data") == tree(native) == tree(src)
        same_listing(native, mnt / "resources" / "data")

    both()
    (src / "a" / "f001.txt").write_text("changed\n")
    os.unlink(src / "a" / "f002.txt")
    shutil.rmtree(src / "empty-dir")
    (src / "new.txt").write_text("new\n")
    age_dirs(src, stamp=1_310_000_000_000_000_009)
    both("--delete")
    with open(src / "a" / "b" / "big.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"patched in place")
    os.utime(src / "a" / "b" / "big.bin", ns=(1_320_000_000_000_000_003,) * 2)  # rsync's quick check: to the second
    both("--inplace", "--no-whole-file")
    assert len(os.listdir(mnt / "instances" / "data")) == 3


@pytest.mark.parametrize("mode", ["preservation", "dynamic"])
def test_a_browsed_resource_shows_every_change_of_a_commit_at_once(tmp_path, mode):
    """resources/<rid> read whole (every entry looked up, every file in the page cache, one kept open),
    then a commit that changes a little of everything: the mv returns and every name shows the new
    head, while the unchanged entries keep their inodes (their cached entries were not thrown away)."""
    root = tmp_path / "archive"
    run_tinyfs("init", root, "--mode", mode)
    src = source_tree(tmp_path / "src")
    (src / "a" / "gone-dir" / "deeper").mkdir(parents=True)
    (src / "a" / "gone-dir" / "deeper" / "x.txt").write_text("x\n")
    (src / "will-be-a-dir").write_text("a file first\n")
    with mounted(root, tmp_path) as m:
        t = m.mnt / "transactions" / "doc"
        os.mkdir(t)
        subprocess.run(["cp", "-a", f"{src}/.", str(t)], check=True)
        m.commit("doc")
        view = m.mnt / "resources" / "doc"
        (old,) = os.listdir(m.mnt / "instances" / "doc")
        before = tree(view)
        inodes = {p: os.lstat(view / p).st_ino for p in listing(view)}
        kept_open = open(view / "a" / "f003.txt", "rb")
        changed_open = open(view / "a" / "f004.txt", "rb")
        assert changed_open.read() == before["a/f004.txt"]

        os.mkdir(t)
        stamp = os.stat(t / "a" / "f004.txt").st_mtime_ns
        with open(t / "a" / "f004.txt", "r+b") as f:
            f.write(b"FILE")                                   # same size, same mtime: only the bytes differ
        os.utime(t / "a" / "f004.txt", ns=(stamp, stamp))
        os.chmod(t / "a" / "f005.txt", 0o640)
        os.unlink(t / "a" / "f006.txt")
        shutil.rmtree(t / "a" / "gone-dir")
        (t / "a" / "b" / "new.txt").write_text("new\n")
        os.unlink(t / "will-be-a-dir")
        os.mkdir(t / "will-be-a-dir")
        (t / "will-be-a-dir" / "inside.txt").write_text("inside\n")
        os.unlink(t / "link")
        os.symlink("a/f000.txt", t / "link")
        expected_tree, expected_listing = tree(t), listing(t)
        root_mtime = os.stat(t).st_mtime_ns
        m.commit("doc")

        assert tree(view) == expected_tree
        shown = listing(view)
        assert shown.keys() == expected_listing.keys()
        for path, (kind, mode_, mtime, extra) in expected_listing.items():
            assert shown[path] == (kind, mode_, mtime, extra), path
        assert not (view / "a" / "f006.txt").exists() and not (view / "a" / "gone-dir").exists()
        assert os.readlink(view / "link") == "a/f000.txt"
        assert os.stat(view).st_mtime_ns == root_mtime          # the root's, as the transaction had it
        kept = [p for p in inodes if p in shown and not p.startswith(("a/f004", "link", "will-be"))]
        assert "a" in kept and "a/f005.txt" in kept           # new times, new mode: the same inodes
        assert [p for p in kept if os.lstat(view / p).st_ino != inodes[p]] == []
        assert os.lstat(view / "a" / "f004.txt").st_ino != inodes["a/f004.txt"]
        assert kept_open.read() == before["a/f003.txt"]
        changed_open.seek(0)
        assert changed_open.read() == before["a/f004.txt"]       # an open file keeps the bytes it had
        kept_open.close()
        changed_open.close()
        if mode == "preservation":
            assert tree(m.mnt / "instances" / "doc" / old) == before
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(root)


def test_tar_x_and_mv_from_another_file_system(mnt, tmp_path):
    src = source_tree(tmp_path / "src")
    archive = tmp_path / "src.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(archive), "."], check=True)
    t = mnt / "transactions" / "tarred"
    os.mkdir(t)
    subprocess.run(["tar", "-C", str(t), "-xpf", str(archive)], check=True)
    moved = tmp_path / "moved"
    shutil.copytree(src, moved, symlinks=True)
    subprocess.run(["mv", str(moved), str(t / "moved")], check=True)
    mnt.commit("tarred")
    view = mnt / "resources" / "tarred"
    same_listing(src, view / "moved")
    assert tree(view / "moved") == tree(src)
    assert {k: v for k, v in tree(view).items() if not k.startswith("moved/")} == tree(src)


def test_tar_x_with_xattrs_which_makes_files_with_mknod(mnt, tmp_path):
    """GNU tar --xattrs creates each regular file with mknod(2), sets its xattrs, then opens it."""
    src = source_tree(tmp_path / "src", n=5)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    try:
        for n, p in enumerate(files):
            os.setxattr(p, "user.note", f"file {n}".encode())
    except OSError as e:
        pytest.skip(f"no user xattrs on {tmp_path}: {e}")
    archive = tmp_path / "src.tar"
    subprocess.run(["tar", "--xattrs", "-C", str(src), "-cf", str(archive), "."], check=True)
    t = mnt / "transactions" / "xtar"
    os.mkdir(t)
    subprocess.run(["tar", "--xattrs", "-C", str(t), "-xpf", str(archive)], check=True)
    os.mknod(t / "made-by-mknod", 0o640 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(t / "made-by-mknod").st_mode)
    with pytest.raises(FileExistsError):
        os.mknod(t / "made-by-mknod", 0o640 | stat.S_IFREG)
    mnt.commit("xtar")
    view = mnt / "resources" / "xtar"
    assert tree(view) == {**tree(src), "made-by-mknod": b""}
    (src / "made-by-mknod").touch()      # what the listing should show: the mknod'ed file, empty
    os.chmod(src / "made-by-mknod", 0o640)
    os.utime(src / "made-by-mknod", ns=(0, os.stat(view / "made-by-mknod").st_mtime_ns))
    same_listing(src, view)
    for p in files:      # (hard-linked names share one inode's xattrs)
        assert os.getxattr(view / p.relative_to(src), "user.note") == os.getxattr(p, "user.note")


@pytest.mark.skipif(not shutil.which("gio"), reason="needs GLib's gio")
def test_gio_copy_and_move(mnt, tmp_path):
    """What GNOME Files does, through GLib's gio: mkdir, copy (--preserve), move, replace, info."""
    src = source_tree(tmp_path / "src", n=5)
    t = mnt / "transactions" / "gio"
    os.mkdir(t)
    env = dict(os.environ, GIO_USE_VFS="local")

    def gio(*args):
        subprocess.run(["gio", *map(str, args)], check=True, env=env, capture_output=True)

    gio("mkdir", "-p", t / "a" / "b")
    for f in sorted((src / "a").glob("*.txt")):
        gio("copy", "--preserve", f, t / "a" / f.name)
    gio("copy", "--preserve", src / "a" / "b" / "big.bin", t / "a" / "b" / "big.bin")
    gio("copy", "--preserve", src / "empty.txt", t / "empty.txt")
    gio("move", t / "a" / "f000.txt", t / "moved.txt")
    gio("move", t / "a" / "b", t / "b-renamed")
    gio("copy", src / "a" / "f004.txt", t / "moved.txt")      # replaces an existing file
    moved_away = tmp_path / "elsewhere.txt"
    moved_away.write_text("moved across file systems\n")
    gio("move", moved_away, t / "elsewhere.txt")
    gio("info", "-f", t)
    mnt.commit("gio")
    view = mnt / "resources" / "gio"
    assert (view / "b-renamed" / "big.bin").read_bytes() == (src / "a" / "b" / "big.bin").read_bytes()
    assert os.stat(view / "empty.txt").st_mtime_ns // 1000 == os.stat(src / "empty.txt").st_mtime_ns // 1000
    assert (view / "moved.txt").read_bytes() == (src / "a" / "f004.txt").read_bytes()
    assert (view / "elsewhere.txt").read_text() == "moved across file systems\n"
    assert not (view / "a" / "f000.txt").exists() and not moved_away.exists()


def test_renames_of_base_files_do_not_copy_and_dedup(mnt, root):
    t = mnt / "transactions" / "r"
    os.makedirs(t / "d1" / "d2")
    payload = os.urandom(2 * 1024 * 1024)
    (t / "d1" / "d2" / "x.bin").write_bytes(payload)
    (t / "keep.txt").write_text("keep")
    mnt.commit("r")
    os.mkdir(t)
    os.rename(t / "d1", t / "moved")
    os.rename(t / "keep.txt", t / "moved" / "kept.txt")
    blobs = root / "transactions" / "r" / "blobs"
    assert os.listdir(blobs) == []          # nothing copied: renames move names, not bytes
    with pytest.raises(FileExistsError):
        subprocess.run(["mv", "-n", str(t / "moved" / "kept.txt"), str(t / "moved" / "d2" / "x.bin")],
                       check=True)
        raise FileExistsError  # mv -n exits 0 without replacing; the check below is what matters
    assert (t / "moved" / "d2" / "x.bin").read_bytes() == payload
    mnt.commit("r")
    view = mnt / "resources" / "r"
    assert (view / "moved" / "d2" / "x.bin").read_bytes() == payload
    assert not (view / "d1").exists()
    newest = sorted(os.listdir(mnt / "instances" / "r"))[-1]
    stored = list((root / "resources").glob(f"*/*/r/instances/{newest}/data/**/*"))
    assert [p for p in stored if p.is_file()] == []   # dedup: the new instance stores no bytes


def test_rename_noreplace_is_honoured(mnt):
    import ctypes
    t = mnt / "transactions" / "nr"
    os.mkdir(t)
    (t / "a").write_text("a")
    (t / "b").write_text("b")
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    rc = libc.renameat2(AT_FDCWD, bytes(t / "a"), AT_FDCWD, bytes(t / "b"), RENAME_NOREPLACE)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (t / "b").read_text() == "b"
    subprocess.run(["mv", str(t / "a"), str(t / "b")], check=True)
    assert (t / "b").read_text() == "a"


def test_commit_with_a_file_open_for_writing_is_ebusy(mnt, root):
    t = mnt / "transactions" / "busy"
    os.mkdir(t)
    f = open(t / "open.txt", "w")
    f.write("not yet")
    f.flush()
    with pytest.raises(OSError) as e:
        mnt.commit("busy")
    assert e.value.errno == errno.EBUSY
    assert os.getxattr(t, "user.tinyfs.state") == b"failed"
    assert b"open.txt" in os.getxattr(t, "user.tinyfs.error")
    f.close()
    mnt.commit("busy")
    assert (mnt / "resources" / "busy" / "open.txt").read_text() == "not yet"


def test_commit_right_after_close_never_ebusy(mnt):
    for i in range(30):
        t = mnt / "transactions" / f"quick{i}"
        os.mkdir(t)
        with open(t / "f.bin", "wb") as f:
            f.write(os.urandom(300_000))
        mnt.commit(f"quick{i}")


def test_sparse_and_random_writes_and_truncate(mnt):
    t = mnt / "transactions" / "sparse"
    os.mkdir(t)
    with open(t / "holes.bin", "wb") as f:
        f.seek(3 * 1024 * 1024)
        f.write(b"end")
        f.seek(5)
        f.write(b"start")
    with open(t / "rw.bin", "w+b") as f:
        f.write(b"0123456789" * 1000)
        f.seek(500)
        f.write(b"XX")
        f.truncate(800)
    mnt.commit("sparse")
    data = (mnt / "resources" / "sparse" / "holes.bin").read_bytes()
    assert len(data) == 3 * 1024 * 1024 + 3 and data[5:10] == b"start" and data[-3:] == b"end"
    rw = (mnt / "resources" / "sparse" / "rw.bin").read_bytes()
    assert len(rw) == 800 and rw[500:502] == b"XX"


def test_write_only_handles_bypass_the_page_cache_coherently(mnt):
    """Write-only handles are direct I/O (one copy less, no second page cache): a reader that already
    cached the bytes, a new reader, a shared writable mmap and the commit all see the newest bytes."""
    import mmap

    t = mnt / "transactions" / "coherent"
    os.mkdir(t)
    p = t / "f.bin"
    p.write_bytes(b"A" * 100_000)
    reader = os.open(p, os.O_RDONLY)
    writer = os.open(p, os.O_WRONLY)
    try:
        assert os.pread(reader, 10, 5000) == b"A" * 10           # now in the kernel's cache
        os.pwrite(writer, b"B" * 10, 5000)
        assert os.pread(reader, 10, 5000) == b"B" * 10
        with open(p, "rb") as again:
            again.seek(5000)
            assert again.read(10) == b"B" * 10
        os.pwrite(writer, b"C" * 10, 100_000)                   # grows the file
        assert os.fstat(reader).st_size == 100_010
        assert os.pread(reader, 15, 99_995) == b"A" * 5 + b"C" * 10
        rw = os.open(p, os.O_RDWR)
        try:
            with mmap.mmap(rw, 4096) as m:
                m[0:3] = b"XYZ"
                m.flush()
        finally:
            os.close(rw)
        assert os.pread(reader, 4, 0) == b"XYZA"
    finally:
        os.close(writer)
        os.close(reader)
    mnt.commit("coherent")
    data = (mnt / "resources" / "coherent" / "f.bin").read_bytes()
    assert data == b"XYZ" + b"A" * 4997 + b"B" * 10 + b"A" * 94_990 + b"C" * 10


def test_copy_on_write_of_a_base_file_and_glib_style_replace(mnt):
    t = mnt / "transactions" / "cow"
    os.mkdir(t)
    (t / "doc.txt").write_text("version 1\n")
    mnt.commit("cow")
    os.mkdir(t)
    fd = os.open(t / "doc.txt", os.O_WRONLY)      # GLib opens the original for writing first
    tmp = t / ".goutputstream-ABC123"
    tmp.write_text("version 2\n")
    os.rename(tmp, t / "doc.txt")
    os.close(fd)
    with open(t / "doc.txt", "a") as f:
        f.write("appended\n")
    mnt.commit("cow")
    assert (mnt / "resources" / "cow" / "doc.txt").read_text() == "version 2\nappended\n"


def test_other_process_commits_show_up_and_stale_conflict(mnt, root, tmp_path):
    t = mnt / "transactions" / "shared"
    os.mkdir(t)
    (t / "a.txt").write_text("a1")
    mnt.commit("shared")
    os.mkdir(t)
    (t / "a.txt").write_text("a2 from the mount")
    f = tmp_path / "a.txt"
    f.write_text("a2 from the cli")
    subprocess.run([*tinyfs_argv(), "ingest", str(root), "shared", str(f)], check=True)
    with pytest.raises(OSError) as e:
        mnt.commit("shared")
    assert e.value.errno == errno.ESTALE
    assert (t / "a.txt").read_text() == "a2 from the mount"
    shutil.rmtree(t)
    deadline = time.monotonic() + 5
    while (mnt / "resources" / "shared" / "a.txt").read_text() != "a2 from the cli":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_commit_merged_over_another_process_s_shows_at_once_in_a_browsed_tree(mnt, root, tmp_path):
    """The tree the kernel holds is the head before another process's commit: the mount's commit, merged on
    top of that commit, must not move the cached tree (it would miss the other commit's change)."""
    t = mnt / "transactions" / "merged"
    os.mkdir(t)
    (t / "a.txt").write_text("a1")
    (t / "b.txt").write_text("b1")
    mnt.commit("merged")
    view = mnt / "resources" / "merged"
    assert tree(view) == {"a.txt": b"a1", "b.txt": b"b1"}
    os.mkdir(t)
    (t / "b.txt").write_text("b2 from the mount")
    (tmp_path / "cli").mkdir()
    for name in ("a.txt", "c.txt"):               # a.txt: a name the kernel holds; c.txt: a new one
        (tmp_path / "cli" / name).write_text(f"{name} from the cli")
    subprocess.run([*tinyfs_argv(), "ingest", str(root), "merged", *(str(p) for p in (tmp_path / "cli").iterdir())],
                   check=True)
    mnt.commit("merged")
    assert tree(view) == {"a.txt": b"a.txt from the cli", "b.txt": b"b2 from the mount", "c.txt": b"c.txt from the cli"}
    assert len(os.listdir(mnt / "instances" / "merged")) == 3


def test_rollback_and_permissions_of_views(mnt, root):
    t = mnt / "transactions" / "gone"
    os.mkdir(t)
    os.makedirs(t / "x" / "y")
    (t / "x" / "y" / "z").write_text("z")
    subprocess.run(["rm", "-rf", str(t)], check=True)
    assert not t.exists() and not (root / "transactions" / "gone").exists()
    assert os.stat(mnt / "transactions").st_mode & 0o7777 == 0o1777
    assert os.stat(mnt / "commit").st_mode & 0o7777 == 0o1777
    with pytest.raises(OSError) as e:
        (mnt / "commit" / "x").write_text("no")
    assert e.value.errno == errno.EPERM
    events = [json.loads(x)["event"] for x in (mnt / "events.jsonl").read_text().splitlines()]
    assert "transaction.rolled_back" in events


def test_xattrs_in_transactions(mnt):
    t = mnt / "transactions" / "xa"
    os.mkdir(t)
    (t / "f").write_text("f")
    os.setxattr(t / "f", "user.checksum.note", b"\x00binary\xff")
    os.setxattr(t / "f", "user.tinyfs.digest", b"ignored")
    for ns in ("security.x", "trusted.x"):
        with pytest.raises(OSError) as e:
            os.setxattr(t / "f", ns, b"1")
        assert e.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)
    os.setxattr(t, "user.tinyfs.message", b"a message\nwith two lines")
    mnt.commit("xa")
    v = mnt / "resources" / "xa" / "f"
    assert os.getxattr(v, "user.checksum.note") == b"\x00binary\xff"
    assert os.getxattr(v, "user.tinyfs.digest").startswith(b"sha512:")


def test_transaction_survives_unmount_and_kill(root, tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "log").start()
    t = point / "transactions" / "persist"
    os.mkdir(t)
    os.makedirs(t / "d")
    (t / "d" / "one.txt").write_text("one")
    os.setxattr(t, "user.tinyfs.label", b"v1")
    assert m.stop() == 0
    m.start()
    assert (t / "d" / "one.txt").read_text() == "one"
    (t / "two.txt").write_text("two")
    m.crash()
    m.start()
    try:
        assert (t / "two.txt").read_text() == "two"
        m.commit("persist")
        assert os.readlink(point / "instances" / "persist" / "v1")
    finally:
        m.stop()
    check_archive(root)


def test_mount_is_exclusive_and_refuses_a_second(root, tmp_path, mnt):
    other = tmp_path / "other"
    other.mkdir()
    r = subprocess.run([*tinyfs_argv(), "mount", "--foreground", str(root), str(other)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "already in use by another tinyfs process" in r.stderr
    assert "Traceback" not in r.stderr


def test_parallel_readers_while_committing(mnt):
    t = mnt / "transactions" / "par"
    os.mkdir(t)
    for i in range(200):
        (t / f"{i}.txt").write_text(str(i))
    errors = []

    def reader():
        try:
            for _ in range(20):
                os.listdir(mnt / "resources")
        except OSError as e:
            errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    mnt.commit("par")
    th.join()
    assert not errors
    assert len(os.listdir(mnt / "resources" / "par")) == 200


def test_a_transaction_whose_base_instance_was_dropped_can_still_be_rolled_back(tmp_path):
    """Dynamic mode: an ingest replaces the head (and drops it) while a mount transaction built on it is
    open. After a restart the transaction still lists (its own changes), refuses to commit (ESTALE, the
    base is gone), and `rm -rf` rolls it back."""
    root = tmp_path / "archive"
    run_tinyfs("init", "--mode", "dynamic", root)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("first\n")
    second.write_text("second\n")
    run_tinyfs("ingest", root, "r", first)
    with mounted(root, tmp_path) as m:
        t = m / "transactions" / "r"
        os.mkdir(t)
        (t / "mine.txt").write_text("mine\n")
        run_tinyfs("ingest", root, "r", second)           # the transaction's base instance is dropped
        m.stop()
        m.start()
        assert sorted(os.listdir(t)) == ["mine.txt"]     # only what the transaction itself holds
        with pytest.raises(OSError) as e:
            m.commit("r")
        assert e.value.errno == errno.ESTALE
        shutil.rmtree(t)
        assert not t.exists()
        assert sorted(os.listdir(m / "resources" / "r")) == ["first.txt", "second.txt"]
    check_archive_ok(root)
