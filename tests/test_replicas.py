"""Replicas: `tinyfs store add`, commits that copy their instance to every store, `--copies`,
`tinyfs replicate` and `tinyfs status`, on real archives (local roots, and a SeaweedFS bucket)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tinyfs.core.api import Archive
from tinyfs.core.errors import TinyfsError
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.replicas import CopyFailed, catch_up, replicas_of

pytestmark = pytest.mark.core


def tree_of(tmp_path: Path, name: str = "src") -> Path:
    src = tmp_path / name
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    os.symlink("a.txt", src / "link")
    return src


def resource_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("resources/*/*/*"))


def same_bags(a: Path, b: Path) -> None:
    """Every instance bag of every resource is byte-for-byte the same in both archives."""
    da, db = resource_dirs(a), resource_dirs(b)
    assert [d.relative_to(a) for d in da] == [d.relative_to(b) for d in db]
    for x, y in zip(da, db, strict=True):
        files = sorted(str(p.relative_to(x)) for p in x.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(y)) for p in y.rglob("*") if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(x, y, files, shallow=False)
        assert not mismatch and not errors


@pytest.fixture
def pair(tmp_path, tinyfs):
    """An archive `a` with one replica `b` (added while empty)."""
    a, b = tmp_path / "a", tmp_path / "b"
    tinyfs("init", a)
    tinyfs("store", "add", a, b)
    return a, b


def test_a_commit_returns_with_its_instance_on_every_store(pair, tmp_path, tinyfs, archive_ok):
    a, b = pair
    src = tree_of(tmp_path)
    iid = tinyfs("ingest", a, "doc", src).stdout.strip()
    (src / "a.txt").write_bytes(b"changed\n")
    iid2 = tinyfs("ingest", a, "doc", src).stdout.strip()
    assert ArchiveRoot(b).instance_ids("doc") == [iid, iid2]
    same_bags(a, b)
    archive_ok(b)                                  # a complete archive of its own, bags valid
    assert json.loads((b / "tinyfs.json").read_text())["mode"] == "preservation"
    copied = [json.loads(x) for x in (b / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["instance"]) for e in copied if e["event"] == "instance.copied"] == \
        [("instance.copied", iid), ("instance.copied", iid2)]
    assert tinyfs("cat", b, "doc", "src/sub/b.bin", text=False).stdout == (src / "sub" / "b.bin").read_bytes()
    r = tinyfs("status", a)
    assert r.returncode == 0 and r.stdout.count("up to date") == 2


def test_store_add_refuses_what_cannot_be_a_replica(tmp_path, tinyfs):
    a = tmp_path / "a"
    tinyfs("init", a)
    tinyfs("ingest", a, "doc", tree_of(tmp_path))
    other = tmp_path / "other"
    tinyfs("init", other)
    tinyfs("ingest", other, "doc", tree_of(tmp_path, "src2"))           # another history of "doc"
    worm = tmp_path / "worm"
    tinyfs("init", worm, "--mode", "worm")
    notarchive = tmp_path / "photos"
    notarchive.mkdir()
    (notarchive / "x.jpg").write_bytes(b"x")
    for target, why in ((other, "does not have"), (worm, "worm"), (a / "resources", "outside"),
                        (notarchive, "not empty")):
        r = tinyfs("store", "add", a, target, check=False)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and why in r.stderr, r.stderr
    assert not (a / "replicas.json").exists()
    assert ArchiveRoot(other).resource_ids() == ["doc"] and (notarchive / "x.jpg").read_bytes() == b"x"
    dyn = tmp_path / "dyn"
    tinyfs("init", dyn, "--mode", "dynamic")
    r = tinyfs("store", "add", dyn, tmp_path / "dyn2", check=False)
    assert r.returncode == 2 and "dynamic" in r.stderr and not (tmp_path / "dyn2").exists()


def test_a_replica_behind_is_shown_by_status_and_caught_up_by_replicate(tmp_path, tinyfs, archive_ok):
    a, b = tmp_path / "a", tmp_path / "b"
    tinyfs("init", a)
    src = tree_of(tmp_path)
    tinyfs("ingest", a, "one", src)
    tinyfs("ingest", a, "two", src)
    tinyfs("store", "add", a, b)                  # an empty replica added to an archive with content
    r = tinyfs("status", a, "--json", check=False)
    assert r.returncode == 1
    rows = {row["name"]: row for row in json.loads(r.stdout)["stores"]}
    assert rows["r1"]["behind"] == 2 and rows["r1"]["behind_resources"] == 2 and rows["r1"]["reachable"]
    assert rows["primary"]["instances"] == 2 and rows["r1"]["instances"] == 0
    out = tinyfs("replicate", a).stdout
    assert "r1\t2 instances copied" in out
    assert tinyfs("replicate", a).stdout.startswith("r1\t0 instances copied")     # nothing twice
    same_bags(a, b)
    archive_ok(b)
    assert tinyfs("status", a).returncode == 0


def test_an_unreachable_replica_refuses_the_commit_unless_copies_allow_it(pair, tmp_path, tinyfs):
    a, b = pair
    src = tree_of(tmp_path)
    first = tinyfs("ingest", a, "doc", src).stdout.strip()
    (src / "a.txt").write_bytes(b"second\n")
    b.rename(tmp_path / "b-away")                 # the replica's disk is gone
    r = tinyfs("ingest", a, "doc", src, check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "r1" in r.stderr and "nothing was committed" in r.stderr
    assert ArchiveRoot(a).instance_ids("doc") == [first]
    r = tinyfs("ingest", a, "doc", src, "--copies", "1")
    second = r.stdout.strip()
    assert "r1" in r.stderr and "behind" in r.stderr
    assert ArchiveRoot(a).instance_ids("doc") == [first, second]
    st = json.loads(tinyfs("status", a, "--json", check=False).stdout)["stores"]
    assert st[1]["reachable"] is False and str(b) in st[1]["error"]
    (tmp_path / "b-away").rename(b)
    assert tinyfs("status", a, check=False).returncode == 1          # reachable again, one behind
    tinyfs("replicate", a)
    assert ArchiveRoot(b).instance_ids("doc") == [first, second]
    r = tinyfs("ingest", a, "doc", src, "--copies", "3", check=False)
    assert r.returncode == 2 and "2 store" in r.stderr


def test_a_replica_failing_during_the_copy_leaves_the_commit_made_and_says_so(pair, tmp_path, tinyfs):
    a, b = pair
    src = tree_of(tmp_path)
    shutil.rmtree(b / "transactions")
    (b / "transactions").write_text("not a directory")          # answers, but cannot take a copy
    r = tinyfs("ingest", a, "doc", src, check=False)
    assert r.returncode == 2 and "fewer stores than required" in r.stderr and "r1" in r.stderr
    iid = r.stdout.strip()
    assert ArchiveRoot(a).instance_ids("doc") == [iid]              # committed on the primary
    behind = [json.loads(x) for x in (a / "events.jsonl").read_text().splitlines()]
    assert [e["detail"]["store"] for e in behind if e["event"] == "replica.behind"] == ["r1"]
    (b / "transactions").unlink()
    (b / "transactions" / ".locks").mkdir(parents=True)
    tinyfs("replicate", a)
    same_bags(a, b)


def test_copies_setting_and_the_api(tmp_path, tinyfs):
    a = tmp_path / "a"
    tinyfs("init", a)
    tinyfs("store", "add", a, tmp_path / "b")
    tinyfs("store", "add", a, tmp_path / "c", "--name", "offsite", "--copies", "2")
    assert tinyfs("store", "list", a).stdout.splitlines()[1:] == [f"r1\t{tmp_path / 'b'}",
                                                                  f"offsite\t{tmp_path / 'c'}"]
    (tmp_path / "c").rename(tmp_path / "c-away")
    src = tree_of(tmp_path)
    with Archive(a).new("doc") as t:              # 2 of 3 stores required: b suffices
        t.add(src / "a.txt", "a.txt")
    assert t.result.behind == ["offsite"] and not t.result.short
    assert ArchiveRoot(tmp_path / "b").instance_ids("doc") == [t.result.instance]
    (tmp_path / "b").rename(tmp_path / "b-away")
    with pytest.raises(TinyfsError, match="needs 2 store"):
        with Archive(a).new("doc2") as t:
            t.add(src / "a.txt", "a.txt")
    assert not ArchiveRoot(a).exists("doc2")
    with Archive(a, copies=1).new("doc2") as t:
        t.add(src / "a.txt", "a.txt")
    assert t.result.behind == ["offsite", "r1"]
    r = tinyfs("store", "add", a, tmp_path / "d", "--copies", "9", check=False)
    assert r.returncode == 2 and "--copies 9" in r.stderr and not (tmp_path / "d").exists()
    assert len(replicas_of(ArchiveRoot(a)).replicas) == 2


def test_a_copy_takes_each_file_from_a_store_whose_bytes_match(tmp_path, tinyfs):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    tinyfs("init", a)
    tinyfs("store", "add", a, b)
    src = tree_of(tmp_path)
    iid = tinyfs("ingest", a, "doc", src).stdout.strip()
    stored = next(a.glob(f"resources/*/*/doc/instances/{iid}/data/src/sub/b.bin"))
    stored.chmod(0o644)
    with open(stored, "r+b") as f:                # a flipped byte in the primary
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    primary, replica = ArchiveRoot(a), ArchiveRoot(b)
    tinyfs("init", c)
    third = ArchiveRoot(c)
    with pytest.raises(CopyFailed, match="sub/b.bin"):   # the only source is damaged: nothing published
        catch_up([primary], third, "doc")
    assert third.instance_ids("doc") == [] and not list((c / "transactions").glob(".commit-*"))
    assert catch_up([primary, replica], third, "doc") == 1           # the good bytes come from b
    assert (next(c.glob("resources/*/*/doc/instances/*/data/src/sub/b.bin")).read_bytes() ==
            (src / "sub" / "b.bin").read_bytes())


def test_a_replica_in_a_bucket(tmp_path, tinyfs, s3_env, bucket, archive_ok):
    a = tmp_path / "a"
    tinyfs("init", a, "--digest", "sha256")
    src = tree_of(tmp_path)
    tinyfs("ingest", a, "doc", src)
    tinyfs("ingest", a, "other", src)
    url = f"s3://{bucket}/copy"
    tinyfs("store", "add", a, url, "--endpoint", s3_env.endpoint, "--name", "cloud")
    assert json.loads((a / "replicas.json").read_text())["replicas"][0]["url"] == url
    assert "secret" not in (a / "replicas.json").read_text().lower()
    (src / "new.txt").write_bytes(b"new\n")
    iid2 = tinyfs("ingest", a, "doc", src).stdout.strip()      # doc's two instances copied with the commit
    r = tinyfs("status", a, check=False)
    assert r.returncode == 1 and "behind by 1" in r.stdout      # "other" predates the store
    assert "1 instance copied" in tinyfs("replicate", a).stdout
    other = tmp_path / "other-host"                             # the bucket read from elsewhere
    tinyfs("init", other, "--store", url, "--endpoint", s3_env.endpoint)
    assert ArchiveRoot(other).instance_ids("doc") == ArchiveRoot(a).instance_ids("doc")
    assert ArchiveRoot(other).head("doc") == iid2
    for path in ("a.txt", "sub/b.bin", "new.txt"):
        assert tinyfs("cat", other, "doc", f"src/{path}", text=False).stdout == (src / path).read_bytes()
    assert tinyfs("fsck", other).returncode == 0
    assert tinyfs("status", a).returncode == 0


def test_an_archive_in_a_bucket_with_a_local_replica(tmp_path, tinyfs, s3_env, bucket, archive_ok):
    a, b = tmp_path / "host", tmp_path / "local-copy"
    tinyfs("init", a, "--store", f"s3://{bucket}/main", "--endpoint", s3_env.endpoint)
    tinyfs("store", "add", a, b)
    src = tree_of(tmp_path)
    iid = tinyfs("ingest", a, "doc", src).stdout.strip()
    assert ArchiveRoot(b).instance_ids("doc") == [iid]
    archive_ok(b)
    assert tinyfs("cat", b, "doc", "src/sub/b.bin", text=False).stdout == (src / "sub" / "b.bin").read_bytes()
    assert tinyfs("status", a).returncode == 0


def test_an_instance_storing_no_new_bytes_is_a_whole_bag_in_every_store(tmp_path, tinyfs, s3_env, bucket,
                                                                       archive_ok):
    """A commit whose bytes are all stored already has an empty data/: its copies must have one too."""
    a = tmp_path / "a"
    tinyfs("init", a)
    tinyfs("store", "add", a, tmp_path / "b")
    tinyfs("store", "add", a, f"s3://{bucket}/copy", "--endpoint", s3_env.endpoint, "--name", "cloud")
    (tmp_path / "o.txt").write_bytes(b"same\n")
    (tmp_path / "t.txt").write_bytes(b"same\n")
    tinyfs("ingest", a, "r", tmp_path / "o.txt")
    tinyfs("ingest", a, "r", tmp_path / "t.txt")        # deduplicated: nothing new to store
    archive_ok(tmp_path / "b")
    r = tinyfs("fsck", a, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_replica_is_named_as_full_not_the_source_as_damaged(tmp_path, tinyfs):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        a = tmp_path / "a"
        tinyfs("init", a)
        tinyfs("store", "add", a, small / "replica")
        (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
        r = tinyfs("ingest", a, "doc", tmp_path / "big.bin", check=False)
        assert r.returncode == 2 and "No space left on device" in r.stderr and "no good copy" not in r.stderr
        assert str(small / "replica") in r.stderr
        assert ArchiveRoot(small / "replica").instance_ids("doc") == []          # whole instances only
        assert not list((small / "replica" / "transactions").glob(".commit-*"))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
