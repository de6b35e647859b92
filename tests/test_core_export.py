"""tinyfs.core.export: the directory and tar forms of a state, as standalone bags."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import bagit
import pytest
from conftest import check_profile

from tinyfs import Archive
from tinyfs.core import bagwrite
from tinyfs.core.bagcheck import validate_bag
from tinyfs.core.errors import AlreadyExists, NotFound
from tinyfs.core.export import export, tar_compression

pytestmark = pytest.mark.core

NS = 1_400_000_000_000_000_123


@pytest.fixture
def resource(tmp_path):
    """Resource r with two instances (labels v1, v2): files, a symlink, an empty dir, modes, times, an xattr."""
    archive = Archive.init(tmp_path / "archive", digests=["sha512", "sha256", "md5"])
    src = tmp_path / "src"
    (src / "d" / "empty").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("f v1\n")
    (src / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "x.sh", 0o700)
    os.symlink("d/f.txt", src / "link")
    try:
        os.setxattr(src / "x.sh", "user.origin", b"\x00\xffscanner")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    os.utime(src / "d" / "f.txt", ns=(NS, NS))
    os.utime(src / "d" / "empty", ns=(NS + 1, NS + 1))
    os.chmod(src / "d", 0o750)
    os.utime(src / "d", ns=(NS + 2, NS + 2))
    with archive.new("r", label="v1", message="first") as txn:
        for p in sorted(src.iterdir()):
            txn.add(p)
    with archive.get("r", "a", label="v2") as txn:
        txn.add_bytes("d/f.txt", b"f v2\n")
    return archive


def test_directory_form(resource, tmp_path):
    dest = tmp_path / "out"
    result = export(resource.root, "r", dest, instance="v1")
    assert result.files == 2 and result.instance == resource.root.resolve_instance("r", "v1")
    bag = bagit.Bag(str(dest))
    bag.validate()
    check_profile(bag)
    report = validate_bag(dest)
    assert report.valid and dict(report.info)["Tinyfs-Label"] == "v1"
    assert sorted(report.payload) == ["data/d/f.txt", "data/x.sh"]
    assert {alg for d in report.payload.values() for alg in d} == {"sha512", "sha256", "md5"}
    assert (dest / "data" / "d" / "f.txt").read_text() == "f v1\n"
    assert os.stat(dest / "data" / "d" / "f.txt").st_mtime_ns == NS
    assert os.stat(dest / "data" / "d" / "empty").st_mtime_ns == NS + 1
    assert os.stat(dest / "data" / "d").st_mtime_ns == NS + 2
    assert os.stat(dest / "data" / "d").st_mode & 0o777 == 0o750
    assert os.stat(dest / "data" / "x.sh").st_mode & 0o777 == 0o700
    assert os.getxattr(dest / "data" / "x.sh", "user.origin") == b"\x00\xffscanner"
    assert not os.path.lexists(dest / "data" / "link")
    assert (dest / "instance.json").read_bytes() == (
        resource.root.instance_dir("r", result.instance) / "instance.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    head = tmp_path / "head"
    export(resource.root, "r", head)
    assert (head / "data" / "d" / "f.txt").read_text() == "f v2\n"
    bagit.Bag(str(head)).validate()


def test_tar_form(resource, tmp_path):
    dest = tmp_path / "snapshot.tar.gz"
    assert tar_compression(dest) == ("snapshot", "gz")
    export(resource.root, "r", dest, tar=True, instance="v1")
    assert not (tmp_path / "snapshot.tar.gz.tmp").exists()
    with tarfile.open(dest) as t:
        names = t.getnames()
        assert names[:3] == ["snapshot", "snapshot/bagit.txt", "snapshot/bag-info.txt"]
        assert "snapshot/data/link" not in names      # symlinks travel in instance.json only
        f = t.getmember("snapshot/data/d/f.txt")
        assert f.pax_headers["mtime"] == "1400000000.000000123" and f.mode == 0o644
        assert t.getmember("snapshot/data/d").mode == 0o750
        assert t.getmember("snapshot/data/d/empty").isdir()
        assert t.getmember("snapshot/data/x.sh").pax_headers["SCHILY.xattr.user.origin"].encode(
            "utf-8", "surrogateescape") == b"\x00\xffscanner"
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(dest), "-C", str(out)], check=True)
    bag = out / "snapshot"
    assert os.stat(bag / "data" / "d" / "f.txt").st_mtime_ns == NS          # GNU tar keeps nanoseconds
    assert os.stat(bag / "data" / "d").st_mtime_ns == NS + 2
    assert not os.path.lexists(bag / "data" / "link")
    extracted = bagit.Bag(str(bag))
    extracted.validate()       # as extracted
    check_profile(extracted, serialized=dest)


def test_refusals_and_cleanup(resource, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(AlreadyExists):
        export(resource.root, "r", tmp_path / "taken")
    with pytest.raises(NotFound):
        export(resource.root, "r", tmp_path / "no" / "such" / "dir")
    with pytest.raises(NotFound):
        export(resource.root, "r", tmp_path / "y", instance="v9")
    (tmp_path / "t.tar.tmp").write_text("someone else's")
    with pytest.raises(AlreadyExists, match="t.tar.tmp"):
        export(resource.root, "r", tmp_path / "t.tar", tar=True)
    assert (tmp_path / "t.tar.tmp").read_text() == "someone else's"

    def fail(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bagwrite, "write_tag_files", fail)
    before = sorted(os.listdir(tmp_path))
    for tar in (False, True):
        with pytest.raises(OSError):
            export(resource.root, "r", tmp_path / "z.tar", tar=tar)
        assert sorted(os.listdir(tmp_path)) == before


def test_digest_missing_from_a_manifest_is_computed(resource, tmp_path):
    iid = resource.root.resolve_instance("r", "v1")
    (resource.root.instance_dir("r", iid) / "manifest-md5.txt").unlink()   # damage: fsck would say so
    export(resource.root, "r", tmp_path / "out", instance="v1")
    lines = (tmp_path / "out" / "manifest-md5.txt").read_text().splitlines()
    assert f"{hashlib.md5(b'f v1' + bytes([10])).hexdigest()}  data/d/f.txt" in lines


def test_long_logical_path(tmp_path):
    archive = Archive.init(tmp_path / "archive")
    dest = tmp_path / "out"
    room = 4095 - len(os.fsencode(dest / "data")) - 2
    parts, used = [], 0
    while used + 201 < room:
        parts.append("d" * 200)
        used += 201
    logical = "/".join(parts + ["f" * min(200, room - used - 1)])
    assert len(logical.encode()) > 3500
    with archive.new("r") as txn:
        txn.add_bytes(logical, b"deep")
    export(archive.root, "r", dest)
    assert validate_bag(dest).valid
    assert Path(dest / "data" / logical).read_bytes() == b"deep"
