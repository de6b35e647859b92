"""Shared fixtures: the `tinyfs` command, a fresh archive, and the end-of-test archive check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mounting import tinyfs_argv

from tinyfs import Archive


def run_tinyfs(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the installed `tinyfs` command; text output captured."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    r = subprocess.run([*tinyfs_argv(), *map(str, args)], check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"tinyfs {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def check_archive_ok(root: Path) -> None:
    """Every instance is a bag bagit-python validates, and fsck (full) finds nothing."""
    import bagit

    from tinyfs.core.fsck import fsck
    from tinyfs.core.layout import ArchiveRoot

    for inst in sorted(Path(root).glob("resources/*/*/*/instances/*")):
        bagit.Bag(str(inst)).validate()
    report = fsck(ArchiveRoot(root))
    assert report.clean, "\n".join(map(str, report.findings))


@pytest.fixture
def tinyfs():
    return run_tinyfs


@pytest.fixture
def archive_ok():
    return check_archive_ok


@pytest.fixture
def archive(tmp_path) -> Archive:
    """A fresh preservation-mode archive (sha512) at tmp_path/archive."""
    return Archive.init(tmp_path / "archive")
