"""Running unattended: systemd units, sd_notify readiness, signals, fstab / mount -t fuse.tinyfs, dead mounts.

Runs as root (CI does): mount(8), mount.fuse3 and systemd-analyze are real. Each test that mounts cleans
up after itself even when it fails (lazy unmount, then SIGKILL of a daemon it started, by pid).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mounting import Mounted, check_archive, tinyfs_argv

from tinyfs.cli.mountcmd import default_log
from tinyfs.core.layout import LOCKS
from tinyfs.fs.mount import MOUNT_LOCK, cache_bytes, parse_options
from tinyfs.fs.ops import CACHE_BYTES

PROJECT = Path(__file__).resolve().parent.parent
UNITS = PROJECT / "systemd"
UNIT_FILES = ("tinyfs@.service", "tinyfs-serve@.service", "tinyfs-fsck@.service", "tinyfs-fsck@.timer", "tinyfs-replicate@.service",
              "tinyfs-replicate@.timer")
VENV_BIN = Path(sys.executable).parent
HAS_FUSE = bool(shutil.which("fusermount3")) and os.path.exists("/dev/fuse")
needs_root_fuse = pytest.mark.skipif(not HAS_FUSE or os.geteuid() != 0,
                                     reason="needs /dev/fuse, fusermount3 and root (mount(8) as root)")


# -- helpers -------------------------------------------------------------------------------------

def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run([str(a) for a in argv], check=False, **kw)


def helper_env() -> dict[str, str]:
    """PATH with this venv's `tinyfs` first, so that mount.fuse3 runs the code under test."""
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}


def daemon_pid(root: Path) -> int | None:
    """The pid the serving daemon wrote into the archive's mount lock, if a daemon holds it."""
    path = root / "transactions" / LOCKS / MOUNT_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None                              # nobody holds it
    except BlockingIOError:
        return int(path.read_text().split()[0])
    finally:
        os.close(fd)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (exited, not yet reaped by its parent) is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def in_proc_mounts(mnt: Path) -> list[list[str]]:
    with open("/proc/self/mounts") as f:
        return [line.split() for line in f if line.split()[1] == str(mnt)]


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET; records every message."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tfn-")   # short: sun_path holds 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            msg = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(msg)
        return msg

    def fields(self) -> list[str]:
        """Every field received so far (what is waiting in the socket included), in order."""
        while self.receive(0.01) is not None:
            pass
        return [f for m in self.messages for f in m.split("\n") if f]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "archive"
    run([*tinyfs_argv(), "init", root]).check_returncode()
    return root


@pytest.fixture
def mnt(tmp_path, root):
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    # whatever happened: no mount and no daemon of ours left behind
    if os.path.ismount(point):
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True)
    pid = daemon_pid(root)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    log = default_log(point)
    if log.exists():
        log.unlink()


# -- the unit files ----------------------------------------------------------------------------

