"""Round trips of a tree with every kind of entry: deposited through the mount (`cp -a`) or by
`tinyfs ingest`, the recorded state is the tree's; exported (directory and tar forms), validated by
bagit.py and ingested again with `--bag`, it comes back exactly. Hard links are one inode end to end."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from trees import OLD_NS, acceptance_tree

from tinyfs.core.layout import ArchiveRoot

needs_fuse = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")
BAGIT = Path(sys.executable).with_name("bagit.py")


def make_full_tree(base: Path) -> Path:
    """`acceptance_tree` plus the rest: dangling and directory symlinks, a 000 file, setuid and setgid files,
    an empty directory with a set mode and time, user xattrs, and a link group of three across
    directories (with an xattr and a client-set time)."""
    acceptance_tree(base)
    os.symlink("no/such/target", base / "dangling")
    os.symlink("sub/deeper", base / "dir-link")
    (base / "locked.txt").write_text("nobody may read me\n")
    os.chmod(base / "locked.txt", 0o000)
    (base / "setuid.sh").write_text("#!/bin/sh\n")
    os.chmod(base / "setuid.sh", 0o4755)
    (base / "setgid.sh").write_text("#!/bin/sh\nid\n")
    os.chmod(base / "setgid.sh", 0o2750)
    (base / "empty-dir").mkdir()
    os.chmod(base / "empty-dir", 0o700)
    os.utime(base / "empty-dir", ns=(OLD_NS + 1, OLD_NS + 1))
    (base / "sub" / "three.txt").write_text("one inode, three names\n")
    os.setxattr(base / "sub" / "three.txt", "user.checksum", b"\x00\xff binary")
    os.utime(base / "sub" / "three.txt", ns=(OLD_NS + 2, OLD_NS + 2))
    os.link(base / "sub" / "three.txt", base / "three-again.txt")
    os.link(base / "sub" / "three.txt", base / "sub" / "deeper" / "three-deeper.txt")
    os.setxattr(base / "big.bin", "user.note", "ünïcode".encode())
    os.utime(base / "sub", ns=(OLD_NS + 3, OLD_NS + 3))
    os.utime(base / "sub" / "deeper", ns=(OLD_NS, OLD_NS))
    return base


def tree_state(src: Path, root: bool = False) -> dict:
    """What instance.json must record for the tree at `src` (digests sha512); with `root`, the mode and
    mtime of `src` itself as the resource root's (a deposit of `src/.` into a transaction)."""
    files, links, dirs, inodes = {}, {}, {}, {}
    if root:
        st = os.lstat(src)
        dirs[""] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(src).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                links[rel] = {"target": os.readlink(full), "mtime_ns": st.st_mtime_ns}
            elif stat.S_ISDIR(st.st_mode):
                dirs[rel] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
            else:
                entry = {"digest": hashlib.sha512(full.read_bytes()).hexdigest(), "size": st.st_size,
                         "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
                xattrs = {k: base64.b64encode(os.getxattr(full, k)).decode()
                          for k in os.listxattr(full) if k.startswith("user.")}
                if xattrs:
                    entry["xattrs"] = xattrs
                files[rel] = entry
                inodes.setdefault(st.st_ino, []).append(rel)
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return {"state": files, "links": links, "dirs": dirs, "hardlinks": groups}


def recorded(root: Path, rid: str, iid: str | None = None) -> dict:
    """The recorded state of an instance (default: the head), its ids and times aside."""
    archive = ArchiveRoot(root)
    iid = iid or archive.head(rid)
    doc = json.loads((archive.instance_dir(rid, iid) / "instance.json").read_bytes())
    return {"state": doc["state"], "links": doc["links"], "dirs": doc["dirs"],
            "hardlinks": doc.get("hardlinks", [])}


def bagit_validate(bag: Path) -> None:
    r = subprocess.run([sys.executable, str(BAGIT), "--validate", str(bag)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is valid" in r.stderr


def check_directory_export(bag: Path, want: dict, xattrs: bool = True) -> None:
    """data/ holds the files (no symlink), one inode per link group, the recorded times and modes
    (owner-readable), user xattrs (unless tar extracted it without --xattrs) and every directory,
    empty ones included."""
    data = bag / "data"
    found = {p.relative_to(data).as_posix() for p in data.rglob("*")}
    assert found == want["state"].keys() | want["dirs"].keys() - {""}     # "": the root, data/ itself
    for path, entry in want["state"].items():
        st = os.lstat(data / path)
        assert stat.S_ISREG(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == entry["mode"] | stat.S_IRUSR, path
        assert st.st_mtime_ns == entry["mtime_ns"], path
        for name, value in entry.get("xattrs", {}).items() if xattrs else ():
            assert os.getxattr(data / path, name) == base64.b64decode(value), path
    for path, entry in want["dirs"].items():
        st = os.lstat(data / path if path else data)
        assert stat.S_IMODE(st.st_mode) == entry["mode"] | 0o500 and st.st_mtime_ns == entry["mtime_ns"], path
    for group in want["hardlinks"]:
        inodes = {os.lstat(data / p).st_ino for p in group}
        assert len(inodes) == 1 and os.lstat(data / group[0]).st_nlink == len(group), group


def round_trip(tinyfs, root: Path, rid: str, work: Path) -> None:
    """Export `rid` in both forms, validate each with bagit.py (the tar form as `tar -xpf` extracts it),
    ingest each into a new resource: the recorded states are equal."""
    want = recorded(root, rid)
    bag = work / f"{rid}-bag"
    tinyfs("export", root, rid, bag)
    check_directory_export(bag, want)
    bagit_validate(bag)
    tinyfs("ingest", root, f"{rid}-from-dir", "--bag", bag)
    assert recorded(root, f"{rid}-from-dir") == want

    tarball = work / f"{rid}-snap.tar"
    tinyfs("export", root, rid, tarball, "--tar")
    out = work / f"{rid}-untarred"
    out.mkdir()
    subprocess.run(["tar", "-xpf", str(tarball), "-C", str(out)], check=True)
    check_directory_export(out / f"{rid}-snap", want, xattrs=False)    # (no --xattrs: instance.json has them)
    bagit_validate(out / f"{rid}-snap")
    tinyfs("ingest", root, f"{rid}-from-tar", "--bag", out / f"{rid}-snap")
    assert recorded(root, f"{rid}-from-tar") == want


@pytest.mark.core
def test_cli_ingest_records_every_kind_of_entry_and_round_trips(tmp_path, root, tinyfs, archive_ok):
    src = make_full_tree(tmp_path / "src")
    want = tree_state(src)
    assert ["hardlink-to-small-000.txt", "sub/small-000.txt"] in want["hardlinks"]   # the tree is what it says
    assert ["sub/deeper/three-deeper.txt", "sub/three.txt", "three-again.txt"] in want["hardlinks"]
    assert {"dangling", "dir-link", "sub/link-to-leaf"} <= want["links"].keys()
    tinyfs("ingest", root, "book", *sorted(src.iterdir()))
    assert recorded(root, "book") == want
    round_trip(tinyfs, root, "book", tmp_path)
    archive_ok(root)


@pytest.mark.mount
@needs_fuse
def test_mount_cp_a_deposit_records_every_kind_of_entry_and_round_trips(mnt, root, tmp_path, tinyfs):
    src = make_full_tree(tmp_path / "src")
    t = mnt / "transactions" / "book"
    t.mkdir()
    subprocess.run(["cp", "-a", f"{src}/.", str(t)], check=True)
    os.rename(t, mnt / "commit" / "book")
    want = tree_state(src, root=True)     # cp -a src/. sets the root
    assert recorded(root, "book") == want
    iid = ArchiveRoot(root).head("book")
    group = ["sub/deeper/three-deeper.txt", "sub/three.txt", "three-again.txt"]
    for view in (mnt / "resources" / "book", mnt / "instances" / "book" / iid):
        stats = [os.lstat(view / p) for p in group]
        assert len({st.st_ino for st in stats}) == 1 and {st.st_nlink for st in stats} == {3}, view
        assert os.lstat(view / "sub" / "small-000.txt").st_nlink == 2
        assert os.lstat(view / "big.bin").st_nlink == 1
        found = subprocess.run(["find", str(view), "-type", "f", "-links", "3"], capture_output=True,
                               text=True, check=True).stdout.split()
        assert sorted(Path(p).relative_to(view).as_posix() for p in found) == group
    copy = tmp_path / "copy"
    subprocess.run(["rsync", "-aH", f"{mnt / 'resources' / 'book'}/", str(copy)], check=True)
    assert len({os.lstat(copy / p).st_ino for p in group}) == 1
    round_trip(tinyfs, root, "book", tmp_path)


def st(path: Path) -> tuple[int, int]:
    s = os.lstat(path)
    return s.st_ino, s.st_nlink


@pytest.mark.mount
@needs_fuse
def test_a_link_group_of_the_base_is_one_inode_in_a_transaction(mnt, root, tmp_path, tinyfs):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_text("one inode\n")
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "sub" / "c")
    (src / "d").write_text("d\n")
    tinyfs("ingest", root, "r", *sorted(src.iterdir()))
    t = mnt / "transactions" / "r"
    t.mkdir()
    ino, n = st(t / "a")
    assert n == 3 and st(t / "b") == st(t / "sub" / "c") == (ino, 3)
    os.unlink(t / "b")
    assert st(t / "a") == st(t / "sub" / "c") == (ino, 2)
    mnt.stop()                               # after a restart the group is still one inode
    mnt.start()                              # (the number the kernel sees may differ: a new daemon)
    assert st(t / "a") == st(t / "sub" / "c") and st(t / "a")[1] == 2 and not os.path.lexists(t / "b")
    with open(t / "a", "a") as f:
        f.write("and more\n")
    assert (t / "sub" / "c").read_text() == "one inode\nand more\n"
    os.link(t / "d", t / "e")
    assert st(t / "e") == (st(t / "d")[0], 2)
    mnt.commit("r")
    assert recorded(root, "r")["hardlinks"] == [["a", "sub/c"], ["d", "e"]]
    state = recorded(root, "r")["state"]
    assert state["a"] == state["sub/c"] and state["a"]["size"] == 19 and "b" not in state
    view = mnt / "resources" / "r"
    assert st(view / "a") == (st(view / "sub" / "c")[0], 2) and st(view / "d")[1] == 2
    head = ArchiveRoot(root).head("r")
    t.mkdir()                                # untouched, the group is no change
    mnt.commit("r")
    assert ArchiveRoot(root).head("r") == head


@pytest.mark.mount
@needs_fuse
@pytest.mark.parametrize("client", ["tar", "rsync"])
def test_tar_x_and_rsync_H_deposits_record_link_groups(mnt, root, tmp_path, client):
    src = make_full_tree(tmp_path / "src")
    t = mnt / "transactions" / "book"
    t.mkdir()
    if client == "tar":
        subprocess.run(f"tar -C {src} -cf - . | tar -C {t} -xpf -", shell=True, check=True)
    else:
        subprocess.run(["rsync", "-aH", f"{src}/", f"{t}/"], check=True)
    mnt.commit("book")
    assert recorded(root, "book")["hardlinks"] == tree_state(src)["hardlinks"]


@pytest.mark.mount
@needs_fuse
def test_a_browsed_tree_shows_a_changed_link_group_at_once(mnt, root, tmp_path, tinyfs):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("one inode\n")
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "c")
    tinyfs("ingest", root, "r", *sorted(src.iterdir()))
    view = mnt / "resources" / "r"
    assert st(view / "a")[1] == st(view / "b")[1] == st(view / "c")[1] == 3     # the kernel holds them
    assert (view / "b").read_text() == "one inode\n"
    t = mnt / "transactions" / "r"
    t.mkdir()
    os.unlink(t / "b")
    (t / "b").write_text("b on its own\n")
    mnt.commit("r")
    assert (view / "b").read_text() == "b on its own\n" and st(view / "b")[1] == 1
    assert st(view / "a") == st(view / "c") and st(view / "a")[1] == 2
    assert st(view / "b")[0] != st(view / "a")[0]


@pytest.mark.core
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_the_owner_of_an_export_validates_it_without_root(tmp_path, root, tinyfs):
    """A file or directory its owner may not read would make bagit.py, run by the bag's owner, call the
    bag invalid: the export adds the owner's read (and search) bits; instance.json keeps the exact mode."""
    src = tmp_path / "src"
    (src / "shut").mkdir(parents=True)
    (src / "shut" / "locked.txt").write_text("locked\n")
    os.chmod(src / "shut" / "locked.txt", 0o000)
    os.chmod(src / "shut", 0o000)
    tinyfs("ingest", root, "r", src / "shut")
    public = Path(tempfile.mkdtemp(prefix="tinyfs-export-"))     # a place user nobody can reach
    try:
        os.chmod(public, 0o755)
        bag = public / "bag"
        tinyfs("export", root, "r", bag)
        subprocess.run(["chown", "-R", "65534:65534", str(bag)], check=True)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            str(BAGIT), "--validate", str(bag)], capture_output=True, text=True)
        assert r.returncode == 0 and "is valid" in r.stderr, r.stderr[-2000:]
        assert stat.S_IMODE(os.stat(bag / "data" / "shut" / "locked.txt").st_mode) == 0o400
        assert recorded(root, "r")["state"]["shut/locked.txt"]["mode"] == 0
        assert recorded(root, "r")["dirs"]["shut"]["mode"] == 0
    finally:
        shutil.rmtree(public)
