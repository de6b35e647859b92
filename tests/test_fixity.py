"""Verified reads: cat, export and the Python API never hand out damaged stored bytes as good, and fsck
names every logical path, in every instance, that uses a damaged or missing stored file.

One stored payload file is shared by two names in one state and by three instances (the same bytes
ingested again under a third name are not stored again); one byte of it is flipped on disk."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import bagit
import pytest
from conftest import run_tinyfs
from mounting import tinyfs_argv

from tinyfs import Archive, FixityError
from tinyfs.core.digests import CHUNK
from tinyfs.core.errors import NotFound
from tinyfs.core.export import export
from tinyfs.core.layout import ArchiveRoot

pytestmark = pytest.mark.core

SIZE = 3 * CHUNK + 123          # several reads of CHUNK, then a short last one
FLIPPED = 1000


@dataclass
class Shared:
    root: Path
    archive: ArchiveRoot
    iids: list[str]
    stored: str                 # the shared stored file, relative to the resource directory
    good: bytes
    expected: str               # sha512 of the good bytes (recorded)
    affected: list[tuple[str, str]]

    @property
    def path(self) -> Path:
        return self.archive.stored_path("walrus", self.stored)

    def events(self) -> list[dict]:
        return [e for e in self.archive.events.read() if e["event"] == "fixity.failed" and "via" in e["detail"]]


@pytest.fixture
def shared(root, tmp_path) -> Shared:
    src = tmp_path / "src"
    (src / "scans").mkdir(parents=True)
    good = os.urandom(SIZE)
    (src / "scans" / "p1.tif").write_bytes(good)
    (src / "scans" / "copy.tif").write_bytes(good)          # two names, one stored file
    (src / "ok.txt").write_text("intact\n")
    run_tinyfs("ingest", root, "walrus", src / "scans", src / "ok.txt")
    (tmp_path / "notes.txt").write_text("second\n")
    run_tinyfs("ingest", root, "walrus", tmp_path / "notes.txt")
    (tmp_path / "again.tif").write_bytes(good)              # a third name in a third instance, not stored again
    run_tinyfs("ingest", root, "walrus", tmp_path / "again.tif")
    archive = ArchiveRoot(root)
    iids = archive.instance_ids("walrus")
    expected = hashlib.sha512(good).hexdigest()
    stored = {archive.instance("walrus", iid).stored[expected] for iid in iids}
    assert len(iids) == 3 and len(stored) == 1 and next(iter(stored)).startswith(f"instances/{iids[0]}/data/")
    names = ["scans/copy.tif", "scans/p1.tif"]
    affected = [(iids[0], n) for n in names] + [(iids[1], n) for n in names] + \
               [(iids[2], n) for n in ["again.tif", *names]]
    return Shared(root, archive, iids, stored.pop(), good, expected, affected)


def flip_one_byte(path: Path, at: int = FLIPPED) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def damaged(shared) -> Shared:
    flip_one_byte(shared.path)
    return shared


def damage_line(s: Shared, path: str) -> str:
    found = hashlib.sha512(s.path.read_bytes()).hexdigest()
    return (f"tinyfs: walrus/{path}: stored bytes damaged (sha512 expected {s.expected[:16]}… "
            f"found {found[:16]}…, stored at {s.stored})\n")


def cat_into(s: Shared, path: str, out: Path, mode: str) -> subprocess.CompletedProcess:
    with open(out, mode) as f:
        return subprocess.run([*tinyfs_argv(), "cat", s.root, "walrus", path], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=120, check=False)


# -- cat ---------------------------------------------------------------------------------------------

def test_cat_of_damaged_bytes_exits_1_and_leaves_no_partial_output(damaged, tmp_path):
    out = tmp_path / "out.tif"
    r = cat_into(damaged, "scans/p1.tif", out, "wb")                         # tinyfs cat ... > out
    assert (r.returncode, r.stderr, out.read_bytes()) == (1, damage_line(damaged, "scans/p1.tif"), b"")

    out.write_bytes(b"kept\n")
    r = cat_into(damaged, "scans/p1.tif", out, "ab")                         # tinyfs cat ... >> out
    assert (r.returncode, out.read_bytes()) == (1, b"kept\n")

    cat = shlex.join(map(str, [*tinyfs_argv(), "cat", damaged.root, "walrus", "again.tif"]))
    r = subprocess.run(["sh", "-c", f"{{ {cat}; echo after; }} > {shlex.quote(str(out))}"], capture_output=True,
                       text=True, check=False)      # the shell's next write goes where cat started: no hole
    assert r.stderr == damage_line(damaged, "again.tif") and out.read_bytes() == b"after\n"

    r = subprocess.run([*tinyfs_argv(), "cat", damaged.root, "walrus", "scans/copy.tif", "--instance",
                        damaged.iids[1]], capture_output=True, check=False)        # a pipe: the end never comes
    bad = damaged.path.read_bytes()
    assert r.returncode == 1 and len(r.stdout) < SIZE and bad.startswith(r.stdout)

    assert cat_into(damaged, "ok.txt", out, "wb").returncode == 0 and out.read_bytes() == b"intact\n"
    events = damaged.events()
    assert [(e["instance"], e["detail"]["path"], e["detail"]["via"]) for e in events] == [
        (damaged.iids[2], "scans/p1.tif", "cat"), (damaged.iids[2], "scans/p1.tif", "cat"),
        (damaged.iids[2], "again.tif", "cat"), (damaged.iids[1], "scans/copy.tif", "cat")]
    assert events[0]["resource"] == "walrus" and events[0]["detail"] == {
        "path": "scans/p1.tif", "stored": damaged.stored, "algorithm": "sha512", "expected": damaged.expected,
        "found": hashlib.sha512(bad).hexdigest(), "via": "cat"}


def test_cat_of_intact_bytes_is_unchanged(shared, tmp_path):
    out = tmp_path / "out.tif"
    for path in ("scans/p1.tif", "again.tif"):
        r = cat_into(shared, path, out, "wb")
        assert (r.returncode, r.stderr) == (0, "") and out.read_bytes() == shared.good
    assert not shared.events()


# -- export ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tar", [False, True], ids=["dir", "tar"])
def test_export_of_damaged_bytes_exits_1_and_leaves_nothing(damaged, tmp_path, tar):
    out = tmp_path / "out"
    out.mkdir()
    dest = out / ("walrus.tar" if tar else "walrus")
    r = run_tinyfs("export", damaged.root, "walrus", dest, *(["--tar"] if tar else []), check=False)
    assert r.returncode == 1 and r.stderr.startswith("tinyfs: walrus/") and r.stderr.count("\n") == 1
    assert r.stderr in {damage_line(damaged, p) for p in ("again.tif", "scans/copy.tif", "scans/p1.tif")}
    assert list(out.iterdir()) == []                                  # no DEST, no temporary file or directory
    [event] = damaged.events()
    assert event["detail"]["via"] == "export" and event["instance"] == damaged.iids[2]


@pytest.mark.parametrize("tar", [False, True], ids=["dir", "tar"])
def test_export_of_intact_bytes_still_works(shared, tmp_path, tar):
    dest = tmp_path / ("walrus.tar" if tar else "walrus")
    run_tinyfs("export", shared.root, "walrus", dest, *(["--tar"] if tar else []))
    if tar:
        with tarfile.open(dest) as t:
            t.extractall(tmp_path / "x")
        dest = tmp_path / "x" / "walrus"
    bagit.Bag(str(dest)).validate()
    assert (dest / "data" / "again.tif").read_bytes() == shared.good
    assert not shared.events()


@pytest.mark.parametrize("tar", [False, True], ids=["dir", "tar"])
@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_export_refuses_a_stored_file_of_another_size(shared, tmp_path, tar, change):
    """tar copies exactly the recorded size: bytes beyond it are damage too, and checked."""
    with open(shared.path, "r+b") as f:
        f.truncate(SIZE + 1 if change == "longer" else SIZE - 1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FixityError):
        export(shared.archive, "walrus", out / "dest", tar=tar)
    assert list(out.iterdir()) == []


def test_export_reads_each_byte_once(tmp_path):
    """Verifying costs no second pass: the bytes read while exporting are the payload (plus tag files)."""
    archive = Archive.init(tmp_path / "archive", digests=["sha512", "md5"])
    with archive.new("r") as txn:
        txn.add_bytes("a.bin", os.urandom(4 << 20))
        txn.add_bytes("b.bin", os.urandom(3 << 20))
    payload = 7 << 20
    export(archive.root, "r", tmp_path / "warm")                     # imports, caches
    for n, tar in enumerate((False, True)):
        seen: list[int] = []
        before = _bytes_read()
        export(archive.root, "r", tmp_path / f"out{n}", tar=tar, progress=lambda _what, _total, seen=seen: seen.append)
        read = _bytes_read() - before
        assert payload <= read < payload + (256 << 10), (tar, read)
        assert sum(seen) == payload


def _bytes_read() -> int:
    """Bytes this process has read with read(2) and friends, cached or not (/proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# -- the Python API ----------------------------------------------------------------------------------

def test_api_read_raises_and_open_raises_at_the_end(damaged):
    resource = Archive(damaged.root).get("walrus")
    bad = damaged.path.read_bytes()
    with pytest.raises(FixityError) as caught:
        resource.read("scans/p1.tif", instance=resource.instances[0])         # an InstanceDoc works
    e = caught.value
    assert isinstance(e, OSError) and e.errno == errno.EIO
    assert (e.resource, e.instance, e.path, e.algorithm, e.expected, e.found, e.stored) == (
        "walrus", damaged.iids[0], "scans/p1.tif", "sha512", damaged.expected, hashlib.sha512(bad).hexdigest(),
        damaged.stored)
    assert str(e) == damage_line(damaged, "scans/p1.tif")[len("tinyfs: "):-1]

    with resource.open("again.tif") as f:
        got = b""
        while len(got) + CHUNK < SIZE:
            got += f.read(CHUNK)                      # every read before the one reaching the end is served
        assert got == bad[:len(got)]
        with pytest.raises(FixityError):
            f.read(CHUNK)
        with pytest.raises(FixityError):              # and it stays refused
            f.read(CHUNK)
    with resource.open("scans/copy.tif", damaged.iids[1]) as f, pytest.raises(OSError):
        shutil.copyfileobj(f, io.BytesIO())
    assert [(e["instance"], e["detail"]["via"]) for e in damaged.events()] == [
        (damaged.iids[0], "api"), (damaged.iids[2], "api"), (damaged.iids[1], "api")]
    assert resource.read("ok.txt", instance=resource.instances[0]) == b"intact\n"


def test_api_open_seek(damaged):
    """Random reads are served as stored; a reader that seeks back to 0 and reads to the end is verified."""
    resource = Archive(damaged.root).get("walrus")
    bad = damaged.path.read_bytes()
    with resource.open("scans/p1.tif") as f:
        f.seek(FLIPPED)
        assert f.read() == bad[FLIPPED:]
        f.seek(0)
        with pytest.raises(FixityError):
            f.read()
    assert len(damaged.events()) == 1


def test_api_instances_by_doc_id_or_label(shared):
    resource = Archive(shared.root).get("walrus")
    first = resource.instances[0]
    assert resource.state(first) == resource.state(first.id) == first.state
    assert resource.read("scans/p1.tif", first) == shared.good
    with resource.open("scans/p1.tif", instance=first) as f:
        assert f.read() == shared.good
    other = Archive(shared.root)
    with other.new("other") as txn:
        txn.add_bytes("x", b"x")
    with pytest.raises(NotFound):
        resource.read("scans/p1.tif", other.get("other").instances[0])


# -- a missing stored file ---------------------------------------------------------------------------

def test_missing_stored_file(shared, tmp_path):
    shared.path.unlink()
    missing = (f"tinyfs: walrus/scans/p1.tif: stored file missing (sha512 {shared.expected[:16]}…, "
               f"expected at {shared.stored})\n")
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "kept"
    kept.write_bytes(b"kept\n")
    r = cat_into(shared, "scans/p1.tif", kept, "ab")
    assert (r.returncode, r.stderr, kept.read_bytes()) == (1, missing, b"kept\n")
    for tar in (False, True):
        r = run_tinyfs("export", shared.root, "walrus", out / "dest", *(["--tar"] if tar else []), check=False)
        assert r.returncode == 1 and "stored file missing" in r.stderr and r.stderr.count("\n") == 1
        assert [p.name for p in out.iterdir()] == ["kept"]
    with pytest.raises(FixityError) as caught:
        Archive(shared.root).get("walrus").read("scans/p1.tif")
    assert caught.value.found is None and caught.value.missing
    assert [e["detail"]["found"] for e in shared.events()] == [None] * 4


# -- fsck ----------------------------------------------------------------------------------------------

def test_fsck_names_every_path_using_a_missing_stored_file(shared):
    shared.path.unlink()
    r = run_tinyfs("fsck", shared.root, check=False)
    lines = r.stdout.splitlines()
    assert r.returncode == 1
    assert f"walrus {shared.stored}: missing-file: listed in the manifest but absent from the bag" in lines
    assert [x for x in lines if x.startswith("  ")] == [f"  {iid} {path}" for iid, path in shared.affected]
    fast = run_tinyfs("fsck", shared.root, "--fast", check=False).stdout.splitlines()
    assert [x for x in fast if x.startswith("  ")] == [f"  {iid} {path}" for iid, path in shared.affected]
    doc = json.loads(run_tinyfs("fsck", shared.root, "--json", check=False).stdout)
    [group] = doc["stored_files"]
    assert group["status"] == "missing" and "missing-file" in group["codes"]


def test_fsck_names_every_path_using_a_damaged_stored_file(damaged):
    r = run_tinyfs("fsck", damaged.root, check=False)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    at = lines.index(next(x for x in lines if x.startswith(f"walrus {damaged.stored}: checksum-mismatch: sha512")))
    assert lines[at + 1:at + 1 + len(damaged.affected)] == [f"  {iid} {p}" for iid, p in damaged.affected]
    assert lines[-1].endswith("1 stored file damaged or missing, used by 7 paths")

    j = run_tinyfs("fsck", damaged.root, "--json", check=False)
    assert j.returncode == 1 and j.stderr == ""
    doc = json.loads(j.stdout)
    assert doc["clean"] is False and doc["instances"] == 3 and doc["interrupted_commits"] == 0
    assert doc["stored_files"] == [{
        "resource": "walrus", "stored": damaged.stored, "status": "damaged",
        "codes": ["checksum-mismatch", "stored-damaged"],
        "affected": [{"instance": iid, "path": p} for iid, p in damaged.affected]}]
    assert {(f["instance"], f["code"]) for f in doc["findings"]} == {
        (damaged.iids[0], "checksum-mismatch"), (damaged.iids[1], "stored-damaged"),
        (damaged.iids[2], "stored-damaged")}
    assert all(f["stored"] == damaged.stored for f in doc["findings"])


def test_fsck_json_of_a_clean_archive(shared):
    doc = json.loads(run_tinyfs("fsck", shared.root, "--json").stdout)
    assert doc["clean"] is True and doc["findings"] == [] and doc["stored_files"] == []
    assert doc["summary"].endswith(": clean") and doc["files"] == 3
