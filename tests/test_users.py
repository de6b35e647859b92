"""Other users (SPEC section 5): real local accounts against a real mount.

Creates the accounts tinyfs-test-a and tinyfs-test-b (useradd -m; removed at the end), mounts as root
with `-o allow_other`, and acts as each user with `runuser`: A reads resources/, opens a transaction,
copies into it and commits; B can neither write into, delete, rename nor commit A's transaction, which
is intact afterwards. Then A mounts an archive of their own (fusermount3, no allow_other) and commits.

The users run the system python3 with the project's virtual environment on PYTHONPATH (the venv's
interpreter lives under /root, which other users cannot enter).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs
from mounting import Mounted, tree

HERE = Path(__file__).resolve().parent.parent
USERS = ("tinyfs-test-a", "tinyfs-test-b")
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, runuser, allow_other)"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("useradd", "userdel", "runuser", "fusermount3"))
                       or not os.path.exists("/dev/fuse"), reason="needs useradd, runuser and FUSE"),
    pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs the system python3"),
]


def user_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": f"{HERE}:{SITE}", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def users():
    for name in USERS:
        if subprocess.run(["id", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    probe = subprocess.run([RUNUSER, "-u", USERS[0], "--", PYTHON, "-c", "import pyfuse3, tinyfs"],
                           env=user_env(), capture_output=True, text=True)
    try:
        if probe.returncode != 0:
            pytest.skip(f"the system python3 cannot import the project as another user: {probe.stderr[-300:]}")
        yield {name: pwd.getpwnam(name) for name in USERS}
    finally:
        for name in USERS:
            _kill_processes_of(name)
        for name in USERS:              # the test's own accounts, even when an earlier run left them
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def _kill_processes_of(name: str) -> None:
    """End what the test's own account left running (a daemon of a failed test), by pid."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


TRY = """
def attempt(label, fn, *args):
    try:
        fn(*args)
        out[label] = "ok"
    except OSError as e:
        out[label] = errno.errorcode.get(e.errno, str(e.errno))
"""


def as_user(user: str, code: str, **kw) -> dict:
    """Run Python `code` as `user`; it fills `out` (a dict), which comes back decoded from JSON."""
    script = "import errno, json, os, sys\nout = {}\n" + TRY + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    r = subprocess.run([RUNUSER, "-u", user, "--", PYTHON, "-c", script], env=user_env(), capture_output=True,
                       text=True, timeout=120, cwd="/", **kw)
    assert r.returncode == 0, f"as {user}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])




