"""tinyfs.core.s3store against a real SeaweedFS (tests/seaweed.py): layout, claims, WORM, the cache."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import botocore.exceptions as bx
import pytest
from stagedbag import make_bag

from tinyfs.core.errors import NoObjectLock, NotAnArchive, NotFound, ObjectExists, Stale
from tinyfs.core.ids import new_instance_id
from tinyfs.core.objects import ObjectStore
from tinyfs.core.s3store import (
    HEAD_FRESH,
    UPLOAD_THREADS,
    ConfigMismatch,
    NotEmpty,
    S3Store,
    init_store,
    open_store,
)

pytestmark = pytest.mark.core

PREFIX = "archive/one"


def objects(seaweed, bucket: str, prefix: str = PREFIX) -> ObjectStore:
    return ObjectStore(bucket, prefix=prefix, endpoint=seaweed.endpoint)


def host(seaweed, bucket: str, cache: Path, **kw) -> S3Store:
    """One "host": its own client and its own cache directory, attached to the archive in `bucket`."""
    return init_store(objects(seaweed, bucket), cache, **kw)


def publish(store: S3Store, tmp: Path, rid: str, files: dict[str, bytes]) -> str:
    previous = store.head(rid)
    iid = new_instance_id(after=previous)
    bag = make_bag(tmp, rid, iid, previous, files)
    store.publish(rid, iid, previous, bag, resource_json=b'{"id": "%s"}\n' % rid.encode())
    return iid


def keys(seaweed, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in seaweed.raw().list_objects_v2(Bucket=bucket).get("Contents", []))


def requests_sent(store: S3Store) -> list[str]:
    sent: list[str] = []
    store.objects.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    return sent


# -- init / attach / refuse ----------------------------------------------------------------------


def test_init_writes_the_marker_a_second_init_attaches_anything_else_is_refused(s3_env, bucket, tmp_path):
    first = host(s3_env, bucket, tmp_path / "a", mode="preservation", digests=["sha512", "md5"])
    marker = json.loads(s3_env.raw().get_object(Bucket=bucket, Key=f"{PREFIX}/tinyfs.json")["Body"].read())
    assert marker["format"] == "tinyfs/1" and marker["mode"] == "preservation"
    assert marker["digests"] == ["sha512", "md5"] and marker["retention_days"] == 0

    second = host(s3_env, bucket, tmp_path / "b")          # a second host joins: no mode given
    assert second.config == first.config
    assert open_store(objects(s3_env, bucket), tmp_path / "c").config == first.config
    with pytest.raises(ConfigMismatch) as e:
        host(s3_env, bucket, tmp_path / "d", mode="dynamic")
    assert e.value.errno == errno.EEXIST and "\n" not in str(e.value)

    s3_env.raw().put_object(Bucket=bucket, Key="other/photo.jpg", Body=b"not an archive")
    with pytest.raises(NotEmpty) as e:
        init_store(objects(s3_env, bucket, "other"), tmp_path / "e")
    assert "\n" not in str(e.value) and s3_env.secret_key not in str(e.value)
    assert keys(s3_env, bucket) == [f"{PREFIX}/tinyfs.json", "other/photo.jpg"]  # nothing written
    with pytest.raises(NotAnArchive):
        open_store(objects(s3_env, bucket, "nothing-here"), tmp_path / "f")


def test_worm_init_refuses_a_bucket_without_object_lock_and_writes_nothing(s3_env, bucket, tmp_path):
    with pytest.raises(NoObjectLock) as e:
        host(s3_env, bucket, tmp_path / "a", mode="worm", retention_days=1)
    assert e.value.errno == errno.EOPNOTSUPP
    assert keys(s3_env, bucket) == []


# -- publish, head, two hosts ----------------------------------------------------------------------


def test_publish_then_head_instance_ids_and_the_bytes_read_back(s3_env, bucket, tmp_path):
    store = host(s3_env, bucket, tmp_path / "cache")
    assert store.head("r1") is None and store.resource_ids() == []
    one = publish(store, tmp_path, "r1", {"a.txt": b"alpha", "sub/b.bin": os.urandom(5000)})
    two = publish(store, tmp_path, "r1", {"c.txt": b"gamma"})
    publish(store, tmp_path, "r2", {"x": b""})
    assert store.head("r1") == two and store.instance_ids("r1") == [one, two]
    assert store.resource_ids() == ["r1", "r2"]
    assert store.stored_file("r1", f"instances/{one}/data/a.txt").read_bytes() == b"alpha"
    assert store.stored_file("r2", f"instances/{store.head('r2')}/data/x").read_bytes() == b""
    doc = json.loads(store.read_document("r1", f"instances/{two}/instance.json"))
    assert doc["previous"] == one
    assert store.read_document("r1", "resource.json") == b'{"id": "r1"}\n'
    bag_keys = [k for k in keys(s3_env, bucket) if f"/instances/{one}/" in k]
    assert sorted(k.split(f"{one}/")[1] for k in bag_keys) == [
        "bagit.txt", "data/a.txt", "data/sub/b.bin", "instance.json", "manifest-sha256.txt"]
    with pytest.raises(NotFound):
        store.stored_file("r1", f"instances/{one}/data/missing")


def test_a_publish_on_one_host_is_seen_by_the_others_next_head_query(s3_env, bucket, tmp_path):
    a = host(s3_env, bucket, tmp_path / "host-a")
    b = host(s3_env, bucket, tmp_path / "host-b")
    first = publish(a, tmp_path, "shared", {"f": b"1"})
    assert b.head("shared") == first
    sent = requests_sent(b)
    assert b.head("shared") == first and sent == [], "a head confirmed within HEAD_FRESH is not asked again"
    time.sleep(HEAD_FRESH)
    assert b.head("shared") == first
    assert sent == ["GET"], "a head query with nothing new costs one request"
    second = publish(a, tmp_path, "shared", {"g": b"2"})
    assert b.head("shared") == first            # seen up to HEAD_FRESH later
    time.sleep(HEAD_FRESH)
    assert b.head("shared") == second and b.instance_ids("shared") == [first, second]
    assert b.stored_file("shared", f"instances/{second}/data/g").read_bytes() == b"2"
    # what B learnt survives its restart: a new S3Store on the same cache asks for what is new only
    again = open_store(objects(s3_env, bucket), tmp_path / "host-b")
    sent = requests_sent(again)
    assert again.head("shared") == second and len(sent) == 1


def test_racing_publishers_on_one_head_one_wins_the_chain_stays_linear_nothing_lost(s3_env, bucket, tmp_path):
    hosts = [host(s3_env, bucket, tmp_path / f"host-{i}") for i in range(4)]
    base = publish(hosts[0], tmp_path, "hot", {"base": b"base"})
    gate = threading.Barrier(len(hosts))
    outcome: dict[int, object] = {}

    def race(i: int) -> None:
        iid = new_instance_id(after=base)
        bag = make_bag(tmp_path / f"race-{i}", "hot", iid, base, {f"from-{i}": f"host {i}".encode()})
        gate.wait()
        try:
            hosts[i].publish("hot", iid, base, bag)
            outcome[i] = iid
        except Exception as e:  # the assertions below say which
            outcome[i] = e

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if isinstance(o, str)]
    assert len(winners) == 1, outcome
    losers = [i for i in outcome if i not in winners]
    assert all(isinstance(outcome[i], Stale) and outcome[i].errno == errno.ESTALE for i in losers), outcome
    assert hosts[1].instance_ids("hot") == [base, outcome[winners[0]]]
    leftovers = {k.split("/instances/")[1].split("/")[0] for k in keys(s3_env, bucket) if "/instances/" in k}
    assert leftovers == {base, outcome[winners[0]]}, "a loser removes what it uploaded"

    for i in losers:  # each loser rebases onto the new head, as a commit does: nothing is lost
        for attempt in range(3):     # (a head this host confirmed within HEAD_FRESH may be behind: Stale)
            try:
                publish(hosts[i], tmp_path / f"rebase-{i}-{attempt}", "hot", {f"from-{i}": f"host {i}".encode()})
                break
            except Stale:
                assert attempt < 2
    chain = hosts[0].instance_ids("hot")
    assert len(chain) == 5 and chain == sorted(chain)
    for previous, iid in zip(chain, chain[1:], strict=False):
        assert json.loads(hosts[0].read_document("hot", f"instances/{iid}/instance.json"))["previous"] == previous
    names = {k.rsplit("/", 1)[1] for k in keys(s3_env, bucket) if "/data/from-" in k}
    assert names == {f"from-{i}" for i in range(4)}


def test_a_claim_whose_answer_was_lost_is_still_ours(s3_env, bucket, tmp_path):
    store = host(s3_env, bucket, tmp_path / "cache")
    iid = publish(store, tmp_path, "r", {"a": b"a"})
    # boto3 resends a PUT whose answer was lost; the resend finds the claim taken (412): by us
    store._claim("r", store._known_chain("r")[0])
    assert store.head("r") == iid and store.stored_file("r", f"instances/{iid}/data/a").read_bytes() == b"a"


def test_an_upload_whose_answer_was_lost_is_still_ours(s3_env, bucket, tmp_path, caplog):
    """boto3 resends a PUT whose answer was lost; the resend finds the key taken (412) by the first
    send. Under a new instance id that is this publish's own object: the publish goes on. Sending the
    whole bag a second time is what every resend would meet."""
    store = host(s3_env, bucket, tmp_path / "cache")
    iid = new_instance_id()
    bag = make_bag(tmp_path, "r", iid, None, {"a.txt": b"alpha", "sub/b.bin": os.urandom(5000)})
    first = store._upload_bag("r", iid, bag)
    with caplog.at_level(logging.INFO, logger="tinyfs.core.s3store"):
        assert store._upload_bag("r", iid, bag) == first
    assert "already holds these bytes" in caplog.text
    store.publish("r", iid, None, bag)
    assert store.stored_file("r", f"instances/{iid}/data/a.txt").read_bytes() == b"alpha"
    (bag / "data" / "a.txt").write_bytes(b"other")       # not what is stored: not ours, refused
    with pytest.raises(ObjectExists):
        store._upload_bag("r", iid, bag)


# -- crashes -------------------------------------------------------------------------------------------


KILLED_PUBLISHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tinyfs.core.objects import ObjectStore
    from tinyfs.core.s3store import open_store
    endpoint, bucket, prefix, cache, rid, iid, bag = sys.argv[1:]
    store = open_store(ObjectStore(bucket, prefix=prefix, endpoint=endpoint), cache)
    store.publish(rid, iid, store.head(rid), Path(bag))
""")


