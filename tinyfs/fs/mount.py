"""Mount life cycle: one mount per archive, recovery first, readiness, clean shutdown.

  serve(): lock the archive, clear a dead mount left by a crashed daemon,
  run recovery, mount, answer requests until unmounted or signalled.
  SIGTERM/SIGINT: refuse new commits, let running ones finish, unmount, exit 0.
  A daemon that dies (kill -9) does not unmount: the mount point stays dead
  rather than empty, so a mirroring rsync never deletes its copy.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import subprocess
from pathlib import Path

import pyfuse3
import trio

from ..core.errors import Busy, TinyfsError
from ..core.formats import start_identifier, stop_identifier
from ..core.layout import MOUNT_LOCK, ArchiveRoot, lock_archive  # noqa: F401 (re-exported)
from ..core.recover import recover
from .kernel import Kernel
from .notify import sd_notify
from .ops import CACHE_BYTES, Operations

log = logging.getLogger(__name__)
# What `-o` may hold. mount(8) and mount.fuse3 hand a fuse.tinyfs fstab line over as
# `tinyfs SOURCE MOUNTPOINT -o rw,allow_other,dev,suid` (mount.fuse3 adds dev,suid when run by root),
# so every word they may pass must be accepted.
PASSED = {"allow_other", "allow_root", "default_permissions", "noexec", "nodev", "nosuid"}   # on to FUSE/kernel
# tinyfs's own: `writeback` turns the kernel's writeback cache on (faster sequential writes; a write()
# that returned is then only safe once its file is closed or fsynced -- see docs/design.md).
# `nonempty` lets a mount hide the files of a non-empty mount point (refused otherwise, as fuse2 did).
OWN = {"writeback", "nonempty"}
# tinyfs's own with a value: `cache_mib=N`, the memory the daemon keeps for caches (instance documents and
# the nodes of read-only trees the kernel holds; ops.CACHE_BYTES, docs/design.md "A mount that settles").
OWN_VALUED = {"cache_mib"}
# Bookkeeping words of fstab, mount(8) and systemd, and kernel flags that mean nothing here (atime
# flavours, sync: a commit is durable anyway). `dev` and `suid` are dropped on purpose: a tinyfs mount
# is always nosuid,nodev (FUSE's default), because the read-only views show archived files -- which
# any user may deposit, setuid bits included -- owned by the mounting user, root under systemd.
DROPPED = {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users", "owner", "group",
           "async", "sync", "dirsync", "relatime", "norelatime", "atime", "noatime", "diratime", "nodiratime",
           "strictatime", "nostrictatime", "lazytime", "nolazytime", "exec", "dev", "suid", "silent", "loud",
           "foreground", "log", "comment"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
READ_AHEAD_KIB = 1024   # the largest request libfuse takes (see raise_read_ahead)
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)   # a mount whose daemon is gone


def parse_options(text: str | list[str] | None) -> list[str]:
    """-o a,b,c (possibly given several times) -> the FUSE options tinyfs passes on.

    `ro` makes the whole mount read-only (transactions then fail with EROFS); the last of `ro`/`rw` wins.
    Anything else unknown is refused with one line, rather than silently ignored.
    """
    items: list[str] = []
    for chunk in ([text] if isinstance(text, str) else (text or [])):
        items.extend(o.strip() for o in chunk.split(",") if o.strip())
    out: list[str] = []
    readonly = False
    for opt in items:
        key = opt.split("=", 1)[0]
        if key in ("ro", "rw"):
            readonly = key == "ro"
        elif key in DROPPED or key.startswith("x-"):
            continue
        elif key in (PASSED | OWN) and "=" not in opt:
            if opt not in out:
                out.append(opt)
        elif key in OWN_VALUED:
            out = [o for o in out if not o.startswith(f"{key}=")] + [f"{key}={_mib(opt)}"]
        else:
            raise TinyfsError(f"unknown mount option {opt!r} (tinyfs takes allow_other, allow_root, ro, "
                              "noexec, writeback, cache_mib=N and the usual fstab words)")
    if "allow_other" in out and "allow_root" in out:
        raise TinyfsError("mount options allow_other and allow_root exclude each other")
    return ["ro", *out] if readonly else out


def _mib(opt: str) -> int:
    key, _, value = opt.partition("=")
    if not value.isdigit() or int(value) < 1:
        raise TinyfsError(f"mount option {key} takes a whole number of MiB (1 or more), not {value!r}")
    return int(value)


def cache_bytes(options: list[str]) -> int:
    """The cache memory asked for with `cache_mib=N`, or the default."""
    for opt in options:
        if opt.startswith("cache_mib="):
            return int(opt.partition("=")[2]) << 20
    return CACHE_BYTES


def clear_dead_mount(mountpoint: Path) -> None:
    """A crashed daemon leaves 'Transport endpoint is not connected': unmount it lazily.

    statfs, not stat: the kernel goes on answering stat from its attribute cache for a while after the
    daemon died, while statfs always asks the daemon. ECONNABORTED is what a request gets that was
    queued while the dying daemon's last thread still held /dev/fuse open.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        if e.errno not in DEAD:
            return          # not there, not a directory...: check_mountpoint() says so in one line
        log.info("clearing a dead mount at %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


def check_mountpoint(mountpoint: Path, options: list[str] = ()) -> None:
    if not mountpoint.is_dir():
        raise TinyfsError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point")
    check_empty(mountpoint, options)


def check_empty(mountpoint: Path, options: list[str] = ()) -> None:
    """A mount over files hides them without a word (libfuse 3 dropped fuse2's check): refused unless
    `-o nonempty` says that is meant. A directory that cannot be listed is left to the mount to judge."""
    if "nonempty" in options:
        return
    try:
        with os.scandir(mountpoint) as entries:
            busy = next(entries, None) is not None
    except OSError:
        return
    if busy:
        raise TinyfsError(f"mount point {mountpoint} is not empty: its files would be hidden "
                          "(give -o nonempty to mount over them)")


# Collector thresholds for the daemon (Python's defaults: 700, 10, 10). See tune_gc().
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Make the cyclic garbage collector run far less often in the daemon.

    The daemon keeps large, acyclic, long-lived data (instance documents of 10,000+ entries, the base
    tree of an open transaction, a Node per inode the kernel knows). With the default thresholds a full
    collection ran once or twice per re-deposit of a 10,000-file resource, 14-33 ms each, collecting
    nothing: 10 % of an `rsync` + commit (0.39-0.41 s -> 0.36-0.37 s, medians of 24 re-deposits).
    Cycles are still collected: a young collection after 50,000 net allocations (a few MiB at most),
    a full one as the ageing rules of CPython decide. What exists once the daemon has started (modules,
    functions, classes) is frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _EarlySignals:
    """Remembers SIGTERM/SIGINT that arrive before the trio loop watches for them (during recovery or
    while mounting), so that `systemctl stop` at start-up still ends cleanly instead of killing the
    process half-way (default action) and leaving a dead mount."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum


def serve(root: str, mountpoint: str, options: list[str], archive: ArchiveRoot | None = None) -> int:
    """Mount and serve in the foreground until unmounted or signalled; returns the exit status. `archive`:
    root already opened (on an object store, opening makes a client and reads the store's marker)."""
    early = _EarlySignals()
    previous = {s: signal.signal(s, early) for s in STOP_SIGNALS}
    try:
        return _serve(archive or ArchiveRoot(root), mountpoint, options, early)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(archive: ArchiveRoot, mountpoint: str, options: list[str], early: _EarlySignals) -> int:
    mnt = Path(mountpoint).absolute()
    lock_fd = lock_archive(archive)
    try:
        clear_dead_mount(mnt)
        check_mountpoint(mnt, options)
        for line in recover(archive, store=False):   # this host's transactions only (recover.py)
            log.info("recovery: %s", line)
        if early.signum is not None:
            log.info("signal %s before mounting: not mounting", signal.Signals(early.signum).name)
            return 0
        ops = Operations(archive, writeback="writeback" in options, cache_bytes=cache_bytes(options))
        tune_gc()
        options = [o for o in options if o not in OWN and o.split("=", 1)[0] not in OWN_VALUED]
        fsname = str(archive.root) if "," not in str(archive.root) else "tinyfs"
        fuse_options = set(pyfuse3.default_options) | {"default_permissions", f"fsname={fsname}",
                                                        "subtype=tinyfs", *options}
        try:
            pyfuse3.init(ops, str(mnt), fuse_options)
        except RuntimeError as e:   # libfuse has said why on stderr (no /dev/fuse, not permitted, ...)
            raise TinyfsError(f"cannot mount on {mnt}: {e}") from None
        log.info("mounted %s on %s (%s)", archive.root, mnt, ",".join(sorted(options)) or "no options")
        clean = False
        archive.history.open()
        start_identifier(archive)
        try:
            trio.run(_main, ops, mnt, early)
            clean = True
        finally:
            Kernel.finish()
            pyfuse3.close(unmount=clean)
            stop_identifier(archive)
        log.info("unmounted %s", mnt)
        return 0
    finally:
        os.close(lock_fd)


async def _main(ops: Operations, mnt: Path, early: _EarlySignals) -> None:
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        nursery.start_soon(_announce_ready, mnt)
        nursery.start_soon(_watch_signals, ops, early)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _announce_ready(mnt: Path) -> None:
    """READY=1 only once the mount answers a stat (from a worker: the loop must be free to answer).

    The worker is abandoned on cancel: if a signal ends the loop before the stat was answered, the
    stat would otherwise wait for an answer that never comes, and the unmount with it.
    """
    st = await trio.to_thread.run_sync(os.stat, mnt, abandon_on_cancel=True)
    raise_read_ahead(st.st_dev)
    sd_notify("READY=1\nSTATUS=serving")
    log.info("ready")


def raise_read_ahead(dev: int, kib: int = READ_AHEAD_KIB) -> None:
    """Let the kernel read ahead `kib` on this mount (its bdi's read_ahead_kb) instead of the 128 KiB it
    starts a FUSE mount with: sequential reads then come as 1 MiB requests (libfuse's largest) instead of
    256 KiB ones, a quarter of the requests for the same bytes (a cold 1 GiB read: 0.61 s of daemon CPU
    instead of 1.08 s; docs/design.md, "Verified reads through the mount"). Only root may write it;
    otherwise the kernel's default stays. Called once the mount has answered a request: the kernel sets
    the read-ahead again when the daemon answers FUSE_INIT."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path) as f:
            if int(f.read()) >= kib:
                return
        with open(path, "w") as f:
            f.write(str(kib))
    except (OSError, ValueError) as e:
        log.info("read-ahead of the mount left as the kernel set it (%s: %s)", path, e)


async def _watch_signals(ops: Operations, early: _EarlySignals) -> None:
    """SIGTERM/SIGINT: refuse new transactions and commits (EBUSY), let running commits finish, then end
    the loop; requests already being answered are answered, and serve() unmounts. SIGHUP is ignored."""
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        if early.signum is None:
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
        else:
            signum = early.signum
        log.info("signal %s: finishing running commits, then unmounting", signal.Signals(signum).name)
        sd_notify("STOPPING=1\nSTATUS=finishing running commits, then unmounting")
        ops.close()
        await ops.commits_done()
        pyfuse3.terminate()
