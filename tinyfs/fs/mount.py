"""Mount life cycle: one mount per archive, recovery first, readiness, clean shutdown.

  serve(): lock the archive, clear a dead mount left by a crashed daemon,
  run recovery, mount, answer requests until unmounted or signalled.
  SIGTERM/SIGINT: refuse new commits, let running ones finish, unmount, exit 0.
  A daemon that dies (kill -9) does not unmount: the mount point stays dead
  rather than empty, so a mirroring rsync never deletes its copy.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
from pathlib import Path

import pyfuse3
import trio

from ..core.errors import Busy, TinyfsError
from ..core.layout import LOCKS, ArchiveRoot
from ..core.recover import recover
from .notify import sd_notify
from .ops import Operations

log = logging.getLogger(__name__)
MOUNT_LOCK = ".mount.lock"
ALLOWED_OPTIONS = {"allow_other", "allow_root", "default_permissions", "ro", "rw", "noatime", "atime",
                   "nodev", "nosuid", "dev", "suid", "exec", "noexec", "auto", "noauto", "user", "nouser",
                   "users", "_netdev", "nofail", "defaults", "async", "sync", "relatime"}
# fstab-only words that mean nothing to FUSE itself
DROPPED = {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users", "rw", "async", "relatime",
           "atime", "noatime", "exec", "dev", "suid", "nodev", "nosuid", "noexec", "sync"}


def parse_options(text: str | list[str] | None) -> list[str]:
    """-o a,b,c (possibly given several times) -> FUSE options tinyfs passes on."""
    items: list[str] = []
    for chunk in ([text] if isinstance(text, str) else (text or [])):
        items.extend(o.strip() for o in chunk.split(",") if o.strip())
    out = []
    for opt in items:
        key = opt.split("=", 1)[0]
        if key in DROPPED or key.startswith("x-") or key in ("foreground", "log"):
            continue
        if key == "ro":
            continue  # the views are read-only anyway; transactions need rw
        if key not in ALLOWED_OPTIONS:
            raise TinyfsError(f"unknown mount option {opt!r}")
        out.append(opt)
    return out


def lock_archive(archive: ArchiveRoot) -> int:
    """Hold the archive's mount lock for the life of the process; Busy when another mount has it."""
    locks = archive.transactions / LOCKS
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / MOUNT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"{archive.root} is already mounted by another tinyfs process") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def clear_dead_mount(mountpoint: Path) -> None:
    """A crashed daemon leaves 'Transport endpoint is not connected': unmount it lazily."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.info("clearing a dead mount at %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise TinyfsError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point")


def serve(root: str, mountpoint: str, options: list[str]) -> int:
    """Mount and serve in the foreground until unmounted or signalled; returns the exit status."""
    archive = ArchiveRoot(root)
    mnt = Path(mountpoint).absolute()
    lock_fd = lock_archive(archive)
    try:
        clear_dead_mount(mnt)
        check_mountpoint(mnt)
        for line in recover(archive):
            log.info("recovery: %s", line)
        ops = Operations(archive)
        fsname = str(archive.root) if "," not in str(archive.root) else "tinyfs"
        fuse_options = set(pyfuse3.default_options) | {"default_permissions", f"fsname={fsname}",
                                                        "subtype=tinyfs", *options}
        pyfuse3.init(ops, str(mnt), fuse_options)
        log.info("mounted %s on %s (%s)", archive.root, mnt, ",".join(sorted(options)) or "no options")
        clean = False
        try:
            trio.run(_main, ops, mnt)
            clean = True
        finally:
            pyfuse3.close(unmount=clean)
        log.info("unmounted %s", mnt)
        return 0
    finally:
        os.close(lock_fd)


async def _main(ops: Operations, mnt: Path) -> None:
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        nursery.start_soon(_announce_ready, mnt)
        nursery.start_soon(_watch_signals, ops, nursery.cancel_scope)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _announce_ready(mnt: Path) -> None:
    """READY=1 only once the mount answers a stat (from a worker: the loop must be free to answer)."""
    await trio.to_thread.run_sync(os.stat, mnt)
    sd_notify("READY=1\nSTATUS=serving")
    log.info("ready")


async def _watch_signals(ops: Operations, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("signal %s: finishing running commits, then unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            ops.closing = True
            while ops.commits_running:
                await trio.sleep(0.05)
            pyfuse3.terminate()
            return