def test_a_failed_upload_stops_the_publish_without_uploading_the_rest(s3_env, bucket, tmp_path):
    """A publish fails after the uploads in flight when one fails, not after trying every file (a store
    that fails every write may take 90 s a request: SeaweedFS unable to place a replica, design.md): the
    first payload file failing leaves the rest of the bag unsent, and nothing is claimed."""
    store = host(s3_env, bucket, tmp_path / "cache")
    iid = new_instance_id()
    bag = make_bag(tmp_path, "r", iid, None, {f"f{i:03d}": b"x" for i in range(200)})
    (bag / "data" / "000-unreadable").symlink_to(tmp_path / "nowhere")   # sorts first: fails at once
    with pytest.raises(FileNotFoundError):
        store.publish("r", iid, None, bag)
    sent = [k for k in keys(s3_env, bucket) if f"/instances/{iid}/" in k]
    assert len(sent) < UPLOAD_THREADS, f"{len(sent)} of 200 objects uploaded after the first failure"
    assert store.head("r") is None


def settled_keys(s3_env, bucket: str, part: str) -> list[str]:
    """The keys holding `part`, once two listings 0.5 s apart agree."""
    before = None
    while (now := [k for k in keys(s3_env, bucket) if part in k]) != before:
        before = now
        time.sleep(0.5)
    return now


