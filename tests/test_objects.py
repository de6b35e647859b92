"""tinyfs.core.objects against a real SeaweedFS (tests/seaweed.py): no mocks of the store."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.exceptions as bx
import pytest
from proxy import Proxy
from seaweed import free_ports, start_seaweed

from tinyfs.core.errors import (
    AlreadyExists,
    NoConditionalWrites,
    NoObjectLock,
    NoSuchBucket,
    NoSuchObject,
    ObjectExists,
    ObjectRetained,
    StoreAccessDenied,
    StoreError,
    StoreFull,
    StoreUnreachable,
)
from tinyfs.core.objects import ObjectStore, classify

pytestmark = pytest.mark.core


def store(seaweed, bucket: str, **kw) -> ObjectStore:
    return ObjectStore(bucket, endpoint=seaweed.endpoint, **kw)


def one_line_without_secrets(err: Exception, seaweed) -> str:
    text = str(err)
    assert "\n" not in text
    assert seaweed.secret_key not in text and seaweed.secret_key not in repr(err.args)
    assert err.__cause__ is None
    return text


def requests_counted(s: ObjectStore, operation: str) -> list[int]:
    """A list that grows by one for every HTTP request boto3 sends for `operation` (retries too)."""
    sent: list[int] = []
    s.client.meta.events.register(f"before-send.s3.{operation}", lambda **_: sent.append(1))
    return sent


# -- create-only writes ------------------------------------------------------


def test_racing_writers_of_one_key_exactly_one_wins(s3_env, bucket):
    writers = [store(s3_env, bucket) for _ in range(4)]  # four "hosts", each its own client
    for round_ in range(8):  # SeaweedFS makes contenders wait in 1 s steps
        key = f"race/{round_}"
        gate = threading.Barrier(len(writers))
        outcome: dict[int, object] = {}

        def write(i: int, key=key, gate=gate, outcome=outcome) -> None:
            gate.wait()
            try:
                writers[i].put_new(key, f"writer {i}".encode())
                outcome[i] = "won"
            except Exception as e:  # the assertion below says which
                outcome[i] = e

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(writers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        losers = [o for o in outcome.values() if o != "won"]
        assert all(isinstance(o, ObjectExists) and o.errno == errno.EEXIST for o in losers), losers
        assert writers[0].get(key) == f"writer {winners[0]}".encode()


def test_a_taken_key_is_refused_at_once_and_left_as_it_was(s3_env, bucket):
    s = store(s3_env, bucket)
    s.put_new("k", b"first")
    sent = requests_counted(s, "PutObject")
    with pytest.raises(ObjectExists) as e:
        s.put_new("k", b"second")
    assert isinstance(e.value, AlreadyExists) and e.value.code == "PreconditionFailed"
    assert len(sent) == 1, "a PreconditionFailed must not be retried"
    text = one_line_without_secrets(e.value, s3_env)
    assert f"s3://{bucket}/k" in text and s3_env.endpoint in text
    assert s.get("k") == b"first"


# -- Object Lock: the store itself refuses ------------------------------------


def small_parts(s: ObjectStore) -> ObjectStore:
    """Files over 6 MiB sent in 5 MiB parts (S3's smallest part): the multipart path with small files."""
    s.multipart_over, s.part_bytes = 6 << 20, 5 << 20
    return s


def test_a_file_over_the_threshold_goes_up_in_parts_create_only_and_whole(s3_env, bucket, tmp_path):
    s = small_parts(store(s3_env, bucket))
    src = tmp_path / "big"
    src.write_bytes(os.urandom(12 << 20) + b"tail")
    parts = requests_counted(s, "UploadPart")
    s.put_new_file("big", src)
    assert len(parts) == 3
    assert s.get("big") == src.read_bytes()
    other = tmp_path / "other"
    other.write_bytes(os.urandom(7 << 20))
    with pytest.raises(ObjectExists):           # the completion is create-only, like a PUT
        s.put_new_file("big", other)
    assert s.get("big") == src.read_bytes()
    assert s.unfinished_uploads("") == []        # the refused upload was aborted, its parts deleted


def test_a_file_in_parts_is_retained_in_worm_and_an_unfinished_upload_is_found(s3_env, locked_bucket, tmp_path):
    s = small_parts(store(s3_env, locked_bucket))
    src = tmp_path / "big"
    src.write_bytes(os.urandom(11 << 20))
    until = datetime.now(UTC) + timedelta(days=1)
    version = s.put_new_file("big", src, retain_until=until)
    info = s.client.head_object(Bucket=locked_bucket, Key="big", VersionId=version)
    assert info["ObjectLockMode"] == "COMPLIANCE" and info["ContentLength"] == 11 << 20
    with pytest.raises(bx.ClientError):
        s.client.delete_object(Bucket=locked_bucket, Key="big", VersionId=version)
    started = s.client.create_multipart_upload(Bucket=locked_bucket, Key="cut/off")["UploadId"]
    assert [(k, u) for k, u, _ in s.unfinished_uploads("cut/")] == [("cut/off", started)]
    s.abort_upload("cut/off", started)
    assert s.unfinished_uploads("") == []


def test_compliance_retained_version_cannot_be_deleted_or_replaced_at_the_store(s3_env, locked_bucket):
    s = store(s3_env, locked_bucket)
    until = datetime.now(UTC) + timedelta(days=2)
    version = s.put_new("aip/bag.zip", b"the preserved bytes", retain_until=until)
    info = s.head("aip/bag.zip")
    assert version and info.version_id == version
    assert info.lock_mode == "COMPLIANCE" and abs(info.retain_until - until) < timedelta(seconds=2)

    raw = s3_env.raw()  # tinyfs bypassed: plain boto3 with the same (admin) identity
    for extra in ({}, {"BypassGovernanceRetention": True}):
        with pytest.raises(bx.ClientError) as e:
            raw.delete_object(Bucket=locked_bucket, Key="aip/bag.zip", VersionId=version, **extra)
        assert e.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(bx.ClientError):  # COMPLIANCE retention cannot be shortened
        raw.put_object_retention(Bucket=locked_bucket, Key="aip/bag.zip", VersionId=version,
                                 Retention={"Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(UTC)})
    with pytest.raises(bx.ClientError) as e:
        raw.put_object(Bucket=locked_bucket, Key="aip/bag.zip", Body=b"x", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    # An unconditional PUT or a DELETE without a version only stacks a new version or a
    # delete marker (S3's versioning): the retained version stays, byte for byte.
    raw.put_object(Bucket=locked_bucket, Key="aip/bag.zip", Body=b"replacement")
    raw.delete_object(Bucket=locked_bucket, Key="aip/bag.zip")
    assert s.get("aip/bag.zip", version_id=version) == b"the preserved bytes"
    versions = raw.list_object_versions(Bucket=locked_bucket, Prefix="aip/")["Versions"]
    assert version in {v["VersionId"] for v in versions}

    with pytest.raises(ObjectRetained) as e:
        s.delete("aip/bag.zip", version_id=version)
    assert e.value.errno == errno.EPERM
    one_line_without_secrets(e.value, s3_env)


def test_a_retained_write_into_a_bucket_without_object_lock_is_refused(s3_env, bucket):
    s = store(s3_env, bucket)
    with pytest.raises(NoObjectLock) as e:
        s.put_new("k", b"x", retain_until=datetime.now(UTC) + timedelta(days=1))
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(NoSuchObject):
        s.head("k")


# -- reading and listing -------------------------------------------------------


def test_listing_gives_every_key_once_paginated_and_scoped_to_the_prefix(s3_env, bucket):
    names = [f"{c}{i:04d}" for i, c in zip(range(1010), "aZ0-_.é~" * 200, strict=False)]
    names += ["deep/er/key", "É", "z", "a b"]
    # '.' and '-' sort before '/': SeaweedFS lists skel/ (its directory) before skel.other/
    names += ["skel/dot.bashrc", "skel.other/index.html", "skel-x", "skel/z/y"]
    s = store(s3_env, bucket, prefix="arch/one")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: s.put_new(n, n.encode()), names))
    store(s3_env, bucket, prefix="arch/other").put_new("outside", b"x")
    store(s3_env, bucket).put_new("arch/onex", b"x")  # shares the string prefix, not the folder

    sent = requests_counted(s, "ListObjectsV2")
    listed = [o.key for o in s.list()]
    assert sorted(listed) == sorted(names) and len(listed) == len(names)  # each once, in the store's order
    assert len(sent) == 2  # 1,018 keys, 1,000 a page
    assert [o.key for o in s.list(page_size=100)] == listed
    assert [o.key for o in s.list("deep/")] == ["deep/er/key"]
    sizes = {o.key: o.size for o in s.list()}
    assert sizes["É"] == len("É".encode())


def test_ranged_reads_behave_like_file_reads(s3_env, bucket):
    s = store(s3_env, bucket)
    data = os.urandom(1 << 20)
    s.put_new("blob", data)
    for offset, length in [(0, 1), (1000, 5000), (len(data) - 10, 100), (len(data), 10), (5, 0),
                           (len(data) + 5, 1)]:
        assert s.get("blob", offset=offset, length=length) == data[offset:offset + length]
    assert s.get("blob", offset=123456) == data[123456:]
    assert s.get("blob") == data
    info = s.head("blob")
    assert info.size == len(data) and info.etag == hashlib.md5(data).hexdigest()


def test_missing_keys_and_buckets_are_typed(s3_env, bucket):
    s = store(s3_env, bucket)
    for call in (lambda: s.get("nope"), lambda: s.head("nope")):
        with pytest.raises(NoSuchObject) as e:
            call()
        assert e.value.errno == errno.ENOENT and f"s3://{bucket}/nope" in str(e.value)
    gone = store(s3_env, "no-such-bucket-here")
    assert not gone.bucket_exists()
    for call in (lambda: gone.get("k"), lambda: gone.put_new("k", b"x"), lambda: list(gone.list()),
                 lambda: gone.check(object_lock=False)):
        with pytest.raises(NoSuchBucket) as e:
            call()
        assert "no-such-bucket-here" in one_line_without_secrets(e.value, s3_env)


def test_delete_removes_an_unretained_object(s3_env, bucket):
    s = store(s3_env, bucket)
    s.put_new("k", b"x")
    s.delete("k")
    with pytest.raises(NoSuchObject):
        s.get("k")


# -- bucket checks -------------------------------------------------------------


def test_bucket_checks_pass_on_a_fit_bucket_and_leave_nothing_behind(s3_env, bucket, locked_bucket):
    store(s3_env, bucket).check(object_lock=False)
    locked = store(s3_env, locked_bucket, prefix="p")
    locked.check(object_lock=True)
    assert locked.object_lock_enabled()
    assert list(store(s3_env, bucket).list()) == []
    assert "Versions" not in s3_env.raw().list_object_versions(Bucket=locked_bucket)


def test_worm_needs_object_lock(s3_env, bucket):
    s = store(s3_env, bucket)
    assert not s.object_lock_enabled()
    with pytest.raises(NoObjectLock) as e:
        s.check(object_lock=True)
    assert bucket in one_line_without_secrets(e.value, s3_env)


def test_a_store_that_ignores_if_none_match_is_detected(s3_env, bucket):
    """The header is dropped before signing, as a store (or proxy) that does not know it would."""
    s = store(s3_env, bucket)

    def drop_condition(request, **_):
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    s.client.meta.events.register("before-sign.s3.PutObject", drop_condition)
    assert not s.conditional_writes_honoured()
    with pytest.raises(NoConditionalWrites) as e:
        s.check(object_lock=False)
    assert e.value.errno == errno.EOPNOTSUPP
    assert list(s.list()) == []  # the probe is gone


# -- unreachable, denied -------------------------------------------------------


def test_an_unreachable_endpoint_fails_within_seconds(s3_env):
    port = free_ports(1)[0]
    s = ObjectStore("b-b-b", endpoint=f"http://someone:hunter2@127.0.0.1:{port}/")
    started = time.monotonic()
    with pytest.raises(StoreUnreachable) as e:
        s.get("k")
    assert time.monotonic() - started < 8
    assert e.value.errno == errno.EHOSTUNREACH
    text = one_line_without_secrets(e.value, s3_env)
    assert f"127.0.0.1:{port}" in text and "hunter2" not in text and "someone" not in text


def test_a_request_that_needed_retries_is_one_warning_line(s3_env, bucket, caplog):
    proxy = Proxy(s3_env.endpoint, drop=2)
    try:
        s = ObjectStore(bucket, endpoint=proxy.endpoint)
        with caplog.at_level(logging.WARNING, logger="tinyfs.core.objects"):
            s.put_new("k", b"through a flaky network")
            s.get("k")
    finally:
        proxy.close()
    assert s3_env.raw().get_object(Bucket=bucket, Key="k")["Body"].read() == b"through a flaky network"
    lines = [r.getMessage() for r in caplog.records if r.name == "tinyfs.core.objects"]
    assert lines == [f"s3://{bucket}/ at {proxy.endpoint}: PutObject succeeded after 3 attempts "
                     "(the store failed the first)"], lines    # the GET needed none: no line


@pytest.mark.parametrize("variable, value", [("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789"),
                                             ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")])
def test_wrong_credentials_are_access_denied(s3_env, bucket, monkeypatch, caplog, variable, value):
    monkeypatch.setenv(variable, value)
    caplog.set_level(logging.DEBUG)
    s = store(s3_env, bucket)
    for call in (lambda: s.put_new("k", b"x"), lambda: s.get("k"), lambda: s.check(object_lock=False)):
        with pytest.raises(StoreAccessDenied) as e:
            call()
        assert e.value.errno == errno.EACCES
        text = one_line_without_secrets(e.value, s3_env)
        assert value not in text and bucket in text
    assert s3_env.secret_key not in caplog.text and "not-the-secret" not in caplog.text


def test_no_credentials_at_all_is_access_denied(s3_env, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreAccessDenied) as e:
        store(s3_env, bucket).get("k")
    assert "no AWS credentials" in one_line_without_secrets(e.value, s3_env)


# -- a full store --------------------------------------------------------------


def test_a_full_store_fails_the_write_cleanly(tmp_path, monkeypatch):
    """One volume of 1 MiB: SeaweedFS answers a write it has no room for with 500 InternalError."""
    tiny = start_seaweed(tmp_path, "-volume.max=1", "-master.volumeSizeLimitMB=1")
    try:
        assert tiny.startup_seconds < 60
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", tiny.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", tiny.secret_key)
        s = ObjectStore(tiny.make_bucket(object_lock=False), endpoint=tiny.endpoint)
        written, failure = 0, None
        for i in range(20):
            try:
                s.put_new(f"k{i}", os.urandom(300_000))
                written += 1
            except StoreError as e:
                failure = (i, e)
                break
        assert failure, "20 x 300 kB went into one 1 MiB volume"
        i, e = failure
        assert type(e) is StoreError and e.errno == errno.EIO and e.code == "InternalError"
        text = one_line_without_secrets(e, tiny)
        assert f"s3://{s.bucket}/k{i}" in text and "after 3 attempt(s)" in text
        with pytest.raises(NoSuchObject):
            s.head(f"k{i}")  # nothing half-written is visible
        assert [o.key for o in s.list()] == sorted(f"k{j}" for j in range(written))
    finally:
        tiny.stop()
    assert not tiny.alive()
    assert not [p for port in tiny.ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


@pytest.mark.parametrize("code, status", [("InsufficientStorage", 507), ("XMinioStorageFull", 507),
                                          ("QuotaExceeded", 403), ("", 507)])
def test_stores_that_say_they_are_full_give_enospc(code, status):
    """AWS, MinIO and Ceph RGW name a full store; these are their answers as boto3 parses them."""
    exc = bx.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    kind, _what, _code = classify(exc)
    assert kind is StoreFull and kind.errno == errno.ENOSPC


def test_a_large_download_comes_in_ranges_pinned_to_one_version(s3_env, locked_bucket, bucket, tmp_path,
                                                                 monkeypatch):
    """Over RANGE_BYTES, download fetches ranges in parallel (made small here, the protocol is the same):
    the file is the object byte for byte, a version asked for is read in every range even when a newer
    one shadows it, and an empty object and one of exactly RANGE_BYTES download too."""
    from tinyfs.core import objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 1 << 20)
    s = store(s3_env, locked_bucket)
    old, new = os.urandom(5 * (1 << 20) + 12345), os.urandom(5 * (1 << 20) + 12345)
    first = s.put_new("big", old)
    s3_env.raw().put_object(Bucket=locked_bucket, Key="big", Body=new)   # a newer version shadows it
    gets = requests_counted(s, "GetObject")
    assert s.download("big", tmp_path / "old", version_id=first) == len(old)
    assert (tmp_path / "old").read_bytes() == old and len(gets) == 6
    assert s.download("big", tmp_path / "new") == len(new) and (tmp_path / "new").read_bytes() == new
    plain = store(s3_env, bucket)
    for name, body in (("empty", b""), ("one-part", os.urandom(1 << 20)), ("part-and-a-byte", os.urandom((1 << 20) + 1))):
        plain.put_new(name, body)
        assert plain.download(name, tmp_path / name) == len(body) and (tmp_path / name).read_bytes() == body
    with pytest.raises(NoSuchObject):
        plain.download("missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
