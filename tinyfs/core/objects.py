"""A small typed client over boto3 for what an archive needs from an S3 bucket.

Create-only writes (`If-None-Match: *`), writes under Object Lock COMPLIANCE
retention, whole and ranged reads, head, sorted paginated listing, delete, and
the bucket checks an archive makes before it trusts a store. Keys are relative
to the store's prefix.

Credentials come only from boto3's usual chain (AWS_* variables, the shared
files, a profile, an instance role); this module never stores, logs or puts
them into a message. Every failure is one `StoreError` subclass whose message
names the endpoint, bucket and key and the store's error code, never the
store's own message text (AWS echoes request details there).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, NoReturn
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from .errors import (
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

# Standard retry mode retries throttling, 5xx and connection errors with jittered
# backoff; 3 attempts keep an unreachable endpoint under a few seconds.  A 412
# PreconditionFailed is not retryable there, so a lost create race fails at once.
MAX_ATTEMPTS = 3
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 60.0
log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # S3's own maximum for ListObjectsV2
CHUNK = 1 << 20   # a streamed download's read size
# A single PUT ends at 5 GiB in S3. Files over MULTIPART_OVER go up in parts (at least PART_BYTES, at most
# MAX_PARTS of them: a 5 TiB file has 525 MiB parts), PART_THREADS at a time, each read whole into memory
# (a retried part is sent again from its bytes): memory PART_THREADS x the part size.
MULTIPART_OVER = 1 << 30
PART_BYTES = 16 << 20
MAX_PARTS = 10_000
PART_THREADS = 4
RANGE_BYTES = 32 << 20   # a larger download comes in ranges of this size ...
RANGES_IN_FLIGHT = 4  # ... this many at once

DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
          "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403"}
FULL = {"InsufficientStorage", "XMinioStorageFull", "QuotaExceeded", "ServiceQuotaExceeded"}
MISSING_KEY = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
NO_LOCK = {"ObjectLockConfigurationNotFoundError"}


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a head tells of one object (`retain_until` only from head)."""

    key: str
    size: int
    etag: str
    version_id: str | None = None
    lock_mode: str | None = None
    retain_until: datetime | None = None
    modified: datetime | None = None  # from a listing
    delete_marker: bool = False       # from a listing of versions


def redact(endpoint: str | None) -> str:
    """The endpoint as it may be shown: without user:password@ and without a query."""
    if not endpoint:
        return "AWS S3"
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def error_code(exc: bx.ClientError) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a ClientError."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def attempts_of(exc: bx.ClientError) -> int:
    """How many requests boto3 sent before giving up (1 = no retry)."""
    return 1 + int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


