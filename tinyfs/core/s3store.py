"""An archive in an S3 bucket/prefix: the layout of format `tinyfs/1` as objects, published by claims.

    PREFIX/tinyfs.json                                the archive marker (format, mode, digests, retention)
    PREFIX/resources/<rid>/resource.json              as on disk
    PREFIX/resources/<rid>/instances/<iid>/...        one BagIt bag per instance, as on disk
    PREFIX/resources/<rid>/chain/<previous or _first> the claim: {"instance": <iid>, "versions": {...}}

An instance is uploaded whole first (payload, tag files, instance.json last),
then published by ONE create-only write of the claim that puts it after its
predecessor. Readers follow claims only, so an instance without a claim is
invisible, and two committers extending one head cannot both win: the store
refuses the second create of the claim key. docs/store.md has the reasoning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .durable import write_atomic
from .errors import (
    AlreadyExists,
    Forbidden,
    InvalidName,
    NoSuchObject,
    NotAnArchive,
    NotFound,
    ObjectExists,
    ObjectRetained,
    Stale,
    StoreError,
)
from .ids import check_rid, is_instance_id, is_rid
from .layout import DIGESTS, FORMAT, MODES
from .model import utc_now
from .objects import ObjectStore
from .store import StoreConfig

MARKER = "tinyfs.json"
FIRST = "_first"              # the claim key of a resource's first instance
PROBE_PREFIX = ".tinyfs-probe/"
UPLOAD_THREADS = 8            # payload objects in flight per publish (boto3 clients are thread-safe)
# A head the store confirmed this long ago is taken as current without asking again: the stats that follow
# a listing of resources/ (one per resource) reuse the heads the listing asked for. Another host's commit
# is seen up to this much later; this host's own commits at once (publish learns its claim), and a lost
# race asks again.
HEAD_FRESH = 1.0
CLAIM_READS = 16              # first claims read at once by a host listing resources it does not know
RECOVER_AGE = 3600.0          # an unclaimed instance younger than this may belong to a live publish
CACHE_BYTES = 1 << 30         # default bound of the local read cache
MIRROR = "mirror"             # under the cache directory: fsck's fresh copy of one resource
CACHE_KEEP = 1                # the most recently fetched file stays whatever its size

log = logging.getLogger(__name__)


class NotEmpty(AlreadyExists):
    """`init` found objects under the prefix that are not a tinyfs archive."""


class ConfigMismatch(AlreadyExists):
    """`init` asked for a mode, digests or retention other than those of the archive already there."""


class BadClaim(StoreError):
    """A claim object that does not hold together (not JSON, an instance that does not follow)."""


@dataclass(frozen=True)
class Claim:
    """One link of a resource's chain: `instance` follows `previous`; `versions` maps the instance's
    paths (relative to the resource) to the version ids the store gave them at upload."""

    previous: str | None
    instance: str
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"previous": self.previous, "instance": self.instance, "versions": self.versions}

    @staticmethod
    def from_json(doc: dict) -> Claim:
        return Claim(doc["previous"], doc["instance"], dict(doc.get("versions") or {}))


# -- init / attach ---------------------------------------------------------------------------------


def init_store(objects: ObjectStore, cache_dir: str | os.PathLike, *, mode: str | None = None,
               digests: list[str] | None = None, retention_days: int | None = None,
               cache_bytes: int = CACHE_BYTES) -> S3Store:
    """A new archive on an empty prefix, or the archive already there (attach: how a second host joins).

    Refuses (one line, typed) a bucket unfit for the mode, a prefix holding anything else
    (NotEmpty), and an existing archive whose marker differs from what was asked (ConfigMismatch).
    """
    wanted = _wanted_config(mode, digests, retention_days)
    objects.check(object_lock=wanted.mode == "worm")
    existing = _read_marker(objects)
    if existing is None:
        _refuse_unless_empty(objects)
        try:
            objects.put_new(MARKER, _marker_bytes(wanted), retain_until=retain_until(wanted))
            existing = wanted
        except ObjectExists:           # another host's init won the race: attach to its archive
            existing = _read_marker(objects)
    _refuse_mismatch(objects, existing, mode, digests, retention_days)
    return S3Store(objects, cache_dir, existing, cache_bytes=cache_bytes)


def open_store(objects: ObjectStore, cache_dir: str | os.PathLike, *, cache_bytes: int = CACHE_BYTES) -> S3Store:
    """The archive under the prefix; NotAnArchive when there is no marker."""
    config = _read_marker(objects)
    if config is None:
        raise NotAnArchive(f"{objects.where(MARKER)}: no tinyfs archive here")
    return S3Store(objects, cache_dir, config, cache_bytes=cache_bytes)


def _wanted_config(mode: str | None, digests: list[str] | None, retention_days: int | None) -> StoreConfig:
    mode = mode or "preservation"
    digests = list(dict.fromkeys(digests or ["sha512"]))
    if mode not in MODES:
        raise InvalidName(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if any(alg not in DIGESTS for alg in digests) or digests[0] not in ("sha512", "sha256"):
        raise InvalidName(f"bad digests {digests}: from {', '.join(DIGESTS)}, the first sha512 or sha256")
    days = retention_days or 0
    if mode == "worm" and days <= 0:
        raise InvalidName("worm mode on an object store needs a retention (days > 0)")
    if mode != "worm" and days:
        raise InvalidName("a retention goes with worm mode only")
    return StoreConfig(mode, tuple(digests), utc_now(), days)


def _marker_bytes(config: StoreConfig) -> bytes:
    doc = {"format": FORMAT, "mode": config.mode, "digests": list(config.digests), "created": config.created,
           "retention_days": config.retention_days}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _read_marker(objects: ObjectStore) -> StoreConfig | None:
    """The marker's config; None when there is none. The marker is read by its first version: a later
    ordinary PUT of the name (possible even under Object Lock) does not change the archive's config."""
    versions = objects.versions(MARKER)
    if not versions:
        return None
    raw = objects.get(MARKER, version_id=_first_version(versions))
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        return StoreConfig(doc["mode"], tuple(doc["digests"]), doc["created"], int(doc.get("retention_days", 0)))
    except (ValueError, KeyError, TypeError) as e:
        raise NotAnArchive(f"{objects.where(MARKER)}: not a tinyfs/1 marker ({e})") from None


