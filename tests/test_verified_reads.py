"""Verified reads through the mount (SPEC 5): a file read from its start to its end is checked against its
digest; damaged bytes make the read that delivers the last of them fail with EIO, and are recorded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import mounted, run_tinyfs

from tinyfs.fs.verify import BAD, GAP, GOOD, OFF, STEP, Expected, ReadCheck

pytestmark = pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                reason="needs FUSE")

MIB = 1 << 20
DAMAGE_AT = 5 * MIB + 123         # the flipped byte of "damaged.bin" (16 MiB)


def stored_file(root: Path, rid: str, name: str) -> Path:
    (path,) = root.glob(f"resources/*/*/{rid}/instances/*/data/{name}")
    return path


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def fixity_events(root: Path) -> list[dict]:
    lines = (root / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "fixity.failed"]


def pread_all(fd: int, n: int, off: int) -> bytes:
    """n bytes at off (fewer at the end of the file), as a program that reads until it has them."""
    out = b""
    while len(out) < n:
        data = os.pread(fd, n - len(out), off + len(out))
        if not data:
            break
        out += data
    return out


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
def damaged(root, tmp_path):
    """Resource `book` with a 16 MiB file whose stored copy has one byte flipped, and intact files;
    mounted. Yields (mount, the original bytes by name, the instance id)."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"damaged.bin": os.urandom(16 * MIB), "intact.bin": os.urandom(3 * MIB + 17),
             "small.txt": b"a small file\n", "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_tinyfs("ingest", root, "book", *sorted(src.iterdir()))
    flip_byte(stored_file(root, "book", "damaged.bin"), DAMAGE_AT)
    (iid,) = os.listdir(next(root.glob("resources/*/*/book/instances")))
    with mounted(root, tmp_path) as m:
        yield m, files, iid
        assert not m.tracebacks(), m.tracebacks()[-3000:]


@pytest.mark.mount
def test_a_damaged_file_fails_at_its_end_and_is_recorded(damaged, root, tmp_path):
    m, files, iid = damaged
    f = m / "resources" / "book" / "damaged.bin"
    bad = bytearray(files["damaged.bin"])
    bad[DAMAGE_AT] ^= 0x01
    r = subprocess.run(["cat", str(f)], capture_output=True)
    assert r.returncode == 1 and b"Input/output error" in r.stderr
    assert DAMAGE_AT < len(r.stdout) < len(bad) and r.stdout == bad[:len(r.stdout)]   # all but the last part

    r = subprocess.run(["cp", str(f), str(tmp_path / "copy")], capture_output=True)
    assert r.returncode == 1 and b"Input/output error" in r.stderr

    r = subprocess.run(["head", "-c", str(MIB), str(f)], capture_output=True)
    assert r.returncode == 0 and r.stdout == files["damaged.bin"][:MIB]    # readable up to that point

    r = subprocess.run(["cat", str(f)], capture_output=True)                # a retry fails again
    assert r.returncode == 1 and b"Input/output error" in r.stderr

    (event,) = fixity_events(root)                                          # recorded once
    assert event["resource"] == "book" and event["instance"] == iid
    assert event["detail"] == {"path": "damaged.bin", "stored": f"instances/{iid}/data/damaged.bin",
                               "algorithm": "sha512", "expected": sha512(files["damaged.bin"]),
                               "found": sha512(bytes(bad)), "via": "mount"}
    log = m.log.read_text()
    assert "fixity failed: resource book, damaged.bin" in log


@pytest.mark.mount
def test_a_whole_read_after_a_partial_one_is_verified_despite_the_page_cache(damaged, root):
    """`head -c` past the damage leaves its pages in the kernel's cache, unverified: a later `cat` must
    not take them from there and get only its reads past them checked (found by a newcomer's trial)."""
    m, files, iid = damaged
    path = m / "resources" / "book" / "damaged.bin"
    with open(path, "rb") as f:
        assert f.read(8 * MIB) != files["damaged.bin"][:8 * MIB]      # served as stored: no verdict yet
    for _ in range(2):
        r = subprocess.run(["cat", str(path)], capture_output=True)
        assert r.returncode != 0 and b"Input/output error" in r.stderr
    with open(m / "resources" / "book" / "intact.bin", "rb") as f:
        f.read(MIB)
    assert subprocess.run(["cat", str(m / "resources" / "book" / "intact.bin")],
                          capture_output=True).stdout == files["intact.bin"]


