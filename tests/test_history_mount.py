"""history/<rid>/... through a real mount: what `ls`, `stat`, `cat` and `readlink` see, no lag after a commit
through the mount (the bug class "views lag a commit"), commits by another process, and every change
refused as in resources/."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_tinyfs
from trees import OLD_NS, errno_of

from tinyfs.core.layout import ArchiveRoot

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]


def commit(mnt, rid: str, files: dict[str, bytes], label: str | None = None, remove: tuple[str, ...] = ()) -> str:
    """One transaction through the mount: write `files`, remove `remove`, set the label, mv into commit/;
    the new head."""
    t = mnt / "transactions" / rid
    os.mkdir(t)
    for path, data in files.items():
        (t / path).parent.mkdir(parents=True, exist_ok=True)
        (t / path).write_bytes(data)
    for path in remove:
        shutil.rmtree(t / path) if (t / path).is_dir() and not (t / path).is_symlink() else os.unlink(t / path)
    if label:
        os.setxattr(t, "user.tinyfs.label", label.encode())
    mnt.commit(rid)
    return ArchiveRoot(mnt.root).head(rid)


def test_history_shows_every_version_with_its_bytes_mode_and_time(mnt, tmp_path):
    t = mnt / "transactions" / "book"
    os.mkdir(t)
    (t / "ch").mkdir()
    (t / "ch" / "one.txt").write_bytes(b"draft\n")
    os.chmod(t / "ch" / "one.txt", 0o640)
    os.utime(t / "ch" / "one.txt", ns=(OLD_NS, OLD_NS))
    os.symlink("ch/one.txt", t / "latest")
    os.setxattr(t, "user.tinyfs.label", b"draft")
    mnt.commit("book")
    first = ArchiveRoot(mnt.root).head("book")
    second = commit(mnt, "book", {"ch/one.txt": b"final text\n"}, label="final")
    third = commit(mnt, "book", {}, remove=("latest",))
    h = mnt / "history" / "book"
    assert os.listdir(mnt / "history") == ["book"]
    assert sorted(os.listdir(h)) == ["ch", "latest"]
    assert sorted(os.listdir(h / "ch")) == ["one.txt"]
    assert sorted(os.listdir(h / "ch" / "one.txt")) == sorted([first, second, "draft", "final"])
    old = os.stat(h / "ch" / "one.txt" / first)
    assert (stat.S_IMODE(old.st_mode), old.st_size, old.st_mtime_ns) == (0o640, 6, OLD_NS)
    assert (h / "ch" / "one.txt" / first).read_bytes() == b"draft\n"
    assert (h / "ch" / "one.txt" / second).read_bytes() == b"final text\n"
    assert (h / "ch" / "one.txt" / "final").read_bytes() == b"final text\n"       # the label, followed
    assert os.readlink(h / "ch" / "one.txt" / "draft") == first
    assert sorted(os.listdir(h / "latest")) == sorted([first, f"{third}.deleted", "draft", "final"])
    assert os.readlink(h / "latest" / first) == "ch/one.txt"
    gone = os.stat(h / "latest" / f"{third}.deleted")
    assert stat.S_ISREG(gone.st_mode) and gone.st_size == 0 and (h / "latest" / f"{third}.deleted").read_bytes() == b""
    out = subprocess.run(["ls", "-l", str(h / "ch" / "one.txt")], check=True, capture_output=True, text=True).stdout
    assert first in out and "-rw-r-----" in out


def test_a_commit_through_the_mount_shows_in_history_without_lag(mnt):
    """Listed and read right after each `mv transactions/<rid> commit/`, twenty times over."""
    heads = [commit(mnt, "lag", {"f.txt": b"round 0\n"})]
    where = mnt / "history" / "lag" / "f.txt"
    assert os.listdir(where) == heads
    for n in range(1, 20):
        heads.append(commit(mnt, "lag", {"f.txt": b"round %d\n" % n}))
        assert sorted(os.listdir(where)) == heads, n
        assert (where / heads[-1]).read_bytes() == b"round %d\n" % n
    out = subprocess.run(["ls", str(where)], check=True, capture_output=True, text=True).stdout.split()
    assert out == heads
    commit(mnt, "lag", {"new/deep.txt": b"new\n"})        # a name never seen before, and a new directory
    assert sorted(os.listdir(mnt / "history" / "lag")) == ["f.txt", "new"]
    assert len(os.listdir(mnt / "history" / "lag" / "new" / "deep.txt")) == 1


def test_commits_by_another_process_show_at_once(mnt, tmp_path):
    src = tmp_path / "f.txt"
    src.write_bytes(b"by the cli\n")
    run_tinyfs("ingest", mnt.root, "cli", src)
    where = mnt / "history" / "cli" / "f.txt"
    assert len(os.listdir(where)) == 1                     # (looked at once: its entries are now cached)
    src.write_bytes(b"again by the cli\n")
    run_tinyfs("ingest", mnt.root, "cli", src)
    head = sorted(os.listdir(where))[-1]
    assert len(os.listdir(where)) == 2 and head == ArchiveRoot(mnt.root).head("cli") and (where / head).read_bytes() == b"again by the cli\n"


def test_every_change_in_history_is_refused(mnt):
    first = commit(mnt, "ro", {"f.txt": b"f\n", "d/g.txt": b"g\n"}, label="v1")
    t = mnt / "transactions" / "other"
    os.mkdir(t)
    (t / "t.txt").write_text("t")
    versions = mnt / "history" / "ro" / "f.txt"
    f = versions / first
    tries = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "create": lambda: os.open(versions / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(versions / "newdir"),
        "mkdir in the resource": lambda: os.mkdir(mnt / "history" / "ro" / "newdir"),
        "mkdir in history": lambda: os.mkdir(mnt / "history" / "newrid"),
        "mknod": lambda: os.mknod(versions / "node", 0o644 | stat.S_IFREG),
        "symlink": lambda: os.symlink("x", versions / "newlink"),
        "link within": lambda: os.link(f, versions / "hard"),
        "link out to a transaction": lambda: os.link(f, t / "hard"),
        "unlink": lambda: os.unlink(f),
        "unlink a label": lambda: os.unlink(versions / "v1"),
        "rmdir": lambda: os.rmdir(mnt / "history" / "ro" / "d"),
        "rename within": lambda: os.rename(f, versions / "renamed"),
        "rename out to a transaction": lambda: os.rename(f, t / "moved"),
        "rename in from a transaction": lambda: os.rename(t / "t.txt", versions / "moved"),
        "chmod": lambda: os.chmod(f, 0o600),
        "chmod dir": lambda: os.chmod(versions, 0o755),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, ns=(OLD_NS, OLD_NS)),
        "truncate": lambda: os.truncate(f, 0),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "setxattr dir": lambda: os.setxattr(versions, "user.x", b"1"),
        "removexattr virtual": lambda: os.removexattr(f, "user.tinyfs.digest"),
    }
    got = {name: errno_of(fn) for name, fn in tries.items()}
    assert got == dict.fromkeys(got, errno.EROFS)
    assert errno_of(os.rename, mnt / "history" / "ro", mnt / "transactions" / "stolen") == errno.EROFS
    assert f.read_bytes() == b"f\n" and os.getxattr(f, "user.tinyfs.instance") == first.encode()
    assert Path(t / "t.txt").read_text() == "t"
