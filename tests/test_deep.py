"""Deep and long input: trees as deep as the path limit allows commit everywhere; a path past the limit is
refused when it is made; what people write about a deposit has limits (tinyfs.core.limits)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import check_archive_ok, mounted, run_tinyfs
from trees import errno_of

from tinyfs import Archive
from tinyfs.core.errors import TooLarge
from tinyfs.core.ids import new_instance_id
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.limits import BAG_INFO_MAX, CREATOR_MAX, EVENT_TEXT_MAX, MESSAGE_MAX

needs_fuse = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")
# 1,000 levels: a 2,000-byte path; 1,990: 3,981 bytes, as deep as 1-byte names go with room for the
# absolute path of a source tree under a short /tmp directory
DEPTHS = [1000, 1990]


def deep_chain(top: str | os.PathLike | int, depth: int, data: bytes = b"at the bottom\n") -> str:
    """mkdir a/a/.../a (`depth` levels) under `top` (a path, or a directory descriptor) through directory
    descriptors, with a file f at the bottom and g at the first level; returns f's relative path."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY) if not isinstance(top, int) else os.dup(top)
    try:
        for level in range(depth):
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level == 0:
                _write_at(fd, "g", b"near the top\n")
        _write_at(fd, "f", data)
    finally:
        os.close(fd)
    return "a/" * depth + "f"


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_at(top: str | os.PathLike, rel: str) -> bytes:
    """The bytes of `rel` under `top`, opened one directory at a time (any length)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *dirs, leaf = rel.split("/")
        for name in dirs:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        f = os.open(leaf, os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(f, 1 << 16)
        finally:
            os.close(f)
    finally:
        os.close(fd)


@pytest.fixture
def short_tmp():
    """A directory with a short absolute path: a 3,981-byte source path still fits under PATH_MAX."""
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


# -- deep trees ---------------------------------------------------------------------------------

@pytest.mark.core
@pytest.mark.slow
@pytest.mark.parametrize("depth", DEPTHS)
def test_a_deep_tree_through_ingest_api_fsck_export_bag_and_recover(root, short_tmp, depth):
    src = short_tmp / "src"
    src.mkdir()
    deep = deep_chain(src, depth)
    run_tinyfs("ingest", root, "deep", src / "a", "-m", "deep")
    archive = ArchiveRoot(root)
    state = archive.state("deep")
    assert deep in state.files and len(state.dirs) == depth
    assert Archive(root).get("deep").read(deep) == b"at the bottom\n"

    # the API makes every missing parent of a deep new path
    with Archive(root).get("deep", "a") as txn:
        txn.add_bytes("b/" * depth + "x", b"made by the API\n")
    assert Archive(root).get("deep").read("b/" * depth + "x") == b"made by the API\n"

    assert run_tinyfs("fsck", root).returncode == 0
    check_archive_ok(root)          # bagit-python too: a deep file is stored under a short name

    # export, both forms; the directory form goes back in with ingest --bag
    bag, tar = short_tmp / "bag", short_tmp / "deep.tar"
    run_tinyfs("export", root, "deep", bag)
    run_tinyfs("export", root, "deep", tar, "--tar")
    assert read_at(bag / "data", deep) == b"at the bottom\n"
    with tarfile.open(tar) as tf:
        assert f"deep/data/{deep}" in tf.getnames()
    run_tinyfs("ingest", root, "again", "--bag", bag)
    assert set(archive.state("again").files) == set(archive.state("deep").files)
    assert Archive(root).get("again").read(deep) == b"at the bottom\n"

    # an interrupted commit of a deep tree is removed by recover
    stage = root / "transactions" / f".commit-deep-{new_instance_id()}"
    stage.mkdir()
    deep_chain(stage, depth)
    r = run_tinyfs("recover", root)
    assert "removed interrupted commit staging" in r.stdout and not stage.exists()
    assert run_tinyfs("fsck", root).returncode == 0


@pytest.mark.mount
@needs_fuse
@pytest.mark.parametrize("depth", DEPTHS)
def test_a_deep_tree_commits_through_the_mount(mnt, root, depth):
    t = mnt / "transactions" / "deep"
    os.mkdir(t)
    deep = deep_chain(t, depth)
    mnt.commit("deep")
    assert not t.exists()
    state = ArchiveRoot(root).state("deep")
    assert deep in state.files and len(state.dirs) == depth
    assert read_at(mnt / "resources" / "deep", deep) == b"at the bottom\n"


@pytest.mark.mount
@needs_fuse
def test_a_commit_failing_unexpectedly_never_stays_committing(root, tmp_path):
    """A commit that fails with an error nobody planned for (here: the head another process committed
    meanwhile has a damaged instance.json) leaves the transaction `failed`, saying why, and writable;
    it commits once the cause is gone."""
    with mounted(root, tmp_path) as m:
        t = m.mnt / "transactions" / "res"
        os.mkdir(t)
        (t / "f").write_bytes(b"x")
        src = tmp_path / "other.txt"
        src.write_bytes(b"cli")
        head = run_tinyfs("ingest", root, "res", src).stdout.strip()
        doc = ArchiveRoot(root).instance_dir("res", head) / "instance.json"
        good = doc.read_bytes()
        doc.write_bytes(b"{damaged")
        try:
            with pytest.raises(OSError) as e:
                m.commit("res")
            assert e.value.errno == errno.EIO
            assert os.getxattr(t, "user.tinyfs.state") == b"failed"
            assert os.getxattr(t, "user.tinyfs.error").startswith(b"internal error: JSONDecodeError")
        finally:
            doc.write_bytes(good)
        (t / "g").write_bytes(b"writable again")
        m.commit("res")
        assert not t.exists()
    assert sorted(ArchiveRoot(root).state("res").files) == ["f", "g", "other.txt"]
    check_archive_ok(root)


# -- limits of what people write about a deposit ---------------------------------------------------

def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2 and r.stderr.startswith("tinyfs: ") and r.stderr.count("\n") == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


@pytest.mark.core
def test_message_creator_and_label_limits_in_the_api_and_the_cli(root, tmp_path):
    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    archive = Archive(root)
    with pytest.raises(TooLarge):
        archive.new("r", message="m" * (MESSAGE_MAX + 1))
    with pytest.raises(TooLarge):
        archive.new("r", creator="é" * (CREATOR_MAX // 2 + 1))        # bytes of UTF-8 count, not characters
    _one_line_error(run_tinyfs("ingest", root, "r", src, "-m", "m" * (MESSAGE_MAX + 1), check=False),
                    "message of 65,537 bytes is too long", "at most 65,536 bytes")
    _one_line_error(run_tinyfs("ingest", root, "r", src, "-c", "c" * (CREATOR_MAX + 1), check=False), "creator")
    _one_line_error(run_tinyfs("ingest", root, "r", src, "-l", "v" * 201, check=False), "invalid label")
    assert "r" not in archive
    run_tinyfs("ingest", root, "r", src, "-m", "m" * MESSAGE_MAX, "-c", "c" * CREATOR_MAX)
    doc = ArchiveRoot(root).instance("r", ArchiveRoot(root).head("r"))
    assert len(doc.message) == MESSAGE_MAX and len(doc.creator) == CREATOR_MAX
    # the event log holds a bounded copy; instance.json the whole message
    last = [line for line in (root / "events.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "transaction.committed"][-1]
    assert len(last) < EVENT_TEXT_MAX + 1000
    check_archive_ok(root)


def _bag(where: Path, info: dict[str, str]) -> Path:
    import bagit

    where.mkdir()
    (where / "payload.txt").write_bytes(b"payload\n")
    bagit.make_bag(str(where), info, checksums=["sha256"])
    return where


@pytest.mark.core
def test_bag_info_limits_in_ingest_bag(root, tmp_path):
    big = _bag(tmp_path / "big", {"External-Description": "d" * 100})
    with open(big / "bag-info.txt", "a") as f:     # (refused on its size, before it is read or validated)
        f.write("External-Description: " + "d" * BAG_INFO_MAX + "\n")
    _one_line_error(run_tinyfs("ingest", root, "r", "--bag", big, check=False),
                    "bag-info.txt of 1,048,", "at most 1,048,576 bytes")
    long = _bag(tmp_path / "long", {"External-Description": "d" * (MESSAGE_MAX + 1)})
    _one_line_error(run_tinyfs("ingest", root, "r", "--bag", long, check=False),
                    "External-Description", "give --message")
    named = _bag(tmp_path / "named", {"Contact-Name": "n" * (CREATOR_MAX + 1)})
    _one_line_error(run_tinyfs("ingest", root, "r", "--bag", named, check=False), "Contact-Name", "--creator")
    assert "r" not in Archive(root)
    assert max(len(line) for line in (root / "events.jsonl").read_text().splitlines()) < EVENT_TEXT_MAX + 1000
    run_tinyfs("ingest", root, "r", "--bag", long, "--message", "described elsewhere")
    assert ArchiveRoot(root).instance("r", ArchiveRoot(root).head("r")).message == "described elsewhere"
    check_archive_ok(root)


@pytest.mark.core
def test_event_values_are_bounded(root):
    archive = ArchiveRoot(root)
    record = archive.events.append("commit.failed", "r", None, error="e" * 100_000, paths=["p" * 50_000])
    assert len(record["detail"]["error"]) < EVENT_TEXT_MAX + 100 and "100,000 characters" in record["detail"]["error"]
    assert len((root / "events.jsonl").read_text().splitlines()[-1]) < 2 * EVENT_TEXT_MAX + 1000


@pytest.mark.mount
@needs_fuse
def test_transaction_metadata_limits_in_the_mount(mnt, root):
    t = mnt / "transactions" / "r"
    os.mkdir(t)
    (t / "f").write_bytes(b"x")
    for name, limit in (("message", MESSAGE_MAX), ("creator", CREATOR_MAX)):
        with pytest.raises(OSError) as e:
            os.setxattr(t, f"user.tinyfs.{name}", b"x" * (limit + 1))
        assert e.value.errno == errno.E2BIG
        os.setxattr(t, f"user.tinyfs.{name}", b"x" * limit)
    mnt.commit("r")
    doc = ArchiveRoot(root).instance("r", ArchiveRoot(root).head("r"))
    assert len(doc.message) == MESSAGE_MAX and len(doc.creator) == CREATOR_MAX


# -- paths past PATH_MAX ------------------------------------------------------------------------

@pytest.mark.mount
@needs_fuse
def test_a_path_past_4095_bytes_is_refused_when_it_is_made(mnt, root):
    t = mnt / "transactions" / "long"
    os.mkdir(t)
    top = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(top)
    names = [f"{i:02d}" + "d" * 198 for i in range(20)]          # 20 x 201 bytes: 4,020 bytes of directories
    for name in names:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    fits, past = "f" * 75, "p" * 76                              # paths of 4,095 and 4,096 bytes
    try:
        os.close(os.open(fits, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        for fn, args, kw in ((os.open, (past, os.O_WRONLY | os.O_CREAT, 0o644), {"dir_fd": fd}),
                             (os.mkdir, (past,), {"dir_fd": fd}),
                             (os.mknod, (past, 0o644 | 0o100000), {"dir_fd": fd}),
                             (os.symlink, ("target", past), {"dir_fd": fd}),
                             (os.link, (fits, past), {"src_dir_fd": fd, "dst_dir_fd": fd}),
                             (os.rename, (fits, past), {"src_dir_fd": fd, "dst_dir_fd": fd})):
            assert errno_of(fn, *args, **kw) == errno.ENAMETOOLONG, fn.__name__
        # renaming a directory so that a path below it gets too long; a shorter name is fine
        longer, shorter = names[0] + "x", names[0][:-1]
        assert errno_of(os.rename, names[0], longer, src_dir_fd=top, dst_dir_fd=top) == errno.ENAMETOOLONG
        os.rename(names[0], shorter, src_dir_fd=top, dst_dir_fd=top)
        os.rename(shorter, names[0], src_dir_fd=top, dst_dir_fd=top)
        fresh = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)     # (a listing is taken at opendir)
        try:
            assert os.listdir(fresh) == [fits]
        finally:
            os.close(fresh)
    finally:
        os.close(fd)
        os.close(top)
    mnt.commit("long")
    assert [len(p.encode()) for p in ArchiveRoot(root).state("long").files] == [4095]


# -- the daemon's log -----------------------------------------------------------------------------

@pytest.mark.mount
@needs_fuse
def test_the_log_keeps_what_an_operator_needs(mnt, root, tmp_path):
    """Requests a client gets an error for (names not there, taken, too long) are not logged above DEBUG;
    a commit that `mv` fails (and tries twice) is logged once, as a warning."""
    for n in range(50):
        assert not (mnt / "resources" / f"missing{n}").exists()
    t = mnt / "transactions" / "r"
    os.mkdir(t)
    for n in range(50):
        assert not (t / f"missing{n}").exists()
    assert errno_of(os.mkdir, t) == errno.EEXIST
    (t / "f").write_bytes(b"x")
    os.setxattr(t, "user.tinyfs.label", b"v1")
    src = tmp_path / "other.txt"
    src.write_bytes(b"cli")
    run_tinyfs("ingest", root, "r", src, "-l", "v1")
    r = subprocess.run(["mv", str(t), str(mnt / "commit") + "/"], capture_output=True, text=True)
    assert r.returncode != 0 and os.getxattr(t, "user.tinyfs.state") == b"failed"
    log = mnt.log.read_text()
    assert "missing" not in log and "lookup" not in log and "mkdir" not in log, log
    assert log.count("commit of r failed") == 1, log
    os.removexattr(t, "user.tinyfs.label")
    mnt.commit("r")
