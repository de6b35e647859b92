"""Build the archives that the mount-time benchmark mounts, fast, through the Python API.

    python -m bench.build many ROOT N           # N resources r000000.., one small file each
    python -m bench.build wide ROOT SOURCEDIR   # one resource "wide" holding the tree SOURCEDIR

The archives are made by `tinyfs.Archive` exactly as a user's script would make
them, so they are valid archives in every byte. Only durability is skipped while
building (fsync and syncfs are no-ops in this process; one syncfs at the end):
10,000 commits each paying a syncfs would take minutes, and durability of the
build is not what is measured.
"""

from __future__ import annotations

import os
import sys

from tinyfs import Archive


def _no_fsync() -> None:
    from tinyfs.core import bagwrite

    os.fsync = lambda fd: None  # type: ignore[assignment]
    os.fdatasync = lambda fd: None  # type: ignore[assignment]
    bagwrite.syncfs = lambda path: None  # type: ignore[assignment]


def _syncfs(path: str) -> None:
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def many(root: str, n: int) -> None:
    archive = Archive.init(root)
    for i in range(n):
        with archive.new(f"r{i:06d}", message="bench") as txn:
            txn.add_bytes("f.txt", b"resource %d\n" % i)


def wide(root: str, source: str) -> None:
    archive = Archive.init(root)
    with archive.new("wide", message="bench") as txn:
        txn.add(source)


def main(argv: list[str]) -> int:
    kind, root, arg = argv
    _no_fsync()
    if kind == "many":
        many(root, int(arg))
    elif kind == "wide":
        wide(root, arg)
    else:
        raise SystemExit(f"unknown archive kind {kind!r}")
    _syncfs(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
