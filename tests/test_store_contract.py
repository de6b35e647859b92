"""The Store contract (core/store.py), the same tests against both implementations: LocalStore on a
fresh archive directory, and S3Store on a real SeaweedFS (tests/seaweed.py), plain and WORM."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from stagedbag import make_bag

from tinyfs.core.errors import Forbidden, InvalidName, NotFound, Stale
from tinyfs.core.ids import new_instance_id
from tinyfs.core.layout import ArchiveRoot, init_archive
from tinyfs.core.localstore import LocalStore
from tinyfs.core.store import Store

pytestmark = pytest.mark.core

PREFIX = "contract"
HEAD = object()         # publish(): after the head, whatever it is now


@dataclass
class Kit:
    """One store under test, and what the tests need to know of where it lives."""

    store: Store
    stages: Path                                   # where staged resource directories are made
    interrupt: Callable[[str, str, Path], None]    # a publish of a bag, stopped just before its atomic step
    reopen: Callable[[], Store]                    # the same archive seen afresh (a restart, another host)
    leftovers: Callable[[str], list[str]]          # whatever of instance `iid` is in the store itself
    worm: bool = False


def _local(tmp_path: Path, mode: str) -> Kit:
    root = init_archive(tmp_path / "archive", mode=mode)
    store = ArchiveRoot(root).store
    assert isinstance(store, LocalStore) and store.local

    def interrupt(rid: str, iid: str, bag: Path) -> None:
        pass                            # before its rename, a bag is only in its stage under transactions/

    def leftovers(iid: str) -> list[str]:
        return [os.path.join(d, n) for d, dirs, files in os.walk(root / "resources") for n in dirs + files
                if iid in os.path.join(d, n)]

    return Kit(store, root / "transactions", interrupt, lambda: ArchiveRoot(root).store, leftovers,
               worm=mode == "worm")


def _s3(request, tmp_path: Path, mode: str) -> Kit:
    from tinyfs.core.objects import ObjectStore
    from tinyfs.core.s3store import init_store

    seaweed = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("locked_bucket" if mode == "worm" else "bucket")
    kw = {"mode": "worm", "retention_days": 1} if mode == "worm" else {}
    hosts = iter(range(1, 100))

    def host() -> Store:
        return init_store(ObjectStore(bucket, prefix=PREFIX, endpoint=seaweed.endpoint),
                          tmp_path / f"cache-{next(hosts)}", **kw)

    store = host()
    assert not store.local

    def interrupt(rid: str, iid: str, bag: Path) -> None:
        store._upload_bag(rid, iid, bag)        # publish's uploads, then killed before the claim

    def leftovers(iid: str) -> list[str]:
        listed = seaweed.raw().list_objects_v2(Bucket=bucket, Prefix=PREFIX).get("Contents", [])
        return [o["Key"] for o in listed if f"/{iid}/" in o["Key"]]

    stages = tmp_path / "stages"
    stages.mkdir()
    return Kit(store, stages, interrupt, host, leftovers, worm=mode == "worm")


@pytest.fixture(params=["local", "local-worm", "s3", "s3-worm"])
def kit(request, tmp_path) -> Kit:
    kind, _, mode = request.param.partition("-")
    mode = mode or "preservation"
    return _local(tmp_path, mode) if kind == "local" else _s3(request, tmp_path, mode)


def stage(kit: Kit, rid: str, iid: str, previous: str | None, files: dict[str, bytes]) -> tuple[Path, bytes | None]:
    """A staged resource directory as commit leaves it: instances/<iid>/ a complete bag (payload, manifest,
    bagit.txt, instance.json), and resource.json for a first instance. (the bag, resource.json's bytes)"""
    top = kit.stages / f".commit-{rid}-{iid}"
    bag = make_bag(top / "instances", rid, iid, previous, files)
    body = None
    if previous is None:
        body = json.dumps({"id": rid}).encode() + b"\n"
        (top / "resource.json").write_bytes(body)
    return bag, body


def publish(kit: Kit, rid: str, files: dict[str, bytes], previous=HEAD, iid: str | None = None) -> str:
    """A publish after `previous` (None: as the first instance; default: the head) of a new instance
    with `files`; its id."""
    if previous is HEAD:
        previous = kit.store.head(rid)
    iid = iid or new_instance_id(after=previous)
    bag, body = stage(kit, rid, iid, previous, files)
    kit.store.publish(rid, iid, previous, bag, resource_json=body)
    return iid


def test_a_published_instance_reads_back_whole_here_and_afresh(kit):
    one = publish(kit, "r1", {"a.txt": b"alpha", "sub/b.bin": os.urandom(5000)})
    two = publish(kit, "r1", {"c.txt": b"gamma"})
    other = publish(kit, "r2", {"x": b""})
    for store in (kit.store, kit.reopen()):
        assert store.resource_ids() == ["r1", "r2"]
        assert store.exists("r1") and store.exists("r2")
        assert store.head("r1") == two and store.instance_ids("r1") == [one, two]
        assert store.head("r2") == other and store.instance_ids("r2") == [other]
        assert json.loads(store.read_document("r1", "resource.json")) == {"id": "r1"}
        doc = json.loads(store.read_document("r1", f"instances/{two}/instance.json"))
        assert (doc["id"], doc["previous"]) == (two, one)
        assert store.stored_file("r1", f"instances/{one}/data/a.txt").read_bytes() == b"alpha"
        assert store.stored_file("r1", f"instances/{two}/data/c.txt").read_bytes() == b"gamma"
        assert store.stored_file("r2", f"instances/{other}/data/x").read_bytes() == b""
        assert store.published_files("r1", f"{one}") == [
            f"instances/{one}/{n}" for n in ("bagit.txt", "data/a.txt", "data/sub/b.bin", "instance.json",
                                              "manifest-sha256.txt")]


def test_a_second_publish_after_the_same_previous_is_stale_and_the_history_stays_linear(kit):
    first = publish(kit, "r", {"a": b"1"})
    with pytest.raises(Stale):          # a second first instance
        publish(kit, "r", {"b": b"2"}, previous=None, iid=new_instance_id(after=first))
    second = publish(kit, "r", {"c": b"3"}, previous=first)
    late = new_instance_id(after=second)
    with pytest.raises(Stale):          # a committer that read `first` as the head before `second` came
        publish(kit, "r", {"d": b"4"}, previous=first, iid=late)
    for store in (kit.store, kit.reopen()):
        assert store.instance_ids("r") == [first, second] and store.head("r") == second
        with pytest.raises(NotFound):
            store.stored_file("r", f"instances/{late}/data/d")


def test_a_first_publish_that_lost_is_stale(kit):
    winner = publish(kit, "r", {"a": b"1"})
    loser = new_instance_id(after=winner)
    bag, body = stage(kit, "r", loser, None, {"b": b"2"})
    with pytest.raises(Stale):
        kit.store.publish("r", loser, None, bag, resource_json=body)
    assert kit.reopen().instance_ids("r") == [winner]


def test_an_interrupted_publish_is_invisible_and_recover_leaves_the_published_alone(kit):
    head = publish(kit, "r", {"kept": b"kept"})
    iid = new_instance_id(after=head)
    bag, _ = stage(kit, "r", iid, head, {f"f{i}": b"x" * 100 for i in range(20)})
    kit.interrupt("r", iid, bag)
    fresh = new_instance_id()
    kit.interrupt("new", fresh, stage(kit, "new", fresh, None, {"n": b"n"})[0])
    for store in (kit.store, kit.reopen()):
        assert store.head("r") == head and store.instance_ids("r") == [head]
        assert store.resource_ids() == ["r"] and not store.exists("new") and store.head("new") is None
        with pytest.raises(NotFound):
            store.stored_file("r", f"instances/{iid}/data/f0")
        with pytest.raises(NotFound):
            store.read_document("r", f"instances/{iid}/instance.json")
        with pytest.raises(NotFound):
            store.published_files("r", iid)
    kit.store.recover(older_than=0)
    if not kit.worm:                    # (a WORM store keeps them, listed as orphaned: test_s3store)
        assert kit.leftovers(iid) == [] and kit.leftovers(fresh) == []
    assert kit.reopen().stored_file("r", f"instances/{head}/data/kept").read_bytes() == b"kept"
    after = publish(kit, "r", {"next": b"n"})
    assert kit.reopen().instance_ids("r") == [head, after]


def test_missing_things_are_not_found(kit):
    iid = publish(kit, "r", {"a": b"a"})
    store = kit.store
    assert store.head("nope") is None and store.instance_ids("nope") == [] and not store.exists("nope")
    assert not store.exists("bad/id")
    for rid, relpath in (("nope", "resource.json"), ("r", f"instances/{iid}/data/b"),
                         ("r", f"instances/{new_instance_id(after=iid)}/instance.json"), ("r", "other.json")):
        with pytest.raises(NotFound):
            store.read_document(rid, relpath)
        with pytest.raises(NotFound):
            store.stored_file(rid, relpath)
    with pytest.raises(NotFound):
        store.published_files("r", new_instance_id(after=iid))
    with pytest.raises(InvalidName):
        store.stored_file("r", f"instances/{iid}/../{iid}/data/a")


def test_ids_out_of_order_are_refused_and_purge_needs_dynamic_mode(kit):
    earlier = new_instance_id()
    iid = publish(kit, "r", {"a": b"a"})
    assert earlier < iid
    bag, _ = stage(kit, "r", earlier, iid, {"b": b"b"})
    with pytest.raises(InvalidName):
        kit.store.publish("r", earlier, iid, bag)
    with pytest.raises(Forbidden):
        kit.store.purge("r")
    assert kit.store.instance_ids("r") == [iid]


def test_restore_replaces_a_published_file(kit, tmp_path):
    """What `tinyfs repair` hands a store: verified bytes for a damaged or missing file. Under Object Lock
    (s3-worm) the version a claim pins cannot be replaced: reads keep getting it (docs/store.md)."""
    iid = publish(kit, "r", {"a.txt": b"alpha", "b.txt": b"beta"})
    rel = f"instances/{iid}/data/a.txt"
    good = tmp_path / "good"
    good.write_bytes(b"ALPHA")
    folder_mode = kit.store.stored_file("r", rel).parent.stat().st_mode
    kit.store.restore("r", rel, good)
    wanted = b"alpha" if kit.worm and not kit.store.local else b"ALPHA"
    for store in (kit.store, kit.reopen()):
        assert store.stored_file("r", rel).read_bytes() == wanted
        assert store.stored_file("r", f"instances/{iid}/data/b.txt").read_bytes() == b"beta"
    if kit.store.local:
        path = kit.store.stored_file("r", rel)
        assert oct(path.stat().st_mode & 0o777) == oct(0o444 if kit.worm else 0o644)
        assert sorted(os.listdir(path.parent)) == ["a.txt", "b.txt"]
        assert path.parent.stat().st_mode == folder_mode
    with pytest.raises(NotFound):
        kit.store.restore("r", f"instances/{new_instance_id(after=iid)}/data/a.txt", good)
