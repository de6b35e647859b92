"""An archive whose store is an S3 bucket, through the CLI and the Python API, on a real SeaweedFS."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import bagit
import pytest

from tinyfs.core.api import Archive
from tinyfs.core.fixity import FixityError

pytestmark = pytest.mark.core

PREFIX = "arch/one"


def store_url(bucket: str) -> str:
    return f"s3://{bucket}/{PREFIX}"


def init(tinyfs, seaweed, root: Path, bucket: str, *extra, check: bool = True):
    return tinyfs("init", root, "--store", store_url(bucket), "--endpoint", seaweed.endpoint, *extra,
                  check=check)


def all_files(top: Path) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_file()] if top.exists() else []


# -- init / attach / refuse -----------------------------------------------------------------------


def test_init_writes_the_address_only_and_a_second_root_attaches(tinyfs, s3_env, bucket, tmp_path):
    init(tinyfs, s3_env, tmp_path / "a", bucket, "--digest", "sha256,md5")
    local = json.loads((tmp_path / "a" / "tinyfs.json").read_text())
    host = local.pop("host")                # names this host's events in the store
    assert local == {"format": "tinyfs/1", "store": store_url(bucket), "endpoint": s3_env.endpoint}
    init(tinyfs, s3_env, tmp_path / "b", bucket)
    assert len(host) == 12 and host != json.loads((tmp_path / "b" / "tinyfs.json").read_text())["host"]
    assert Archive(tmp_path / "b").root.config.digests == ("sha256", "md5")
    kinds = [json.loads(line)["event"] for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert kinds == ["archive.attached"]
    r = init(tinyfs, s3_env, tmp_path / "c", bucket, "--mode", "worm", "--retain", "1d", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_init_refuses_a_bucket_holding_something_else_and_an_unreachable_endpoint(tinyfs, s3_env, bucket,
                                                                                  tmp_path):
    s3_env.raw().put_object(Bucket=bucket, Key=f"{PREFIX}/photo.jpg", Body=b"not an archive")
    r = init(tinyfs, s3_env, tmp_path / "a", bucket, check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "photo.jpg" in r.stderr
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    r = tinyfs("init", tmp_path / "b", "--store", store_url(bucket), "--endpoint", "http://127.0.0.1:9",
               check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "127.0.0.1:9" in r.stderr
    assert list((tmp_path / "b").iterdir()) == []
    r = init(tinyfs, s3_env, tmp_path / "c", bucket, "--mode", "dynamic", check=False)
    assert r.returncode == 2 and "not supported" in r.stderr and not (tmp_path / "c").exists()


# -- the CLI and the API on a store ------------------------------------------------------------------


def test_ingest_ls_cat_export_fsck_and_a_second_root_sees_the_commit(tinyfs, s3_env, bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4000)
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, s3_env, a, bucket)
    iid = tinyfs("ingest", a, "res", src / "a.txt", src / "sub", "-m", "first").stdout.strip()
    assert tinyfs("ls", a).stdout.split() == ["res"]
    assert tinyfs("ls", a, "res").stdout.split("\t")[0] == iid
    assert tinyfs("cat", a, "res", "a.txt").stdout == "alpha\n"
    init(tinyfs, s3_env, b, bucket)
    assert tinyfs("ls", b, "res").stdout.split("\t")[0] == iid
    tinyfs("export", b, "res", tmp_path / "out")
    bagit.Bag(str(tmp_path / "out")).validate()
    assert (tmp_path / "out" / "data" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    r = tinyfs("fsck", b)
    assert r.stdout.strip().endswith("clean")
    assert {e["event"] for e in map(json.loads, tinyfs("events", b).stdout.splitlines())} >= {"fixity.checked"}
    keys = [o["Key"] for o in s3_env.raw().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"{PREFIX}/resources/res/instances/{iid}/data/sub/b.bin" in keys


def test_python_api_new_get_read_on_a_store(tinyfs, s3_env, bucket, tmp_path):
    init(tinyfs, s3_env, tmp_path / "a", bucket)
    archive = Archive(tmp_path / "a")
    with archive.new("doc") as t:
        t.add_bytes("x/readme.txt", b"hello")
    with archive.get("doc", "a") as t:
        t.add_bytes("y.txt", b"second")
    assert list(Archive(tmp_path / "a")) == ["doc"]
    res = archive.get("doc")
    assert res.read("x/readme.txt") == b"hello" and res.read("y.txt") == b"second"
    assert len(res.instances) == 2 and res.instances[1].previous == res.instances[0].id


def test_two_roots_committing_to_one_resource_at_once_give_one_linear_history(tinyfs, s3_env, bucket, tmp_path):
    init(tinyfs, s3_env, tmp_path / "a", bucket)
    init(tinyfs, s3_env, tmp_path / "b", bucket)
    hosts = [Archive(tmp_path / "a"), Archive(tmp_path / "b")]
    with hosts[0].new("shared") as t:
        t.add_bytes("start.txt", b"0")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for k in range(6):
                with hosts[n].get("shared", "a") as t:
                    t.add_bytes(f"host{n}/{k}.txt", f"{n}:{k}".encode())
        except BaseException as e:      # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    res = Archive(tmp_path / "a").get("shared")
    chain = res.instances
    assert len(chain) == 13
    assert all(doc.previous == prev.id for prev, doc in zip(chain, chain[1:], strict=False))
    files = res.state().files
    assert len(files) == 13
    for n in (0, 1):
        for k in range(6):
            assert res.read(f"host{n}/{k}.txt") == f"{n}:{k}".encode()


def test_a_byte_flipped_in_the_store_fails_cat_and_fsck_names_it(tinyfs, s3_env, bucket, tmp_path):
    src = tmp_path / "f.txt"
    src.write_bytes(b"precious bytes\n" * 100)
    a = tmp_path / "a"
    init(tinyfs, s3_env, a, bucket)
    iid = tinyfs("ingest", a, "res", src).stdout.strip()
    tinyfs("fsck", a)
    key = f"{PREFIX}/resources/res/instances/{iid}/data/f.txt"
    raw = s3_env.raw()
    body = bytearray(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[7] ^= 1
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    r = tinyfs("cat", a, "res", "f.txt", check=False)
    assert r.returncode == 1 and "f.txt" in r.stderr
    r = tinyfs("fsck", a, check=False)
    assert r.returncode == 1 and f"instances/{iid}/data/f.txt" in r.stdout
    with pytest.raises(FixityError):
        Archive(a).get("res").read("f.txt")


def test_credentials_never_reach_the_root(tinyfs, s3_env, bucket, tmp_path):
    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    a = tmp_path / "a"
    init(tinyfs, s3_env, a, bucket, "-v")
    outputs = [tinyfs("-v", "ingest", a, "res", src), tinyfs("-v", "cat", a, "res", "f.txt"),
               tinyfs("-v", "fsck", a), tinyfs("-v", "events", a)]
    r = tinyfs("-v", "ls", a, "nope", check=False)
    for out in [*outputs, r]:
        assert s3_env.secret_key not in out.stdout + out.stderr
        assert s3_env.access_key not in out.stdout + out.stderr
    for path in all_files(a):
        data = path.read_bytes()
        assert s3_env.secret_key.encode() not in data and s3_env.access_key.encode() not in data, path


def test_fsck_of_names_the_store_lists_in_its_own_order(tinyfs, s3_env, bucket, tmp_path):
    """'.' and '-' sort before '/': SeaweedFS lists skel/ before skel.other/, AWS the other way round."""
    src = tmp_path / "src"
    for rel in ("skel/dot.bashrc", "skel.other/index.html", "skel-x", "skel/z/y"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    a = tmp_path / "a"
    init(tinyfs, s3_env, a, bucket)
    tinyfs("ingest", a, "res", src)
    tinyfs("fsck", a)                   # exit 0: clean
    assert tinyfs("cat", a, "res", "src/skel.other/index.html").stdout == "skel.other/index.html"


def test_fsck_on_a_store_holds_one_resource_at_a_time_on_local_disk(tinyfs, s3_env, bucket, tmp_path):
    from tinyfs.core.fsck import fsck
    from tinyfs.core.layout import ArchiveRoot

    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}").write_text(str(i) * 100)
    a = tmp_path / "a"
    init(tinyfs, s3_env, a, bucket)
    for rid in ("one", "two", "three"):
        tinyfs("ingest", a, rid, src)
    key = f"{PREFIX}/resources/two/" + next(
        o["Key"].split("/resources/two/")[1] for o in s3_env.raw().list_objects_v2(
            Bucket=bucket, Prefix=f"{PREFIX}/resources/two/instances/")["Contents"] if o["Key"].endswith("/f7"))
    s3_env.raw().put_object(Bucket=bucket, Key=key, Body=b"not seven")
    on_disk = []

    def progress(what, total):
        on_disk.append(sorted(p.name for p in (a / "cache" / "mirror").iterdir()))
        return lambda n: None

    report = fsck(ArchiveRoot(a), progress=progress)
    assert on_disk == [["one"], ["three"], ["two"]]
    assert not (a / "cache" / "mirror").exists()
    assert report.resources == 3 and report.files == 120
    assert {f.resource for f in report.findings} == {"two"}
    assert [g.stored for g in report.stored] == [key.split("/resources/two/")[1]]
    assert tinyfs("fsck", a, "one", "three").returncode == 0
    r = tinyfs("fsck", a, "one", "nope", check=False)
    assert r.returncode == 2 and "nope" in r.stderr


def test_init_cache_bounds_this_hosts_read_cache(tinyfs, s3_env, bucket, tmp_path):
    r = init(tinyfs, s3_env, tmp_path / "bad", bucket, "--cache", "lots", check=False)
    assert r.returncode == 2 and "bad cache size" in r.stderr and not (tmp_path / "bad").exists()
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, s3_env, a, bucket)
    init(tinyfs, s3_env, b, bucket, "--cache", "3M")
    assert json.loads((b / "tinyfs.json").read_text())["cache_bytes"] == 3 << 20
    files = []
    for n in range(6):
        files.append(tmp_path / f"f{n}.bin")
        files[-1].write_bytes(os.urandom(1 << 20))
    tinyfs("ingest", a, "big", *files)
    for f in files:
        assert tinyfs("cat", b, "big", f.name, text=False).stdout == f.read_bytes()
    cached = sum(p.stat().st_size for p in (b / "cache" / "files").rglob("*") if p.is_file())
    assert 1 << 20 <= cached <= 3 << 20


def test_the_mounts_recovery_sends_no_request_to_the_store_and_tinyfs_recover_sweeps_it(tinyfs, s3_env, bucket,
                                                                                          tmp_path):
    """The mount starts with recover(store=False): the store's sweep costs requests in proportion to the
    archive (every resource's chain and instance listing), so a mount of a large archive would wait on it.
    An unpublished instance stays invisible until `tinyfs recover` removes it."""
    from tinyfs.core.ids import new_instance_id
    from tinyfs.core.recover import recover

    init(tinyfs, s3_env, tmp_path / "a", bucket)
    archive = Archive(tmp_path / "a")
    for rid in ("one", "two"):
        with archive.new(rid) as t:
            t.add_bytes("f.txt", rid.encode())
    root = archive.root
    orphan = f"resources/one/instances/{new_instance_id(after=root.head('one'))}/data/f.txt"  # no claim names it
    s3_env.raw().put_object(Bucket=bucket, Key=f"{PREFIX}/{orphan}", Body=b"never claimed")
    sent = []
    root.store.objects.client.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].url))

    def store_requests() -> list[str]:   # (the event shipper's thread shares the client: its requests aside)
        return [url for url in sent if "events" not in url]

    assert recover(root, store=False) == [] and store_requests() == []
    assert recover(root) == [], "a young leftover is left alone"
    assert len(store_requests()) >= 3, "after listing the resources and their instances"
    assert any("orphan" in line or "unpublished instance one/" in line for line in root.store.recover(older_than=0))
    assert list(root.store.objects.list(orphan)) == []
