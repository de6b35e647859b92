"""One event log for the hosts of an archive in an S3 store: each host's events shipped as segments, read
merged (core/s3events.py), on a real SeaweedFS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import mounted

from tinyfs.core.api import Archive
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.objects import ObjectStore

PREFIX = "arch/ev"


def init(tinyfs, seaweed, root: Path, bucket: str):
    return tinyfs("init", root, "--store", f"s3://{bucket}/{PREFIX}", "--endpoint", seaweed.endpoint)


def two_hosts(tinyfs, seaweed, bucket: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A one-line file to deposit, and two hosts' roots attached to one archive: (file, a, b)."""
    src = tmp_path / "f.txt"
    src.write_text("x")
    a, b = tmp_path / "a", tmp_path / "b"
    init(tinyfs, seaweed, a, bucket)
    init(tinyfs, seaweed, b, bucket)
    return src, a, b


def events(tinyfs, root: Path, *extra) -> list[dict]:
    return [json.loads(line) for line in tinyfs("events", root, *extra).stdout.splitlines()]


def committed(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["resource"], r["instance"]) for r in records if r["event"] == "transaction.committed"]


@pytest.mark.core
def test_each_host_reads_every_hosts_events_in_time_order(tinyfs, s3_env, bucket, tmp_path):
    src, a, b = two_hosts(tinyfs, s3_env, bucket, tmp_path)
    made = [("one", tinyfs("ingest", a, "one", src).stdout.strip()),
            ("two", tinyfs("ingest", b, "two", src).stdout.strip())]
    src.write_text("y")
    made.append(("one", tinyfs("ingest", a, "one", src).stdout.strip()))
    for root in (a, b):
        records = events(tinyfs, root)
        assert committed(records) == made
        assert [r["time"] for r in records] == sorted(r["time"] for r in records)
        assert {r["event"] for r in records} >= {"archive.created", "archive.attached"}
    since = events(tinyfs, b)[-1]["time"]
    assert committed(events(tinyfs, b, "--since", since)) == made[-1:]
    assert committed(list(Archive(b).events())) == made
    # each host's events.jsonl stays its own record; the store holds them as segments
    assert committed([json.loads(line) for line in (b / "events.jsonl").read_text().splitlines()]) == made[1:2]
    keys = [o["Key"] for o in s3_env.raw().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/events/")["Contents"]]
    assert len({k.split("/")[3] for k in keys}) == 2


@pytest.mark.core
def test_a_lost_shipping_offset_neither_duplicates_nor_loses_events(tinyfs, s3_env, bucket, tmp_path):
    src, a, b = two_hosts(tinyfs, s3_env, bucket, tmp_path)
    first = tinyfs("ingest", a, "one", src).stdout.strip()
    shipped = next((a / "cache" / "events").glob("*.shipped"))
    shipped.unlink()                     # as if the process had died before recording how far it shipped
    src.write_text("y")
    second = tinyfs("ingest", a, "one", src).stdout.strip()
    assert committed(events(tinyfs, b)) == [("one", first), ("one", second)]
    assert len(events(tinyfs, b)) == len(events(tinyfs, a))


@pytest.mark.core
def test_an_unreachable_store_still_gives_this_hosts_events_and_those_fetched(tinyfs, s3_env, bucket, tmp_path):
    src, a, b = two_hosts(tinyfs, s3_env, bucket, tmp_path)
    theirs = tinyfs("ingest", a, "one", src).stdout.strip()
    archive = ArchiveRoot(b)
    assert committed(list(archive.events.read())) == [("one", theirs)]     # a's segment now fetched
    archive.store.objects = ObjectStore(bucket, prefix=PREFIX, endpoint="http://127.0.0.1:9")  # nobody there
    archive.events.append("transaction.committed", "two", "01a23f3e-0000-7000-8000-000000000000")
    records = list(archive.events.read())
    assert committed(records) == [("one", theirs), ("two", "01a23f3e-0000-7000-8000-000000000000")]
    assert not list(s3_env.raw().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/events/")["Contents"]) == []


@pytest.mark.mount
def test_the_mounts_events_file_shows_every_hosts_events(tinyfs, s3_env, bucket, tmp_path):
    src, a, b = two_hosts(tinyfs, s3_env, bucket, tmp_path)
    with mounted(b, tmp_path) as m:
        check_mount_events(tinyfs, a, m.mnt, src)


def check_mount_events(tinyfs, a: Path, mnt: Path, src: Path) -> None:
    iid = tinyfs("ingest", a, "one", src).stdout.strip()
    records = [json.loads(line) for line in (mnt / "events.jsonl").read_text().splitlines()]
    assert ("one", iid) in committed(records)
    (mnt / "transactions" / "two").mkdir()
    (mnt / "transactions" / "two" / "g").write_text("y")
    (mnt / "transactions" / "two").rename(mnt / "commit" / "two")
    records = [json.loads(line) for line in subprocess.run(["cat", str(mnt / "events.jsonl")], check=True,
                                                           capture_output=True, text=True).stdout.splitlines()]
    assert [r for r, _ in committed(records)] == ["one", "two"]
    assert [r["resource"] for r in events(tinyfs, a) if r["event"] == "transaction.committed"] == ["one", "two"]
