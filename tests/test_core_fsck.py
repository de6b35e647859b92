"""tinyfs.core.fsck: every kind of damage is found, with the exact path and code."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_tinyfs

from tinyfs import Archive
from tinyfs.core.fsck import fsck

pytestmark = pytest.mark.core


@pytest.fixture
def two(tmp_path):
    """Resource r: instance 1 stores big.bin and small.txt, instance 2 stores other.txt and refers to both."""
    archive = Archive.init(tmp_path / "archive")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(1 << 20))
    (src / "small.txt").write_text("small\n")
    with archive.new("r") as txn:
        txn.add(src / "big.bin")
        txn.add(src / "small.txt")
    with archive.get("r", "a") as txn:
        txn.add_bytes("other.txt", b"other\n")
    root = archive.root
    i1, i2 = root.instance_ids("r")
    return archive, root.instance_dir("r", i1), root.instance_dir("r", i2)


def found(report) -> set[tuple[str, str, str, str]]:
    return {(f.resource, f.instance, f.path, f.code) for f in report.findings}


def rewrite_instance_json(inst: Path, change) -> None:
    """Edit instance.json and fix the tag manifest, so that only tinyfs's own checks can tell."""
    doc = json.loads((inst / "instance.json").read_text())
    change(doc)
    raw = (json.dumps(doc, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode()
    (inst / "instance.json").write_bytes(raw)
    tag = inst / "tagmanifest-sha512.txt"
    lines = [f"{hashlib.sha512(raw).hexdigest()}  instance.json" if line.endswith("  instance.json") else line
             for line in tag.read_text().splitlines()]
    tag.write_text("\n".join(lines) + "\n")


def test_clean_archive_and_events(two):
    archive, _i1, _i2 = two
    report = fsck(archive.root)
    assert report.clean and (report.resources, report.instances, report.files) == (1, 2, 3)
    assert report.bytes == (1 << 20) + 6 + 6
    checked = [e for e in archive.events() if e["event"] == "fixity.checked"]
    assert len(checked) == 1 and checked[0]["detail"]["problems"] == 0
    assert not [e for e in archive.events() if e["event"] == "fixity.failed"]


def test_flipped_byte(two):
    archive, i1, i2 = two
    victim = i1 / "data" / "big.bin"
    raw = bytearray(victim.read_bytes())
    raw[12345] ^= 0x01
    victim.write_bytes(raw)
    report = fsck(archive.root)
    assert found(report) == {("r", i1.name, "data/big.bin", "checksum-mismatch"),
                             ("r", i2.name, "big.bin", "stored-damaged")}
    assert fsck(archive.root, fast=True).clean          # fast mode hashes nothing; the size is unchanged
    failed = [e for e in archive.events() if e["event"] == "fixity.failed"]
    assert {(e["resource"], e["instance"]) for e in failed} == {("r", i1.name), ("r", i2.name)}
    assert failed[0]["detail"]["findings"][0]["code"] == "checksum-mismatch"

    r = run_tinyfs("fsck", archive.root.root, check=False)
    assert r.returncode == 1
    lines = r.stdout.splitlines()           # the stored file's problem, then every path that uses it
    assert lines[0].startswith(f"r instances/{i1.name}/data/big.bin: checksum-mismatch: sha512 expected")
    assert lines[1:3] == [f"  {i1.name} big.bin", f"  {i2.name} big.bin"]
    assert lines[-1].endswith("2 problems in 2 instances; 1 stored file damaged or missing, used by 2 paths")


def test_missing_stored_file(two):
    archive, i1, i2 = two
    os.unlink(i1 / "data" / "small.txt")
    for fast in (False, True):
        report = fsck(archive.root, fast=fast)
        assert found(report) == {("r", i1.name, "data/small.txt", "missing-file"),
                                 ("r", i1.name, "bag-info.txt", "oxum-mismatch"),
                                 ("r", i2.name, "small.txt", "stored-damaged")}


def test_truncated_stored_file_found_by_size_in_fast_mode(two):
    archive, i1, _i2 = two
    os.truncate(i1 / "data" / "big.bin", 1000)
    codes = found(fsck(archive.root, fast=True))
    assert ("r", i1.name, "bag-info.txt", "oxum-mismatch") in codes
    assert ("r", i1.name, "big.bin", "stored-size-mismatch") in codes


def test_corrupted_instance_json(two):
    archive, _i1, i2 = two
    (i2 / "instance.json").write_text('{"type": "tinyfs-instance", "format": 1, "id": ')
    assert found(fsck(archive.root)) == {("r", i2.name, "instance.json", "checksum-mismatch"),
                                         ("r", i2.name, "instance.json", "bad-instance-json")}


def test_corrupted_manifest_line(two):
    archive, i1, _i2 = two
    manifest = i1 / "manifest-sha512.txt"
    text = manifest.read_text()
    manifest.write_text(re.sub(r"^[0-9a-f]+(  data/small\.txt)$", r"nothex\1", text, flags=re.MULTILINE))
    codes = found(fsck(archive.root))
    assert ("r", i1.name, "manifest-sha512.txt", "bad-manifest-line") in codes
    assert ("r", i1.name, "manifest-sha512.txt", "checksum-mismatch") in codes
    assert ("r", i1.name, "data/small.txt", "extra-file") in codes
    assert all(f[1] == i1.name or f[3] == "stored-damaged" for f in codes)


def test_instance_json_inconsistencies_behind_a_valid_bag(two):
    archive, _i1, i2 = two

    def break_it(doc):
        doc["previous"] = None
        doc["stored"].pop(next(d for d, p in doc["stored"].items() if p.endswith("small.txt")))
        doc["state"]["ghost.txt"] = dict(doc["state"]["big.bin"], digest="ab" * 64)
        doc["state"]["nodir/x"] = doc["state"]["other.txt"]

    rewrite_instance_json(i2, break_it)
    assert found(fsck(archive.root)) == {
        ("r", i2.name, "instance.json", "broken-chain"),
        ("r", i2.name, "small.txt", "missing-stored"),
        ("r", i2.name, "ghost.txt", "missing-stored"),
        ("r", i2.name, "nodir/x", "orphan-entry"),
    }


def test_stored_path_pointing_at_the_wrong_bytes(two):
    archive, _i1, i2 = two

    def swap(doc):
        digests = sorted(doc["stored"])
        a, b = digests[0], digests[1]
        doc["stored"][a], doc["stored"][b] = doc["stored"][b], doc["stored"][a]

    rewrite_instance_json(i2, swap)
    codes = {f[3] for f in found(fsck(archive.root))}
    assert codes <= {"stored-digest-mismatch", "stored-size-mismatch"} and "stored-digest-mismatch" in codes


def test_stray_entry_and_selection_by_resource(two, tmp_path):
    archive, i1, _i2 = two
    with archive.new("s") as txn:
        txn.add_bytes("x", b"x")
    (i1.parent / "not-an-instance").mkdir()
    report = fsck(archive.root, ["s"])
    assert report.clean and report.resources == 1
    assert found(fsck(archive.root)) == {("r", None, "instances/not-an-instance", "unexpected-entry")}
