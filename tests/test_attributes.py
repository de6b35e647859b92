"""What ordinary tools see of attributes through the mount: recorded modes shown exactly (every change of a
read-only tree is EROFS), virtual xattrs, the resource root's mode and mtime, and rsync round trips that
check clean (`rsync -anciHAX` prints nothing after `rsync -aHAX` into a transaction and the commit)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs
from mounting import Mounted, listing
from trees import OLD_NS, acceptance_tree, errno_of

from tinyfs.core.layout import ArchiveRoot

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse")
                       or not shutil.which("rsync"), reason="needs FUSE and rsync"),
]

def rsync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rsync", *args], capture_output=True, text=True, timeout=600)


def doc_sample(base: Path, files: int = 300) -> Path:
    """Real material: whole package folders of /usr/share/doc (modes, times, symbolic links as packaged)
    until about `files` files, every top-level symbolic link (most then dangle: their folders were left
    out), and one dangling link made here in case the machine has none."""
    doc = Path("/usr/share/doc")
    if not doc.is_dir():
        pytest.skip("no /usr/share/doc")
    base.mkdir()
    taken = 0
    for entry in sorted(doc.iterdir()):
        if entry.is_symlink():
            subprocess.run(["cp", "-a", str(entry), str(base)], check=True)
        elif entry.is_dir() and taken < files:
            subprocess.run(["cp", "-a", str(entry), str(base)], check=True)
            taken += sum(len(f) for _d, _s, f in os.walk(base / entry.name))
    os.symlink("no-such-package/changelog.gz", base / "dangling")
    os.utime(base / "dangling", ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(base, ns=(OLD_NS + 1, OLD_NS + 1))
    return base


def itemized(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def owner_only(line: str) -> bool:
    """An itemized line whose only differences are the owner and group (`.f....og...`): owners are not
    recorded (SPEC 4), so a file the root deposited with another owner shows the mounting user's."""
    flags = line.split(" ", 1)[0]
    return flags[0] == "." and set(flags[2:]) <= {".", "o", "g"} and ("o" in flags or "g" in flags)


# -- read-only trees ---------------------------------------------------------------------------------------

@pytest.fixture
def committed(mnt, tmp_path):
    """resource `ro` committed from a tree of assorted modes; (mount, its source, the instance id)."""
    src = tmp_path / "src"
    (src / "private").mkdir(parents=True)
    (src / "open").mkdir()
    for name, mode in (("rw.txt", 0o644), ("mine.txt", 0o600), ("run.sh", 0o755), ("ro.txt", 0o444),
                       ("setid", 0o6755), ("none", 0o000)):
        (src / name).write_text(name)
        os.chmod(src / name, mode)
    (src / "private" / "x.txt").write_text("x")
    (src / "open" / "y.txt").write_text("y")
    os.chmod(src / "private", 0o700)
    os.chmod(src / "open", 0o777)
    os.symlink("rw.txt", src / "link")
    t = mnt / "transactions" / "ro"
    os.mkdir(t)
    subprocess.run(["cp", "-a", f"{src}/.", str(t)], check=True)
    mnt.commit("ro")
    (iid,) = os.listdir(mnt / "instances" / "ro")
    return mnt, src, iid


def test_views_show_the_recorded_modes_exactly(committed, root):
    mnt, src, iid = committed
    for view in (mnt / "resources" / "ro", mnt / "instances" / "ro" / iid):
        shown, recorded = listing(view), listing(src)
        assert shown == recorded                       # type, mode (write and set-id bits too), mtime, size
        assert stat.S_IMODE(os.stat(view / "setid").st_mode) == 0o6755
    aip = mnt / "aip" / "ro"
    stored = ArchiveRoot(root).resource_dir("ro")
    for path in ("resource.json", f"instances/{iid}", f"instances/{iid}/instance.json", f"instances/{iid}/data"):
        assert os.lstat(aip / path).st_mode == os.lstat(stored / path).st_mode, path    # as stored