@pytest.mark.mount
def test_the_same_stored_bytes_fail_in_every_view(damaged, root):
    m, files, iid = damaged
    for path in (m / "instances" / "book" / iid / "damaged.bin",
                 m / "aip" / "book" / "instances" / iid / "data" / "damaged.bin"):
        r = subprocess.run(["cat", str(path)], capture_output=True)
        assert r.returncode == 1 and b"Input/output error" in r.stderr, path
    assert [e["detail"]["path"] for e in fixity_events(root)] == ["damaged.bin"]   # one stored file, one name


@pytest.mark.mount
def test_intact_files_read_whole_and_random_reads_are_served_as_stored(damaged, root):
    m, files, iid = damaged
    for view in (m / "resources" / "book", m / "instances" / "book" / iid,
                 m / "aip" / "book" / "instances" / iid / "data"):
        for name in ("intact.bin", "small.txt", "empty"):
            assert (view / name).read_bytes() == files[name], view / name
    assert (m / "aip" / "book" / "instances" / iid / "manifest-sha512.txt").read_bytes()   # tag files as stored
    fd = os.open(m / "resources" / "book" / "damaged.bin", os.O_RDONLY)
    try:
        middle = os.pread(fd, 4096, DAMAGE_AT - 100)
    finally:
        os.close(fd)
    assert middle[100] == files["damaged.bin"][DAMAGE_AT] ^ 0x01      # a random read: the bytes as stored
    assert fixity_events(root) == []


@pytest.mark.mount
def test_reads_out_of_order_that_end_at_the_end_are_verified(damaged, root):
    """Chunks read out of order, each no further ahead than a readahead, ending at the end of the file."""
    m, files, iid = damaged
    size = len(files["damaged.bin"])
    order = [(2 * MIB, 2 * MIB), (0, 2 * MIB), (5 * MIB, 3 * MIB), (4 * MIB, MIB)]
    order += [(off, 2 * MIB) for off in range(8 * MIB, size, 2 * MIB)]
    for name in ("intact.bin", "damaged.bin"):
        want = files[name]
        fd = os.open(m / "resources" / "book" / name, os.O_RDONLY)
        try:
            got = bytearray(len(want))
            error = None
            for off, n in (order if name == "damaged.bin" else [(MIB, MIB), (0, MIB), (2 * MIB, 2 * MIB)]):
                try:
                    data = pread_all(fd, n, off)
                except OSError as e:
                    error = e
                    break
                got[off:off + len(data)] = data
        finally:
            os.close(fd)
        if name == "intact.bin":
            assert error is None and bytes(got) == want
        else:
            assert error is not None and error.errno == errno.EIO
    assert [e["detail"]["path"] for e in fixity_events(root)] == ["damaged.bin"]


@pytest.mark.mount
def test_a_base_file_read_in_a_transaction_is_verified(damaged, root):
    m, files, iid = damaged
    t = m / "transactions" / "book"
    os.mkdir(t)
    r = subprocess.run(["cat", str(t / "damaged.bin")], capture_output=True)
    assert r.returncode == 1 and b"Input/output error" in r.stderr
    assert (t / "intact.bin").read_bytes() == files["intact.bin"]
    (event,) = fixity_events(root)
    assert event["detail"]["path"] == "damaged.bin" and event["instance"] == iid
    subprocess.run(["rm", "-rf", str(t)], check=True)     # roll back


@pytest.mark.mount
def test_a_write_to_a_damaged_base_file_fails_and_copies_nothing(damaged, root):
    """Copy-on-write copies a base file's stored bytes into the transaction: damaged ones would be
    committed as new bytes with a good digest of their own. The write fails instead, nothing changes."""
    m, files, iid = damaged
    t = m / "transactions" / "book"
    t.mkdir()
    with pytest.raises(OSError) as e:
        with open(t / "damaged.bin", "ab") as f:
            f.write(b"appended")
    assert e.value.errno == errno.EIO
    with open(t / "intact.bin", "ab") as f:                      # an intact base file copies as before
        f.write(b"appended")
    event = next(e for e in fixity_events(root) if e["detail"]["path"] == "damaged.bin")
    assert event["instance"] == iid and event["detail"]["via"] == "mount"
    assert os.stat(t / "damaged.bin").st_size == len(files["damaged.bin"])
    os.rename(t, m / "commit" / "book")
    state = {p: e["digest"] for p, e in _head_state(root, "book").items()}
    assert state["damaged.bin"] == sha512(files["damaged.bin"])       # still the recorded (base) bytes
    assert state["intact.bin"] == sha512(files["intact.bin"] + b"appended")


def _head_state(root: Path, rid: str) -> dict:
    from tinyfs.core.layout import ArchiveRoot
    archive = ArchiveRoot(root)
    return {p: {"digest": e.digest} for p, e in archive.state(rid).files.items()}


