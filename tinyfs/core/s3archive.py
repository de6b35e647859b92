"""A local working directory attached to an archive in an S3 bucket/prefix (docs/store.md).

    ROOT/tinyfs.json    {"format": "tinyfs/1", "store": "s3://BUCKET/PREFIX", "endpoint": URL}: the store's
                        address only; mode, digests and retention are the store's marker's
    ROOT/transactions/  open transactions and commit stages, as for a local archive (one host's)
    ROOT/events.jsonl   this host's events (shipped to the store and read merged with the others': s3events)
    ROOT/cache/         the store's bounded read cache and the chains this host has learnt

Credentials are never written here: boto3 finds them in the AWS variables, files or profile.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .durable import fsync_dir, write_new
from .errors import AlreadyExists, InvalidName, NoSuchObject, NotAnArchive, NotFound, TinyfsError
from .events import EventLog
from .ids import is_rid
from .model import utc_now

if TYPE_CHECKING:
    from .layout import ArchiveRoot
    from .s3events import SharedEventLog
    from .s3store import S3Store

CACHE = "cache"
MIRROR_THREADS = 8
_RETAIN = re.compile(r"^([1-9][0-9]{0,4})([dy]?)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class NotSupported(TinyfsError):
    """Something an archive on an object store cannot do yet."""

    errno = errno.EOPNOTSUPP


def parse_store_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET[/PREFIX]."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not _BUCKET.match(parts.netloc or "") or parts.query or parts.fragment:
        raise InvalidName(f"bad store address {url!r}: give s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise InvalidName(f"bad store prefix {prefix!r} in {url!r}")
    return parts.netloc, prefix


def parse_retention(text: str) -> int:
    """Days of `--retain`: 3650, 3650d or 10y (a year counted as 365 days)."""
    m = _RETAIN.match(text.strip())
    if not m:
        raise InvalidName(f"bad retention {text!r}: give days (30d) or years (10y)")
    return int(m.group(1)) * (365 if m.group(2) == "y" else 1)


_SIZE = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.IGNORECASE)


def parse_cache_size(text: str) -> int:
    """Bytes of `--cache`: 500M, 20G, 2TiB (powers of 1024), or a plain number of bytes; at least 1 MiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise InvalidName(f"bad cache size {text!r}: give e.g. 500M, 20G or 1T")
    size = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if size < 1 << 20:
        raise InvalidName(f"cache size {text!r} is under 1 MiB")
    return size


def check_endpoint(endpoint: str | None) -> None:
    """An endpoint URL without credentials in it: ROOT/tinyfs.json records it."""
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidName(f"bad endpoint {endpoint!r}: give http(s)://HOST[:PORT]")
    if parts.username or parts.password or parts.query:
        raise InvalidName("the endpoint must not carry credentials or a query; use the AWS variables or files")


def _objects(url: str, endpoint: str | None, region: str | None = None):
    from .objects import ObjectStore

    bucket, prefix = parse_store_url(url)
    check_endpoint(endpoint)
    return ObjectStore(bucket, prefix=prefix, endpoint=endpoint, region=region)


def init_s3_archive(root: str | os.PathLike, url: str, endpoint: str | None, *, mode: str | None = None,
                    digests: list[str] | None = None, retention_days: int | None = None,
                    cache_bytes: int | None = None) -> Path:
    """Make `root` (absent or empty) a working directory of the archive at `url`: a new archive on an empty
    prefix, or the one there (a second host attaches). The store is checked and initialised first, so a
    refusal (unreachable, not empty, no Object Lock, ...) leaves `root` as it was."""
    from .s3store import init_store

    root = Path(root).absolute()
    if mode == "dynamic":
        raise NotSupported("dynamic mode on an object store is not supported yet")
    if (root / "tinyfs.json").exists() or (root.is_dir() and any(root.iterdir())):
        raise AlreadyExists(f"{root} is not empty")
    if root.exists() and not root.is_dir():
        raise AlreadyExists(f"{root} exists and is not a directory")
    started = utc_now()
    store = init_store(_objects(url, endpoint), root / CACHE, mode=mode, digests=digests,
                       retention_days=retention_days)
    _write_root(root, url, endpoint, store, attached=store.config.created < started, cache_bytes=cache_bytes)
    return root


