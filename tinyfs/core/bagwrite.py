"""Writing the tag files of a BagIt 1.0 bag (RFC 8493), each one durably.

Payload files are placed by the caller; this writes bagit.txt, bag-info.txt,
one manifest and one tagmanifest per algorithm, and any extra tag files
(instance.json), so that a bag is complete once this returns.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from .bagcheck import encode_manifest_path as encode_path  # noqa: F401  (one encoder for writer and reader)
from .digests import MultiHash
from .durable import write_new

PROFILE = "https://tinyfs.invalid/bagit-profile/tinyfs-1"


def fold(name: str, value: str) -> str:
    """One bag-info element; a multi-line value is folded with indented continuation lines (§2.2.2)."""
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return f"{name}: {lines[0]}\n" + "".join(f"  {line}\n" for line in lines[1:])


def bag_info(rid: str, payload_bytes: int, payload_count: int, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    fields = [("Bagging-Date", datetime.now(UTC).strftime("%Y-%m-%d")),
              ("Payload-Oxum", f"{payload_bytes}.{payload_count}"),
              ("External-Identifier", rid),
              ("BagIt-Profile-Identifier", PROFILE),
              *[(k, v) for k, v in extra if v]]
    return "".join(fold(k, v) for k, v in fields).encode("utf-8")


def write_tag_files(bag: Path, algorithms: Sequence[str], payload: dict[str, dict[str, str]],
                    info: bytes, extra_tags: dict[str, bytes] = {}, mode: int = 0o644) -> None:  # noqa: B006
    """Write every tag file of `bag`. `payload` maps "data/..." paths (unencoded) to {alg: hex}."""
    tags: dict[str, bytes] = {
        "bagit.txt": b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n",
        "bag-info.txt": info,
    }
    for alg in algorithms:
        lines = sorted(f"{digests[alg]}  {encode_path(p)}\n" for p, digests in payload.items())
        tags[f"manifest-{alg}.txt"] = "".join(lines).encode("utf-8")
    tags.update(extra_tags)
    for name, data in tags.items():
        write_new(bag / name, data, mode)
    for alg in algorithms:
        lines = []
        for name, data in sorted(tags.items()):
            h = MultiHash([alg])
            h.update(data)
            lines.append(f"{h.hexdigests()[alg]}  {encode_path(name)}\n")
        write_new(bag / f"tagmanifest-{alg}.txt", "".join(lines).encode("utf-8"), mode)


def read_manifest(bag: Path, alg: str) -> dict[str, str]:
    """"data/..." path -> hex digest from one manifest of a bag tinyfs wrote (paths never encoded there)."""
    out = {}
    try:
        text = (bag / f"manifest-{alg}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if path:
            out[path] = digest
    return out


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