def _refusals(view: Path, txn: Path, with_link: bool = True) -> dict[str, int]:
    """Every kind of change of a read-only tree at `view` (a directory holding rw.txt, private/ and, with
    `with_link`, link), done as root, so that the kernel's permission checks let each request reach the
    daemon."""
    f, d = view / "rw.txt", view / "private"
    tries = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "open O_CREAT existing": lambda: os.open(f, os.O_WRONLY | os.O_CREAT),
        "create": lambda: os.open(view / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(view / "newdir"),
        "mknod": lambda: os.mknod(view / "node", 0o644 | stat.S_IFREG),
        "mkfifo": lambda: os.mkfifo(view / "fifo"),
        "symlink": lambda: os.symlink("rw.txt", view / "newlink"),
        "link within": lambda: os.link(f, view / "hard"),
        "link out to a transaction": lambda: os.link(f, txn / "hard"),
        "link in from a transaction": lambda: os.link(txn / "t.txt", view / "hard"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d),
        "rename within": lambda: os.rename(f, view / "renamed.txt"),
        "rename out to a transaction": lambda: os.rename(f, txn / "moved.txt"),
        "rename in from a transaction": lambda: os.rename(txn / "t.txt", view / "moved.txt"),
        "rename over": lambda: os.rename(txn / "t.txt", f),
        "chmod": lambda: os.chmod(f, 0o600),
        "chmod dir": lambda: os.chmod(d, 0o755),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, ns=(OLD_NS, OLD_NS)),
        "touch": lambda: os.utime(f),
        "truncate": lambda: os.truncate(f, 0),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "setxattr dir": lambda: os.setxattr(d, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.x"),
        "removexattr virtual": lambda: os.removexattr(f, "user.tinyfs.digest"),
    }
    if with_link:
        tries["unlink symlink"] = lambda: os.unlink(view / "link")
        tries["utime symlink"] = lambda: os.utime(view / "link", ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    return {name: errno_of(fn) for name, fn in tries.items()}


def test_every_change_of_a_read_only_tree_is_erofs(committed, root):
    mnt, src, iid = committed
    t = mnt / "transactions" / "other"
    os.mkdir(t)
    (t / "t.txt").write_text("t")
    for view in (mnt / "resources" / "ro", mnt / "instances" / "ro" / iid):
        got = _refusals(view, t)
        assert got == dict.fromkeys(got, errno.EROFS), view
    # aip/ shows the stored bag: its data/ holds the same files (no symbolic link: a BagIt payload has none)
    got = _refusals(mnt / "aip" / "ro" / "instances" / iid / "data", t, with_link=False)
    assert got == dict.fromkeys(got, errno.EROFS)
    for path in ("resources/ro", "instances/ro", f"instances/ro/{iid}", "aip/ro"):
        assert errno_of(os.rename, mnt / path, mnt / "transactions" / "stolen") == errno.EROFS, path
        assert errno_of(os.rmdir, mnt / path) == errno.EROFS, path
        assert errno_of(os.chmod, mnt / path, 0o700) == errno.EROFS, path
    assert (t / "t.txt").read_text() == "t"
    os.unlink(t / "t.txt")
    os.rmdir(t)
    assert listing(mnt / "resources" / "ro") == listing(src)          # nothing changed


# -- virtual xattrs ----------------------------------------------------------------------------------------

def test_synthetic_xattrs_are_readable_by_name_and_never_listed(mnt, tmp_path):
    t = mnt / "transactions" / "xa"
    os.mkdir(t)
    assert os.listxattr(t) == []                                  # nothing set yet: nothing listed
    assert os.getxattr(t, "user.tinyfs.state") == b"open"         # ... though the state reads by name
    assert errno_of(os.getxattr, t, "user.tinyfs.error") == errno.ENODATA
    for key in ("message", "creator", "label"):
        assert errno_of(os.removexattr, t, f"user.tinyfs.{key}") == errno.ENODATA     # not set: as any name
    for key in ("state", "error"):
        assert errno_of(os.removexattr, t, f"user.tinyfs.{key}") == errno.EPERM
        assert errno_of(os.setxattr, t, f"user.tinyfs.{key}", b"x") == errno.EPERM
    os.setxattr(t, "user.tinyfs.message", b"listed once set")
    os.setxattr(t, "user.tinyfs.label", b"v1")
    assert sorted(os.listxattr(t)) == ["user.tinyfs.label", "user.tinyfs.message"]
    os.removexattr(t, "user.tinyfs.label")
    assert os.listxattr(t) == ["user.tinyfs.message"]
    assert errno_of(os.getxattr, t, "user.tinyfs.label") == errno.ENODATA
    assert errno_of(os.removexattr, t, "user.tinyfs.label") == errno.ENODATA
    (t / "f").write_text("f")
    os.setxattr(t / "f", "user.origin", b"scanner")
    mnt.commit("xa")

    v = mnt / "resources" / "xa" / "f"
    assert os.listxattr(v) == ["user.origin"]                       # recorded ones only
    assert os.getxattr(v, "user.tinyfs.digest").startswith(b"sha512:")
    (iid,) = os.listdir(mnt / "instances" / "xa")
    assert os.getxattr(v, "user.tinyfs.instance") == iid.encode()
    assert os.listxattr(mnt / "instances" / "xa" / iid / "f") == ["user.origin"]
    # cp -a out of a view copies what is listed: no synthetic attribute travels with the bytes
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cp", "-a", str(v), str(out)], check=True)
    assert os.listxattr(out / "f") == ["user.origin"]


def test_rsync_x_into_a_transaction_with_metadata_set(mnt, tmp_path):
    """rsync -X makes the destination's xattrs the source's: the virtual state is not in its way; metadata
    the user had set is listed like any attribute, so it goes too (set it after the copy)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    os.setxattr(src / "a.txt", "user.origin", b"scanner")
    t = mnt / "transactions" / "rx"
    os.mkdir(t)
    os.setxattr(t, "user.tinyfs.creator", b"set before the copy")
    r = rsync("-aHAX", "--delete", f"{src}/", f"{t}/")
    assert r.returncode == 0, r.stderr
    assert os.listxattr(t) == [] and os.getxattr(t, "user.tinyfs.state") == b"open"
    os.setxattr(t, "user.tinyfs.message", b"set after the copy")
    mnt.commit("rx")
    doc = _head_doc(mnt, "rx")
    assert doc["message"] == "set after the copy" and doc["creator"] != "set before the copy"
    assert os.getxattr(mnt / "resources" / "rx" / "a.txt", "user.origin") == b"scanner"


def _head_doc(mnt: Mounted, rid: str) -> dict:
    iid = sorted(os.listdir(mnt / "instances" / rid))[-1]
    return json.loads((mnt / "aip" / rid / "instances" / iid / "instance.json").read_bytes())


# -- the resource root ---------------------------------------------------------------------------------------

def test_the_resource_root_keeps_the_mode_and_mtime_its_client_set(mnt, root, tmp_path):
    t = mnt / "transactions" / "rt"
    os.mkdir(t)
    os.mkdir(t / "sub")
    (t / "a.txt").write_text("a")
    os.chmod(t, 0o750)
    os.utime(t, ns=(OLD_NS, OLD_NS))
    st = os.stat(t)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid) == (0o750, OLD_NS, 0)
    os.chmod(t, 0o555)
    assert stat.S_IMODE(os.stat(t).st_mode) == 0o755       # shown usable by its owner, kept as set
    mnt.commit("rt")
    (iid,) = os.listdir(mnt / "instances" / "rt")
    for view in (mnt / "resources" / "rt", mnt / "instances" / "rt" / iid):
        st = os.stat(view)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o555, OLD_NS), view
    assert _head_doc(mnt, "rt")["dirs"][""] == {"mode": 0o555, "mtime_ns": OLD_NS}
    listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(mnt / "resources")}    # (readdirplus)
    assert (stat.S_IMODE(listed["rt"].st_mode), listed["rt"].st_mtime_ns) == (0o555, OLD_NS)

    # the next transaction starts from the recorded root; touching nothing there keeps it
    os.mkdir(t)
    assert os.stat(t).st_mtime_ns == OLD_NS
    mnt.commit("rt")
    assert len(os.listdir(mnt / "instances" / "rt")) == 1                      # unchanged: no instance
    os.mkdir(t)
    (t / "sub" / "deeper.txt").write_text("below the root: its time stays")
    mnt.commit("rt")
    assert os.stat(mnt / "resources" / "rt").st_mtime_ns == OLD_NS
    os.mkdir(t)
    (t / "top.txt").write_text("in the root: its time moves, as on a local disk")
    mnt.commit("rt")
    st = os.stat(mnt / "resources" / "rt")
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime_ns > OLD_NS
    moved = st.st_mtime_ns
    # a CLI ingest records no root of its own: the head's stays
    (tmp_path / "cli.txt").write_text("cli")
    run_tinyfs("ingest", root, "rt", tmp_path / "cli.txt")
    assert len(os.listdir(mnt / "instances" / "rt")) == 4
    assert os.stat(mnt / "resources" / "rt").st_mtime_ns == moved
    # an instance with no root recorded (the CLI's, or one older than the record) shows 0755 and its time
    run_tinyfs("ingest", root, "cli-only", tmp_path / "cli.txt")
    (cli_iid,) = os.listdir(mnt / "instances" / "cli-only")
    st = os.stat(mnt / "resources" / "cli-only")
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_mtime_ns // 1_000_000 == int(cli_iid.replace("-", "")[:12], 16)


def test_a_read_only_source_root_does_not_lock_its_depositor_out(tmp_path):
    """As an ordinary user (nobody), `cp -a` and `rsync -a` of a 0555 source set 0555 on the transaction
    directory: the owner can still write into it, commit it with mv, and roll back another with rm -rf."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as nobody and to mount with allow_other")
    base = Path(tempfile.mkdtemp(prefix="tinyfs-attr-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        root, point = base / "archive", base / "mnt"
        run_tinyfs("init", root)
        src = base / "src"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f.txt").write_text("f")
        os.utime(src, ns=(OLD_NS, OLD_NS))
        subprocess.run(["chown", "-R", "65534:65534", str(src)], check=True)
        os.chmod(src, 0o555)
        point.mkdir()
        m = Mounted(root, point, base / "mount.log", options="allow_other").start()
        try:
            script = f"""
                set -e
                mkdir {point}/transactions/by-cp {point}/transactions/by-rsync {point}/transactions/dropped
                cp -a {src}/. {point}/transactions/by-cp/
                rsync -a {src}/ {point}/transactions/by-rsync/
                rsync -a {src}/ {point}/transactions/dropped/
                echo later > {point}/transactions/dropped/later.txt
                mv {point}/transactions/by-cp {point}/commit/
                mv {point}/transactions/by-rsync {point}/commit/
                rm -rf {point}/transactions/dropped
                stat -c '%a %Y' {point}/resources/by-cp {point}/resources/by-rsync
            """
            r = subprocess.run(["sh", "-c", script], user=65534, group=65534, extra_groups=[], cwd="/",
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split("\n")[:2] == [f"555 {OLD_NS // 10**9}"] * 2
            assert os.listdir(point / "transactions") == []
        finally:
            status = m.stop()
        assert status == 0 and not m.tracebacks(), m.tracebacks()[-3000:]
        check_archive_ok(root)
    finally:
        if os.path.ismount(base / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# -- round trips with rsync -----------------------------------------------------------------------------------

def deposit_and_check(mnt: Mounted, src: Path, rid: str, check: str = "-anciHAX") -> list[str]:
    """`rsync -aHAX --delete SRC/ transactions/<rid>/` (exit 0), the commit, then what `rsync <check>
    --delete SRC/ resources/<rid>/` itemizes (nothing, for a faithful deposit)."""
    t = mnt / "transactions" / rid
    os.mkdir(t)
    r = rsync("-aHAX", "--delete", f"{src}/", f"{t}/")
    assert r.returncode == 0, r.stderr
    mnt.commit(rid)
    r = rsync(check, "--delete", f"{src}/", f"{mnt.mnt}/resources/{rid}/")
    assert r.returncode == 0, r.stderr
    return itemized(r.stdout)


def test_rsync_round_trip_of_usr_share_doc(mnt, tmp_path):
    src = doc_sample(tmp_path / "doc")
    assert any(not p.exists() for p in src.iterdir() if p.is_symlink())      # dangling links among them
    assert deposit_and_check(mnt, src, "doc") == []
    # a second deposit over the first: changed, removed, added and re-moded files, a new root time
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    with open(files[0], "ab") as f:
        f.write(b"appended\n")
    files[1].unlink()
    (files[2].parent / "added.txt").write_text("added\n")
    os.chmod(files[3], 0o600)
    os.utime(src, ns=(OLD_NS + 7, OLD_NS + 7))
    assert deposit_and_check(mnt, src, "doc") == []
    assert len(os.listdir(mnt / "instances" / "doc")) == 2


def test_rsync_round_trip_of_the_acceptance_tree(mnt, tmp_path):
    src = acceptance_tree(tmp_path / "tree")
    os.utime(src, ns=(OLD_NS + 1, OLD_NS + 1))
    lines = deposit_and_check(mnt, src, "tree", check="-anciAX")     # -H: see the test below
    # owners are not recorded (SPEC 4): the file make_tree gives to uid 1000 (as root) shows the mounting user
    assert all(owner_only(line) for line in lines), lines
    assert [line.split(" ", 1)[1] for line in lines] == (["sub/small-001.txt"] if os.geteuid() == 0 else [])


def test_rsync_round_trip_of_the_acceptance_tree_with_hard_links(mnt, tmp_path):
    src = acceptance_tree(tmp_path / "tree")
    lines = deposit_and_check(mnt, src, "tree")
    assert [line for line in lines if not owner_only(line)] == []
