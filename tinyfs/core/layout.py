"""An archive root: its config, its working directories, and reading its committed instances.

The committed instances live in the archive's store (`store`, the Protocol of
store.py): the root's own resources/ directory (localstore.LocalStore, format
tinyfs/1, SPEC section 4) or an S3 bucket/prefix (s3store.S3Store). Everything
here reads through the store; only the resource locks and transactions/ are
the root's own.

Committed instances never change, so parsed instance documents are cached by
(rid, iid) without any invalidation (least recently used first out, within a
budget of estimated bytes); only "which instances exist" is read from the
directory each time it is asked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .bagwrite import parse_manifest
from .durable import fsync_dir, write_new
from .errors import AlreadyExists, Busy, InvalidName, NotAnArchive, NotFound
from .events import EventLog
from .ids import check_rid, is_rid
from .localstore import LocalStore
from .model import UNKNOWN, DirEntry, InstanceDoc, State, peek_root, utc_now
from .store import Store, StoreConfig

log = logging.getLogger(__name__)

FORMAT = "tinyfs/1"
MODES = ("preservation", "worm", "dynamic")
DIGESTS = ("sha512", "sha256", "sha384", "sha224", "sha1", "md5")
LOCKS = ".locks"
MOUNT_LOCK = ".mount.lock"  # flock held by the one process (mount or server) owning the transactions


@dataclass(frozen=True)
class Config:
    mode: str
    digests: tuple[str, ...]
    created: str
    immutable: bool = False
    verify_writes: bool = True      # read every newly stored file back from the device before publishing
    identify: bool = True           # identify the formats of new files after each commit (core.formats)

    @property
    def primary(self) -> str:
        return self.digests[0]


def init_archive(root: str | os.PathLike, mode: str = "preservation", digests: list[str] | None = None,
                 immutable: bool = False, verify_writes: bool = True, identify: bool = True) -> Path:
    """Create a new archive at `root` (an absent or empty directory)."""
    root = Path(root).absolute()
    digests = list(dict.fromkeys(digests or ["sha512"]))
    if mode not in MODES:
        raise InvalidName(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for alg in digests:
        if alg not in DIGESTS:
            raise InvalidName(f"unknown digest {alg!r} (choose from {', '.join(DIGESTS)})")
    if digests[0] not in ("sha512", "sha256"):
        raise InvalidName("the first digest must be sha512 or sha256")
    if immutable and mode != "worm":
        raise InvalidName("--immutable goes with --mode worm")
    if (root / "tinyfs.json").exists():
        raise AlreadyExists(f"{root} is already a tinyfs archive")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise AlreadyExists(f"{root} is not empty")
    config = {"format": FORMAT, "mode": mode, "digests": digests, "created": utc_now()}
    if immutable:
        config["immutable"] = True
    if not verify_writes:
        config["verify_writes"] = False      # (absent: on, as in archives made before the option)
    if not identify:
        config["identify"] = False
    # Laid out beside ROOT and renamed onto it (absent, or an empty directory, which a rename replaces):
    # a kill during init leaves ROOT as it was, never a half-made archive that a second init (or a
    # resumed `tinyfs migrate` into ROOT) would refuse as "not empty".
    if root.is_dir() and os.path.samefile(root, "."):
        _lay_out(root, config)          # the working directory: a rename would leave the shell in a deleted one
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = root.parent / f".{root.name}.init-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        _lay_out(stage, config)
        try:
            os.rename(stage, root)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise AlreadyExists(f"{root} is not empty") from None
            if e.errno not in (errno.EXDEV, errno.EBUSY):
                raise
            _lay_out(root, config)      # ROOT is a mount point: laid out in place, the marker last
        fsync_dir(root.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return root


def _lay_out(top: Path, config: dict) -> None:
    """An archive's directories, its first event, and tinyfs.json last, all durable."""
    for sub in ("resources", "transactions", f"transactions/{LOCKS}"):
        (top / sub).mkdir()
    EventLog(top / "events.jsonl").append("archive.created", mode=config["mode"], digests=config["digests"])
    write_new(top / "tinyfs.json", (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())
    fsync_dir(top / "transactions")
    fsync_dir(top)


class ArchiveRoot:
    """An archive root on disk: its config, its resources and their instances."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        try:
            doc = json.loads((self.root / "tinyfs.json").read_text())
        except FileNotFoundError:
            raise NotAnArchive(f"{self.root} is not a tinyfs archive (no tinyfs.json)") from None
        except ValueError as e:
            raise NotAnArchive(f"{self.root}/tinyfs.json is not valid JSON: {e}") from None
        if doc.get("format") != FORMAT:
            raise NotAnArchive(f"{self.root}: unsupported format {doc.get('format')!r}")
        # An archive in an object store (tinyfs.json names its address): committed instances live there, and
        # this directory holds the open transactions, the events and a read cache (docs/store.md).
        self.store: Store
        self.events = EventLog(self.root / "events.jsonl")
        if "store" in doc:
            from .s3archive import open_s3_store, shared_events
            self.store = open_s3_store(self.root, doc)
            self.events = shared_events(self.root, doc, self.store)
            doc = {"mode": self.store.config.mode, "digests": self.store.config.digests,
                   "created": self.store.config.created}
        else:
            self.store = LocalStore(self.root, StoreConfig(doc["mode"], tuple(doc["digests"]), doc["created"]),
                                    bool(doc.get("immutable")))
        self.config = Config(doc["mode"], tuple(doc["digests"]), doc["created"], bool(doc.get("immutable")),
                             doc.get("verify_writes", True) is not False, doc.get("identify", True) is not False)
        self.transactions = self.root / "transactions"
        self.identifier = None      # core.formats.Identifier of a mount or a server: commits handed to it
        # (rid, iid) -> (document, its estimated bytes), least recently used first; see remember()
        self._docs: OrderedDict[tuple[str, str], tuple[InstanceDoc, int]] = OrderedDict()
        self._docs_bytes = 0
        self._docs_lock = threading.Lock()
        self.doc_cache_bytes = DOC_CACHE_BYTES
        # rid -> (instance, keys of every digest stored up to it): see commit._stored_keys (under the lock)
        self.stored_keys: OrderedDict[str, tuple[str, set[int]]] = OrderedDict()
        self.stored_keys_lock = threading.Lock()
        from .history import HistoryIndex  # (here: history.py imports commit.py, which imports this module)
        self.history = HistoryIndex(self)  # every path's versions: derived data in ROOT/index/, opened at first use

    # -- where things are -------------------------------------------------
    def resource_dir(self, rid: str) -> Path:
        """The resource's directory on a local store; on an object store, fsck's fresh copy (Store.local)."""
        return self.store.resource_dir(rid)

    def instance_dir(self, rid: str, iid: str) -> Path:
        return self.resource_dir(rid) / "instances" / iid

    # -- what exists -------------------------------------------------------
    def exists(self, rid: str) -> bool:
        return self.store.exists(rid)

    def resource_ids(self) -> list[str]:
        """Every resource id, sorted: meant for listings, not hot paths (a walk of resources/ locally)."""
        return self.store.resource_ids()

    def instance_ids(self, rid: str) -> list[str]:
        """The resource's instance ids in chain order (UUIDv7 sorts by time)."""
        return self.store.instance_ids(rid) if is_rid(rid) else []

    def head(self, rid: str) -> str | None:
        return self.store.head(rid) if is_rid(rid) else None

    def heads(self, rids: list[str]) -> dict[str, str | None]:
        """The heads of existing resources (of resource_ids())."""
        return self.store.heads(rids)

    def require(self, rid: str) -> str:
        """The head of an existing resource, or NotFound."""
        check_rid(rid)
        head = self.head(rid)
        if head is None:
            raise NotFound(f"no resource {rid!r} in {self.root}")
        return head

    def instance(self, rid: str, iid: str) -> InstanceDoc:
        key = (rid, iid)
        with self._docs_lock:
            cached = self._docs.get(key)
            if cached is not None:
                self._docs.move_to_end(key)
                return cached[0]
        doc = InstanceDoc.from_json_bytes(self.instance_bytes(rid, iid))
        self.remember(rid, iid, doc)
        return doc

    def instance_bytes(self, rid: str, iid: str) -> bytes:
        """The instance's instance.json as stored; NotFound for an instance that does not exist."""
        try:
            return self._instance_json(rid, iid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no instance {iid} of resource {rid!r}") from None

    def _instance_json(self, rid: str, iid: str) -> Path:
        """A local file holding the instance's instance.json (for an object store: a cached copy)."""
        try:
            return self.store.stored_file(rid, f"instances/{iid}/instance.json")
        except NotFound:
            raise NotFound(f"no instance {iid} of resource {rid!r}") from None

    def manifest(self, rid: str, iid: str, alg: str) -> dict[str, str]:
        """"data/..." path -> digest from the instance bag's manifest for `alg` ({} when it has none)."""
        try:
            return parse_manifest(self.store.read_document(rid, f"instances/{iid}/manifest-{alg}.txt").decode())
        except NotFound:
            return {}

    def instance_mtime(self, rid: str, iid: str) -> float:
        """When the instance was published: its directory's mtime on a local store (the rename's time, as
        the mount has always shown it); an object store has no directories, so its `created`."""
        if self.store.local:
            return os.path.getmtime(self.instance_dir(rid, iid))
        return datetime.fromisoformat(self.instance(rid, iid).created.replace("Z", "+00:00")).timestamp()

    def root_entry(self, rid: str, iid: str) -> DirEntry | None:
        """The resource root's recorded mode and mtime at an instance (None: none recorded). Listing
        resources/ asks this of every head: the cached document answers, else the first few KiB of
        instance.json do (model.peek_root), and only a document laid out otherwise is read whole."""
        with self._docs_lock:
            cached = self._docs.get((rid, iid))
        if cached is not None:
            return cached[0].state.root
        try:
            with open(self._instance_json(rid, iid), "rb") as f:
                found = peek_root(f.read(PEEK_BYTES))
        except FileNotFoundError:
            raise NotFound(f"no instance {iid} of resource {rid!r}") from None
        return self.instance(rid, iid).state.root if found is UNKNOWN else found

    def remember(self, rid: str, iid: str, doc: InstanceDoc) -> None:
        """Cache a document: one just read, or one just committed (the same content as its instance.json;
        the view's first look at a resource after a commit then parses nothing: 25 ms for 10,000 files).

        Bounded by estimated bytes, not documents: one instance may list 100,000 paths, another 3, and
        a long-running mount reads thousands of them. The two most recently used documents stay whatever
        their size: comparing two large instances (diff -r) alternates between them, and re-reading a
        100,000-entry instance.json per file took 0.4 s a file. A head evicted here still commits
        correctly, only slower (its instance.json lines are encoded again)."""
        weight = doc_bytes(doc)
        with self._docs_lock:
            old = self._docs.pop((rid, iid), None)
            self._docs[(rid, iid)] = (doc, weight)
            self._docs_bytes += weight - (old[1] if old else 0)
            previous = self._docs.get((rid, doc.previous)) if doc.previous else None
            if previous is not None and previous[1] != (lighter := doc_bytes(previous[0])):
                # a commit moved the encoded lines of the head it followed to this document: weigh it again
                self._docs[(rid, doc.previous)] = (previous[0], lighter)
                self._docs_bytes += lighter - previous[1]
            while len(self._docs) > DOC_CACHE_KEEP and self._docs_bytes > self.doc_cache_bytes:
                self._docs_bytes -= self._docs.popitem(last=False)[1][1]

    def forget_document(self, rid: str, iid: str) -> None:
        """Drop a cached document whose stored instance.json was found damaged and has been repaired."""
        with self._docs_lock:
            old = self._docs.pop((rid, iid), None)
            if old is not None:
                self._docs_bytes -= old[1]

    def state(self, rid: str, iid: str | None = None) -> State:
        """The state at `iid` (default: the head); an empty state for a resource with no instance."""
        iid = iid or self.head(rid)
        return self.instance(rid, iid).state if iid else State()

    def labels(self, rid: str) -> dict[str, str]:
        """label -> instance id. From the history index (caught up to the head first): reading every
        instance document took 42 s on a resource of 1,000 instances of 10,000 files, at each labelled
        commit. Should the index fail (it is derived data), the documents answer."""
        if self.head(rid) is None:
            return {}                       # (no such resource, or one being made: no labels yet)
        try:
            return self.history.labels(rid)
        except NotFound:
            return {}                       # (purged meanwhile)
        except Exception as e:
            log.warning("labels of %s read from the instance documents (the history index failed: %s)", rid, e)
            return {doc.label: iid for iid in self.instance_ids(rid)
                    if (doc := self.instance(rid, iid)).label}

    def resolve_instance(self, rid: str, ref: str | None) -> str:
        """An instance id from an id, a label or None (the head)."""
        head = self.require(rid)
        if ref is None:
            return head
        if ref in self.instance_ids(rid):
            return ref
        labels = self.labels(rid)
        if ref in labels:
            return labels[ref]
        raise NotFound(f"resource {rid!r} has no instance or label {ref!r}")

    def stored_path(self, rid: str, relative: str) -> Path:
        """The file on disk for a `stored` value (relative to the resource directory); for an object store,
        a copy in the bounded read cache (open it at once: a later eviction may remove it)."""
        try:
            return self.store.stored_file(rid, relative)
        except NotFound:
            raise FileNotFoundError(errno.ENOENT, "not in the store", relative) from None

    # -- locks -----------------------------------------------------------
    @contextmanager
    def resource_lock(self, rid: str, wait: bool = True):
        """An exclusive lock per resource, so two committers never interleave (flock: dies with its process)."""
        locks = self.transactions / LOCKS
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{rid}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(f"resource {rid!r} is being committed by another process") from None
            yield
        finally:
            os.close(fd)


PEEK_BYTES = 8192            # `created`, `creator` and the root's line of `dirs` (a longer creator: read it all)
DOC_CACHE_BYTES = 32 << 20   # estimated bytes of all cached documents together (ArchiveRoot.doc_cache_bytes) ...
DOC_CACHE_KEEP = 2           # ... except that the 2 most recently used documents stay whatever their size
# Measured with tracemalloc on a 10,000-file instance (paths of ~30 bytes): a parsed entry with its `stored`
# line costs 754 bytes, and the per-directory index the mount derives from it 156 more; the encoded lines a
# document keeps after it was written (model.InstanceDoc.encoded) cost 709 bytes an entry more.
ENTRY_BYTES = 900
ENCODED_BYTES = 700


def doc_bytes(doc: InstanceDoc) -> int:
    """About how much memory a parsed document takes (what its cache entry is weighed by)."""
    entries = len(doc.state.files) + len(doc.state.dirs) + len(doc.state.links) + 1
    return entries * (ENTRY_BYTES + (ENCODED_BYTES if doc.encoded is not None else 0))


def lock_archive(archive: ArchiveRoot) -> int:
    """Hold the archive's mount lock for the life of the process; Busy when another mount has it."""
    locks = archive.transactions / LOCKS
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / MOUNT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"{archive.root} is already in use by another tinyfs process (mount or server)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