def test_a_publish_killed_before_its_claim_stays_invisible_and_recover_removes_it(s3_env, bucket, tmp_path):
    store = host(s3_env, bucket, tmp_path / "cache")
    head = publish(store, tmp_path, "r", {"kept": b"kept"})
    iid = new_instance_id(after=head)
    bag = make_bag(tmp_path / "big", "r", iid, head, {f"f{i:04d}": b"x" * 100 for i in range(400)})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, s3_env.endpoint, bucket, PREFIX,
                             str(tmp_path / "killed-cache"), "r", iid, str(bag)])
    try:
        deadline = time.monotonic() + 60
        while not any(f"/{iid}/data/" in k for k in keys(s3_env, bucket)):
            assert proc.poll() is None and time.monotonic() < deadline, "the publisher never uploaded"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    uploaded = settled_keys(s3_env, bucket, f"/{iid}/")   # PUTs the store had taken may land after the kill
    assert uploaded and not any(k.endswith("instance.json") for k in uploaded), "killed mid-upload"

    other = host(s3_env, bucket, tmp_path / "other-host")
    for s in (store, other):
        assert s.head("r") == head and s.instance_ids("r") == [head]
        with pytest.raises(NotFound):
            s.stored_file("r", f"instances/{iid}/data/f0000")
    assert store.recover() == [], "a young unclaimed instance may be a live publish: left alone"
    assert store.recover(older_than=0) == [f"removed unpublished instance r/{iid} ({len(uploaded)} object version(s))"]
    assert not [k for k in keys(s3_env, bucket) if f"/{iid}/" in k]
    assert store.stored_file("r", f"instances/{head}/data/kept").read_bytes() == b"kept"


