"""POSIX details pjdfstest checks inside a transaction, against the same steps on the local disk:
chmod/12.t (a write by a process without CAP_FSETID clears the set-id bits, through write-only handles
too), open/00.t 43-44 (open with O_TRUNC updates mtime and ctime), rename/23.t 7 (renaming over a file
that has another hard link updates that link's ctime)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from mounting import Mounted

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"), reason="needs FUSE"),
]
NOBODY = 65534
PYTHON = "/usr/bin/python3"      # (the venv's interpreter may be out of another user's reach)

# Runs in the directory under test as the given user: open NAME with FLAGS, write one byte at 0, print
# the mode fstat shows then.
WRITE_ONE = """
import json, os, sys
name, flags = sys.argv[1], sys.argv[2]
fd = os.open(name, {"wronly": os.O_WRONLY, "rdwr": os.O_RDWR, "trunc": os.O_WRONLY | os.O_TRUNC}[flags])
if flags != "trunc":
    os.write(fd, b"x")
print(json.dumps(os.fstat(fd).st_mode & 0o7777))
os.close(fd)
"""


@pytest.fixture
def shared_mnt(root, tmp_path):
    """A mount that other users may use (allow_other), with a transaction `p` owned by root."""
    if os.geteuid() != 0:
        pytest.skip("needs root: acts as nobody and mounts with allow_other")
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "mount.log", options="allow_other").start()
    os.mkdir(point / "transactions" / "p")
    yield m
    assert m.stop() == 0, m.log.read_text()[-3000:]
    assert not m.tracebacks(), m.tracebacks()[-3000:]


def write_as(directory: Path, name: str, flags: str, uid: int, gid: int, groups: list[int]) -> int:
    """The mode fstat shows after a process of uid/gid/groups opened `name` in `directory` and wrote to it.
    The child enters `directory` as root before it drops to uid (tmp_path is out of nobody's reach)."""
    kw = {} if uid == 0 else {"user": uid, "group": gid, "extra_groups": groups}
    r = subprocess.run([PYTHON, "-c", WRITE_ONE, name, flags], cwd=directory, capture_output=True, text=True,
                       timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# (mode, file's group, writer's uid, gid, groups, flags) -> what fstat and stat show afterwards
SETID_CASES = [
    ("suid, O_WRONLY, by nobody (chmod/12.t 3-4)", 0o4777, 0, NOBODY, NOBODY, [], "wronly", 0o777),
    ("sgid, O_WRONLY, by nobody", 0o2777, 0, NOBODY, NOBODY, [], "wronly", 0o777),
    ("both, O_WRONLY, by nobody", 0o6777, 0, NOBODY, NOBODY, [], "wronly", 0o777),
    ("sgid, O_RDWR, by nobody (chmod/12.t 7-8)", 0o2777, 0, NOBODY, NOBODY, [], "rdwr", 0o777),
    ("both, O_RDWR, by nobody (chmod/12.t 11-12)", 0o6777, 0, NOBODY, NOBODY, [], "rdwr", 0o777),
    ("sgid not group-executable, writer in the group", 0o2767, NOBODY, NOBODY, NOBODY, [], "wronly", 0o2767),
    ("sgid not group-executable, writer in the group by a supplementary one", 0o2767, 4242, NOBODY, NOBODY,
     [4242], "wronly", 0o2767),
    ("both, O_WRONLY, by root (CAP_FSETID)", 0o6777, 0, 0, 0, [], "wronly", 0o6777),
    ("both, O_TRUNC, by nobody", 0o6777, 0, NOBODY, NOBODY, [], "trunc", 0o777),
]


@pytest.mark.parametrize("case", SETID_CASES, ids=[c[0] for c in SETID_CASES])
def test_a_write_without_cap_fsetid_clears_set_id_bits_as_on_a_local_disk(shared_mnt, tmp_path, case):
    _label, mode, file_gid, uid, gid, groups, flags, expected = case
    native = tmp_path / "native"
    native.mkdir()
    shown = {}
    for where in (native, shared_mnt.mnt / "transactions" / "p"):
        fd = os.open(where / "n0", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        os.chown(where / "n0", 0, file_gid)
        os.chmod(where / "n0", mode)
        after_write = write_as(where, "n0", flags, uid, gid, groups)
        shown[where] = (after_write, stat.S_IMODE(os.stat(where / "n0").st_mode))
    assert shown[native] == (expected, expected)      # what this kernel does on a local disk ...
    assert shown[shared_mnt.mnt / "transactions" / "p"] == (expected, expected)   # ... the transaction too


def test_a_non_member_s_write_clears_a_setgid_bit_without_group_execute(shared_mnt):
    """The kernel's rule since 6.x (setattr_should_drop_sgid): such a setgid bit goes too when the
    writer is outside the file's group."""
    p = shared_mnt.mnt / "transactions" / "p"
    (p / "n0").write_text("")
    os.chmod(p / "n0", 0o2767)
    assert write_as(p, "n0", "wronly", NOBODY, NOBODY, []) == 0o767


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