@pytest.mark.core
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing (apt-get install systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` on every unit, instantiated as NAME=test (what `systemctl start` loads).

    It checks syntax, every directive, that ExecStart's programs exist (/usr/local/bin/tinyfs, which
    scripts/setup links, /bin/sh) and the units they pull in. Lines about other units of the host
    (e.g. a distribution unit with an obsolete directive) are not ours and are ignored; every line that
    names one of our units or files fails the test.
    """
    assert Path("/usr/local/bin/tinyfs").exists(), "/usr/local/bin/tinyfs is missing: run scripts/setup"
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, tmp_path / name)
        (tmp_path / name.replace("@.", "@test.")).symlink_to(name)
    instances = [str(tmp_path / n.replace("@.", "@test.")) for n in UNIT_FILES]
    r = run(["systemd-analyze", "verify", *instances])
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if "tinyfs" in line or str(tmp_path) in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def unit_settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.core
def test_service_unit_keeps_the_mount_visible_and_stops_cleanly():
    s = unit_settings("tinyfs@.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["EnvironmentFile"] == ["/etc/tinyfs/%i.conf"]
    assert s["ExecStart"] == ["/usr/local/bin/tinyfs mount --foreground ${ARCHIVE} ${MOUNTPOINT} -o ${OPTIONS}"]
    assert s["KillSignal"] == ["SIGTERM"] and s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"]
    assert "ExecStop" not in s
    # any of these gives the service a mount namespace of its own, and the FUSE mount would be invisible
    # to the host
    namespacing = {"PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "ProtectKernelTunables",
                   "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
                   "ProcSubset", "PrivateMounts", "MountFlags", "ReadOnlyPaths", "ReadWritePaths",
                   "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
                   "BindReadOnlyPaths", "PrivateUsers", "RootDirectory", "RootImage", "DynamicUser"}
    assert not namespacing & s.keys()
    assert "CAP_SYS_ADMIN" in s["CapabilityBoundingSet"][0].split()
    assert s["DeviceAllow"] == ["/dev/fuse rw"]
    timer = unit_settings("tinyfs-fsck@.timer")
    assert timer["OnCalendar"] == ["weekly"] and timer["Persistent"] == ["true"] and "RandomizedDelaySec" in timer
    fsck = unit_settings("tinyfs-fsck@.service")
    assert fsck["Type"] == ["oneshot"] and fsck["ExecStart"] == ["/usr/local/bin/tinyfs fsck ${ARCHIVE}"]
    assert "AF_INET" in fsck["RestrictAddressFamilies"][0].split()     # stores in buckets, S3 replicas
    replicate = unit_settings("tinyfs-replicate@.service")
    assert replicate["ExecStart"] == ["/usr/local/bin/tinyfs replicate ${ARCHIVE}"]
    assert unit_settings("tinyfs-replicate@.timer")["OnCalendar"] == ["hourly"]


def exec_start_pre(mnt: Path) -> subprocess.CompletedProcess:
    """Run the unit's ExecStartPre shell line as systemd would: `$$` becomes `$`, MOUNTPOINT comes from the
    EnvironmentFile through the environment."""
    line = unit_settings("tinyfs@.service")["ExecStartPre"][0]
    assert line.startswith("-/bin/sh -c '") and line.endswith("'")
    script = line[len("-/bin/sh -c '"):-1].replace("$$", "$")
    return run(["/bin/sh", "-c", script], env={**os.environ, "MOUNTPOINT": str(mnt)})


@pytest.mark.core
def test_exec_start_pre_is_harmless_on_a_plain_directory(tmp_path):
    """Nothing mounted: it does nothing and succeeds. (On dead and live mounts: test_kill_9_* below.)"""
    r = exec_start_pre(tmp_path)
    assert r.returncode == 0 and not r.stderr, r.stderr
    r = exec_start_pre(tmp_path / "missing")
    assert r.returncode == 0 and not r.stderr, r.stderr


@pytest.mark.core
def test_install_systemd_into_destdir(tmp_path):
    dest = tmp_path / "dest"
    r = run([PROJECT / "scripts" / "install-systemd", "books", "/srv/books", "/mnt/books"],
            env={**os.environ, "DESTDIR": str(dest)})
    assert r.returncode == 0, r.stderr
    for name in UNIT_FILES:
        assert (dest / "etc/systemd/system" / name).read_bytes() == (UNITS / name).read_bytes()
    assert (dest / "etc/tinyfs/books.conf").read_text() == \
        "ARCHIVE=/srv/books\nMOUNTPOINT=/mnt/books\nOPTIONS=allow_other\n"
    assert (dest / "mnt/books").is_dir()
    (dest / "etc/tinyfs/books.conf").write_text("ARCHIVE=/elsewhere\n")
    r = run([PROJECT / "scripts" / "install-systemd", "books", "/srv/books", "/mnt/books"],
            env={**os.environ, "DESTDIR": str(dest)})
    assert r.returncode == 0 and (dest / "etc/tinyfs/books.conf").read_text() == "ARCHIVE=/elsewhere\n"


# -- options as mount(8) and mount.fuse3 pass them -------------------------------------------------

@pytest.mark.core
def test_parse_options_takes_what_mount_fuse3_passes():
    # `mount -t fuse.tinyfs SRC MNT -o allow_other` runs `tinyfs SRC MNT -o rw,allow_other,dev,suid`
    assert parse_options("rw,allow_other,dev,suid") == ["allow_other"]
    assert parse_options(["rw,dev,suid"]) == []
    # `... defaults,allow_other,_netdev,nofail,noatime,user` in fstab
    assert parse_options("ro,noatime,nodev,nosuid,noexec,allow_other") == ["ro", "nodev", "nosuid", "noexec",
                                                                             "allow_other"]
    assert parse_options("ro,rw") == [] and parse_options("rw,ro") == ["ro"]
    assert parse_options("defaults,_netdev,nofail,auto,x-systemd.automount,relatime") == []
    assert parse_options("") == [] and parse_options(None) == []
    for bad in ("bogus", "auto_unmount", "fsname=x", "allow_other,allow_root", "uid=5"):
        with pytest.raises(Exception, match="mount option"):
            parse_options(bad)


@pytest.mark.core
def test_cache_mib_sets_the_daemons_cache_memory():
    assert parse_options("allow_other,cache_mib=32") == ["allow_other", "cache_mib=32"]
    assert parse_options("cache_mib=32,cache_mib=0064") == ["cache_mib=64"]       # the last one wins
    assert cache_bytes(parse_options("cache_mib=32")) == 32 << 20
    assert cache_bytes(parse_options("allow_other")) == CACHE_BYTES
    for bad in ("cache_mib", "cache_mib=", "cache_mib=0", "cache_mib=-5", "cache_mib=1.5", "cache_mib=x"):
        with pytest.raises(Exception, match="cache_mib takes a whole number of MiB"):
            parse_options(bad)


@pytest.mark.core
@pytest.mark.skipif(os.geteuid() != 0, reason="checks the system-wide link scripts/setup makes (as root)")
def test_mount_fuse3_finds_the_helper_on_the_default_path():
    """mount.fuse3 runs `/bin/sh -c 'tinyfs' SRC MNT -o OPTS` with mount's PATH; systemd's default PATH
    (and root's) has /usr/local/bin, where scripts/setup links this venv's `tinyfs`."""
    default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which("tinyfs", path=default_path)
    assert found, "tinyfs is not on the default PATH: run scripts/setup"
    # (it may be another checkout's venv when tests run outside scripts/test; the tests below put this
    # venv first on PATH, so they exercise this checkout either way)
    r = run(["/bin/sh", "-c", "tinyfs --version"], env={**os.environ, "PATH": default_path})
    assert r.returncode == 0 and r.stdout.startswith("tinyfs "), r.stdout + r.stderr


# -- readiness and signals -------------------------------------------------------------------------

def start_foreground(root: Path, mnt: Path, log: Path, listener: NotifyListener) -> subprocess.Popen:
    with open(log, "ab") as logf:
        return subprocess.Popen([*tinyfs_argv(), "mount", "--foreground", str(root), str(mnt)],
                                env={**os.environ, "NOTIFY_SOCKET": listener.path},
                                stdout=logf, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, mnt: Path, listener: NotifyListener, log: Path) -> None:
    """Wait for READY=1; the moment it arrives, the mount point must be a mount that answers."""
    parent_dev = os.stat(mnt.parent).st_dev
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"no READY=1 in 30 s: {listener.messages}\n{log.read_text()}"
        assert proc.poll() is None, f"daemon exited {proc.returncode}: {log.read_text()[-3000:]}"
        msg = listener.receive(0.2)
        if msg is not None and "READY=1" in msg.split("\n"):
            assert os.path.ismount(mnt), "READY=1 before the mount point was a mount"
            st = os.stat(mnt)                    # answered by the daemon
            assert st.st_dev != parent_dev
            assert sorted(os.listdir(mnt)) == ["aip", "commit", "events.jsonl", "history", "instances", "resources",
                                               "transactions"]
            return


@pytest.mark.mount
@needs_root_fuse
def test_ready_only_when_mount_answers_and_sigterm_lets_a_commit_finish(root, mnt, tmp_path):
    log = tmp_path / "daemon.log"
    listener = NotifyListener()
    proc = start_foreground(root, mnt, log, listener)
    try:
        wait_ready(proc, mnt, listener, log)
        assert not [f for f in listener.fields() if f == "STOPPING=1"]

        # a transaction with a 300 MiB file, written through the mount
        txn = mnt / "transactions" / "big"
        os.mkdir(txn)
        block = os.urandom(1 << 20)
        expected = hashlib.sha512()
        with open(txn / "big.bin", "wb") as f:
            for i in range(300):
                chunk = i.to_bytes(8, "little") + block[8:]
                f.write(chunk)
                expected.update(chunk)

        outcome: dict[str, object] = {}

        def do_commit() -> None:
            try:
                os.rename(txn, mnt / "commit" / "big")
                outcome["ok"] = True
            except OSError as e:
                outcome["error"] = e

        committer = threading.Thread(target=do_commit)
        committer.start()
        # the commit is running once its staging directory appears in the archive (core/commit.py)
        staging = root / "transactions"
        deadline = time.monotonic() + 60
        while not any(n.startswith(".commit-big-") for n in os.listdir(staging)):
            assert committer.is_alive(), f"the commit ended before it was seen running: {outcome}"
            assert time.monotonic() < deadline, "the commit did not start within 60 s"
            time.sleep(0.0005)
        proc.send_signal(signal.SIGTERM)
        signalled_while_committing = committer.is_alive()

        committer.join(120)
        assert not committer.is_alive(), "the commit did not return within 120 s of SIGTERM"
        assert outcome == {"ok": True}, outcome
        assert signalled_while_committing
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        assert not os.path.ismount(mnt) and not in_proc_mounts(mnt)
        fields = listener.fields()
        assert "STOPPING=1" in fields and fields.index("STOPPING=1") > fields.index("READY=1"), fields
        text = log.read_text()
        assert "Traceback" not in text, text
        assert "signal SIGTERM" in text and "unmounted" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()

    # the instance is whole and on disk, with the file's bytes
    (inst,) = root.glob("resources/*/*/big/instances/*")
    state = json.loads((inst / "instance.json").read_text())["state"]
    assert state["big.bin"]["size"] == 300 << 20
    assert state["big.bin"]["digest"] == expected.hexdigest()
    stored = inst.parent.parent / json.loads((inst / "instance.json").read_text())["stored"][expected.hexdigest()]
    assert stored.stat().st_size == 300 << 20
    assert not (root / "transactions" / "big").exists()
    check_archive(root)


@pytest.mark.mount
@needs_root_fuse
def test_sigint_unmounts_and_exits_0(root, mnt, tmp_path):
    log = tmp_path / "daemon.log"
    listener = NotifyListener()
    proc = start_foreground(root, mnt, log, listener)
    try:
        wait_ready(proc, mnt, listener, log)
        os.mkdir(mnt / "transactions" / "open-one")
        (mnt / "transactions" / "open-one" / "a.txt").write_text("kept across the restart\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert not os.path.ismount(mnt)
        assert "STOPPING=1" in listener.fields()
        assert daemon_pid(root) is None                  # the archive lock is released
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    m = Mounted(root, mnt, tmp_path / "again.log").start()
    try:
        assert (mnt / "transactions" / "open-one" / "a.txt").read_text() == "kept across the restart\n"
    finally:
        assert m.stop() == 0


# -- mount(8): -t fuse.tinyfs and /etc/fstab --------------------------------------------------------

def mount_options(mnt: Path) -> set[str]:
    (entry,) = in_proc_mounts(mnt)
    assert entry[2] == "fuse.tinyfs", entry
    return set(entry[3].split(","))


def unmount_and_check_daemon_ends(root: Path, mnt: Path) -> None:
    pid = daemon_pid(root)
    assert pid is not None, "no daemon holds the archive lock"
    r = run(["umount", mnt])
    assert r.returncode == 0, r.stderr
    # the archive lock goes with the daemon's last thread (a zombie leader does not count)
    wait_until(lambda: daemon_pid(root) is None, 30, f"daemon {pid} to exit after umount")
    wait_until(lambda: process_gone(pid), 30, f"daemon {pid} to exit after umount")
    assert not os.path.ismount(mnt)
    log = default_log(mnt).read_text()
    assert "unmounted" in log and "Traceback" not in log, log


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.skipif(not shutil.which("mount.fuse3"), reason="mount.fuse3 missing (apt-get install fuse3)")
def test_mount_t_fuse_tinyfs_and_umount(root, mnt, tmp_path):
    r = run(["mount", "-t", "fuse.tinyfs", root, mnt, "-o", "allow_other"], env=helper_env())
    assert r.returncode == 0, r.stdout + r.stderr
    # mount returned: the mount answers at once
    assert os.path.ismount(mnt) and "transactions" in os.listdir(mnt)
    opts = mount_options(mnt)
    # mount.fuse3 asked for dev,suid (it runs as root); tinyfs keeps every mount nosuid,nodev
    assert {"allow_other", "default_permissions", "nosuid", "nodev", "rw"} <= opts, opts
    os.mkdir(mnt / "transactions" / "r1")
    (mnt / "transactions" / "r1" / "hello.txt").write_text("hello\n")
    os.rename(mnt / "transactions" / "r1", mnt / "commit" / "r1")
    assert (mnt / "resources" / "r1" / "hello.txt").read_text() == "hello\n"
    unmount_and_check_daemon_ends(root, mnt)
    check_archive(root)


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.skipif(not shutil.which("mount.fuse3"), reason="mount.fuse3 missing (apt-get install fuse3)")
def test_mount_from_an_fstab_line(root, mnt, tmp_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\n{root} {mnt} fuse.tinyfs defaults,allow_other,_netdev 0 0\n")
    r = run(["mount", "-T", fstab, mnt], env=helper_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"allow_other", "nosuid", "nodev"} <= mount_options(mnt)
    assert sorted(os.listdir(mnt / "resources")) == []
    unmount_and_check_daemon_ends(root, mnt)
    # read-only and noexec, as an fstab line may ask
    fstab.write_text(f"{root} {mnt} fuse.tinyfs ro,noexec,nofail,x-systemd.automount 0 0\n")
    r = run(["mount", "-T", fstab, mnt], env=helper_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"ro", "noexec", "nosuid", "nodev"} <= mount_options(mnt)
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / "transactions" / "nope")
    assert e.value.errno == errno.EROFS
    unmount_and_check_daemon_ends(root, mnt)


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.skipif(not shutil.which("mount.fuse3"), reason="mount.fuse3 missing (apt-get install fuse3)")
def test_mount_failures_are_one_line_and_non_zero(root, mnt, tmp_path):
    not_archive = tmp_path / "plain"
    not_archive.mkdir()
    r = run(["mount", "-t", "fuse.tinyfs", not_archive, mnt], env=helper_env())
    assert r.returncode != 0 and not os.path.ismount(mnt)
    assert r.stderr.strip().count("\n") == 0 and "not a tinyfs archive" in r.stderr, r.stderr
    r = run(["mount", "-t", "fuse.tinyfs", root, mnt, "-o", "bogus"], env=helper_env())
    assert r.returncode != 0 and "unknown mount option 'bogus'" in r.stderr and r.stderr.count("\n") == 1
    # the same archive twice: the second fails (the archive is locked), the first keeps serving
    r = run(["mount", "-t", "fuse.tinyfs", root, mnt], env=helper_env())
    assert r.returncode == 0, r.stderr
    other = tmp_path / "mnt2"
    other.mkdir()
    try:
        r = run(["mount", "-t", "fuse.tinyfs", root, other], env=helper_env())
        assert r.returncode != 0 and not os.path.ismount(other)
        assert r.stderr.count("\n") == 1 and "already in use by another tinyfs process" in r.stderr, r.stderr
        assert "transactions" in os.listdir(mnt)
    finally:
        if default_log(other).exists():
            default_log(other).unlink()
    unmount_and_check_daemon_ends(root, mnt)


# -- kill -9 --------------------------------------------------------------------------------------

def assert_dead(mnt: Path) -> None:
    """A dead mount: still mounted, and every request that reaches the kernel's FUSE connection fails
    with ENOTCONN. A plain stat of the mount point may go on being answered from the kernel's attribute
    cache (the root's attributes are cached for long); listing and statfs always ask the daemon."""
    assert os.path.ismount(mnt)
    for call in (os.listdir, os.statvfs, lambda p: os.stat(p / "resources" / "no-such-rid")):
        with pytest.raises(OSError) as e:
            call(mnt)
        # ENOTCONN; ECONNABORTED for a request queued while the daemon's last thread was exiting
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), call


@pytest.mark.mount
@needs_root_fuse
def test_kill_9_leaves_a_dead_mount_that_the_next_mount_clears(root, mnt, tmp_path):
    m = Mounted(root, mnt, tmp_path / "first.log").start()
    os.mkdir(mnt / "transactions" / "survivor")
    (mnt / "transactions" / "survivor" / "note.txt").write_text("written before the crash\n")
    m.proc.kill()                                          # SIGKILL: no chance to unmount
    m.proc.wait()
    assert_dead(mnt)                                       # dead, not empty: rsync --delete sees no empty tree

    # the unit's ExecStartPre leaves a live mount alone and clears a dead one; here the next
    # `tinyfs mount` clears it by itself (without ExecStartPre)
    r = run([*tinyfs_argv(), "mount", root, mnt])          # the background form: returns once it answers
    assert r.returncode == 0, r.stdout + r.stderr
    assert (mnt / "transactions" / "survivor" / "note.txt").read_text() == "written before the crash\n"
    assert exec_start_pre(mnt).returncode == 0
    assert (mnt / "transactions" / "survivor" / "note.txt").exists(), "ExecStartPre touched a live mount"
    pid = daemon_pid(root)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon_pid(root) is None, 30, "the killed daemon to go")
    assert_dead(mnt)
    assert exec_start_pre(mnt).returncode == 0
    assert not os.path.ismount(mnt), "ExecStartPre did not clear the dead mount"

    r = run([*tinyfs_argv(), "mount", root, mnt])
    assert r.returncode == 0, r.stdout + r.stderr
    os.rename(mnt / "transactions" / "survivor", mnt / "commit" / "survivor")
    assert (mnt / "resources" / "survivor" / "note.txt").read_text() == "written before the crash\n"
    pid = daemon_pid(root)
    r = run([*tinyfs_argv(), "umount", mnt])
    assert r.returncode == 0, r.stderr
    assert process_gone(pid) and daemon_pid(root) is None
    check_archive(root)


@pytest.mark.core
def test_units_use_only_configured_variables():
    """Every ${VAR} the units use is one the configuration file defines (a typo would expand to '')."""
    for name in UNIT_FILES:
        used = set(re.findall(r"\$\{(\w+)\}", (UNITS / name).read_text()))
        assert used <= {"ARCHIVE", "MOUNTPOINT", "OPTIONS", "LISTEN"}, (name, used)
