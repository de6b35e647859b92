"""The mount on an archive kept in an S3 store (real SeaweedFS): deposits with ordinary tools, read back
as deposited by this host and by another one with a cold cache, damaged stored bytes refused."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import mounted
from proxy import Proxy

from tinyfs.core.layout import ArchiveRoot

PREFIX = "arch/mount"
MIB = 1 << 20


def init(tinyfs, seaweed, root: Path, bucket: str):
    return tinyfs("init", root, "--store", f"s3://{bucket}/{PREFIX}", "--endpoint", seaweed.endpoint)


def source_tree(top: Path) -> Path:
    """What a user deposits: nested directories, a big file, an empty one, a symlink, a hard link, odd
    names, modes and mtimes that must survive."""
    (top / "deep" / "er").mkdir(parents=True)
    (top / "big.bin").write_bytes(os.urandom(5 * MIB + 17))
    (top / "empty").write_bytes(b"")
    (top / "deep" / "er" / "note 100%.txt").write_text("spaces and a percent\n")
    (top / "deep" / "ünïcødé.txt").write_text("names are bytes\n")
    (top / "deep" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(top / "deep" / "script.sh", 0o750)
    os.link(top / "deep" / "script.sh", top / "hardlink.sh")
    os.symlink("deep/er/note 100%.txt", top / "link")
    os.utime(top / "empty", ns=(1_500_000_000_123_456_789,) * 2)
    return top


def rsync_differences(src: Path, dest: Path) -> str:
    """What `rsync -anciHAX --delete` would change: nothing when dest shows src exactly."""
    r = subprocess.run(["rsync", "-anciHAX", "--delete", f"{src}/", f"{dest}/"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def deposit(mnt: Path, rid: str, src: Path) -> None:
    (mnt / "transactions" / rid).mkdir()
    subprocess.run(["cp", "-a", f"{src}/.", str(mnt / "transactions" / rid)], check=True)
    os.rename(mnt / "transactions" / rid, mnt / "commit" / rid)


@pytest.mark.mount
def test_a_deposit_through_the_mount_reads_back_exactly_here_and_on_another_host(tinyfs, s3_env, bucket,
                                                                                  tmp_path):
    src = source_tree(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, s3_env, a, bucket)
    init(tinyfs, s3_env, b, bucket)
    (tmp_path / "ma").mkdir()
    (tmp_path / "mb").mkdir()
    with mounted(a, tmp_path / "ma") as m:
        deposit(m.mnt, "book", src)
        assert rsync_differences(src, m.mnt / "resources" / "book") == ""
        (src / "deep" / "ünïcødé.txt").write_text("changed\n")        # a second instance: rsync re-deposit
        (src / "empty").unlink()
        (m.mnt / "transactions" / "book").mkdir()
        subprocess.run(["rsync", "-aHAX", "--delete", f"{src}/", str(m.mnt / "transactions" / "book")], check=True)
        m.commit("book")
        assert rsync_differences(src, m.mnt / "resources" / "book") == ""
        assert not m.tracebacks()
    iids = ArchiveRoot(b).instance_ids("book")
    assert len(iids) == 2
    stored = [o["Key"] for o in s3_env.raw().list_objects_v2(
        Bucket=bucket, Prefix=f"{PREFIX}/resources/book/instances/{iids[1]}/data/").get("Contents", [])]
    assert [k.rsplit("/data/", 1)[1] for k in stored] == ["deep/ünïcødé.txt"]    # only the new bytes
    with mounted(b, tmp_path / "mb") as m:                 # another host, nothing cached: from the store
        assert rsync_differences(src, m.mnt / "resources" / "book") == ""
        first = m.mnt / "instances" / "book" / iids[0]
        assert (first / "empty").exists() and (first / "deep" / "ünïcødé.txt").read_text() == "names are bytes\n"
        assert not m.tracebacks()
    tinyfs("fsck", b)


@pytest.mark.mount
def test_bytes_damaged_in_the_store_are_an_error_through_the_mount_never_data(tinyfs, s3_env, bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_bytes(b"good bytes\n" * 1000)
    (src / "victim.txt").write_bytes(b"precious bytes\n" * 1000)
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, s3_env, a, bucket)
    iid = tinyfs("ingest", a, "res", src / "good.txt", src / "victim.txt").stdout.strip()
    key = f"{PREFIX}/resources/res/instances/{iid}/data/victim.txt"
    raw = s3_env.raw()
    body = bytearray(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[5000] ^= 1
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    init(tinyfs, s3_env, b, bucket)
    with mounted(b, tmp_path) as m:
        view = m.mnt / "resources" / "res"
        assert (view / "good.txt").read_bytes() == (src / "good.txt").read_bytes()
        with pytest.raises(OSError) as e:
            (view / "victim.txt").read_bytes()
        assert e.value.errno == errno.EIO
        r = subprocess.run(["cp", str(view / "victim.txt"), str(tmp_path / "copy")], capture_output=True, text=True)
        assert r.returncode != 0 and "Input/output error" in r.stderr


@pytest.mark.mount
def test_worm_a_deposit_through_the_mount_is_locked_by_the_store_itself(tinyfs, s3_env, locked_bucket, tmp_path):
    import botocore.exceptions as bx

    src = source_tree(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    tinyfs("init", a, "--mode", "worm", "--retain", "2d", "--store", f"s3://{locked_bucket}/{PREFIX}",
           "--endpoint", s3_env.endpoint)
    (tmp_path / "ma").mkdir()
    with mounted(a, tmp_path / "ma") as m:
        deposit(m.mnt, "book", src)
    raw = s3_env.raw()
    versions = [v for page in raw.get_paginator("list_object_versions").paginate(Bucket=locked_bucket,
                                                                                Prefix=f"{PREFIX}/resources/")
                for v in page.get("Versions", [])]
    assert len(versions) >= 10
    for v in versions:          # tinyfs bypassed: plain deletes and overwrites of every stored object
        with pytest.raises(bx.ClientError) as e:
            raw.delete_object(Bucket=locked_bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert e.value.response["Error"]["Code"] == "AccessDenied", v["Key"]
        raw.put_object(Bucket=locked_bucket, Key=v["Key"], Body=b"overwritten")    # a new version, ignored
    init(tinyfs, s3_env, b, locked_bucket)          # another host with a cold cache
    with mounted(b, tmp_path) as m:
        assert rsync_differences(src, m.mnt / "resources" / "book") == ""
    tinyfs("fsck", b)


@pytest.mark.mount
def test_aip_shows_each_published_bag_whole_from_the_store_and_bagit_validates_it(tinyfs, s3_env, bucket, tmp_path):
    """aip/<rid> on an object store is made from the published objects (no directories there): every bag
    read through it, on a host with a cold cache, validates with bagit-python (sizes, every digest)."""
    import bagit

    src = source_tree(tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, s3_env, a, bucket)
    first = tinyfs("ingest", a, "book", src).stdout.strip()
    (src / "added.txt").write_text("a second instance\n")
    second = tinyfs("ingest", a, "book", src / "added.txt").stdout.strip()
    init(tinyfs, s3_env, b, bucket)
    with mounted(b, tmp_path) as m:
        aip = m.mnt / "aip" / "book"
        assert sorted(os.listdir(m.mnt / "aip")) == ["book"]
        assert sorted(os.listdir(aip)) == ["instances", "resource.json"]
        assert os.listdir(aip / "instances") == [first, second]
        assert b'"id": "book"' in (aip / "resource.json").read_bytes()
        for iid in (first, second):
            bag = aip / "instances" / iid
            assert {"bagit.txt", "bag-info.txt", "instance.json", "data"} <= set(os.listdir(bag))
            bagit.Bag(str(bag)).validate()          # Payload-Oxum (st_size of each file) and every manifest
        assert os.listdir(aip / "instances" / second / "data") == ["added.txt"]
        big = next((aip / "instances" / first / "data").rglob("big.bin"))
        assert (big.stat().st_size, big.stat().st_mode & 0o777) == ((src / "big.bin").stat().st_size, 0o444)
        assert big.read_bytes() == (src / "big.bin").read_bytes()
        for missing in ("nothing", f"instances/{first}/data/nothing", "instances/0190f5a0-0000-7000-8000-000000000000"):
            assert not (aip / missing).exists()
        assert not m.tracebacks()


@pytest.mark.mount
def test_a_store_that_stalls_holds_up_only_the_reads_that_need_it(tinyfs, s3_env, bucket, tmp_path):
    """The first read of a stored file downloads it, and a lookup asks the store for the head: both wait
    for a stalled store in a worker thread, and the mount serves everything else meanwhile."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(8 * MIB))
    writer, a = tmp_path / "writer", tmp_path / "a"
    init(tinyfs, s3_env, writer, bucket)
    tinyfs("ingest", writer, "book", src / "big.bin")
    proxy = Proxy(s3_env.endpoint)
    try:
        tinyfs("init", a, "--store", f"s3://{bucket}/{PREFIX}", "--endpoint", proxy.endpoint)
        with mounted(a, tmp_path) as m:
            assert (m.mnt / "resources" / "book").is_dir()
            read: dict = {}

            def reader():
                started = time.monotonic()
                read["bytes"] = (m.mnt / "resources" / "book" / "big.bin").read_bytes()
                read["seconds"] = time.monotonic() - started

            (m.mnt / "transactions" / "other").mkdir()
            proxy.flowing.clear()
            threading.Timer(6, proxy.flowing.set).start()          # the store answers again after 6 s
            t = threading.Thread(target=reader)
            t.start()
            time.sleep(0.5)                                         # the read is waiting for the store
            started = time.monotonic()        # a transaction open before: no request to the store
            (m.mnt / "transactions" / "other" / "note.txt").write_text("written meanwhile\n")
            assert os.listdir(m.mnt / "transactions") == ["other"]
            assert (m.mnt / "transactions" / "other" / "note.txt").read_text() == "written meanwhile\n"
            meanwhile = time.monotonic() - started
            t.join(60)
            assert read["bytes"] == (src / "big.bin").read_bytes()
            assert meanwhile < 2 and read["seconds"] > 4, (meanwhile, read["seconds"])
            assert not m.tracebacks()
    finally:
        proxy.close()
