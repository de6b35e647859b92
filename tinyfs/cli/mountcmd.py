"""`tinyfs mount`, `tinyfs umount` and the mount.fuse3 form `tinyfs SOURCE MOUNTPOINT -o OPTIONS`."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.errors import TinyfsError
from ..core.layout import ArchiveRoot

READY_TIMEOUT = 60.0


def default_log(mountpoint: Path) -> Path:
    tag = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:12]
    base = Path("/var/log/tinyfs") if os.geteuid() == 0 else \
        Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "tinyfs"
    return base / f"mount-{mountpoint.name or 'root'}-{tag}.log"


def mount_command(root: str, mountpoint: str, options=None, foreground: bool = False,
                  log_file: str | None = None) -> int:
    from ..fs.mount import check_empty, parse_options

    opts = parse_options(options)
    archive = ArchiveRoot(root)                    # fail early with one line when it is not an archive
    mnt = Path(mountpoint).absolute()
    if not os.path.ismount(mnt):
        check_empty(mnt, opts)                     # (the daemon checks again; this fails before it starts)
    if foreground:
        from ..fs.mount import serve

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr, force=True)
        return serve(root, str(mnt), opts, archive)
    return _background(root, mnt, opts, Path(log_file) if log_file else default_log(mnt))


def _background(root: str, mnt: Path, opts: list[str], log_path: Path) -> int:
    """Start the daemon detached; return once the mount answers, or fail with its last log line.

    The daemon is told to report readiness on a notify socket of our own ($NOTIFY_SOCKET, as systemd
    does): it sends READY=1 only after a stat of the mount point has been answered by the mount. Polling
    os.path.ismount instead could take some other file system already mounted there for ours.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tinyfs.cli.main", "mount", "--foreground", str(Path(root).absolute()), str(mnt)]
    if opts:
        argv += ["-o", ",".join(opts)]
    with tempfile.TemporaryDirectory(prefix="tinyfs-mount-") as tmp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        address = os.path.join(tmp, "notify")
        sock.bind(address)
        env = {**os.environ, "NOTIFY_SOCKET": address}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/",
                                    start_new_session=True, close_fds=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready and b"READY=1" in sock.recv(4096).split(b"\n"):
                return 0
            if proc.poll() is not None and not select.select([sock], [], [], 0)[0]:
                raise TinyfsError(f"mount failed: {_last_line(log_path)} (log: {log_path})")
    raise TinyfsError(f"the mount did not answer within {READY_TIMEOUT:.0f} s; the daemon (pid {proc.pid}) "
                      f"may still be starting (log: {log_path})")


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "tinyfs:" in line or "ERROR" in line:
            return line.split("tinyfs: ", 1)[-1]
    return lines[-1] if lines else "no log"


def umount_command(mountpoint: str, timeout: float = 600.0) -> int:
    """Unmount and wait until the daemon has exited: its archive lock released (running commits
    finished), then the process gone (it took about a second more to end)."""
    mnt = Path(os.path.realpath(mountpoint))      # /proc/mounts names the real path (not a symlink to it)
    root = _archive_of(mnt)
    daemon = _daemon_pidfd(root) if root is not None else None
    try:
        r = subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise TinyfsError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"cannot unmount {mnt}")
        deadline = time.monotonic() + timeout
        if root is not None:
            _wait_for_daemon(root, timeout)
        if daemon is not None and not select.select([daemon], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TinyfsError(f"the daemon of {root} did not exit within {timeout:.0f} s")
    finally:
        if daemon is not None:
            os.close(daemon)
    return 0


def _daemon_pidfd(root: Path) -> int | None:
    """A pidfd of the daemon serving `root` (the process holding its mount lock, whose pid the lock file
    holds), taken before the unmount so that it names that very process; None when there is none."""
    import fcntl

    from ..core.layout import LOCKS, MOUNT_LOCK

    try:
        fd = os.open(root / "transactions" / LOCKS / MOUNT_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None                    # nobody holds it
        except BlockingIOError:
            pass
        pid = int(os.pread(fd, 32, 0).split()[0])
        return os.pidfd_open(pid)
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def _archive_of(mnt: Path) -> Path | None:
    """The archive root a tinyfs mount serves, from /proc/mounts (its fsname)."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and _unescape(fields[1]) == str(mnt) and "tinyfs" in fields[2]:
                    src = _unescape(fields[0])
                    return Path(src) if os.path.isdir(src) else None
    except OSError:
        pass
    return None


def _unescape(field: str) -> str:
    """A path of /proc/mounts: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _wait_for_daemon(root: Path, timeout: float) -> None:
    import fcntl

    from ..core.layout import LOCKS, MOUNT_LOCK

    path = root / "transactions" / LOCKS / MOUNT_LOCK
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.05)
        finally:
            os.close(fd)
    raise TinyfsError(f"the daemon of {root} did not finish within {timeout:.0f} s")