class ObjectStore:
    """One bucket (and key prefix) of an S3 service, by endpoint URL or AWS's default."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint: str | None = None,
                 region: str | None = None, session: boto3.Session | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        session = session or boto3.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint, region_name=region or session.region_name or "us-east-1",
            config=Config(retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
                          connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                          s3={"addressing_style": "path" if endpoint else "auto"}))
        self.client.meta.events.register("after-call.s3", self._note_retries)
        self.multipart_over = MULTIPART_OVER    # a parameter, so that tests can send small files in parts
        self.part_bytes = PART_BYTES

    def __repr__(self) -> str:
        return f"ObjectStore({self.where()})"

    # -- objects -------------------------------------------------------------

    def put_new(self, key: str, body: bytes | BinaryIO, *, retain_until: datetime | None = None) -> str | None:
        """Write `key` only if no object has it; ObjectExists if one does (never retried).

        A file `body` must be seekable: a retried request sends it again from the start.

        With `retain_until` (timezone-aware) the object is written under Object Lock
        COMPLIANCE retention until then. Returns the new version id (None unversioned).
        """
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key), "Body": body,
                                "IfNoneMatch": "*"}
        if retain_until is not None:
            args.update(ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=retain_until)
        try:
            return self.client.put_object(**args).get("VersionId")
        except bx.ClientError as e:
            if retain_until is not None and error_code(e)[0] == "InvalidRequest":
                self._fail(NoObjectLock, "the bucket refused a retained write: Object Lock is not enabled",
                           key, "InvalidRequest")
            self._raise(e, key)
        except bx.BotoCoreError as e:
            self._raise(e, key)

    def put_new_file(self, key: str, path: str | os.PathLike, *, retain_until: datetime | None = None) -> str | None:
        """put_new of a file's bytes: one PUT, or over `multipart_over` bytes a multipart upload completed
        with If-None-Match (create-only, like the PUT: ObjectExists if the key is taken)."""
        size = os.stat(path).st_size
        if size <= self.multipart_over:
            with open(path, "rb") as body:
                return self.put_new(key, body, retain_until=retain_until)
        return self._put_new_in_parts(key, path, size, retain_until)

    def replace_file(self, key: str, path: str | os.PathLike, *, retain_until: datetime | None = None) -> str | None:
        """Write a file's bytes to `key` whether or not an object has it (tinyfs repair: a damaged or lost
        object written again; on a versioned bucket a new version). Returns the new version id."""
        size = os.stat(path).st_size
        if size > self.multipart_over:
            return self._put_new_in_parts(key, path, size, retain_until, create_only=False)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if retain_until is not None:
            args.update(ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=retain_until)
        try:
            with open(path, "rb") as body:
                return self.client.put_object(**args, Body=body).get("VersionId")
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, key)

    def _put_new_in_parts(self, key: str, path: str | os.PathLike, size: int,
                          retain_until: datetime | None, create_only: bool = True) -> str | None:
        """The parts are invisible until the completion, which either makes the whole object or nothing;
        a failed upload is aborted (its parts deleted), and `abort_uploads` finds those a crash left."""
        from concurrent.futures import ThreadPoolExecutor

        part = max(self.part_bytes, -(-size // MAX_PARTS))
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        start = dict(args)
        if retain_until is not None:
            start.update(ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=retain_until)
        try:
            upload_id = self.client.create_multipart_upload(**start)["UploadId"]
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, key)

        def send(number: int) -> dict[str, Any]:
            with open(path, "rb") as f:
                f.seek((number - 1) * part)
                body = f.read(part)
            r = self.client.upload_part(**args, UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": r["ETag"]}

        try:
            with ThreadPoolExecutor(PART_THREADS) as pool:
                parts = list(pool.map(send, range(1, -(-size // part) + 1)))
            only = {"IfNoneMatch": "*"} if create_only else {}
            r = self.client.complete_multipart_upload(**args, **only, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
            return r.get("VersionId")
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._abort_quietly(key, upload_id)
            self._raise(e, key)
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise

    def unfinished_uploads(self, prefix: str) -> list[tuple[str, str, datetime]]:
        """(key, upload id, started) of every multipart upload under `prefix` neither completed nor aborted."""
        found = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                             Prefix=self._full(prefix))
        try:
            for page in pages:
                for u in page.get("Uploads", []):
                    found.append((u["Key"][len(self.prefix):], u["UploadId"], u["Initiated"]))
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, prefix)
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._full(key), UploadId=upload_id)
        except (bx.ClientError, bx.BotoCoreError) as e:
            if not (isinstance(e, bx.ClientError) and error_code(e)[0] == "NoSuchUpload"):
                self._raise(e, key)

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Best effort after a failure: what is left is found by `unfinished_uploads` (recover)."""
        try:
            self.abort_upload(key, upload_id)
        except StoreError as e:
            log.warning("%s: an unfinished upload is left for recover: %s", self.where(key), e)

    def get(self, key: str, *, offset: int = 0, length: int | None = None,
            version_id: str | None = None) -> bytes:
        """The object's bytes, or `length` of them from `offset` (fewer at the end, b"" past it)."""
        if length == 0:
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        if version_id:
            args["VersionId"] = version_id
        try:
            with self.client.get_object(**args)["Body"] as body:
                return body.read()
        except bx.ClientError as e:
            if error_code(e)[0] == "InvalidRange":  # offset at or past the end, as a file read
                return b""
            self._raise(e, key)
        except bx.BotoCoreError as e:
            self._raise(e, key)

    def head(self, key: str) -> ObjectInfo:
        """Size, ETag, version and lock of `key`. A HEAD answer has no body, so in a missing
        bucket this says NoSuchObject; `bucket_exists` tells the two apart."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, key)
        return ObjectInfo(key, r["ContentLength"], r.get("ETag", "").strip('"'), r.get("VersionId"),
                          r.get("ObjectLockMode"), r.get("ObjectLockRetainUntilDate"))

    def list(self, prefix: str = "", *, page_size: int = PAGE_SIZE) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, each once, one page request at a time, in the store's order.

        AWS lists in UTF-8 binary order; SeaweedFS walks its directory tree (`a/b` comes before `a.c`,
        whose '.' sorts before '/'). Pagination follows the store's continuation token, so either
        order lists every key; callers that need an order sort.
        """
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix), PaginationConfig={"PageSize": page_size})
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    yield ObjectInfo(key[len(self.prefix):], item["Size"], item.get("ETag", "").strip('"'),
                                     modified=item.get("LastModified"))
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, prefix)

    def list_names(self, prefix: str) -> Iterator[str]:
        """The next path segment of every key under `prefix` (which ends in "/"), once each:
        S3's common prefixes with Delimiter "/", so a listing of 10,000 resources is 10 pages, not one
        page per 1,000 of their objects."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix), Delimiter="/")
        start = len(self._full(prefix))
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"][start:].rstrip("/")
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, prefix)

    def list_versions(self, prefix: str) -> list[ObjectInfo]:
        """Every version and delete marker under `prefix`; those of one key newest first (S3's order).
        On a bucket without versioning each object is one entry with version id "null"."""
        found: list[ObjectInfo] = []
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix))
        try:
            for page in pages:
                entries = [(v, False) for v in page.get("Versions", [])]
                entries += [(m, True) for m in page.get("DeleteMarkers", [])]
                for item, marker in entries:
                    found.append(ObjectInfo(item["Key"][len(self.prefix):], item.get("Size", 0),
                                            item.get("ETag", "").strip('"'), item.get("VersionId"),
                                            modified=item.get("LastModified"), delete_marker=marker))
        except (bx.ClientError, bx.BotoCoreError) as e:
            self._raise(e, prefix)
        return found

    def versions(self, key: str) -> list[ObjectInfo]:
        """The versions of exactly `key` (no delete markers), newest first; [] when it has none."""
        return [v for v in self.list_versions(key) if v.key == key and not v.delete_marker]

    def download(self, key: str, dest: str | os.PathLike, *, version_id: str | None = None) -> int:
        """Stream the object (that version) into the new file `dest`, CHUNK bytes at a time, never
        whole in memory; returns its size. `dest` is removed again when the read fails.

        An object larger than RANGE_BYTES comes in ranges of that size, RANGES_IN_FLIGHT at a time: one
        GET stream from SeaweedFS on loopback gave 1 GiB in 5.7 s, four ranges at once in 1.8 s. The
        ranges after the first name the version read, or the first answer's ETag (If-Match), so the
        file cannot be pieced together from two different objects."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if version_id:
            args["VersionId"] = version_id
        try:
            with open(dest, "xb") as out:
                try:
                    return self._download_into(out.fileno(), args)
                except BaseException:
                    os.unlink(dest)
                    raise
        except (bx.ClientError, bx.BotoCoreError) as e:
            if isinstance(e, bx.ClientError) and error_code(e)[1] == 412:   # If-Match of a later range
                self._fail(StoreError, "the object changed while it was downloaded", key, "PreconditionFailed")
            self._raise(e, key)

    def _download_into(self, fd: int, args: dict[str, Any]) -> int:
        try:
            first = self.client.get_object(**args, Range=f"bytes=0-{RANGE_BYTES - 1}")
        except bx.ClientError as e:
            if error_code(e)[0] != "InvalidRange":
                raise
            first = self.client.get_object(**args)   # an empty object has no byte 0 to range over
        _write_stream(first, fd, 0)
        content_range = first.get("ContentRange") or ""   # none: the whole object came (empty, or no ranges)
        size = int(content_range.rpartition("/")[2]) if content_range else first["ContentLength"]
        if content_range and size > RANGE_BYTES:
            pinned = {**args, **({} if "VersionId" in args else {"IfMatch": first["ETag"]})}

            def fetch(offset: int) -> None:
                end = min(offset + RANGE_BYTES, size) - 1
                part = self.client.get_object(**pinned, Range=f"bytes={offset}-{end}")
                _write_stream(part, fd, offset)

            with ThreadPoolExecutor(RANGES_IN_FLIGHT, thread_name_prefix="download") as pool:
                list(pool.map(fetch, range(RANGE_BYTES, size, RANGE_BYTES)))
        return size

    def delete(self, key: str, *, version_id: str | None = None) -> None:
        """Delete the object (that version with `version_id`); ObjectRetained if its lock forbids."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if version_id:
            args["VersionId"] = version_id
        try:
            self.client.delete_object(**args)
        except bx.ClientError as e:
            if error_code(e)[0] == "AccessDenied" and self._retained(key, version_id):
                self._fail(ObjectRetained, "the store keeps this version under Object Lock retention",
                           key, "AccessDenied")
            self._raise(e, key)
        except bx.BotoCoreError as e:
            self._raise(e, key)

    # -- the bucket ----------------------------------------------------------

    def bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bx.ClientError as e:
            if error_code(e)[0] in {"404", "NoSuchBucket", "NotFound"}:
                return False
            self._raise(e, None)
        except bx.BotoCoreError as e:
            self._raise(e, None)
        return True

    def object_lock_enabled(self) -> bool:
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except bx.ClientError as e:
            if error_code(e)[0] in NO_LOCK:
                return False
            self._raise(e, None)
        except bx.BotoCoreError as e:
            self._raise(e, None)
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def conditional_writes_honoured(self) -> bool:
        """Try it: create a scratch key twice; the second must be refused. The key is removed after."""
        key = f".tinyfs-probe/{uuid.uuid4().hex}"
        versions = [self.put_new(key, b"probe")]
        try:
            versions.append(self.put_new(key, b"probe"))
        except ObjectExists:
            return True
        finally:
            for version in versions:
                self._delete_quietly(key, version)
        return False

    def check(self, *, object_lock: bool) -> None:
        """Raise the typed error for the first thing that makes this bucket unfit for an archive."""
        if not self.bucket_exists():
            self._fail(NoSuchBucket, "no such bucket", None, "NoSuchBucket")
        if object_lock and not self.object_lock_enabled():
            self._fail(NoObjectLock, "Object Lock is not enabled on the bucket (WORM needs it)", None,
                       "ObjectLockConfigurationNotFoundError")
        if not self.conditional_writes_honoured():
            self._fail(NoConditionalWrites, "the store ignores If-None-Match: two writers could take one key",
                       None, "NoConditionalWrites")

    # -- helpers -------------------------------------------------------------

    def _note_retries(self, http_response, parsed: dict, model, **_) -> None:
        """One warning line for a request that needed retries: a store that fails now and then (a volume
        server gone, throttling) shows in the log before it fails a commit, and a create-only write whose
        retry met its own first attempt (412) is told apart from a lost race."""
        attempts = 1 + int(parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
        if attempts > 1:
            status = http_response.status_code
            outcome = "succeeded" if status < 300 else f"ended {parsed.get('Error', {}).get('Code') or status}"
            log.warning("%s: %s %s after %d attempts (the store failed the first)", self.where(), model.name,
                        outcome, attempts)

    def _full(self, key: str) -> str:
        return self.prefix + key

    def where(self, key: str | None = None) -> str:
        """endpoint, bucket and key as error messages show them."""
        place = f"s3://{self.bucket}/{self._full(key) if key is not None else self.prefix}"
        return f"{place} at {redact(self.endpoint)}"

    def _retained(self, key: str, version_id: str | None) -> bool:
        try:
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
            if version_id:
                args["VersionId"] = version_id
            r = self.client.get_object_retention(**args)
        except (bx.ClientError, bx.BotoCoreError):
            return False
        return bool(r.get("Retention", {}).get("Mode"))

    def _delete_quietly(self, key: str, version_id: str | None) -> None:
        """Best effort: a bucket with a default retention keeps even the probe."""
        try:
            self.delete(key, version_id=version_id)
        except StoreError:
            pass

    def _fail(self, kind: type[StoreError], what: str, key: str | None, code: str) -> NoReturn:
        raise kind(f"{self.where(key)}: {what}", code=code)

    def _raise(self, exc: Exception, key: str | None) -> NoReturn:
        """Translate a boto3 failure into its StoreError (chained to nothing: no store text leaks)."""
        kind, what, code = classify(exc)
        if isinstance(exc, bx.ClientError) and kind in (StoreError, StoreFull):
            what += f" after {attempts_of(exc)} attempt(s)"
        if kind is NoSuchBucket or (key is None and kind is NoSuchObject):
            kind, what = NoSuchBucket, "no such bucket"
        raise kind(f"{self.where(key)}: {what}", code=code) from None


def _write_stream(response: dict, fd: int, offset: int) -> None:
    """The body of a GetObject answer written into `fd` from `offset`, CHUNK bytes at a time."""
    body = response["Body"]
    try:
        for chunk in body.iter_chunks(CHUNK):
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
    finally:
        body.close()


def classify(exc: Exception) -> tuple[type[StoreError], str, str]:
    """(error class, what happened, code) for a boto3 exception."""
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StoreAccessDenied, "no AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, " \
                                  "~/.aws/credentials or AWS_PROFILE)", type(exc).__name__
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError
                  | bx.ReadTimeoutError):
        return StoreUnreachable, f"no answer from the endpoint ({type(exc).__name__})", type(exc).__name__
    if not isinstance(exc, bx.ClientError):
        return StoreError, f"request failed ({type(exc).__name__})", type(exc).__name__
    code, status = error_code(exc)
    if code == "PreconditionFailed" or status == 412:
        return ObjectExists, "the key exists already (If-None-Match refused the write)", code
    if code == "NoSuchBucket":
        return NoSuchBucket, "no such bucket", code
    if code in MISSING_KEY:
        return NoSuchObject, "no such key", code
    if code in DENIED:
        return StoreAccessDenied, f"access denied ({code}): check the AWS credentials and the bucket policy", code
    if code in FULL or status == 507:
        return StoreFull, f"the store is full ({code or status})", code or str(status)
    return StoreError, f"the store failed the request ({code or 'no code'}, HTTP {status})", code
