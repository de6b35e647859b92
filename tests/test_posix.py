"""POSIX details pjdfstest checks inside a transaction, against the same steps on the local disk:
chmod/12.t (a write by a process without CAP_FSETID clears the set-id bits, through write-only handles
too), open/00.t 43-44 (open with O_TRUNC updates mtime and ctime), rename/23.t 7 (renaming over a file
that has another hard link updates that link's ctime)."""

from __future__ import annotations

import os
import shutil
import stat
import time

import pytest

pytestmark = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")


def test_open_with_o_trunc_updates_mtime_and_ctime(mnt):
    """open/00.t 43-44, and a write, which updates both too."""
    t = mnt / "transactions" / "tr"
    os.mkdir(t)
    (t / "n0").write_text("test\n")
    os.utime(t / "n0", ns=(1_500_000_000_000_000_000,) * 2)
    before = os.stat(t / "n0")
    time.sleep(0.01)
    os.close(os.open(t / "n0", os.O_WRONLY | os.O_TRUNC))
    after = os.stat(t / "n0")
    assert after.st_size == 0
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    time.sleep(0.01)
    fd = os.open(t / "n0", os.O_WRONLY)           # (a write-only handle: direct I/O)
    os.write(fd, b"x")
    os.close(fd)
    written = os.stat(t / "n0")
    assert written.st_mtime_ns > after.st_mtime_ns and written.st_ctime_ns > after.st_ctime_ns


def test_renaming_over_a_multiply_linked_file_updates_the_other_link_s_ctime(mnt):
    """rename/23.t 6-7, for a file made in the transaction and for one of the base state."""
    t = mnt / "transactions" / "rn"
    os.mkdir(t)
    (t / "base-dst").write_text("base")
    mnt.commit("rn")
    os.mkdir(t)
    for dst in ("dst", "base-dst"):
        (t / "src").write_text("src")
        if dst == "dst":
            (t / dst).write_text("dst")
        os.link(t / dst, t / "dstlnk")
        ctime1 = os.lstat(t / "dstlnk").st_ctime_ns
        time.sleep(0.01)
        os.rename(t / "src", t / dst)
        st = os.lstat(t / "dstlnk")
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, dst
        assert st.st_ctime_ns > ctime1, dst
        os.unlink(t / "dstlnk")