def _first_version(versions: list) -> str | None:
    """The oldest version id of one key (S3 lists a key's versions newest first); None if unversioned."""
    oldest = versions[-1].version_id
    return None if oldest in (None, "null") else oldest


def _refuse_unless_empty(objects: ObjectStore) -> None:
    for info in objects.list(""):
        if not info.key.startswith(PROBE_PREFIX):
            raise NotEmpty(f"{objects.where()}: holds objects ({info.key!r}) but no tinyfs archive; "
                           "choose an empty prefix")


def _refuse_mismatch(objects: ObjectStore, found: StoreConfig, mode: str | None, digests: list[str] | None,
                     retention_days: int | None) -> None:
    asked = {"mode": mode, "digests": tuple(dict.fromkeys(digests)) if digests else None,
             "retention_days": retention_days}
    for name, value in asked.items():
        if value is not None and value != getattr(found, name):
            raise ConfigMismatch(f"{objects.where()}: the archive there has {name} {getattr(found, name)!r}, "
                                 f"not {value!r}")


def retain_until(config: StoreConfig) -> datetime | None:
    if config.mode != "worm":
        return None
    return datetime.now(UTC) + timedelta(days=config.retention_days)


# -- the store -------------------------------------------------------------------------------------


class S3Store:
    """The committed side of one archive in a bucket/prefix, with a local cache directory per host."""

    local = False       # stored files are cached copies; other hosts publish too (store.Store.local)

    def __init__(self, objects: ObjectStore, cache_dir: str | os.PathLike, config: StoreConfig, *,
                 cache_bytes: int = CACHE_BYTES):
        self.objects = objects
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.files = FileCache(self.cache_dir / "files", cache_bytes)
        self._chains: dict[str, list[Claim]] = {}     # rid -> its claims as far as known, oldest first
        self._asked: dict[str, float] = {}            # rid -> when the store last confirmed its head
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.objects.where()})"

    def resource_dir(self, rid: str) -> Path:
        """Where fsck's fresh copy of the resource is downloaded (s3archive.mirrored); nothing otherwise."""
        return self.cache_dir / MIRROR / rid

    # -- what is published ---------------------------------------------------------------------

    def head(self, rid: str) -> str | None:
        """The head confirmed by the store within HEAD_FRESH seconds, or asked for now."""
        check_rid(rid)
        with self._lock:
            recent = time.monotonic() - self._asked.get(rid, -HEAD_FRESH) < HEAD_FRESH
        if recent:
            known = self._known_chain(rid)
            return known[-1].instance if known else None
        return self._ask_head(rid)

    def heads(self, rids: list[str]) -> dict[str, str | None]:
        """head() of each resource, CLAIM_READS at once (a listing of resources/)."""
        with ThreadPoolExecutor(CLAIM_READS, thread_name_prefix="heads") as pool:
            return dict(zip(rids, pool.map(self.head, rids), strict=True))

    def _ask_head(self, rid: str) -> str | None:
        """Follow the chain past what is known here: one request when nothing was published since."""
        asked = time.monotonic()
        known = self._known_chain(rid)
        new: list[Claim] = []
        last = known[-1].instance if known else None
        while (claim := self._read_claim(rid, last)) is not None:
            new.append(claim)
            last = claim.instance
        if new:
            self._learn_chain(rid, known + new)
        with self._lock:
            self._asked[rid] = asked
        return last

    def instance_ids(self, rid: str) -> list[str]:
        """Asks the store (one request when nothing is new): a history is never shown a second behind."""
        check_rid(rid)
        self._ask_head(rid)
        return [claim.instance for claim in self._known_chain(rid)]

    def exists(self, rid: str) -> bool:
        return is_rid(rid) and self.head(rid) is not None

    def resource_ids(self) -> list[str]:
        """Resources with a first claim: one listing of names, plus one request per resource not yet
        known here, CLAIM_READS at once, its first claim learnt (a resource whose first publish never
        claimed is not one)."""
        names = [rid for rid in self.objects.list_names("resources/") if is_rid(rid)]
        unknown = [rid for rid in names if not self._known_chain(rid)]
        with ThreadPoolExecutor(CLAIM_READS, thread_name_prefix="claims") as pool:
            missing = {rid for rid, first in zip(unknown, pool.map(self._learn_first, unknown), strict=True) if not first}
        return sorted(rid for rid in names if rid not in missing)

    def _learn_first(self, rid: str) -> bool:
        """Read and learn the first claim of a resource new here; False when it has none."""
        claim = self._read_claim(rid, None)
        if claim is not None:
            self._learn_chain(rid, [claim])
        return claim is not None

    # -- reading ---------------------------------------------------------------------------------

    def stored_file(self, rid: str, relpath: str) -> Path:
        key, version = self._where(rid, relpath)
        name = _cache_name(key, version)
        return self.files.get(name) or self.files.fill(name, lambda dest: self._download(key, version, dest))

    def _download(self, key: str, version: str | None, dest: Path) -> int:
        """The pinned version of `key`; for a payload file whose pinned version the store no longer has
        (lost, or deleted by a repair that wrote good bytes again: `restore`), the newest version: every
        reader verifies a payload file's bytes against instance.json. Tag files (instance.json itself,
        the manifests) are read only by their pinned version: nothing would check a newer one."""
        try:
            return self.objects.download(key, dest, version_id=version)
        except NoSuchObject:
            if version is None or "/data/" not in key:
                raise
            log.warning("%s: version %s is gone; reading the newest version", self.objects.where(key), version)
            return self.objects.download(key, dest)

    def read_document(self, rid: str, relpath: str) -> bytes:
        return self.stored_file(rid, relpath).read_bytes()

    def forget(self, rid: str, relpath: str) -> None:
        key, version = self._where(rid, relpath)
        self.files.drop(_cache_name(key, version))

    def published_files(self, rid: str, iid: str) -> list[str]:
        """The paths (relative to the resource) of a published instance's objects: those its claim records
        on a versioned bucket, else what a listing of the instance's prefix finds now (fsck compares them
        with the manifests, so an object added or removed by hand shows there)."""
        claim = self._claim_of(rid, iid)
        if claim.versions:
            return sorted(rel for rel in claim.versions if rel.startswith(f"instances/{iid}/"))
        base = f"resources/{rid}/"
        return sorted(info.key[len(base):] for info in self.objects.list(f"{base}instances/{iid}/"))

    def fetch_fresh(self, rid: str, relpath: str, dest: Path) -> int:
        """Download a published path from the store into the new file `dest`, past the cache (fsck)."""
        key, version = self._where(rid, relpath)
        return self._download(key, version, dest)

    # -- repairing -------------------------------------------------------------------------------

    def restore(self, rid: str, relpath: str, source: Path) -> None:
        """Write the object again (an ordinary PUT, worm: under the store's retention). On a versioned
        bucket reads are pinned to the version the claim records, so the damaged version is then deleted
        and reads of a payload file fall back to the newest (`_download`); under Object Lock the store
        refuses that delete, and the pinned version stays what readers get (docs/store.md: there only a
        payload version the server lost is repaired)."""
        key, version = self._where(rid, relpath)
        new = self.objects.replace_file(key, source, retain_until=retain_until(self.config))
        if version and new != version:
            try:
                self.objects.delete(key, version_id=version)
            except NoSuchObject:
                pass                        # lost: reads take the newest version
            except ObjectRetained:
                log.warning("%s: version %s is kept by Object Lock; reads still get it",
                            self.objects.where(key), version)
        self.files.drop(_cache_name(key, version))

    def _where(self, rid: str, relpath: str) -> tuple[str, str | None]:
        """The key of a published path and the version to read; NotFound for an unpublished instance."""
        check_rid(rid)
        parts = relpath.split("/")
        if ".." in parts or "" in parts or "." in parts:
            raise InvalidName(f"invalid stored path {relpath!r}")
        if relpath == "resource.json":
            if self.head(rid) is None:
                raise NotFound(f"no resource {rid!r}")
            return f"resources/{rid}/{relpath}", self._known_chain(rid)[0].versions.get(relpath)
        if len(parts) < 3 or parts[0] != "instances":
            raise NotFound(f"no stored file {relpath!r} in resource {rid!r}")
        claim = self._claim_of(rid, parts[1])
        version = claim.versions.get(relpath)
        if claim.versions and version is None:   # the claim lists every object it published
            raise NotFound(f"no stored file {relpath!r} in resource {rid!r}")
        return f"resources/{rid}/{relpath}", version

    def _claim_of(self, rid: str, iid: str) -> Claim:
        """The claim that published `iid`, asking the store only when it is not known here."""
        claim = _find(self._known_chain(rid), iid)
        if claim is None:
            self.head(rid)
            claim = _find(self._known_chain(rid), iid)
        if claim is None:
            raise NotFound(f"no instance {iid} of resource {rid!r}")
        return claim

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, rid: str, iid: str, previous: str | None, bag: Path,
                resource_json: bytes | None = None) -> None:
        """Upload the bag (payload, tags, instance.json last), then claim its place after `previous`."""
        check_rid(rid)
        if not is_instance_id(iid) or (previous is not None and iid <= previous):
            raise InvalidName(f"instance id {iid!r} must be a UUIDv7 after {previous!r}")
        if self._ask_head(rid) != previous:
            raise Stale(f"resource {rid!r}: {previous or 'no instance'} is no longer the head")
        versions = self._upload_bag(rid, iid, bag)
        if previous is None and resource_json is not None:
            versions.update(self._upload_resource_json(rid, resource_json))
        claim = Claim(previous, iid, versions)
        self._claim(rid, claim)

    def _upload_bag(self, rid: str, iid: str, bag: Path) -> dict[str, str]:
        payload, tags = _bag_files(bag)
        base = f"instances/{iid}"
        retain = retain_until(self.config)

        # Once one upload has failed, the uploads not yet started are not sent: a store failing every
        # write (SeaweedFS unable to place a replica: 90 s a request with the retries) then fails the
        # commit after the uploads in flight, not after a second round of them. Workers take the files
        # in order, so a file skipped comes after the one that failed, whose error `map` raises first.
        failed = threading.Event()

        def upload(rel: str) -> tuple[str, str | None]:
            if failed.is_set():
                raise NotSent(rel)
            key = f"resources/{rid}/{base}/{rel}"
            try:
                try:
                    return f"{base}/{rel}", self.objects.put_new_file(key, bag / rel, retain_until=retain)
                except ObjectExists:
                    return f"{base}/{rel}", self._own_upload(key, bag / rel)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            done = list(pool.map(upload, payload))
        done += [upload(rel) for rel in tags]          # instance.json is the last of them
        return {rel: version for rel, version in done if version not in (None, "null")}

    def _own_upload(self, key: str, path: Path) -> str | None:
        """The version of `key`, taken already by a create-only write of this publish's file `path`.

        Nobody else writes under a new instance id: the object is this publisher's own earlier send whose
        answer was lost (boto3 resent the PUT and met it, 412), and a PUT is whole or absent. Failing
        here would fail a commit that succeeded. Checked all the same: the size, and the MD5 where the
        store's ETag is one (a single-part PUT's, unencrypted); otherwise the write is refused again."""
        info = self.objects.head(key)
        if not (info.size == path.stat().st_size and (len(info.etag) != 32 or _md5(path) == info.etag)):
            raise ObjectExists(f"{self.objects.where(key)}: taken by other bytes than this publish's",
                               code="PreconditionFailed")
        # (info, not a warning: a copy of an instance resumed after an interruption meets every object its
        # first attempt sent, and said so once per object)
        log.info("%s: already holds these bytes (an answer was lost, or an interrupted copy sent them): kept",
                 self.objects.where(key))
        return info.version_id

    def _upload_resource_json(self, rid: str, body: bytes) -> dict[str, str]:
        """resource.json, once per resource: a racing first publisher may have written it already."""
        try:
            version = self.objects.put_new(f"resources/{rid}/resource.json", body,
                                           retain_until=retain_until(self.config))
        except ObjectExists:
            return {}
        return {"resource.json": version} if version not in (None, "null") else {}

    def _claim(self, rid: str, claim: Claim) -> None:
        """The one atomic step: create the claim key. Lost: Stale, after removing our objects."""
        key = _claim_key(rid, claim.previous)
        body = (json.dumps(claim.to_json(), sort_keys=True) + "\n").encode()
        try:
            self.objects.put_new(key, body, retain_until=retain_until(self.config))
        except StoreError:
            # A create that reached the store but whose answer was lost (a retry then sees 412) is
            # ours all the same: ask which instance the claim names before deciding anything.
            winner = self._read_claim_quietly(rid, claim.previous)
            if winner is None:
                raise                       # outcome unknown: nothing removed (recover decides later)
            if winner.instance != claim.instance:
                with self._lock:
                    self._asked.pop(rid, None)      # the rebase that follows must see the winner
                self._remove_unclaimed(rid, claim.instance)
                raise Stale(f"resource {rid!r}: another committer published after "
                            f"{claim.previous or 'nothing'} first") from None
        known = self._known_chain(rid)
        if (known[-1].instance if known else None) == claim.previous:
            self._learn_chain(rid, known + [claim])

    def _remove_unclaimed(self, rid: str, iid: str) -> None:
        """The loser's objects: deleted where the bucket allows (left to `recover` otherwise)."""
        try:
            self._delete_versions(f"resources/{rid}/instances/{iid}/")
        except StoreError as e:
            log.info("unclaimed instance %s/%s left for recover: %s", rid, iid, e)

    # -- recovery and deletion -------------------------------------------------------------------

    def recover(self, older_than: float = RECOVER_AGE) -> list[str]:
        """Unclaimed instances (and resource.json of resources never claimed) older than `older_than`
        seconds: deleted, or listed as orphaned where Object Lock keeps them. Readers never see them."""
        actions: list[str] = []
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        for rid in self.objects.list_names("resources/"):
            if not is_rid(rid):
                continue
            claimed = set(self.instance_ids(rid))
            for iid in self.objects.list_names(f"resources/{rid}/instances/"):
                if iid not in claimed:
                    actions.extend(self._recover_prefix(f"resources/{rid}/instances/{iid}/", cutoff,
                                                        f"unpublished instance {rid}/{iid}"))
            if not claimed:
                actions.extend(self._recover_prefix(f"resources/{rid}/resource.json", cutoff,
                                                    f"resource.json of unpublished resource {rid}"))
        actions.extend(self._abort_unfinished_uploads(cutoff))
        for line in actions:
            log.info("recover: %s", line)
        return actions

    def _abort_unfinished_uploads(self, cutoff: datetime) -> list[str]:
        """Multipart uploads a killed publisher began: their parts are invisible (no object) but stored."""
        actions = []
        for key, upload_id, started in self.objects.unfinished_uploads("resources/"):
            if started <= cutoff:
                self.objects.abort_upload(key, upload_id)
                actions.append(f"aborted an unfinished upload of {key}")
        return actions

    def _recover_prefix(self, prefix: str, cutoff: datetime, what: str) -> list[str]:
        versions = self.objects.list_versions(prefix)
        if not versions or max(v.modified for v in versions if v.modified) > cutoff:
            return []                                   # gone already, or maybe a publish still running
        kept = self._delete_versions(prefix, versions)
        if kept:
            return [f"orphaned {what}: {kept} object(s) kept by the store's retention, never shown"]
        return [f"removed {what} ({len(versions)} object version(s))"]

    def _delete_versions(self, prefix: str, versions: list | None = None) -> int:
        """Delete every version under `prefix`; how many the store's retention kept."""
        kept = 0
        for v in versions if versions is not None else self.objects.list_versions(prefix):
            try:
                self.objects.delete(v.key, version_id=None if v.version_id == "null" else v.version_id)
            except ObjectRetained:
                kept += 1
        return kept

    def purge(self, rid: str) -> None:
        """Delete a resource (dynamic mode only): its first claim first, so it is gone to readers at once."""
        if self.config.mode != "dynamic":
            raise Forbidden(f"purge is allowed in dynamic mode only; this archive is {self.config.mode}")
        if self.head(rid) is None:
            raise NotFound(f"no resource {rid!r}")
        self._delete_versions(_claim_key(rid, None))
        with self._lock:
            self._chains.pop(rid, None)
            self._asked.pop(rid, None)
            self._chain_file(rid).unlink(missing_ok=True)
        self._delete_versions(f"resources/{rid}/")

    # -- the chain ---------------------------------------------------------------------------------

    def _read_claim(self, rid: str, previous: str | None) -> Claim | None:
        """The claim after `previous`, None if there is none yet. Read by its first version on a
        versioned bucket: a later ordinary PUT of the key cannot change the chain readers follow."""
        key = _claim_key(rid, previous)
        try:
            if self.config.mode == "worm":
                versions = self.objects.versions(key)
                if not versions:
                    return None
                if len(versions) > 1:
                    log.warning("claim %s has %d versions; the first is the claim", key, len(versions))
                raw = self.objects.get(key, version_id=_first_version(versions))
            else:
                raw = self.objects.get(key)
        except NoSuchObject:
            return None
        return _parse_claim(self.objects, key, raw, previous)

    def _read_claim_quietly(self, rid: str, previous: str | None) -> Claim | None:
        try:
            return self._read_claim(rid, previous)
        except StoreError:
            return None

    def _known_chain(self, rid: str) -> list[Claim]:
        """A copy of the claims known here, oldest first."""
        with self._lock:
            chain = self._chains.get(rid)
            if chain is None:
                chain = self._chains[rid] = self._load_chain(rid)
            return list(chain)

    def _learn_chain(self, rid: str, chain: list[Claim]) -> None:
        """Keep the longer of two known chains: both are beginnings of the one chain of claims."""
        with self._lock:
            if len(chain) > len(self._chains.get(rid, [])):
                self._chains[rid] = chain
                self._save_chain(rid, chain)

    def _chain_file(self, rid: str) -> Path:
        return self.cache_dir / "chains" / f"{rid}.json"

    def _load_chain(self, rid: str) -> list[Claim]:
        """Claims never change once made, so what this host learnt survives a restart."""
        try:
            return [Claim.from_json(c) for c in json.loads(self._chain_file(rid).read_bytes())]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []

    def _save_chain(self, rid: str, chain: list[Claim]) -> None:
        self._chain_file(rid).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._chain_file(rid), json.dumps([c.to_json() for c in chain]).encode())


