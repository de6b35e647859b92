"""Durable writes in one place: temp file, fsync, rename, fsync the directory.

Every file the archive writes outside a bag's payload goes through these
helpers, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Create `path` (which must not exist yet) with `data`, fsynced unless the caller makes it durable
    otherwise (`sync=False`: a syncfs of the whole file system follows); the caller fsyncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    write_new(tmp, data, mode)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def append_line(path: str | os.PathLike, line: bytes) -> None:
    """Append one line with O_APPEND (atomic against other appenders) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(top: str | os.PathLike) -> None:
    """fsync every file and directory below `top` (bottom-up), then `top` itself."""
    for dirpath, _dirs, files in os.walk(top, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@functools.cache
def _libc():
    """libc through ctypes, loaded once (find_library runs `ldconfig -p`: ~10 ms a call)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    try:
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except AttributeError:
        pass
    return libc


def syncfs(path: str | os.PathLike) -> None:
    """Flush every dirty page and inode of the file system holding `path` (one call instead of
    an fsync per file). Falls back to a global sync where syncfs(2) is unavailable."""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of a file to disk, without waiting (sync_file_range(2)
    with SYNC_FILE_RANGE_WRITE). Durability still comes from the commit's syncfs; starting early only
    spreads the disk writes over the copy so that the syncfs has less left to do. Best effort."""
    try:
        _libc().sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
    except AttributeError:
        pass