@pytest.mark.mount
def test_a_large_intact_file_read_sequentially_verifies(mnt, root, tmp_path):
    """64 MiB through resources/ and instances/ with cat and cp: many concurrent reads, no false alarm."""
    data = os.urandom(64 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    run_tinyfs("ingest", root, "big", tmp_path / "big.bin")
    (iid,) = os.listdir(mnt / "instances" / "big")
    for path in (mnt / "resources" / "big" / "big.bin", mnt / "instances" / "big" / iid / "big.bin"):
        r = subprocess.run(["cat", str(path)], capture_output=True)
        assert r.returncode == 0 and sha512(r.stdout) == sha512(data), path
        subprocess.run(["cp", str(path), str(tmp_path / "copy")], check=True)
        assert sha512((tmp_path / "copy").read_bytes()) == sha512(data)
    assert fixity_events(root) == []


# -- the check itself, fed as the kernel may feed it (no mount) ------------------------------------------
def _run_check(tmp_path: Path, stored: bytes, recorded: bytes, reads: list[tuple[int, int]]) -> ReadCheck:
    path = tmp_path / "stored"
    path.write_bytes(stored)
    expected = Expected("r", None, "f", "instances/x/data/f", "sha512", sha512(recorded), len(recorded))

    async def main() -> ReadCheck:
        fd = os.open(path, os.O_RDONLY)
        try:
            async with trio.open_nursery() as nursery:
                check = ReadCheck(expected, os.fstat(fd).st_size)
                for off, n in reads:
                    data = os.pread(fd, n, off)
                    if check.take(off, data, n, fd, nursery) and check.state == "running":
                        await check.verdict()
                    elif check.behind:
                        await check.wait_for_hasher()
                return check
        finally:
            os.close(fd)
    return trio.run(main)


@pytest.mark.adapter
def test_check_follows_reads_in_any_order_within_the_gap(tmp_path):
    data = os.urandom(10 * MIB + 5)
    chunks = [(off, MIB) for off in range(0, len(data), MIB)]
    shuffled = chunks[1:3] + chunks[:1] + chunks[4:] + chunks[3:4]     # the last read is not at the end
    assert _run_check(tmp_path, data, data, chunks).state == GOOD
    assert _run_check(tmp_path, data, data, shuffled).state == GOOD
    small = [(off, 4096) for off in range(0, len(data), 4096)]          # hashed on the loop, in order
    assert _run_check(tmp_path, data, data, small).state == GOOD
    skip = [(100, 4000), (0, 100), (4100, len(data))]                  # a small gap: read and hashed inline
    assert _run_check(tmp_path, data, data, skip).state == GOOD
    bad = bytearray(data)
    bad[7 * MIB] ^= 1
    assert _run_check(tmp_path, bytes(bad), data, shuffled).state == BAD


@pytest.mark.adapter
def test_check_ends_at_a_far_jump_and_catches_a_wrong_size(tmp_path):
    data = os.urandom(GAP + 3 * MIB)
    jump = [(0, MIB), (GAP + 2 * MIB, MIB)]                           # random access: served, not judged
    assert _run_check(tmp_path, data, data, jump).state == OFF
    assert _run_check(tmp_path, data + b"x", data, [(0, len(data) + 4096)]).state == BAD    # longer
    assert _run_check(tmp_path, data[:-1], data, [(0, len(data))]).state == BAD            # shorter
    assert _run_check(tmp_path, data + b"x", data, [(0, len(data))]).state == BAD          # the rest is read


@pytest.mark.adapter
def test_the_worker_follows_the_prefix_in_one_hand_off(tmp_path, monkeypatch):
    """The worker hashes as far as the prefix is taken when it gets there, not STEP at a time with a return to
    the loop in between (each return waited for the busy loop to start the next step)."""
    data = os.urandom(12 * STEP)
    path = tmp_path / "stored"
    path.write_bytes(data)
    expected = Expected("r", None, "f", "instances/x/data/f", "sha512", sha512(data), len(data))
    hand_offs = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn, *args, **kw):
        hand_offs.append(fn)
        return await run_sync(fn, *args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)

    async def main() -> ReadCheck:
        fd = os.open(path, os.O_RDONLY)
        try:
            async with trio.open_nursery() as nursery:
                check = ReadCheck(expected, len(data))
                for off in range(0, len(data), MIB):          # all taken before the worker starts
                    check.take(off, os.pread(fd, MIB, off), MIB, fd, nursery)
                assert check.behind
                await check.wait_for_hasher()
                assert await check.verdict()
                return check
        finally:
            os.close(fd)
    assert trio.run(main).state == GOOD
    assert len(hand_offs) == 1