def _find(chain: list[Claim], iid: str) -> Claim | None:
    return next((claim for claim in chain if claim.instance == iid), None)


def _claim_key(rid: str, previous: str | None) -> str:
    return f"resources/{rid}/chain/{previous or FIRST}"


def _parse_claim(objects: ObjectStore, key: str, raw: bytes, previous: str | None) -> Claim:
    try:
        claim = Claim.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadClaim(f"{objects.where(key)}: not a claim", code="BadClaim") from None
    if claim.previous != previous or not is_instance_id(claim.instance) or \
            (previous is not None and claim.instance <= previous):
        raise BadClaim(f"{objects.where(key)}: claims {claim.instance!r} after {claim.previous!r}",
                       code="BadClaim")
    return claim


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


class NotSent(Exception):
    """An upload skipped because another of the same publish failed (never raised out of publish)."""


def _bag_files(bag: Path) -> tuple[list[str], list[str]]:
    """(payload files, tag files with instance.json last), relative to the bag, sorted."""
    payload, tags = [], []
    for path in _walk_files(bag):
        rel = path.relative_to(bag).as_posix()
        (payload if rel.startswith("data/") else tags).append(rel)
    tags.sort(key=lambda rel: (rel == "instance.json", rel))
    return sorted(payload), tags


def _walk_files(top: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            yield Path(dirpath) / name


def _cache_name(key: str, version: str | None) -> str:
    return hashlib.sha256(f"{key}\0{version or ''}".encode()).hexdigest()


# -- the read cache ----------------------------------------------------------------------------------


class FileCache:
    """Files in one directory under hashed names, least recently used out first past `limit` bytes.

    A file is fetched into a temporary name and renamed into place, so a crash never leaves a
    partial copy under a real name. What was there at start (a host's restart) is indexed by mtime.
    """

    def __init__(self, directory: Path, limit: int):
        self.directory = directory
        self.limit = limit
        self.tmp = directory / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.total = 0
        self._lock = threading.Lock()
        found = [(p.stat(), p.name) for p in directory.iterdir() if p.is_file()]
        for st, name in sorted(found, key=lambda item: item[0].st_mtime_ns):
            self._sizes[name] = st.st_size
            self.total += st.st_size
        self._evict()

    def get(self, name: str) -> Path | None:
        with self._lock:
            if name not in self._sizes:
                return None
            self._sizes.move_to_end(name)
        return self.directory / name

    def fill(self, name: str, fetch: Callable[[Path], int]) -> Path:
        """Fetch into the cache (outside the lock: several fetches run at once) and return the path."""
        tmp = self.tmp / uuid.uuid4().hex
        size = fetch(tmp)
        os.rename(tmp, self.directory / name)
        with self._lock:
            self.total += size - self._sizes.pop(name, 0)
            self._sizes[name] = size
            self._evict()
        return self.directory / name

    def drop(self, name: str) -> None:
        with self._lock:
            size = self._sizes.pop(name, None)
            if size is not None:
                self.total -= size
                (self.directory / name).unlink(missing_ok=True)

    def _evict(self) -> None:
        while len(self._sizes) > CACHE_KEEP and self.total > self.limit:
            name, size = self._sizes.popitem(last=False)
            self.total -= size
            (self.directory / name).unlink(missing_ok=True)