def _write_root(root: Path, url: str, endpoint: str | None, store: S3Store, attached: bool,
                cache_bytes: int | None) -> None:
    from .layout import FORMAT, LOCKS

    for sub in ("transactions", f"transactions/{LOCKS}"):
        (root / sub).mkdir(exist_ok=True)
    cfg = store.config
    EventLog(root / "events.jsonl").append("archive.attached" if attached else "archive.created",
                                           mode=cfg.mode, digests=list(cfg.digests), store=url)
    doc = {"format": FORMAT, "store": url, "endpoint": endpoint, "host": secrets.token_hex(6)}
    if cache_bytes is not None:
        doc["cache_bytes"] = cache_bytes
    write_new(root / "tinyfs.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    fsync_dir(root / "transactions")
    fsync_dir(root)


def open_s3_store(root: Path, doc: dict) -> S3Store:
    """The store a working directory's tinyfs.json names."""
    from .s3store import CACHE_BYTES, open_store

    url, endpoint = doc.get("store"), doc.get("endpoint")
    if not isinstance(url, str) or not (endpoint is None or isinstance(endpoint, str)):
        raise NotAnArchive(f"{root}/tinyfs.json: bad store address")
    cache_bytes = doc.get("cache_bytes", CACHE_BYTES)
    if not isinstance(cache_bytes, int) or cache_bytes < 1 << 20:
        raise NotAnArchive(f"{root}/tinyfs.json: bad cache_bytes {cache_bytes!r}")
    return open_store(_objects(url, endpoint, doc.get("region")), root / CACHE, cache_bytes=cache_bytes)


def shared_events(root: Path, doc: dict, store: S3Store) -> SharedEventLog:
    """This host's events.jsonl, shipped to the store and read merged with the other hosts' events. The
    host is named in tinyfs.json (a root made before that: by its hostname and path)."""
    from .s3events import SharedEventLog

    host = doc.get("host")
    if not (isinstance(host, str) and re.fullmatch(r"[0-9a-f]{12}", host)):
        host = hashlib.sha256(f"{socket.gethostname()}:{root}".encode()).hexdigest()[:12]
    return SharedEventLog(root / "events.jsonl", store, host)


# -- fsck: a fresh copy of what the store holds --------------------------------------------------------


@contextmanager
def mirrored(archive: ArchiveRoot, rid: str) -> Iterator[None]:
    """Download the resource's published objects (past the read cache) to where `resource_dir` points on
    an object store, for fsck to check as it checks a local archive; removed afterwards."""
    dest = archive.store.resource_dir(rid)
    top = dest.parent
    shutil.rmtree(top, ignore_errors=True)
    try:
        if not is_rid(rid) or archive.head(rid) is None:
            raise NotFound(f"no resource {rid!r} in {archive.root}")
        _mirror_resource(archive.store, rid, dest)
        yield
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _mirror_resource(store: S3Store, rid: str, dest: Path) -> None:
    """resource.json and every published instance's objects, MIRROR_THREADS downloads in flight (a small
    object costs a round trip, not bandwidth); an object the store lacks stays absent."""
    paths = ["resource.json"]
    for iid in store.instance_ids(rid):
        (dest / "instances" / iid / "data").mkdir(parents=True)   # a bucket has no empty directories: a
        # bag's data/ is implied (an instance whose bytes were all stored already has no payload object)
        paths.extend(store.published_files(rid, iid))
    for folder in sorted({(dest / rel).parent for rel in paths}):
        folder.mkdir(parents=True, exist_ok=True)

    def fetch(rel: str) -> None:
        try:
            store.fetch_fresh(rid, rel, dest / rel)
        except NoSuchObject:
            pass                        # fsck reports it missing

    with ThreadPoolExecutor(MIRROR_THREADS, thread_name_prefix="mirror") as pool:
        list(pool.map(fetch, paths))
