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
