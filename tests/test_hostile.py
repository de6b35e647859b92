"""Hostile input: each gets a clear error and changes nothing, or works exactly (docs/faults.md).

Names that are not UTF-8, 255/256-byte names, ~4,000-byte paths, unsafe paths in a bag's manifest and
fetch.txt, fifos and device nodes, hard links, symlink loops, a directory of many entries, a file
rewritten by another process while it is being committed, the mount and the CLI committing the same
resource at once, and damage that fsck must name exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import bagit
import pytest
from conftest import check_archive_ok, run_tinyfs
from mounting import tinyfs_argv, tree
from trees import errno_of

from tinyfs import Archive
from tinyfs.core.errors import Busy
from tinyfs.core.layout import ArchiveRoot

needs_fuse = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")
MIB = 1 << 20
ENTRIES = int(os.environ.get("TINYFS_HOSTILE_ENTRIES", "10000"))   # 100000 for the full run (docs/faults.md)


def snapshot_disk(root: Path) -> dict[str, bytes]:
    """Every file of the archive but the event log (which fsck appends to), with its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.name != "events.jsonl" and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("tinyfs: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


# -- names ----------------------------------------------------------------------------------------

@pytest.mark.mount
@needs_fuse
def test_names_that_are_not_utf8_are_eilseq(mnt):
    t = mnt / "transactions" / "names"
    os.mkdir(t)
    (t / "ok.txt").write_text("ok")
    bt = os.fsencode(t)
    bad = b"bad-\xff\xfe.txt"
    assert errno_of(os.open, bt + b"/" + bad, os.O_WRONLY | os.O_CREAT, 0o644) == errno.EILSEQ
    assert errno_of(os.mkdir, bt + b"/" + bad) == errno.EILSEQ
    assert errno_of(os.symlink, b"ok.txt", bt + b"/" + bad) == errno.EILSEQ
    assert errno_of(os.symlink, b"target-\xff", bt + b"/link") == errno.EILSEQ     # the target, too
    assert errno_of(os.rename, bt + b"/ok.txt", bt + b"/" + bad) == errno.EILSEQ
    assert errno_of(os.link, bt + b"/ok.txt", bt + b"/" + bad) == errno.EILSEQ
    assert errno_of(os.mkdir, os.fsencode(mnt / "transactions") + b"/\xff") in (errno.EILSEQ, errno.EINVAL)
    assert os.listdir(t) == ["ok.txt"]
    mnt.commit("names")
    assert os.listdir(mnt / "resources" / "names") == ["ok.txt"]


@pytest.mark.core
def test_ingest_refuses_names_that_are_not_utf8(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "fine.txt").write_text("fine")
    with open(os.fsencode(src / "sub") + b"/caf\xe9.txt", "wb") as f:    # Latin-1, not UTF-8
        f.write(b"latin-1 name")
    r = run_tinyfs("ingest", root, "latin", src, check=False)
    one_line_error(r, "not valid UTF-8", "caf\\xe9.txt", "nothing was committed")
    assert ArchiveRoot(root).head("latin") is None
    bag = tmp_path / "bag"
    shutil.copytree(src, bag / "data")
    r = run_tinyfs("ingest", root, "latin", "--bag", bag, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ArchiveRoot(root).head("latin") is None
    check_archive_ok(root)


@pytest.mark.mount
@needs_fuse
def test_names_of_255_bytes_work_and_256_are_enametoolong(mnt, root):
    t = mnt / "transactions" / "long-names"
    os.mkdir(t)
    ascii255, utf255 = "a" * 251 + ".txt", "é" * 127 + "x"           # 255 bytes each
    assert len(ascii255.encode()) == len(utf255.encode()) == 255
    (t / ascii255).write_text("ascii")
    os.mkdir(t / utf255)
    (t / utf255 / ascii255).write_text("nested")
    os.symlink(ascii255, t / ("l" * 255))
    long = "b" * 256
    bt = os.fsencode(t)
    assert errno_of(os.open, t / long, os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, t / long) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "x", t / long) == errno.ENAMETOOLONG
    assert errno_of(os.rename, t / ascii255, t / long) == errno.ENAMETOOLONG
    assert errno_of(os.link, t / ascii255, t / long) == errno.ENAMETOOLONG
    assert errno_of(os.open, bt + b"/" + "é".encode() * 128, os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
    assert sorted(os.listdir(t)) == sorted([ascii255, utf255, "l" * 255])
    mnt.commit("long-names")
    view = mnt / "resources" / "long-names"
    assert tree(view) == {ascii255: b"ascii", f"{utf255}/{ascii255}": b"nested"}
    assert os.readlink(view / ("l" * 255)) == ascii255
    assert os.statvfs(mnt.mnt).f_namemax == 255


def _deep_dirs(top_fd: int, levels: int = 20, component: int = 196) -> tuple[int, list[str]]:
    """mkdir a chain of `levels` names of `component` bytes, relative to fds (no absolute path ever gets
    that long); returns (fd of the deepest directory, the names)."""
    fd, names = os.dup(top_fd), []
    for i in range(levels):
        name = f"{i:03d}" + "d" * (component - 3)
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        names.append(name)
    return fd, names


def _read_deep(top: Path, names: list[str], leaf: str) -> bytes:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        lfd = os.open(leaf, os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(lfd, 1 << 16)
        finally:
            os.close(lfd)
    finally:
        os.close(fd)


@pytest.mark.mount
@needs_fuse
def test_paths_of_4000_bytes_through_the_mount(mnt, root):
    t = mnt / "transactions" / "deep"
    os.mkdir(t)
    top = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
    fd, names = _deep_dirs(top)
    os.close(top)
    prefix = sum(len(n) + 1 for n in names)               # 3,940 bytes of directories
    leaves = {"f" * (4000 - prefix): b"4000 bytes of path\n", "g" * (4095 - prefix): b"4095 bytes of path\n"}
    try:
        for leaf, data in leaves.items():
            w = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(w, data)
            os.close(w)
        # 4,096 bytes: past PATH_MAX, refused when it is made (tests/test_deep.py tries every way)
        too_long = "h" * (4096 - prefix)
        assert errno_of(os.open, too_long, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd) == errno.ENAMETOOLONG
    finally:
        os.close(fd)
    mnt.commit("deep")
    state = ArchiveRoot(root).state("deep")
    assert sorted(len(p.encode()) for p in state.files) == [4000, 4095]
    for leaf, data in leaves.items():
        assert _read_deep(mnt / "resources" / "deep", names, leaf) == data
    # the stored names are short enough for every tool (bagit-python validates them: see the fixture)
    for rel in ArchiveRoot(root).instance("deep", ArchiveRoot(root).head("deep")).stored.values():
        assert len(os.fsencode(ArchiveRoot(root).stored_path("deep", rel))) < 4096


# -- bags ---------------------------------------------------------------------------------------

def _retag(bag: Path) -> None:
    """Rewrite tagmanifest-sha256.txt so that only the planted problem remains."""
    lines = []
    for p in sorted(bag.iterdir()):
        if p.is_file() and not p.name.startswith("tagmanifest-"):
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n")
    (bag / "tagmanifest-sha256.txt").write_text("".join(lines))


@pytest.mark.core
def test_unsafe_paths_in_a_bag_are_refused(root, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("secret\n")
    digest = hashlib.sha256(b"secret\n").hexdigest()
    plain = tmp_path / "plain"
    (plain / "inner").mkdir(parents=True)
    (plain / "inner" / "f.txt").write_text("payload\n")
    bagit.make_bag(str(plain), checksums=["sha256"])
    cases = {
        "dotdot": ("manifest-sha256.txt", f"{digest}  data/../../outside.txt\n", "data/../../outside.txt"),
        "dotdot-plain": ("manifest-sha256.txt", f"{digest}  ../outside.txt\n", "../outside.txt"),
        "absolute": ("manifest-sha256.txt", f"{digest}  {secret}\n", str(secret)),
        "fetch-dotdot": ("fetch.txt", f"file://{secret} 7 data/../../outside.txt\n", "data/../../outside.txt"),
        "fetch-absolute": ("fetch.txt", "http://example.org/x 7 /etc/passwd\n", "/etc/passwd"),
    }
    before = snapshot_disk(root)
    for name, (tag, line, shown) in cases.items():
        bag = tmp_path / name
        shutil.copytree(plain, bag)
        with open(bag / tag, "a") as f:
            f.write(line)
        _retag(bag)
        r = run_tinyfs("ingest", root, name, "--bag", bag, check=False)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and shown in r.stderr and "unsafe-path" in r.stderr, (name, r.stderr)
        assert r.stderr.splitlines()[0].startswith("tinyfs: invalid bag")
        assert ArchiveRoot(root).head(name) is None
    assert secret.read_text() == "secret\n"
    assert snapshot_disk(root) == before
    run_tinyfs("ingest", root, "plain", "--bag", plain)          # the untouched bag is fine
    assert tree(ArchiveRoot(root).resource_dir("plain")).keys() >= {"resource.json"}
    check_archive_ok(root)


# -- special files, hard links, symlink loops ------------------------------------------------------

@pytest.mark.mount
@needs_fuse
def test_fifos_device_nodes_and_sockets_are_eperm_in_the_mount(mnt):
    t = mnt / "transactions" / "special"
    os.mkdir(t)
    assert errno_of(os.mkfifo, t / "fifo") == errno.EPERM
    if os.geteuid() == 0:
        assert errno_of(os.mknod, t / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3)) == errno.EPERM
        assert errno_of(os.mknod, t / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0)) == errno.EPERM
    s = socket.socket(socket.AF_UNIX)
    try:
        assert errno_of(s.bind, str(t / "sock")) == errno.EPERM
    finally:
        s.close()
    assert os.listdir(t) == []
    os.rmdir(t)


@pytest.mark.core
def test_ingest_refuses_fifos_and_device_nodes(root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "fine.txt").write_text("fine")
    before = snapshot_disk(root)
    os.mkfifo(src / "fifo")
    one_line_error(run_tinyfs("ingest", root, "special", src, check=False), "fifo", "FIFO")
    os.unlink(src / "fifo")
    if os.geteuid() == 0:
        os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        one_line_error(run_tinyfs("ingest", root, "special", src, check=False), "null", "device node")
        os.unlink(src / "null")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    try:
        one_line_error(run_tinyfs("ingest", root, "special", src, check=False), "sock", "socket")
        os.mkfifo(tmp_path / "lonely-fifo")
        one_line_error(run_tinyfs("ingest", root, "special", tmp_path / "lonely-fifo", check=False), "FIFO")
    finally:
        s.close()
    assert ArchiveRoot(root).head("special") is None
    assert snapshot_disk(root) == before
    # and through the API: refused, nothing committed
    with pytest.raises(Exception) as e:
        with Archive(root).new("special") as txn:
            txn.add(tmp_path / "lonely-fifo")
    assert "regular files" in str(e.value)
    assert ArchiveRoot(root).head("special") is None


def _stored_files(root: Path, rid: str) -> list[Path]:
    archive = ArchiveRoot(root)
    return [p for p in (archive.instance_dir(rid, archive.head(rid)) / "data").rglob("*") if p.is_file()]


@pytest.mark.mount
@needs_fuse
def test_hard_links_are_one_inode_recorded_and_stored_once(mnt, root, tmp_path):
    """A hard link is two entries with one digest, stored once, and a link group (mount and ingest alike)."""
    t = mnt / "transactions" / "hard"
    os.mkdir(t)
    os.mkdir(t / "d")
    payload = os.urandom(300_000)
    (t / "a.bin").write_bytes(payload)
    os.link(t / "a.bin", t / "d" / "b.bin")
    assert os.stat(t / "a.bin").st_nlink == 2
    assert os.stat(t / "a.bin").st_ino == os.stat(t / "d" / "b.bin").st_ino
    with open(t / "d" / "b.bin", "r+b") as f:      # a write through one name shows through the other
        f.write(b"XY")
    payload = b"XY" + payload[2:]
    assert (t / "a.bin").read_bytes() == payload
    assert errno_of(os.link, t / "d", t / "d2") == errno.EPERM                         # no directory links
    os.mkdir(mnt / "transactions" / "other")
    assert errno_of(os.link, t / "a.bin", mnt / "transactions" / "other" / "x") == errno.EXDEV
    os.rmdir(mnt / "transactions" / "other")
    mnt.commit("hard")
    state = ArchiveRoot(root).state("hard")
    assert state.files["a.bin"].digest == state.files["d/b.bin"].digest
    assert len(_stored_files(root, "hard")) == 1
    view = mnt / "resources" / "hard"
    assert (view / "a.bin").read_bytes() == (view / "d" / "b.bin").read_bytes() == payload
    assert os.stat(view / "a.bin").st_nlink == 2                                       # one inode
    assert os.stat(view / "a.bin").st_ino == os.stat(view / "d" / "b.bin").st_ino
    assert state.hardlinks == (("a.bin", "d/b.bin"),)
    assert errno_of(os.link, view / "a.bin", view / "c.bin") == errno.EROFS

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_bytes(payload)
    os.link(src / "one.txt", src / "sub" / "two.txt")
    os.link(src / "one.txt", src / "three.txt")
    run_tinyfs("ingest", root, "hard-cli", src)
    state = ArchiveRoot(root).state("hard-cli")
    assert {state.files[p].digest for p in ("src/one.txt", "src/sub/two.txt", "src/three.txt")} == \
        {hashlib.sha512(payload).hexdigest()}
    assert len(_stored_files(root, "hard-cli")) == 1
    assert state.hardlinks == (("src/one.txt", "src/sub/two.txt", "src/three.txt"),)


@pytest.mark.mount
@needs_fuse
def test_hard_links_to_files_of_the_base_state(mnt, root):
    """The same through a transaction on an existing resource, where the linked file is a base file
    (an inode the staging has no row for until it changes): link counts, a write through the new name
    (copy-on-write of the shared inode), removal of the base name, a daemon restart, the commit."""
    t = mnt / "transactions" / "hb"
    os.mkdir(t)
    (t / "a.bin").write_bytes(b"base bytes\n")
    (t / "keep.txt").write_text("untouched\n")
    mnt.commit("hb")
    os.mkdir(t)
    os.link(t / "a.bin", t / "b.bin")
    assert os.stat(t / "a.bin").st_nlink == os.stat(t / "b.bin").st_nlink == 2
    assert os.stat(t / "keep.txt").st_nlink == 1
    with open(t / "b.bin", "r+b") as f:
        f.write(b"BASE")
    assert (t / "a.bin").read_bytes() == b"BASE bytes\n"
    os.unlink(t / "a.bin")
    assert os.stat(t / "b.bin").st_nlink == 1
    mnt.stop()
    mnt.start()
    assert sorted(os.listdir(t)) == ["b.bin", "keep.txt"]
    assert os.stat(t / "b.bin").st_nlink == 1 and (t / "b.bin").read_bytes() == b"BASE bytes\n"
    mnt.commit("hb")
    view = mnt / "resources" / "hb"
    assert sorted(os.listdir(view)) == ["b.bin", "keep.txt"]
    assert (view / "b.bin").read_bytes() == b"BASE bytes\n"
    assert (view / "keep.txt").read_text() == "untouched\n"


def _loops(d: Path) -> dict[str, str]:
    links = {"loop1": "loop2", "loop2": "loop1", "self": "self", "up": "..", "root": "/",
             "sub/back": "../sub", "sub/top": "../../.."}
    (d / "sub").mkdir(exist_ok=True)
    for name, target in links.items():
        os.symlink(target, d / name)
    return links


@pytest.mark.mount
@needs_fuse
def test_symlink_loops_are_stored_as_links_never_followed(mnt, root, tmp_path):
    t = mnt / "transactions" / "loops"
    os.mkdir(t)
    links = _loops(t)
    mnt.commit("loops")
    view = mnt / "resources" / "loops"
    for name, target in links.items():
        assert os.readlink(view / name) == target
    assert errno_of(os.stat, view / "loop1") == errno.ELOOP
    assert errno_of(os.stat, view / "self") == errno.ELOOP
    assert {p: e.target for p, e in ArchiveRoot(root).state("loops").links.items()} == links

    src = tmp_path / "src"
    src.mkdir()
    _loops(src)
    (src / "sub" / "file.txt").write_text("only file")
    started = time.monotonic()
    run_tinyfs("ingest", root, "loops-cli", src, timeout=60)
    assert time.monotonic() - started < 30
    state = ArchiveRoot(root).state("loops-cli")
    assert {p: e.target for p, e in state.links.items()} == {f"src/{k}": v for k, v in links.items()}
    assert list(state.files) == ["src/sub/file.txt"]


# -- many entries ----------------------------------------------------------------------------------

@pytest.mark.mount
@pytest.mark.slow
@needs_fuse
def test_a_directory_of_many_entries_in_one_transaction(mnt, root):
    t = mnt / "transactions" / "many"
    os.mkdir(t)
    d = t / "flat"
    os.mkdir(d)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    started = time.monotonic()
    try:
        for i in range(ENTRIES):
            fd = os.open(f"entry-{i:06d}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            os.write(fd, b"%d\n" % i)
            os.close(fd)
    finally:
        os.close(dfd)
    created = time.monotonic() - started
    started = time.monotonic()
    assert len(os.listdir(d)) == ENTRIES
    listed = time.monotonic() - started
    started = time.monotonic()
    mnt.commit("many")
    committed = time.monotonic() - started
    started = time.monotonic()
    names = os.listdir(mnt / "resources" / "many" / "flat")
    viewed = time.monotonic() - started
    assert len(names) == ENTRIES
    assert (mnt / "resources" / "many" / "flat" / f"entry-{ENTRIES - 1:06d}.txt").read_bytes() == \
        b"%d\n" % (ENTRIES - 1)
    print(f"\n{ENTRIES} entries in one directory: create {created:.1f} s, ls {listed:.2f} s, "
          f"commit {committed:.1f} s, ls of the view {viewed:.2f} s")


# -- files changed while they are committed --------------------------------------------------------

WRITER = """\
import os, sys, time
path, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
n, end = 0, time.monotonic() + seconds
print("ready", flush=True)
while time.monotonic() < end:
    chunk = (b"B" if n % 2 == 0 else b"A") * (1 << 20)
    for off in range(0, size, 1 << 20):
        os.pwrite(fd, chunk, off)
    n += 1
"""


def _stored_bytes(root: Path, rid: str, path: str) -> bytes:
    archive = ArchiveRoot(root)
    doc = archive.instance(rid, archive.head(rid))
    return archive.stored_path(rid, doc.stored[doc.state.files[path].digest]).read_bytes()


@pytest.mark.core
def test_a_file_rewritten_while_it_is_committed_is_never_stored_torn(root, tmp_path):
    """Another process rewrites the file in place (all A, all B, ...) while the CLI or the API commits
    it: the commit stores all A or all B, with the digest of those bytes, or fails and stores nothing."""
    size = 24 * MIB
    src = tmp_path / "moving.bin"
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    whole = {b"A" * size, b"B" * size}
    outcomes = {"stored-whole": 0, "refused": 0}
    for rnd in range(6):
        src.write_bytes(b"A" * size)
        w = subprocess.Popen([sys.executable, str(writer), str(src), str(size), "2" if rnd % 2 == 0 else "0.4"],
                             stdout=subprocess.PIPE)
        w.stdout.readline()
        rid = f"moving-{rnd % 2}"
        if rnd < 4:
            r = run_tinyfs("ingest", root, rid, src, check=False)
            ok = r.returncode == 0
            if not ok:
                one_line_error(r, "changed while it was being copied", "nothing was committed")
        else:
            archive = Archive(root)
            txn = archive.get(rid, "a") if rid in archive else archive.new(rid)
            txn.add(src)
            try:
                txn.commit()
                ok = True
            except Busy as e:
                assert "changed while it was being copied" in str(e)
                ok = False
        w.wait()
        if ok:
            assert _stored_bytes(root, rid, "moving.bin") in whole
            outcomes["stored-whole"] += 1
        else:
            outcomes["refused"] += 1
        assert not [n for n in os.listdir(root / "transactions") if n.startswith((".commit-", ".api-"))]
        check_archive_ok(root)
    print(f"\nrewritten during commit: {outcomes}")
    # once the writer has stopped, the same commit stores the final bytes
    run_tinyfs("ingest", root, "moving-0", src)
    assert _stored_bytes(root, "moving-0", "moving.bin") == src.read_bytes()


@pytest.mark.mount
@pytest.mark.slow
@needs_fuse
def test_mount_and_cli_commit_the_same_resource_at_once(mnt, root, tmp_path):
    t = mnt / "transactions" / "both"
    os.mkdir(t)
    (t / "shared.txt").write_text("start\n")
    mnt.commit("both")
    results = []
    for rnd in range(8):
        conflict = rnd % 2 == 0
        os.mkdir(t)
        os.setxattr(t, "user.tinyfs.message", f"mount {rnd}".encode())
        m_shared, c_shared = f"mount {rnd}\n" * 1000, f"cli {rnd}\n" * 1000
        (t / f"m-{rnd}.txt").write_text("from the mount\n")
        (t / "big.bin").write_bytes(os.urandom(4 * MIB))
        if conflict:
            (t / "shared.txt").write_text(m_shared)
        src = tmp_path / f"round{rnd}"
        src.mkdir()
        (src / f"c-{rnd}.txt").write_text("from the cli\n")
        if conflict:
            (src / "shared.txt").write_text(c_shared)
        (src / "big-cli.bin").write_bytes(os.urandom(48 * MIB))      # the CLI's commit takes a while
        wait_for_cli = rnd % 4 < 2      # the mount's commit starts while the CLI's commit runs, or at once
        before_txn = tree(t)
        out: dict = {}

        def by_mount(out=out):
            try:
                mnt.commit("both")
                out["mount"] = 0
            except OSError as e:
                out["mount"] = e.errno

        th = threading.Thread(target=by_mount)
        cli = subprocess.Popen([*tinyfs_argv(), "ingest", str(root), "both", *map(str, sorted(src.iterdir())),
                                "-m", f"cli {rnd}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait_for_cli:
            while cli.poll() is None and not any(n.startswith(".commit-both-")
                                                 for n in os.listdir(root / "transactions")):
                time.sleep(0.001)
        th.start()
        _, cli_err = cli.communicate(timeout=120)
        th.join(120)
        results.append((conflict, wait_for_cli, errno.errorcode.get(out["mount"], "ok"), cli.returncode))
        if conflict and wait_for_cli:   # the CLI committed first, on the base the mount's transaction had
            assert out["mount"] == errno.ESTALE and cli.returncode == 0, (out, cli_err)
        assert out["mount"] in (0, errno.ESTALE), (rnd, out, cli_err)
        assert cli.returncode in (0, 2), cli_err
        if cli.returncode:
            assert "changed on both sides" in cli_err and cli_err.count("\n") == 1, cli_err
        assert out["mount"] == 0 or cli.returncode == 0          # one of them always gets through
        if not conflict:
            assert out["mount"] == 0 and cli.returncode == 0, (rnd, out, cli_err)
        state = ArchiveRoot(root).state("both")
        assert (f"m-{rnd}.txt" in state.files) == (out["mount"] == 0)
        assert (f"c-{rnd}.txt" in state.files) == (cli.returncode == 0)
        if out["mount"]:
            assert tree(t) == before_txn                           # ESTALE leaves the transaction whole
            assert b"changed on both sides" in os.getxattr(t, "user.tinyfs.error")
            shutil.rmtree(t)
        else:
            assert not t.exists()
        if conflict:
            head = ArchiveRoot(root).instance("both", ArchiveRoot(root).head("both"))
            last = "mount" if head.message.startswith("mount") else "cli"
            shown = (mnt / "resources" / "both" / "shared.txt").read_text()
            for _ in range(50):        # commits by another process appear within the entry timeout
                if shown == (m_shared if last == "mount" else c_shared):
                    break
                time.sleep(0.1)
                shown = (mnt / "resources" / "both" / "shared.txt").read_text()
            assert shown == (m_shared if last == "mount" else c_shared)
        check_archive_ok(root)
    print(f"\n(conflict, mount commits while the CLI commits, mount result, CLI exit) per round: {results}")


# -- damage found by fsck ----------------------------------------------------------------------------

def _fsck_lines(root: Path) -> tuple[int, list[str]]:
    r = run_tinyfs("fsck", root, check=False)
    assert "Traceback" not in r.stderr
    return r.returncode, r.stdout.splitlines()


@pytest.mark.core
def test_fsck_names_the_exact_path_and_problem(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_text("hello\n")
    (src / "y.txt").write_text("other\n")
    run_tinyfs("ingest", root, "r", src)
    archive = ArchiveRoot(root)
    iid = archive.head("r")
    inst = archive.instance_dir("r", iid)
    assert _fsck_lines(root)[0] == 0
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine, symlinks=True)

    def damage(how) -> list[str]:
        shutil.rmtree(root)
        shutil.copytree(pristine, root, symlinks=True)
        how()
        before = snapshot_disk(root)
        code, lines = _fsck_lines(root)
        assert code == 1, lines
        assert snapshot_disk(root) == before                       # fsck changes nothing
        assert lines[-1].startswith("fsck: ") and "problem" in lines[-1]
        return lines[:-1]

    def flip_payload():
        p = inst / "data" / "src" / "sub" / "x.txt"
        p.write_bytes(b"jello\n")
    lines = damage(flip_payload)
    stored_x = f"r instances/{iid}/data/src/sub/x.txt"                # a damaged stored file, then its users
    assert len(lines) == 2 and lines[0].startswith(f"{stored_x}: checksum-mismatch: sha512 expected "), lines
    assert lines[1] == f"  {iid} src/sub/x.txt", lines

    def break_json():
        (inst / "instance.json").write_text("{")
    lines = damage(break_json)
    assert any(x.startswith(f"r {iid} instance.json: bad-instance-json") for x in lines), lines
    assert any(x.startswith(f"r {iid} instance.json: checksum-mismatch") for x in lines), lines

    def lie_in_json():              # a valid bag whose instance.json records a wrong digest
        doc = json.loads((inst / "instance.json").read_text())
        wrong = "0" * 128
        old = doc["state"]["src/y.txt"]["digest"]
        doc["state"]["src/y.txt"]["digest"] = wrong
        doc["stored"][wrong] = doc["stored"].pop(old)
        (inst / "instance.json").write_text(json.dumps(doc, sort_keys=True))
        _retag_all(inst)
    lines = damage(lie_in_json)
    assert any(x.startswith(f"r instances/{iid}/data/src/y.txt: stored-digest-mismatch") for x in lines), lines
    assert f"  {iid} src/y.txt" in lines

    def drop_manifest_line():
        m = inst / "manifest-sha512.txt"
        m.write_text("".join(x for x in m.read_text().splitlines(True) if "y.txt" not in x))
        _retag_all(inst)
    lines = damage(drop_manifest_line)
    assert any(x.startswith(f"r instances/{iid}/data/src/y.txt: extra-file") for x in lines), lines

    def wrong_manifest_digest():
        m = inst / "manifest-sha512.txt"
        m.write_text("".join(("f" * 128 + x[128:]) if "x.txt" in x else x for x in m.read_text().splitlines(True)))
    lines = damage(wrong_manifest_digest)
    assert any(x.startswith(f"{stored_x}: checksum-mismatch") for x in lines), lines
    assert any(x.startswith(f"r {iid} manifest-sha512.txt: checksum-mismatch") for x in lines), lines

    def remove_stored():
        (inst / "data" / "src" / "y.txt").unlink()
    lines = damage(remove_stored)
    assert f"r instances/{iid}/data/src/y.txt: missing-file: listed in the manifest but absent from the bag" in lines
    assert f"  {iid} src/y.txt" in lines


def _retag_all(inst: Path) -> None:
    for tm in inst.glob("tagmanifest-*.txt"):
        alg = tm.name[len("tagmanifest-"):-4]
        lines = []
        for p in sorted(inst.iterdir()):
            if p.is_file() and not p.name.startswith("tagmanifest-"):
                lines.append(f"{hashlib.new(alg, p.read_bytes()).hexdigest()}  {p.name}\n")
        tm.write_text("".join(lines))
