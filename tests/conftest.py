"""Shared fixtures: the `tinyfs` command, a fresh archive, and the end-of-test archive check."""

from __future__ import annotations

import functools
import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from mounting import Mounted, tinyfs_argv

from tinyfs import Archive

# the S3 store fixtures (seaweed, s3_env, bucket, locked_bucket) live in tests/seaweed.py
pytest_plugins = ("seaweed",)

TIERS = ("core", "adapter", "mount")      # pyproject.toml describes them; `slow` is not a tier


def tier_problem(item: pytest.Item) -> str | None:
    """Why a test's tier markers are wrong (none, several, or `mount` missing on a user of `mnt`), or None."""
    tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
    if len(tiers) != 1:
        return f"{item.nodeid}: {' and '.join(tiers) if tiers else 'no tier'} (mark it with one of {', '.join(TIERS)})"
    if "mnt" in getattr(item, "fixturenames", ()) and tiers != ["mount"]:
        return f"{item.nodeid}: uses the `mnt` fixture but is marked {tiers[0]}, not mount"
    return None


@pytest.hookimpl(tryfirst=True)     # before `-m` deselects: every collected test is checked, whatever is run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collection fails unless every test has exactly one tier, so that `-m core`, `-m adapter` and
    `-m mount` together run everything and a new test cannot drop out of all three."""
    problems = [p for p in map(tier_problem, items) if p is not None]
    if problems:
        raise pytest.UsageError("tests without exactly one tier marker:\n  " + "\n  ".join(problems))


def run_tinyfs(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the installed `tinyfs` command; text output captured."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    r = subprocess.run([*tinyfs_argv(), *map(str, args)], check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"tinyfs {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


PUBLISHED_PROFILE = Path(__file__).parent.parent / "docs" / "profile" / "tinyfs-bagit-profile.json"


@functools.cache
def tinyfs_profile():
    """The published tinyfs BagIt profile, as bagit_profile reads it (given as a document: its
    identifier does not resolve, and bagit_profile would fetch it)."""
    import bagit_profile

    document = json.loads(PUBLISHED_PROFILE.read_text())
    return bagit_profile.Profile(document["BagIt-Profile-Info"]["BagIt-Profile-Identifier"], profile=document)


def check_profile(bag, serialized: Path | None = None) -> None:
    """`bag` (a bagit.Bag) conforms to the tinyfs BagIt profile, checked by bagit_profile; `serialized`,
    the tar or zip file it came from, passes the profile's serialization rules."""
    profile = tinyfs_profile()
    assert profile.validate_serialization(str(serialized or bag.path))
    assert profile.validate(bag), f"{bag.path}: {profile.report}"


def check_archive_ok(root: Path) -> None:
    """Every instance is a bag bagit-python validates and that conforms to the tinyfs BagIt profile,
    and fsck (full) finds nothing."""
    import bagit

    from tinyfs.core.fsck import fsck
    from tinyfs.core.layout import ArchiveRoot

    for inst in sorted(Path(root).glob("resources/*/*/*/instances/*")):
        bag = bagit.Bag(str(inst))
        bag.validate()
        check_profile(bag)
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


@contextmanager
def mounted(root: Path, tmp_path: Path):
    """A real mount of `root` at tmp_path/mnt (log in tmp_path/mount.log), stopped on the way out."""
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "mount.log").start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def root(tmp_path) -> Path:
    """A fresh archive made by `tinyfs init` at tmp_path/archive."""
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    return root


@pytest.fixture
def mnt(root, tmp_path):
    """`root` mounted; afterwards the unmount is clean, the log has no traceback and the archive checks."""
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "mount.log").start()
    yield m
    assert m.stop() == 0, m.log.read_text()[-3000:]
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(root)