def test_recover_removes_the_resource_json_of_a_first_publish_that_never_claimed(s3_env, bucket, tmp_path):
    store = host(s3_env, bucket, tmp_path / "cache")
    iid = new_instance_id()
    store._upload_bag("new", iid, make_bag(tmp_path, "new", iid, None, {"a": b"a"}))
    store._upload_resource_json("new", b"{}\n")  # the steps of publish, up to the claim
    assert store.resource_ids() == [] and store.head("new") is None
    assert sorted(store.recover(older_than=0)) == [
        "removed resource.json of unpublished resource new (1 object version(s))",
        f"removed unpublished instance new/{iid} (4 object version(s))"]
    assert keys(s3_env, bucket) == [f"{PREFIX}/tinyfs.json"]


# -- WORM ------------------------------------------------------------------------------------------------


def test_worm_every_object_is_retained_and_the_store_refuses_deletes(s3_env, locked_bucket, tmp_path):
    store = host(s3_env, locked_bucket, tmp_path / "cache", mode="worm", retention_days=1)
    one = publish(store, tmp_path, "w", {"a.txt": b"preserved", "b.txt": b"also"})
    raw = s3_env.raw()
    versions = raw.list_object_versions(Bucket=locked_bucket, Prefix=f"{PREFIX}/")["Versions"]
    assert len(versions) == 8  # marker, resource.json, claim, bagit, manifest, instance.json, 2 payload
    for v in versions:
        lock = raw.head_object(Bucket=locked_bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert lock["ObjectLockMode"] == "COMPLIANCE", v["Key"]
        assert lock["ObjectLockRetainUntilDate"].timestamp() > time.time() + 23 * 3600
        with pytest.raises(bx.ClientError) as e:  # tinyfs bypassed: the store itself refuses
            raw.delete_object(Bucket=locked_bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert e.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(Exception) as e:
        store.purge("w")
    assert e.value.errno == errno.EPERM
    assert store.stored_file("w", f"instances/{one}/data/a.txt").read_bytes() == b"preserved"


def test_worm_overwriting_objects_by_name_does_not_change_what_readers_see(s3_env, locked_bucket, tmp_path):
    writer = host(s3_env, locked_bucket, tmp_path / "writer", mode="worm", retention_days=1)
    one = publish(writer, tmp_path, "w", {"a.txt": b"preserved"})
    before = writer.read_document("w", f"instances/{one}/instance.json")
    raw, base = s3_env.raw(), f"{PREFIX}/resources/w"
    # ordinary PUTs and DELETEs by name: each adds a version or a delete marker, nothing is refused
    forged = new_instance_id(after=one)
    raw.put_object(Bucket=locked_bucket, Key=f"{base}/instances/{one}/instance.json", Body=b'{"forged": 1}')
    raw.put_object(Bucket=locked_bucket, Key=f"{base}/instances/{one}/data/a.txt", Body=b"altered")
    raw.put_object(Bucket=locked_bucket, Key=f"{base}/chain/_first",
                   Body=json.dumps({"previous": None, "instance": forged, "versions": {}}).encode())
    raw.delete_object(Bucket=locked_bucket, Key=f"{PREFIX}/tinyfs.json")

    reader = open_store(objects(s3_env, locked_bucket), tmp_path / "reader")  # a new host, cold cache
    assert reader.config.mode == "worm"
    assert reader.head("w") == one and reader.resource_ids() == ["w"]
    assert reader.read_document("w", f"instances/{one}/instance.json") == before
    assert reader.stored_file("w", f"instances/{one}/data/a.txt").read_bytes() == b"preserved"


def test_worm_recover_lists_an_unclaimed_instance_as_orphaned_and_keeps_it(s3_env, locked_bucket, tmp_path):
    store = host(s3_env, locked_bucket, tmp_path / "cache", mode="worm", retention_days=1)
    head = publish(store, tmp_path, "w", {"a": b"a"})
    iid = new_instance_id(after=head)
    store._upload_bag("w", iid, make_bag(tmp_path / "lost", "w", iid, head, {"b": b"b"}))
    assert store.recover(older_than=0) == [
        f"orphaned unpublished instance w/{iid}: 4 object(s) kept by the store's retention, never shown"]
    assert store.instance_ids("w") == [head]


# -- the cache -------------------------------------------------------------------------------------------


def test_the_read_cache_stays_within_its_bound_and_forget_drops_a_bad_copy(s3_env, bucket, tmp_path):
    writer = host(s3_env, bucket, tmp_path / "writer")
    files = {f"f{i}": bytes([i]) * 1000 for i in range(10)}
    iid = publish(writer, tmp_path, "r", files)
    reader = open_store(objects(s3_env, bucket), tmp_path / "reader", cache_bytes=3500)
    cached = tmp_path / "reader" / "files"

    def on_disk() -> int:
        return sum(p.stat().st_size for p in cached.iterdir() if p.is_file())

    for _ in range(2):
        for name, data in files.items():
            assert reader.stored_file("r", f"instances/{iid}/data/{name}").read_bytes() == data
            assert on_disk() <= 3500 and reader.files.total == on_disk()
    assert on_disk() == 3000
    sent = requests_sent(reader)
    reader.stored_file("r", f"instances/{iid}/data/f9")
    assert sent == [], "a cached file costs no request"

    copy = reader.stored_file("r", f"instances/{iid}/data/f9")
    copy.write_bytes(b"bit rot")             # a caller's hash would fail: it drops the copy
    reader.forget("r", f"instances/{iid}/data/f9")
    assert reader.stored_file("r", f"instances/{iid}/data/f9").read_bytes() == files["f9"]
    restarted = open_store(objects(s3_env, bucket), tmp_path / "reader", cache_bytes=1500)
    assert restarted.files.total <= 1500 and on_disk() <= 1500


def test_a_big_file_is_published_in_parts_and_recover_aborts_an_upload_a_crash_left(s3_env, bucket, tmp_path):
    store = host(s3_env, bucket, tmp_path / "cache")
    store.objects.multipart_over, store.objects.part_bytes = 6 << 20, 5 << 20
    big = os.urandom(13 << 20)
    iid = publish(store, tmp_path, "r", {"big.bin": big, "small": b"s"})
    reader = host(s3_env, bucket, tmp_path / "reader")
    assert reader.stored_file("r", f"instances/{iid}/data/big.bin").read_bytes() == big
    # a publisher killed between its parts and their completion leaves an upload and no object
    key = f"resources/r/instances/{new_instance_id(after=iid)}/data/cut.bin"
    started = store.objects.client.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/{key}")["UploadId"]
    store.objects.client.upload_part(Bucket=bucket, Key=f"{PREFIX}/{key}", UploadId=started, PartNumber=1,
                                     Body=b"x" * (5 << 20))
    assert store.recover() == []                 # young: perhaps a publish still under way
    assert store.recover(older_than=0) == [f"aborted an unfinished upload of {key}"]
    assert store.objects.unfinished_uploads("") == []
    assert reader.instance_ids("r") == [iid]


def test_a_new_host_lists_resources_by_reading_first_claims_at_once_and_keeps_them(s3_env, bucket, tmp_path):
    """resource_ids on a host that knows no chain reads every first claim (CLAIM_READS at once) and learns
    them: the next listing is one request, whatever the number of resources. A resource whose first
    publish never claimed is not listed."""
    writer = host(s3_env, bucket, tmp_path / "w")
    rids = [f"r{i:02d}" for i in range(20)]
    for rid in rids:
        publish(writer, tmp_path, rid, {"f": rid.encode()})
    s3_env.raw().put_object(Bucket=bucket, Key=f"{PREFIX}/resources/zz/resource.json", Body=b'{"id": "zz"}\n')
    reader = host(s3_env, bucket, tmp_path / "r")
    sent: list[str] = []
    reader.objects.client.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].method))
    assert reader.resource_ids() == rids
    assert len(sent) == 1 + 21
    sent.clear()
    assert reader.resource_ids() == rids and len(sent) == 2, "the listing, and zz's claim again"
    assert reader.head("r07") == writer.head("r07")


def test_a_listing_asks_for_the_heads_at_once_and_the_stats_that_follow_reuse_them(s3_env, bucket, tmp_path):
    a = host(s3_env, bucket, tmp_path / "host-a")
    made = {f"r{n:02d}": publish(a, tmp_path / f"r{n}", f"r{n:02d}", {"f": b"%d" % n}) for n in range(20)}
    b = host(s3_env, bucket, tmp_path / "host-b")
    rids = b.resource_ids()
    assert b.heads(rids) == made
    sent = requests_sent(b)
    assert {rid: b.head(rid) for rid in rids} == made and sent == []      # as `ls -l resources/` stats each
    later = publish(a, tmp_path / "later", "r00", {"g": b"new"})
    time.sleep(HEAD_FRESH)
    assert b.head("r00") == later and sent                                # another host's commit: seen
