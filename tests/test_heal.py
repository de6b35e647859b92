"""Self-healing reads through a real mount (docs/replicas.md): a damaged or missing primary copy is
repaired from a replica by the daemon; a read that had not handed out any of the damaged bytes gets the
good ones, a read that had fails with EIO and the next one gets the good bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import mounted, run_tinyfs
from test_repair import flip_byte, stored

pytestmark = [pytest.mark.skipif(not shutil.which("fusermount3") or not os.path.exists("/dev/fuse"),
                                 reason="needs FUSE"), pytest.mark.mount]

MIB = 1 << 20


def events(root: Path, kind: str) -> list[dict]:
    lines = (root / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture
def replicated(tmp_path):
    """Resource `book` in an archive with one local replica; the files' original bytes."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"small.txt": b"a small file\n", "big.bin": os.urandom(8 * MIB + 3), "lost.txt": b"lost\n" * 100}
    for name, data in files.items():
        (src / name).write_bytes(data)
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    run_tinyfs("store", "add", root, tmp_path / "r1")
    run_tinyfs("ingest", root, "book", *sorted(src.iterdir()))
    return root, tmp_path / "r1", files


def test_the_mount_heals_from_a_replica(replicated, tmp_path):
    root, r1, files = replicated
    flip_byte(stored(root, "book", "data/small.txt"))
    flip_byte(stored(root, "book", "data/big.bin"), 5 * MIB)
    stored(root, "book", "data/lost.txt").unlink()
    with mounted(root, tmp_path) as m:
        book = m.mnt / "resources" / "book"
        assert (book / "small.txt").read_bytes() == files["small.txt"]     # one read: the good bytes
        assert (book / "lost.txt").read_bytes() == files["lost.txt"]       # missing at open: repaired first

        r = subprocess.run(["cat", str(book / "big.bin")], capture_output=True)
        assert r.returncode == 1 and b"Input/output error" in r.stderr      # bad bytes went out: EIO
        assert len(r.stdout) < len(files["big.bin"])
        assert (book / "big.bin").read_bytes() == files["big.bin"]          # the next read: the good bytes
        iid = next(iter(os.listdir(m.mnt / "instances" / "book")))
        assert (m.mnt / "instances" / "book" / iid / "big.bin").read_bytes() == files["big.bin"]
        assert not m.tracebacks(), m.tracebacks()[-3000:]
        log = m.log.read_text()
    assert "repaired from store r1" in log
    repaired = events(root, "stored.repaired")
    assert sorted(e["detail"]["stored"].rsplit("/", 1)[1] for e in repaired) == ["big.bin", "lost.txt", "small.txt"]
    assert all(e["detail"]["via"] == "mount" and e["detail"]["source"] == "r1" for e in repaired)
    assert {e["detail"]["path"] for e in events(root, "fixity.failed")} == {"small.txt", "big.bin", "lost.txt"}
    for name, data in files.items():
        assert stored(root, "book", f"data/{name}").read_bytes() == data
    assert run_tinyfs("fsck", root).returncode == 0


def test_a_file_damaged_in_every_store_stays_an_eio(replicated, tmp_path):
    root, r1, files = replicated
    for store, at in ((root, 0), (r1, 1)):
        flip_byte(stored(store, "book", "data/small.txt"), at)
    before = [stored(s, "book", "data/small.txt").read_bytes() for s in (root, r1)]
    with mounted(root, tmp_path) as m:
        for _ in range(2):
            r = subprocess.run(["cat", str(m.mnt / "resources" / "book" / "small.txt")], capture_output=True)
            assert r.returncode == 1 and b"Input/output error" in r.stderr and r.stdout == b""
        assert not m.tracebacks(), m.tracebacks()[-3000:]
    assert [stored(s, "book", "data/small.txt").read_bytes() for s in (root, r1)] == before
    assert not events(root, "stored.repaired")