@pytest.fixture
def shared(users):
    """A world-traversable directory for an archive and a mount point (tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="tinyfs-users-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        if os.path.ismount(base / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_allow_other_users_deposit_and_cannot_touch_each_others_transactions(users, shared):
    a, b = USERS
    root, point = shared / "archive", shared / "mnt"
    run_tinyfs("init", root)
    readme = shared / "readme.txt"
    readme.write_text("shared reading\n")
    run_tinyfs("ingest", root, "library", readme)
    point.mkdir()
    m = Mounted(root, point, shared / "mount.log", options="allow_other").start()
    try:
        mnt = str(point)
        # A reads resources/, opens a transaction, copies a file of their own in and commits it
        home_a = users[a].pw_dir
        out = as_user(a, f"""
            mnt = {mnt!r}
            out["resources"] = sorted(os.listdir(mnt + "/resources"))
            out["readme"] = open(mnt + "/resources/library/readme.txt").read()
            with open({home_a!r} + "/mine.txt", "w") as f:
                f.write("A's own words\\n")
            os.mkdir(mnt + "/transactions/from-a")
            import subprocess
            subprocess.run(["cp", "-a", {home_a!r} + "/mine.txt", mnt + "/transactions/from-a/"], check=True)
            out["owner"] = os.stat(mnt + "/transactions/from-a/mine.txt").st_uid
            subprocess.run(["mv", mnt + "/transactions/from-a", mnt + "/commit/"], check=True)
            out["committed"] = open(mnt + "/resources/from-a/mine.txt").read()
            os.makedirs(mnt + "/transactions/a-open/sub")
            with open(mnt + "/transactions/a-open/a.txt", "w") as f:
                f.write("A's open transaction\\n")
            with open(mnt + "/transactions/a-open/sub/b.txt", "w") as f:
                f.write("nested\\n")
            os.setxattr(mnt + "/transactions/a-open", "user.tinyfs.message", b"by A")
        """)
        assert out["resources"] == ["library"] and out["readme"] == "shared reading\n"
        assert out["owner"] == users[a].pw_uid
        assert out["committed"] == "A's own words\n"
        t = point / "transactions" / "a-open"
        before = tree(t)
        assert os.stat(t).st_uid == users[a].pw_uid

        # B tries everything against A's open transaction
        out = as_user(b, f"""
            t = {str(t)!r}
            mnt = {mnt!r}
            out["read-resources"] = open(mnt + "/resources/from-a/mine.txt").read()
            attempt("create", lambda: open(t + "/b-was-here.txt", "w"))
            attempt("write", lambda: open(t + "/a.txt", "a"))
            attempt("truncate", os.truncate, t + "/a.txt", 0)
            attempt("unlink", os.unlink, t + "/a.txt")
            attempt("unlink-nested", os.unlink, t + "/sub/b.txt")
            attempt("mkdir-inside", os.mkdir, t + "/b-dir")
            attempt("rmdir-nested", os.rmdir, t + "/sub")
            attempt("rename-inside", os.rename, t + "/a.txt", t + "/renamed.txt")
            attempt("rmdir-transaction", os.rmdir, t)
            attempt("rename-transaction", os.rename, t, mnt + "/transactions/b-took-it")
            attempt("commit", os.rename, t, mnt + "/commit/a-open")
            attempt("setxattr", os.setxattr, t, "user.tinyfs.message", b"by B")
            attempt("chmod", os.chmod, t, 0o777)
            attempt("chmod-file", os.chmod, t + "/a.txt", 0o666)
            attempt("utime", os.utime, t + "/a.txt", (0, 0))
            import subprocess
            r = subprocess.run(["rm", "-rf", t], capture_output=True)
            out["rm-rf"] = r.returncode
            r = subprocess.run(["mv", t, mnt + "/commit/"], capture_output=True)
            out["mv-commit"] = r.returncode
            # B's own transaction works
            os.mkdir(mnt + "/transactions/from-b")
            with open(mnt + "/transactions/from-b/b.txt", "w") as f:
                f.write("B's words\\n")
            os.rename(mnt + "/transactions/from-b", mnt + "/commit/from-b")
            out["b-committed"] = open(mnt + "/resources/from-b/b.txt").read()
        """)
        denied = {"EACCES", "EPERM"}
        refused = {k: v for k, v in out.items() if k not in ("read-resources", "rm-rf", "mv-commit", "b-committed")}
        assert all(v in denied for v in refused.values()), refused
        assert out["rm-rf"] != 0 and out["mv-commit"] != 0
        assert out["read-resources"] == "A's own words\n" and out["b-committed"] == "B's words\n"

        # A's transaction is intact, and A can still commit it
        assert tree(t) == before
        assert os.getxattr(t, "user.tinyfs.message") == b"by A"
        out = as_user(a, f"""
            os.rename({str(t)!r}, {mnt!r} + "/commit/a-open")
            out["done"] = sorted(os.listdir({mnt!r} + "/resources/a-open"))
        """)
        assert out["done"] == ["a.txt", "sub"]
        assert tree(point / "resources" / "a-open") == before
    finally:
        status = m.stop()
    assert status == 0
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(root)


@pytest.fixture
def dev_fuse_for_users():
    """libfuse opens /dev/fuse itself before it falls back to fusermount3, and gives up on EACCES: a user
    can mount only where /dev/fuse is 0666, as udev makes it on Debian. A machine that left it 0600 gets
    that mode for the length of the test (and its own back afterwards)."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        if mode & 0o006 != 0o006:
            os.chmod("/dev/fuse", mode)


def test_a_user_mounts_an_archive_of_their_own(users, dev_fuse_for_users):
    a = USERS[0]
    home = Path(users[a].pw_dir)
    root, point = home / "own-archive", home / "own-mnt"
    shutil.rmtree(root, ignore_errors=True)
    out = as_user(a, f"""
        import subprocess, time
        tinyfs = [sys.executable, "-m", "tinyfs.cli.main"]
        root, point = {str(root)!r}, {str(point)!r}
        subprocess.run(tinyfs + ["init", root], check=True)
        os.makedirs(point, exist_ok=True)
        r = subprocess.run(tinyfs + ["mount", root, point], capture_output=True, text=True)
        out["mount"] = [r.returncode, r.stderr]
        if r.returncode == 0:
            try:
                t = point + "/transactions/mine"
                os.mkdir(t)
                with open(t + "/notes.txt", "w") as f:
                    f.write("mine\\n")
                os.symlink("notes.txt", t + "/link")
                subprocess.run(["mv", t, point + "/commit/"], check=True)
                out["view"] = sorted(os.listdir(point + "/resources/mine"))
                out["bytes"] = open(point + "/resources/mine/notes.txt").read()
                out["owner"] = os.stat(point + "/resources/mine/notes.txt").st_uid == os.getuid()
            finally:
                r = subprocess.run(tinyfs + ["umount", point], capture_output=True, text=True)
                out["umount"] = [r.returncode, r.stderr]
                out["still-mounted"] = os.path.ismount(point)
    """)
    assert out["mount"][0] == 0, out["mount"][1]
    assert out["view"] == ["link", "notes.txt"] and out["bytes"] == "mine\n" and out["owner"]
    assert out["umount"][0] == 0 and not out["still-mounted"], out["umount"][1]
    assert all(os.stat(p).st_uid == users[a].pw_uid for p in root.rglob("*"))    # all the user's own
    check_archive_ok(root)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(point, ignore_errors=True)
