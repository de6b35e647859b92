"""tinyfs.core.ingest: paths and bags (the LoC BagIt conformance suite), without a mount."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
from pathlib import Path

import bagit
import pytest

from tinyfs import Archive
from tinyfs.core import ingest as ingest_module
from tinyfs.core.errors import BadEncoding, Forbidden, InvalidBag, InvalidName
from tinyfs.core.ingest import ingest_bag, ingest_paths

pytestmark = pytest.mark.core

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "bagit-conformance"


def bags(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in CONFORMANCE.glob(pattern) if p.is_dir())


ACCEPTED = bags("*/valid/*", "v0.97/warning/*")
REFUSED = bags("*/invalid/*", "v0.97/linux-only/*")


def bag_id(path: Path) -> str:
    return "/".join(path.parts[-3:])


def test_the_suite_is_there():
    assert len(ACCEPTED) >= 20 and len(REFUSED) >= 15


@pytest.mark.parametrize("bag", ACCEPTED, ids=bag_id)
def test_conformance_bag_is_accepted(archive, bag, archive_ok):
    result = ingest_bag(archive, "sip", bag)
    assert result.instance is not None
    data = bag / "data"
    on_disk = {p.relative_to(data).as_posix(): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    res = archive.get("sip")
    assert {p: res.read(p) for p in res.state().files} == on_disk
    archive_ok(archive.root.root)


@pytest.mark.parametrize("bag", REFUSED, ids=bag_id)
def test_conformance_bag_is_refused(archive, bag):
    with pytest.raises(InvalidBag) as caught:
        ingest_bag(archive, "sip", bag)
    problems = caught.value.problems
    assert problems and str(caught.value) == f"invalid bag {bag}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
    assert "sip" not in archive
    assert not [n for n in os.listdir(archive.root.transactions) if n.startswith(".commit-")]


def test_fetch_txt_with_absent_files_is_refused_clearly(archive, tmp_path):
    bag = tmp_path / "bag"
    bag.mkdir()
    (bag / "here.txt").write_text("here")
    bagit.make_bag(str(bag))                      # moves the directory's content into data/
    (bag / "fetch.txt").write_text("https://example.org/x 4 data/there.txt\n")
    with pytest.raises(InvalidBag) as caught:
        ingest_bag(archive, "sip", bag)
    assert any(p.code == "fetch-unsupported" and p.path == "data/there.txt" and "does not fetch" in p.message
               for p in caught.value.problems)
    assert "sip" not in archive


def test_bag_changing_after_validation_is_refused(archive, tmp_path, monkeypatch):
    """The digests the commit computes while copying are compared with the manifest before publishing."""
    bag = tmp_path / "bag"
    bag.mkdir()
    (bag / "a.txt").write_text("original")
    (bag / "b.txt").write_text("stays")
    bagit.make_bag(str(bag), checksums=["sha512"])
    real = ingest_module.validate_bag

    def validate_then_tamper(*args, **kw):
        report = real(*args, **kw)
        (bag / "data" / "a.txt").write_text("tampered")   # someone writes to the bag meanwhile
        return report

    monkeypatch.setattr(ingest_module, "validate_bag", validate_then_tamper)
    with pytest.raises(InvalidBag) as caught:
        ingest_bag(archive, "sip", bag)
    assert [(p.code, p.path) for p in caught.value.problems] == [("checksum-mismatch", "data/a.txt")]
    assert "sip" not in archive
    assert not [n for n in os.listdir(archive.root.transactions) if not n.startswith(".")]


def test_bag_message_label_creator(archive, tmp_path, archive_ok):
    bag = tmp_path / "bag"
    (bag / "d").mkdir(parents=True)
    (bag / "d" / "f.txt").write_text("f")
    bagit.make_bag(str(bag), {"Internal-Sender-Description": "from the scanner", "Contact-Name": "Ana"})
    ingest_bag(archive, "sip", bag, label="v1")
    doc = archive.get("sip").instances[-1]
    assert (doc.message, doc.creator, doc.label) == ("from the scanner", "Ana", "v1")
    ingest_bag(archive, "sip", bag, message="again", creator="Bo")   # unchanged payload: nothing to commit
    assert len(archive.get("sip").instances) == 1
    (bag / "data" / "d" / "g.txt").write_text("g")
    bagit.Bag(str(bag)).save(manifests=True)
    ingest_bag(archive, "sip", bag, message="again", creator="Bo")
    doc = archive.get("sip").instances[-1]
    assert (doc.message, doc.creator, doc.label) == ("again", "Bo", None)
    assert sorted(archive.get("sip").state().files) == ["d/f.txt", "d/g.txt"]
    archive_ok(archive.root.root)


def test_paths_go_on_top_of_the_current_state(archive, tmp_path, archive_ok):
    a = tmp_path / "a.txt"
    a.write_text("a1")
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x").write_text("x")
    os.symlink("sub/x", d / "link")
    r1 = ingest_paths(archive, "r", [a, d], message="one")
    assert (r1.added, r1.files_stored) == (2, 2)
    a.write_text("a2")
    r2 = ingest_paths(archive, "r", [a])
    assert (r2.added, r2.changed, r2.removed) == (0, 1, 0)
    res = archive.get("r")
    assert res.read("a.txt") == b"a2" and res.read("dir/sub/x") == b"x"
    assert res.state().links["dir/link"].target == "sub/x"
    assert ingest_paths(archive, "r", [a]).instance is None      # nothing changed
    archive_ok(archive.root.root)


def test_paths_refused(archive, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "f").write_text("f")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    try:
        with pytest.raises(Forbidden, match="sock.*socket"):
            ingest_paths(archive, "r", [d])
    finally:
        sock.close()
        os.unlink(d / "sock")
    bad = os.path.join(os.fsencode(d), b"\xff\xfe")
    os.mkdir(bad)
    with pytest.raises(BadEncoding) as caught:
        ingest_paths(archive, "r", [d])
    assert caught.value.errno == errno.EILSEQ and "\\xff\\xfe" in str(caught.value)
    os.rmdir(bad)
    other = tmp_path / "other" / "src"
    other.mkdir(parents=True)
    with pytest.raises(InvalidName, match="both"):
        ingest_paths(archive, "r", [d, other])
    with pytest.raises(InvalidName):
        ingest_paths(archive, "r", [])
    assert "r" not in archive


def test_large_bag_payload_is_verified_and_deduplicated(archive, tmp_path, archive_ok):
    bag = tmp_path / "bag"
    bag.mkdir()
    blob = os.urandom(3 * 1024 * 1024)
    for name in ("one.bin", "two.bin"):
        (bag / name).write_bytes(blob)
    bagit.make_bag(str(bag), checksums=["sha256", "sha512"])
    result = ingest_bag(archive, "sip", bag)
    assert result.files_stored == 1 and result.bytes_stored == len(blob)
    doc = archive.get("sip").instances[-1]
    assert doc.state.files["one.bin"].digest == hashlib.sha512(blob).hexdigest()
    shutil.rmtree(bag)
    archive_ok(archive.root.root)


def test_new_resource_created_by_someone_else_meanwhile(tmp_path):
    """open_transaction falls back to the existing resource when `new` loses the race."""
    archive = Archive.init(tmp_path / "a")
    f = tmp_path / "f"
    f.write_text("1")
    txn = ingest_module.open_transaction(archive, "r")
    with archive.new("r") as other:
        other.add(f)
    txn.add(f, path="g")
    txn.commit()
    assert sorted(archive.get("r").state().files) == ["f", "g"]
    again = ingest_module.open_transaction(archive, "r")
    assert again.base == archive.root.head("r")
    again.rollback()
