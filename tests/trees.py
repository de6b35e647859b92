"""Trees and small helpers shared by the tests: the acceptance suite's tree, and the errno of a call."""

from __future__ import annotations

import os
from pathlib import Path

OLD_NS = 1_600_000_000_123_456_789       # a client-set time with nanoseconds


def errno_of(fn, *args, **kw) -> int:
    """The errno `fn` fails with, or 0 (a file descriptor it returns is closed)."""
    try:
        result = fn(*args, **kw)
    except OSError as e:
        return e.errno
    if fn is os.open:
        os.close(result)
    return 0


def acceptance_tree(base: Path, n_small: int = 20) -> Path:
    """The tree the acceptance suite (kept outside the project) deposits, copied here: odd names, an
    empty file, a hard-linked pair, a symlink, a user xattr, a file owned by another user (as root), and
    client-set times on a file and a directory."""
    base.mkdir(parents=True)
    (base / "sub" / "deeper").mkdir(parents=True)
    (base / "empty.txt").write_bytes(b"")
    (base / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (base / "café ü.txt").write_text("unicode name\n")
    (base / "with space.txt").write_text("space\n")
    (base / "sub" / "deeper" / "leaf.txt").write_text("leaf\n")
    for i in range(n_small):
        (base / "sub" / f"small-{i:03d}.txt").write_text(f"small file {i}\n" * (i + 1))
    os.link(base / "sub" / "small-000.txt", base / "hardlink-to-small-000.txt")
    os.symlink("deeper/leaf.txt", base / "sub" / "link-to-leaf")
    (base / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(base / "script.sh", 0o755)
    try:
        os.setxattr(base / "with space.txt", "user.origin", b"scanner-3")
    except OSError:
        pass  # the source file system keeps no user xattrs
    if os.geteuid() == 0:
        os.chown(base / "sub" / "small-001.txt", 1000, 1000)
    os.utime(base / "with space.txt", ns=(OLD_NS, OLD_NS))
    os.utime(base / "sub" / "deeper", ns=(OLD_NS, OLD_NS))
    return base
