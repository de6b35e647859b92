"""Faults: kill -9 at random instants of a commit (the reduced crash torture), and a full disk.

The full torture is `scripts/torture --trials 1000` (docs/faults.md); CI runs 30 trials of it here.
The full-disk tests put the archive root on a 64 MiB loop-mounted ext4 image (root only).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import check_archive_ok, mounted, run_tinyfs
from mounting import Mounted, tree

from tinyfs.core.layout import ArchiveRoot

HERE = Path(__file__).resolve().parent.parent
MIB = 1 << 20
N_SMALL = 4000

needs_fuse = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts)")


# -- crash torture ------------------------------------------------------------------------------

@pytest.mark.mount
@pytest.mark.slow
@needs_fuse
def test_crash_torture_reduced(tmp_path):
    """30 trials of scripts/torture: mount, CLI and API commits killed at random instants."""
    seed = os.environ.get("TINYFS_TORTURE_SEED", "20261123")
    r = subprocess.run([str(HERE / "scripts" / "torture"), "--trials", "30", "--via", "all", "--seed", seed,
                        "--workdir", str(tmp_path), "--max-mb", "16", "--small", "150"],
                       capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines and " 0 failures" in lines[-1], r.stdout[-5000:] + r.stderr[-3000:]
    assert "30 trials" in [x for x in lines if x.startswith("torture: 30")][0]


@pytest.mark.mount
@pytest.mark.slow
@needs_fuse
def test_crash_torture_reduced_on_an_s3_store(tmp_path):
    """12 trials of `scripts/torture --store s3` (its own SeaweedFS): the kill lands in the uploads too."""
    seed = os.environ.get("TINYFS_TORTURE_SEED", "20261204")
    r = subprocess.run([str(HERE / "scripts" / "torture"), "--store", "s3", "--trials", "12", "--via", "all",
                        "--seed", seed, "--workdir", str(tmp_path), "--max-mb", "8", "--small", "100"],
                       capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines and " 0 failures" in lines[-1], r.stdout[-5000:] + r.stderr[-3000:]
    assert lines[-1].startswith("torture: 12 trials") and "store s3" in lines[-1]


@pytest.mark.core
@pytest.mark.slow
def test_crash_torture_of_copies_reduced(tmp_path):
    """12 trials of scripts/torture-replicas: replicated commits (a local and an S3 replica), migrations
    and merges killed at random instants, resumed, checked."""
    seed = os.environ.get("TINYFS_TORTURE_SEED", "20261205")
    r = subprocess.run([str(HERE / "scripts" / "torture-replicas"), "--kind", "all", "--s3", "--trials", "12",
                        "--seed", seed, "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines and lines[-1].startswith("torture-replicas: 12 trials, 0 failures"), \
        r.stdout[-5000:] + r.stderr[-3000:]


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB ext4 file system, loop-mounted."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4")
    img, point = tmp_path / "disk.img", tmp_path / "small"
    point.mkdir()
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount: {r.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["sync"], check=False)
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False)


def fill(path: Path, chunk: int = MIB) -> int:
    """Write `path` until the disk is full; returns the errno that stopped it (raised by write or close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    data = os.urandom(chunk)
    code = 0
    try:
        for _ in range(1000):
            os.write(fd, data)
    except OSError as e:
        code = e.errno
    try:
        os.close(fd)
    except OSError as e:
        code = code or e.errno
    return code


def fill_rest(directory: Path) -> None:
    """Fill the file system to the last block (as root: the reserved blocks too), outside the archive."""
    n = 0
    while fill(directory / f"filler-{n}", 64 * 1024) == 0:
        n += 1
    for size in (4096, 1):
        k = 0
        while fill(directory / f"crumb-{size}-{n}-{k}", size) == 0 and k < 64:
            k += 1


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


@pytest.fixture
def full_mount(small_fs, tmp_path):
    root = small_fs / "archive"
    run_tinyfs("init", root)
    with mounted(root, tmp_path) as m:
        yield m


@pytest.mark.mount
@needs_fuse
@needs_root
def test_writes_on_a_full_disk_fail_with_enospc_and_the_commit_waits_for_space(full_mount):
    m = full_mount
    t = m / "transactions" / "full"
    os.mkdir(t)
    keep = os.urandom(4 * MIB + 5)
    (t / "keep.bin").write_bytes(keep)
    code = fill(t / "fill.bin")
    assert code == errno.ENOSPC, f"writing into a full disk failed with {errno.errorcode.get(code, code)}"
    assert m.proc.poll() is None and os.path.ismount(m.mnt)          # the daemon stays up
    assert sorted(os.listdir(t)) == ["fill.bin", "keep.bin"]
    assert os.statvfs(m.mnt).f_bavail * os.statvfs(m.mnt).f_frsize < 4 * MIB

    with pytest.raises(OSError) as e:
        m.commit("full")
    assert e.value.errno in (errno.ENOSPC, errno.EIO), e.value
    if e.value.errno == errno.EIO:
        assert b"fill.bin" in os.getxattr(t, "user.tinyfs.error")
    assert (t / "keep.bin").read_bytes() == keep                     # the transaction is intact
    assert not (m / "resources" / "full").exists()

    os.unlink(t / "fill.bin")                                          # free the space
    m.commit("full")
    assert tree(m / "resources" / "full") == {"keep.bin": keep}
    assert not t.exists()
    assert m.stop() == 0
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(m.root)


@pytest.mark.mount
@needs_fuse
@needs_root
def test_a_commit_that_cannot_complete_on_a_full_disk_leaves_the_transaction(full_mount, small_fs):
    m = full_mount
    t = m / "transactions" / "tight"
    os.mkdir(t)
    a, spare = os.urandom(6 * MIB), os.urandom(8 * MIB)
    (t / "a.bin").write_bytes(a)
    (t / "spare.bin").write_bytes(spare)
    os.makedirs(t / "d" / "e")
    for i in range(N_SMALL):        # manifests and instance.json of a few MiB: more than the disk has left
        (t / "d" / "e" / f"{i:05d}-{'x' * 200}.txt").write_text(f"small {i}\n")
    fill_rest(small_fs)                             # another process fills the disk
    assert fill(small_fs / "probe", 4096) == errno.ENOSPC

    with pytest.raises(OSError) as e:
        m.commit("tight")
    assert e.value.errno in (errno.ENOSPC, errno.EIO), e.value
    assert m.proc.poll() is None
    assert (t / "a.bin").read_bytes() == a and (t / "spare.bin").read_bytes() == spare
    assert len(os.listdir(t / "d" / "e")) == N_SMALL
    assert not (m / "resources" / "tight").exists()
    leftovers = [n for n in os.listdir(m.root / "transactions") if n.startswith(".commit-")]
    assert not leftovers

    os.unlink(t / "spare.bin")                      # free space by deleting a file from the transaction
    m.commit("tight")
    view = m / "resources" / "tight"
    assert (view / "a.bin").read_bytes() == a and not (view / "spare.bin").exists()
    assert len(os.listdir(view / "d" / "e")) == N_SMALL
    assert m.stop() == 0
    assert not m.tracebacks(), m.tracebacks()[-3000:]
    check_archive_ok(m.root)


@pytest.mark.core
@needs_root
def test_ingest_on_a_full_disk_is_one_line_and_commits_nothing(small_fs, tmp_path):
    root = small_fs / "archive"
    run_tinyfs("init", root)
    first = tmp_path / "first.txt"
    first.write_text("first\n")
    run_tinyfs("ingest", root, "r", first)
    before = ArchiveRoot(root).state("r")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        (src / "sub" / f"big{i}.bin").write_bytes(os.urandom(12 * MIB))
    (src / "small.txt").write_text("small\n")
    filler = small_fs / "filler"
    filler.mkdir()
    fill_rest(filler)
    # leave a little room, so that the commit starts and fails half-way through copying
    shutil.rmtree(filler)
    filler.mkdir()
    fill(filler / "most", MIB)
    for rid in ("r", "fresh"):
        r = run_tinyfs("ingest", root, rid, src, check=False)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith("tinyfs: ") and r.stderr.count("\n") == 1, r.stderr
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    archive = ArchiveRoot(root)
    assert archive.state("r") == before and archive.head("fresh") is None
    assert not [n for n in os.listdir(root / "transactions") if n.startswith((".commit-", ".api-"))]
    shutil.rmtree(filler)
    run_tinyfs("fsck", root)
    check_archive_ok(root)
    # with the space back, the same ingest works
    run_tinyfs("ingest", root, "r", src / "small.txt")
    assert (ArchiveRoot(root).state("r").files.keys()) == {"first.txt", "small.txt"}


@pytest.mark.mount
@needs_fuse
def test_worm_commit_killed_after_its_bag_is_read_only_leaves_the_transaction_writable(tmp_path):
    """Staged blobs are hard links of the new bag's files, which worm mode makes 0444 before the final
    rename: a kill -9 in between must not leave the transaction's own files read-only (a daemon that is
    not root could no longer write them)."""
    root = tmp_path / "archive"
    run_tinyfs("init", root, "--mode", "worm")
    point = tmp_path / "mnt"
    point.mkdir()
    m = Mounted(root, point, tmp_path / "mount.log").start()
    t = point / "transactions" / "w"
    hit = False
    try:
        for attempt in range(16):
            if not t.exists():
                os.mkdir(t)
            for i in range(100):
                (t / f"s{attempt}-{i}.txt").write_text(f"small {attempt} {i}\n")
            (t / f"big{attempt}.bin").write_bytes(os.urandom(96 * MIB))     # dirty: syncfs takes a while
            before = tree(t)
            th = threading.Thread(target=lambda: _try(m.commit, "w"))
            th.start()
            tags = False
            while th.is_alive() and not tags:       # kill the daemon as soon as the bag's tag files exist
                stages = [n for n in os.listdir(root / "transactions") if n.startswith(".commit-w-")]
                for stage in stages:
                    iid = stage[len(".commit-w-"):]
                    if os.path.exists(root / "transactions" / stage / "instances" / iid / "tagmanifest-sha512.txt"):
                        tags = True
            if tags:
                time.sleep(0.005 * (attempt % 4 + 1))   # into syncfs, after worm's chmod
            m.crash()
            th.join()
            staged = root / "transactions" / "w" / "blobs"
            blobs = list(staged.iterdir()) if tags and staged.exists() else []   # gone: the commit won
            hit = hit or any(not os.stat(b).st_mode & 0o200 for b in blobs)
            m.start()                                # recovery
            if not tags or not t.exists():
                continue                             # the commit won the race: try again
            assert tree(t) == before
            modes = {oct(os.stat(b).st_mode & 0o777) for b in (root / "transactions" / "w" / "blobs").iterdir()}
            assert modes <= {"0o600", "0o644"}, modes
            with open(t / f"big{attempt}.bin", "r+b") as f:
                f.write(b"still writable")
            if hit:
                break
    finally:
        m.stop()
    if not hit:
        pytest.skip("no kill landed between the bag's chmod and its rename")
    check_archive_ok(root)


def _try(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


@pytest.fixture
def crashable(root, tmp_path):
    with mounted(root, tmp_path) as m:
        yield m
    check_archive_ok(root)


@pytest.mark.mount
@needs_fuse
def test_bytes_rewritten_before_a_kill_are_not_committed_with_their_old_digest(crashable):
    """A file hashed at its close, opened again, rewritten in place (same size) and fsynced; the daemon is
    killed before that handle closes. The next commit must store the new bytes under their own digest."""
    m = crashable
    t = m / "transactions" / "stale"
    os.mkdir(t)
    (t / "f.txt").write_bytes(b"AAAA version\n")
    (t / "g.bin").write_bytes(os.urandom(3 * MIB))
    fd = os.open(t / "f.txt", os.O_RDWR)
    fd2 = os.open(t / "g.bin", os.O_RDWR)
    try:
        os.pwrite(fd, b"BBBB", 0)
        os.pwrite(fd2, b"changed in place", 1000)
        os.fsync(fd)
        os.fsync(fd2)
        expected = {"f.txt": b"BBBB version\n", "g.bin": None}
        m.crash()
    finally:
        for d in (fd, fd2):
            try:
                os.close(d)
            except OSError:
                pass
    m.start()
    g = (t / "g.bin").read_bytes()
    assert g[1000:1016] == b"changed in place"
    expected["g.bin"] = g
    assert tree(t) == expected
    m.commit("stale")
    assert tree(m / "resources" / "stale") == expected
    check_archive_ok(m.root)


@pytest.mark.mount
@needs_fuse
def test_a_write_that_returned_survives_a_kill_of_the_daemon(crashable):
    """SPEC 5: every operation that had returned survives a kill -9 of the daemon (hence no writeback
    cache by default: docs/design.md)."""
    m = crashable
    t = m / "transactions" / "returned"
    os.mkdir(t)
    fd = os.open(t / "f.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"written, and write() returned\n") == 30
        m.crash()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    m.start()
    assert (t / "f.txt").read_bytes() == b"written, and write() returned\n"


@pytest.mark.mount
@needs_fuse
def test_no_stale_digest_when_a_file_changes_right_after_its_close(crashable):
    """A file written out of order is hashed in the background after its close. A truncate or a rewrite
    right after that close must win: the commit stores the bytes with their own digest (fsck clean)."""
    m = crashable
    for i in range(6):
        t = m / "transactions" / f"race{i}"
        os.mkdir(t)
        with open(t / "f.bin", "wb") as f:
            f.seek(24 * MIB)
            f.write(b"end")
            f.seek(0)
            f.write(os.urandom(24 * MIB))
        os.truncate(t / "f.bin", 100)                  # by path: no open handle
        with open(t / "g.bin", "wb") as f:
            f.seek(8 * MIB)
            f.write(b"end")
            f.seek(0)
            f.write(os.urandom(8 * MIB))
        with open(t / "g.bin", "r+b") as f:            # opened again at once
            f.write(b"rewritten")
        expected = tree(t)
        m.commit(f"race{i}")
        assert tree(m / "resources" / f"race{i}") == expected
    check_archive_ok(m.root)


@pytest.mark.mount
@needs_fuse
def test_killing_the_committing_mv_does_not_cut_the_commit(crashable):
    """kill -9 of `mv` during the rename: the kernel does not interrupt a FUSE request the daemon has
    already taken, so mv dies only when the commit has finished, and the commit is whole."""
    m = crashable
    for i in range(3):
        t = m / "transactions" / f"mv{i}"
        os.mkdir(t)
        for k in range(100):
            (t / f"s{k}").write_bytes(os.urandom(1000))
        with open(t / "big", "wb") as f:                 # out of order: the commit waits for its hash
            f.seek(24 * MIB)
            f.write(b"e")
            f.seek(0)
            f.write(os.urandom(24 * MIB))
        expected = tree(t)
        mv = subprocess.Popen(["mv", str(t), str(m / "commit")])
        time.sleep(0.02 * (i + 1))
        mv.kill()
        mv.wait()
        if t.exists():                                   # killed before it reached rename(2)
            assert tree(t) == expected and not (m / "resources" / f"mv{i}").exists()
            m.commit(f"mv{i}")
        assert not t.exists()
        assert tree(m / "resources" / f"mv{i}") == expected
    check_archive_ok(m.root)
