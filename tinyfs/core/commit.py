"""Turning a transaction into a new instance: atomic, durable, deduplicated.

Under the resource lock, in transactions/.commit-<rid>-<iid>/ (the stage), the phases of
`_commit_locked` (SPEC sections 3-6), each a function of its own:
  read_base_and_head  the state the changes were made against, and the head (ESTALE: base gone)
  hash_new_files      every new file gets all configured digests (on all cores; a user's file is
                      copied into the stage while it is hashed)
  merge_request       the changes applied on top of the head (ESTALE when a path changed on both
                      sides), checked; then the label; nothing to commit ends here
  plan_bag            which digests the new bag stores (once per resource), under which names
  place_payload       hard links of staged blobs (or the copies) into the bag's data/
  write_tags          manifests, bag-info.txt, instance.json
  flush               one syncfs: every byte of the stage is durable
  verify_writes       every file of the new bag read back from the device (its pages dropped first)
                      and hashed: a mismatch fails the commit (EIO); then `before_publish` is told
  publish             the store's publish (a local store: one rename into resources/, its
                      directory fsynced): the instance exists whole or not at all
  record              caches, dynamic mode's older instances, the history index, the event
A crash anywhere before `publish` leaves only the stage, which `recover` deletes; after it,
leftovers `recover` also deletes (an object store's unclaimed uploads: its own `recover`).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import bagwrite, replicas, tree
from .digests import copy_and_hash, hash_file, hash_file_object, parallel
from .durable import write_new
from .errors import Forbidden, Inconsistent, LabelTaken, NameTooLong, NotFound, Stale, WriteNotVerified
from .ids import PATH_MAX, check_rid, new_instance_id, parent_of
from .layout import ArchiveRoot
from .limits import check_metadata
from .model import (
    DirEntry,
    Entry,
    FileEntry,
    Group,
    InstanceDoc,
    LinkEntry,
    State,
    group_index,
    group_problems,
    link_groups,
    utc_now,
)

log = logging.getLogger(__name__)

COMMIT_PREFIX = ".commit-"
KEEP_PREFIX = ".api-commit-"   # users' files kept across an object store commit's tries (recover sweeps .api-*)
PUBLISH_TRIES = 8              # lost races to publish on an object store before a commit fails with ESTALE
ALT_DIR = ".tinyfs"
# Longest absolute path we let a stored file reach (PATH_MAX is 4096 with the NUL).
MAX_STORED_ABSPATH = 4000
# Deepest directory level of a stored file under data/: bagit-python walks a bag with os.walk, which
# recurses once per level on Python 3.11 and fails past about 990 (a deeper file gets a chosen name).
MAX_STORED_DEPTH = 256


@dataclass
class NewFile:
    """Bytes not yet in the archive: a staged blob (linkable) or a user's file (copied)."""

    source: str | os.PathLike           # (a str from the mount: 10,000 Path objects cost more than the links)
    size: int
    mode: int
    mtime_ns: int
    xattrs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] | None = None
    linkable: bool = True
    label: str = ""          # the logical path, for error messages

    def entry(self, primary: str) -> FileEntry:
        return FileEntry(self.digests[primary], self.size, self.mode, self.mtime_ns, self.xattrs)


Change = FileEntry | NewFile | LinkEntry | DirEntry | None


@dataclass
class CommitRequest:
    rid: str
    base: str | None                     # the head the changes were made against
    changes: dict[str, Change]           # path -> new entry, or None to remove
    full: bool = False                   # True: `changes` is the whole target state, not a delta
    walked: bool = False                 # True: applied to `base`, the changes give a tree walked from its
                                         # root (every parent exists): no need to check the tree again
    message: str = ""
    creator: str = ""
    label: str | None = None
    # told the new iid once the bag is durable, just before the rename that publishes it (raising aborts)
    before_publish: Callable[[str], None] | None = None
    on_phase: Callable[[str], None] | None = None    # told "verifying" when the read-back starts
    # The link groups of the whole target state (what was one inode in the transaction), made against
    # `base`; None: the base's groups, less the paths the changes touch.
    hardlinks: tuple[Group, ...] | None = None
    root: DirEntry | None = None         # the resource root's mode and mtime; None: as the head has them
    copies: int | None = None            # stores (the primary counted) that must take the instance; None:
                                         # as ROOT/replicas.json says (replicas.py)
    origin: dict | None = None           # instance.json's `origin` (a merge's: core/migrate.py)


@dataclass
class CommitResult:
    instance: str | None                 # None: nothing changed, nothing committed
    added: int = 0
    changed: int = 0
    removed: int = 0
    bytes_stored: int = 0
    files_stored: int = 0
    behind: list[str] = field(default_factory=list)   # replicas that did not take the instance (yet)
    short: bool = False                  # fewer stores than required hold it: see replicas.replicate_commit


class LostClaim(Stale):
    """Another host published after the same head first (object store): the commit rebases and tries again."""


def commit(archive: ArchiveRoot, req: CommitRequest, progress: Callable[[int], None] | None = None) -> CommitResult:
    check_rid(req.rid)
    check_metadata(req.message, req.creator, req.label)
    replicas.check_reachable(archive, req.rid, req.copies)     # (too few stores: refused, nothing written)
    if archive.store.local:         # every committer of the resource waits for its lock: no race to lose
        result = _commit_once(archive, req, progress)
    else:
        result = _commit_to_store(archive, req, progress)
    if result.instance is not None:
        result.behind, result.short = replicas.replicate_commit(archive, req.rid, result.instance, req.copies)
    return result


def _commit_to_store(archive: ArchiveRoot, req: CommitRequest, progress) -> CommitResult:
    """The resource lock orders this host's committers only: another host may publish after the same head
    first (LostClaim). Then the commit rebases onto the new head and tries again, as a local committer that
    waited for the lock would have merged; ESTALE after PUBLISH_TRIES lost races or a real conflict."""
    keep = _keep_user_files(archive, req, progress)
    try:
        for attempt in range(1, PUBLISH_TRIES + 1):
            try:
                return _commit_once(archive, req, progress)
            except LostClaim as e:
                log.info("%s: lost the race to publish (try %d of %d): %s", req.rid, attempt, PUBLISH_TRIES, e)
                if attempt == PUBLISH_TRIES:
                    archive.events.append("commit.failed", req.rid, None, error=str(e))
                    raise
        raise AssertionError("unreachable")
    finally:
        if keep is not None:
            tree.rmtree(keep, ignore_errors=True, force=True)


def _keep_user_files(archive: ArchiveRoot, req: CommitRequest, progress) -> Path | None:
    """Copy (and hash) users' files once, before the first try, so that every try links the same copies
    (a try moves its copies into its bag, and a lost try's bag is deleted)."""
    users = {p: c for p, c in req.changes.items() if isinstance(c, NewFile) and not c.linkable}
    if not users:
        return None
    keep = archive.transactions / f"{KEEP_PREFIX}{uuid.uuid4().hex}"
    keep.mkdir()
    try:
        hash_new_files(users, archive.config.digests, keep, progress)
    except BaseException:
        tree.rmtree(keep, ignore_errors=True, force=True)
        raise
    for nf in users.values():
        nf.linkable = True
    return keep


def _commit_once(archive: ArchiveRoot, req: CommitRequest, progress) -> CommitResult:
    with archive.resource_lock(req.rid):
        head = archive.head(req.rid)
        iid = new_instance_id(after=head)
        stage = archive.transactions / f"{COMMIT_PREFIX}{req.rid}-{iid}"
        stage.mkdir()
        try:
            return _commit_locked(archive, req, head, iid, stage, progress)
        except BaseException as e:
            tree.rmtree(stage, ignore_errors=True, force=True)
            if archive.config.mode == "worm":
                owner_writable(c.source for c in req.changes.values() if isinstance(c, NewFile) and c.linkable)
            if isinstance(e, Exception) and not isinstance(e, LostClaim):  # (a bug too: the log says so)
                archive.events.append("commit.failed", req.rid, None, error=str(e))
            raise


def _commit_locked(archive: ArchiveRoot, req: CommitRequest, head: str | None, iid: str, stage: Path,
                   progress) -> CommitResult:
    """The phases of a commit, in order; nothing is visible to readers before `publish`."""
    base_state, head_doc = read_base_and_head(archive, req, head)
    head_state = head_doc.state if head_doc else State()
    pending = stage / "pending"
    pending.mkdir()
    new_files = hash_new_files(req.changes, archive.config.digests, pending, progress)
    merged, delta = merge_request(req, base_state, head_state, head, archive.config.primary)
    if req.label is not None and req.label in archive.labels(req.rid):
        raise LabelTaken(f"label {req.label!r} is already used by resource {req.rid!r}")
    if _nothing_to_commit(req, head, merged, head_state):
        archive.events.append("transaction.unchanged", req.rid, head)
        shutil.rmtree(stage)
        return CommitResult(None)
    plan = plan_bag(archive, req.rid, head, head_doc, merged, new_files, stage, iid)
    place_payload(plan)
    shutil.rmtree(pending)
    doc = write_tags(archive, req, head, head_doc, merged, plan)
    flush(archive, req, stage, doc, new_resource=head is None)
    verify_writes(archive, req, plan)
    if req.before_publish:
        req.before_publish(doc.id)
    publish(archive, req.rid, iid, stage, previous=head)
    return record(archive, req, head_state, delta, plan, doc)


def read_base_and_head(archive: ArchiveRoot, req: CommitRequest, head: str | None) -> tuple[State, InstanceDoc | None]:
    """The state the changes were made against, and the head's document: ESTALE when the base is gone."""
    if req.base is not None and head is None:
        raise Stale(f"resource {req.rid!r} no longer exists")
    try:
        base_state = archive.state(req.rid, req.base) if req.base else State()
    except NotFound:
        raise Stale(f"instance {req.base} of {req.rid!r}, which the changes were made against, "
                    "no longer exists (dynamic mode replaced it)") from None
    return base_state, archive.instance(req.rid, head) if head else None


def merge_request(req: CommitRequest, base_state: State, head_state: State, head: str | None,
                  primary: str) -> tuple[State, dict[str, Entry | None]]:
    """(the new state, the delta from the base): the request's changes, made against its base, applied on
    top of the head and checked. Every NewFile has its digests by now (hash_new_files)."""
    changes = {p: (c.entry(primary) if isinstance(c, NewFile) else c) for p, c in req.changes.items()}
    delta = state_changes(base_state, changes) if req.full else _drop_noops(base_state, changes)
    groups = link_groups(req.hardlinks) if req.hardlinks is not None else _surviving(base_state.hardlinks, delta)
    merged = _merge(base_state, head_state, delta, req.rid, head_is_base=head == req.base, groups=groups)
    merged.root = _merge_root(base_state, head_state, req.root, req.rid)
    if not (req.walked and head == req.base):   # else merged is the caller's walked tree itself
        _check_tree(merged)
    _check_groups(merged)
    _check_lengths(delta)
    return merged, delta


def _nothing_to_commit(req: CommitRequest, head: str | None, merged: State, head_state: State) -> bool:
    """An existing resource whose state (and label) would not change; a new one with nothing in it."""
    if head is None:
        return not merged.entries()
    return _same_state(merged, head_state) and req.label is None


# (os.link or os.rename, source, destination): how one payload file gets into the new bag
Placement = tuple[Callable, str | os.PathLike, str]


@dataclass
class BagPlan:
    """Where every payload file of the new bag comes from, decided before anything is written."""

    iid: str                               # the new instance
    bag: Path                              # its bag in the stage: <stage>/instances/<iid>
    stored: dict[str, str]                 # digest -> stored path (from the resource) of every file of the new state
    to_store: list[str]                    # the digests this bag stores itself; earlier bags store the rest
    sources: dict[str, NewFile]            # digest -> the new file that brings its bytes
    placements: list[Placement] = field(default_factory=list)
    payload: dict[str, dict[str, str]] = field(default_factory=dict)   # "data/..." -> digests (manifests)
    total: int = 0                         # payload bytes


def plan_bag(archive: ArchiveRoot, rid: str, head: str | None, head_doc: InstanceDoc | None, merged: State,
             new_files: list[NewFile], stage: Path, iid: str) -> BagPlan:
    """Which digests the new bag stores, under which names, from which sources (reads only)."""
    cfg = archive.config
    dynamic = cfg.mode == "dynamic"
    stored, to_store = _already_stored(archive, rid, head, None if dynamic else head_doc, merged, cfg.primary)
    bag = stage / "instances" / iid
    plan = BagPlan(iid, bag, stored, to_store, _sources_by_digest(new_files, cfg.primary))
    first_path = _first_paths(merged, set(to_store))
    names = _stored_names({d: first_path[d] for d in to_store}, archive, rid, iid, stage)
    bag_str = os.fspath(bag)          # plain strings here: Path objects were a third of a 10,000-file commit
    placements, payload, sources = plan.placements, plan.payload, plan.sources
    for digest in to_store:
        rel = names[digest]
        dest = f"{bag_str}/{rel}"
        if digest in sources:
            src = sources[digest]
            placements.append((os.link if src.linkable else os.rename, src.source, dest))
            payload[rel] = src.digests
            size = src.size
        else:  # dynamic mode: bytes kept from the instance being replaced
            old_rel = head_doc.stored[digest]
            placements.append((os.link, archive.stored_path(rid, old_rel), dest))
            payload[rel] = _manifest_digests(archive, rid, old_rel, cfg.digests)
            size = merged.files[first_path[digest]].size
        stored[digest] = f"instances/{iid}/{rel}"
        plan.total += size
    return plan


def _already_stored(archive: ArchiveRoot, rid: str, head: str | None, head_doc: InstanceDoc | None,
                    merged: State, primary: str) -> tuple[dict[str, str], list[str]]:
    """(digest -> stored path, for the files of `merged` whose bytes the head or an earlier instance stores;
    the other digests, sorted). `head_doc` None: nothing is looked up (a new resource; dynamic mode)."""
    needed = {f.digest for f in merged.files.values()}
    stored: dict[str, str] = {}
    if head_doc:
        stored = {d: p for d, p in head_doc.stored.items() if d in needed}
    to_store = sorted(needed - set(stored))
    if to_store and head_doc:   # bytes the head dropped may still be stored further back
        stored.update(_stored_earlier(archive, rid, head, set(to_store), primary))
        to_store = [d for d in to_store if d not in stored]
    return stored, to_store


def _first_paths(state: State, digests: set[str]) -> dict[str, str]:
    """digest -> the first path (sorted) of `state` with those bytes, for each of `digests`."""
    first: dict[str, str] = {}
    for path in sorted(p for p, f in state.files.items() if f.digest in digests):
        first.setdefault(state.files[path].digest, path)
    return first


def place_payload(plan: BagPlan) -> None:
    """The bag's data/ directories, then every payload file linked (or moved) into place."""
    (plan.bag / "data").mkdir(parents=True)
    made_dirs: set[str] = set()
    for _op, _source, dest in plan.placements:
        parent = dest.rpartition("/")[0]
        if parent not in made_dirs:
            tree.makedirs(parent)
            made_dirs.add(parent)
    _place(plan.placements)


def write_tags(archive: ArchiveRoot, req: CommitRequest, head: str | None, head_doc: InstanceDoc | None,
               merged: State, plan: BagPlan) -> InstanceDoc:
    """The bag's tag files and instance.json (not yet durable: see `flush`); worm mode makes it read-only."""
    cfg = archive.config
    iid = plan.iid
    doc = InstanceDoc(iid, req.rid, head, utc_now(), req.message or "", req.creator or "", req.label,
                      cfg.primary, merged, plan.stored, req.origin)   # (unsorted: instance.json sorts)
    info = bagwrite.bag_info(req.rid, plan.total, len(plan.payload), [
        ("Internal-Sender-Description", doc.message), ("Contact-Name", doc.creator),
        ("Tinyfs-Label", doc.label or ""), ("Tinyfs-Instance", iid), ("Tinyfs-Previous", head or "")])
    worm = cfg.mode == "worm"
    document = doc.to_json_bytes(previous=head_doc)     # (re-encodes only what changed since the head)
    bagwrite.write_tag_files(plan.bag, cfg.digests, plan.payload, info, {"instance.json": document},
                             mode=0o444 if worm else 0o644)
    if worm:
        _make_read_only(plan.bag)
    return doc


def flush(archive: ArchiveRoot, req: CommitRequest, stage: Path, doc: InstanceDoc, new_resource: bool) -> None:
    """Make the whole stage durable (with resource.json for a new resource)."""
    if new_resource:
        write_new(stage / "resource.json", f'{{"created": "{doc.created}", "id": "{req.rid}"}}\n'.encode(),
                  0o444 if archive.config.mode == "worm" else 0o644)
    bagwrite.syncfs(stage)                      # every payload byte and tag file of the new bag, in one call


def verify_writes(archive: ArchiveRoot, req: CommitRequest, plan: BagPlan) -> None:
    """Read every file of the new bag back from the device and compare its digest with the one taken
    while it was written: a disk or controller that acknowledged a write it did not make, or made wrong,
    fails the commit here (WriteNotVerified, EIO, naming the file) instead of in a fixity check years on.
    The transaction is left as it was, but a file it shares with the bag (a hard link) shares the damage:
    it must be written again. A file's pages are clean after the flush, so dropping them
    (POSIX_FADV_DONTNEED) makes the read come from the device, not from the page cache that holds what
    was meant to be written. Off with `init --no-verify-writes`; an object store checks its uploads itself
    (s3store: size and MD5)."""
    if not (archive.config.verify_writes and archive.store.local):
        return
    if req.on_phase:
        req.on_phase("verifying")
    alg = archive.config.primary
    expected = {rel: digests[alg] for rel, digests in plan.payload.items()}
    expected.update(_tag_digests(plan.bag, alg))

    def check(item: tuple[str, str]) -> None:
        rel, digest = item
        found = read_back_digest(plan.bag / rel, alg)
        if found != digest:
            raise WriteNotVerified(f"{req.rid}: {rel} read back from the disk is not what was written ({alg} "
                                   f"expected {digest[:16]}… found {found[:16]}…): nothing was committed; "
                                   "check the disk, then write the file again", path=rel)

    parallel(check, sorted(expected.items()))


def _tag_digests(bag: Path, alg: str) -> dict[str, str]:
    """The tag files of a bag just written, with their digests from its tag manifest."""
    out = {}
    for line in (bag / f"tagmanifest-{alg}.txt").read_text("utf-8").splitlines():
        digest, _, rel = line.partition(" ")
        out[rel.strip()] = digest
    return out


def read_back_digest(path: Path, alg: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with open(fd, "rb", buffering=0, closefd=False) as f:
            return hash_file_object(f, alg)
    finally:
        os.close(fd)


def publish(archive: ArchiveRoot, rid: str, iid: str, stage: Path, previous: str | None) -> None:
    """The atomic step, the store's: a local store renames the staged bag (for a new resource, the whole
    stage) into resources/; an object store uploads it, then claims its place after `previous`
    (docs/store.md). The instance exists whole or not at all. LostClaim when another host came first."""
    body = (stage / "resource.json").read_bytes() if previous is None else None
    try:
        archive.store.publish(rid, iid, previous, stage / "instances" / iid, resource_json=body)
    except Stale as e:
        raise LostClaim(str(e)) from None
    tree.rmtree(stage, ignore_errors=True, force=True)     # what the publish left of the stage


def record(archive: ArchiveRoot, req: CommitRequest, head_state: State, delta: dict[str, Entry | None],
           plan: BagPlan, doc: InstanceDoc) -> CommitResult:
    """After the publication: immutability, the caches, dynamic mode's older instances, the event."""
    cfg = archive.config
    iid = doc.id
    counts = _counts(head_state, doc.state, delta)
    if cfg.immutable:
        _make_immutable(archive.instance_dir(req.rid, iid), plan.sources.values())
    archive.remember(req.rid, iid, doc)         # (after the rename: the instance exists)
    if cfg.mode != "dynamic":
        _note_stored(archive, req.rid, doc.previous, iid, plan.to_store)
    elif doc.previous is not None:
        drop_older_instances(archive, req.rid, iid)
    # the history index (derived data: never fails the commit); `delta` is the change from the head when
    # nobody committed since the base (a diff of 10,000 entries cost a commit 15 ms)
    archive.history.note_commit(doc, head_state, delta if doc.previous == req.base else None)
    result = CommitResult(iid, *counts, bytes_stored=plan.total, files_stored=len(plan.payload))
    archive.events.append("transaction.committed", req.rid, iid, added=result.added, changed=result.changed,
                          removed=result.removed, bytes_stored=plan.total, files_stored=len(plan.payload),
                          label=req.label, message=doc.message)
    return result


def _make_immutable(bag: Path, sources) -> None:
    """chattr +i on the published bag; its payload's staging names go first (an immutable file could not
    lose them later)."""
    for src in sources:
        if src.linkable:
            try:
                os.unlink(src.source)
            except OSError:
                pass
    set_immutable_tree(bag)


PLACE_CHUNK = 256     # placements per thread hand-off


def _place(placements: list[tuple[Callable, str | os.PathLike, str]]) -> None:
    """Link (or rename) every new file into the bag, on all cores: a link is one system call that
    releases the GIL, and ext4 makes links into different directories at once (10,000 links: 115 ms
    in one thread, 68 ms in two, here). Nothing is visible until the bag's rename; on an error the
    caller deletes the whole stage, so links other threads made meanwhile do not matter."""
    def place(chunk: list) -> None:
        for op, source, dest in chunk:
            op(source, dest)
    if len(placements) <= PLACE_CHUNK:
        place(placements)
        return
    parallel(place, [placements[i:i + PLACE_CHUNK] for i in range(0, len(placements), PLACE_CHUNK)])


def hash_new_files(changes: dict[str, Change], algorithms, pending: Path, progress) -> list[NewFile]:
    """Give every NewFile all configured digests: hash staged blobs that lack them; copy users' files
    into `pending` while hashing them (one read pass), all on every core."""
    todo = [c for c in changes.values() if isinstance(c, NewFile)]
    for p, c in changes.items():
        if isinstance(c, NewFile):
            c.label = p

    def resolve(item: tuple[int, NewFile]) -> None:
        n, nf = item
        if not nf.linkable:
            copy = pending / str(n)
            try:
                nf.digests, nf.size = copy_and_hash(nf.source, copy, algorithms, progress)
            except FileNotFoundError:
                raise NotFound(f"{nf.source}: no such file", path=nf.label) from None
            nf.source = copy
        elif nf.digests is None or not all(a in nf.digests for a in algorithms):
            nf.digests = hash_file(nf.source, algorithms, progress)
            if os.stat(nf.source).st_size != nf.size:
                raise Inconsistent(f"{nf.label}: changed while it was being committed", path=nf.label)

    work = [(n, nf) for n, nf in enumerate(todo)
            if not nf.linkable or nf.digests is None or not all(a in nf.digests for a in algorithms)]
    parallel(resolve, work)
    return todo


def _sources_by_digest(new_files: list[NewFile], primary: str) -> dict[str, NewFile]:
    out: dict[str, NewFile] = {}
    for nf in sorted(new_files, key=lambda f: f.label):
        out.setdefault(nf.digests[primary], nf)
    return out


def state_changes(base: State, target: dict[str, Entry]) -> dict[str, Entry | None]:
    """The changes that turn `base` into the full state `target` (None: removed), identity first."""
    delta: dict[str, Entry | None] = {}
    before = base.entries()
    for path, entry in target.items():
        if not _same(before.get(path), entry):
            delta[path] = entry
    for path in before:
        if path not in target:
            delta[path] = None
    return delta


def _drop_noops(base: State, changes: dict[str, Entry | None]) -> dict[str, Entry | None]:
    before = base.entries()
    return {p: e for p, e in changes.items() if not _same(before.get(p), e)}


def _same(a: Entry | None, b: Entry | None) -> bool:
    """Entry equality, identity first: an untouched entry is the very object of the state it came from
    (a dataclass `==` builds two tuples; 10,000 of them were a tenth of a commit)."""
    return a is b or a == b


def _merge(base: State, head: State, delta: dict[str, Entry | None], rid: str, head_is_base: bool = False,
           groups: tuple[Group, ...] | None = None) -> State:
    """Apply `delta` (made against `base`, whose link groups become `groups`: default, the base's less
    the delta's paths) on top of `head`; ESTALE when a path changed on both sides, its link group
    (which paths share its inode) included."""
    if groups is None:
        groups = _surviving(base.hardlinks, delta)
    if head_is_base:          # nobody committed meanwhile: no clash
        result_groups = groups
    else:
        theirs = state_changes(base, head.entries())
        clash = sorted(p for p in delta if p in theirs and not _same(theirs[p], delta[p]))
        result_groups = _merge_groups(base, head, delta, theirs, groups, clash)
        if clash:
            raise Stale(f"resource {rid!r} changed meanwhile and {clash[0]!r} changed on both sides",
                        path=clash[0])
    # copies of the head's three maps (C speed), then the delta; unsorted: whatever is written sorts its keys
    result = State(dict(head.files), dict(head.links), dict(head.dirs), hardlinks=result_groups)
    for path, entry in delta.items():
        result.files.pop(path, None)
        result.links.pop(path, None)
        result.dirs.pop(path, None)
        if isinstance(entry, FileEntry):
            result.files[path] = entry
        elif isinstance(entry, LinkEntry):
            result.links[path] = entry
        elif entry is not None:
            result.dirs[path] = entry
    return result


def _surviving(groups: tuple[Group, ...], delta: dict) -> tuple[Group, ...]:
    """The link groups left when the paths of `delta` leave theirs (a changed path is its own inode)."""
    if not groups or not delta:
        return groups
    return link_groups([p for p in group if p not in delta] for group in groups)


def _left(group: Group | None, changed) -> Group | None:
    """What is left of a link group when its changed paths leave it (a changed path is its own inode)."""
    if group is None:
        return None
    left = tuple(p for p in group if p not in changed)
    return left if len(left) >= 2 else None


def _regrouped(before: dict[str, Group], after: dict[str, Group], changed) -> set[str]:
    """The paths, not in `changed`, whose link group (path -> group maps) is not what is left of their
    group before: linked to another path, unlinked from one that stays, regrouped. A path whose partner
    was removed or rewritten has not changed by that itself."""
    return {p for p in before.keys() | after.keys() if p not in changed and after.get(p) != _left(before.get(p), changed)}


def _merge_groups(base: State, head: State, delta: dict, theirs: dict, ours: tuple[Group, ...],
                  clash: list[str]) -> tuple[Group, ...]:
    """The link groups of `delta` (made against `base`, giving `ours`) applied on top of `head`. A path
    is touched by a side when that side changed its entry or regrouped it; a side touches whole groups
    of its own grouping. A path takes its group from the side that touched it; a path neither touched
    keeps what is left of its base group. A path both touched must end alike on both sides (entry and
    group), else it is a clash (added to `clash`). So every group names paths that exist with one entry."""
    before, mine, other = group_index(base.hardlinks), group_index(ours), group_index(head.hardlinks)
    ours_touched = set(delta) | _regrouped(before, mine, delta)
    theirs_touched = set(theirs) | _regrouped(before, other, theirs)
    base_entries = None
    for path in sorted(ours_touched & theirs_touched):
        if path in clash:
            continue
        base_entries = base_entries if base_entries is not None else base.entries()
        our_entry = delta[path] if path in delta else base_entries.get(path)
        their_entry = theirs[path] if path in theirs else base_entries.get(path)
        if not _same(our_entry, their_entry) or mine.get(path) != other.get(path):
            clash.append(path)
    clash.sort()
    changed = delta.keys() | theirs.keys()
    groups = set()
    for path in before.keys() | mine.keys() | other.keys():
        if path in ours_touched:
            group = mine.get(path)
        elif path in theirs_touched:
            group = other.get(path)
        else:
            group = _left(before.get(path), changed)
        if group is not None:
            groups.add(group)
    return link_groups(groups)


def _check_groups(state: State) -> None:
    """Link groups whose paths are not one file (bytes that changed while they were read, for one)."""
    problems = group_problems(state)
    if problems:
        path, why = problems[0]
        raise Inconsistent(f"{path}: {why} (hard links must show one file: did it change during the commit?)",
                      path=path)



def _merge_root(base: State, head: State, root: DirEntry | None, rid: str) -> DirEntry | None:
    """The resource root's mode and mtime after the commit: the request's when it changed them against
    its base (ESTALE when the head changed them too, otherwise), else the head's. Like any directory's."""
    if root is None or _same(root, base.root):
        return head.root
    if not _same(head.root, base.root) and not _same(head.root, root):
        raise Stale(f"resource {rid!r} changed meanwhile and the mode or time of its root changed on both sides")
    return root


def _same_state(a: State, b: State) -> bool:
    return a.files == b.files and a.links == b.links and a.dirs == b.dirs and a.root == b.root and \
        link_groups(a.hardlinks) == link_groups(b.hardlinks)    # dict == compares identity first


def _check_tree(state: State) -> None:
    """Every entry's parent is a directory of the state (a merge can break this)."""
    for path in state.entries():
        parent = parent_of(path)
        if parent and parent not in state.dirs:
            raise Stale(f"{path!r} has no parent directory in the merged state", path=path)


def _check_lengths(delta: dict) -> None:
    """A logical path longer than PATH_MAX (a mount builds one with relative names: no syscall sees it
    whole) would make an instance fsck calls damaged: refused (ENAMETOOLONG), the transaction intact."""
    for path in delta:
        if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
            raise NameTooLong(f"{path[:60]}...: path longer than {PATH_MAX} bytes", path=path)


def _counts(before: State, after: State, delta: dict) -> tuple[int, int, int]:
    """Files added, changed, removed from `before` (the head) to `after` (the head with `delta` applied):
    only the delta's paths can differ."""
    old, new = before.files, after.files
    added = sum(1 for p in delta if p in new and p not in old)
    changed = sum(1 for p in delta if p in new and p in old and not _same(old[p], new[p]))
    removed = sum(1 for p in delta if p in old and p not in new)
    # a file linked to another, or unlinked from one, is changed too (its group is part of its record)
    if before.hardlinks or after.hardlinks:
        regrouped = _regrouped(group_index(before.hardlinks), group_index(after.hardlinks), delta)
        changed += sum(1 for p in regrouped if p in old and p in new)
    return added, changed, removed


def _stored_names(wanted: dict[str, str], archive: ArchiveRoot, rid: str, iid: str, stage: Path) -> dict[str, str]:
    """digest -> "data/..." name in the bag: the logical path where it is safe, else a short chosen name."""
    final_prefix = len(os.fsencode(archive.instance_dir(rid, iid) / "data")) + 1
    stage_prefix = len(os.fsencode(stage / "instances" / iid / "data")) + 1
    room = MAX_STORED_ABSPATH - max(final_prefix, stage_prefix)
    own: dict[str, str] = {}
    other: list[str] = []
    for digest, path in wanted.items():
        # bagit-python strips trailing whitespace (str.strip) off manifest paths: such names are chosen too
        if any(c in path for c in "%\r\n") or path != path.rstrip() or len(path.encode()) > room \
                or path.count("/") >= MAX_STORED_DEPTH:
            other.append(digest)
        else:
            own[digest] = path
    tops = {p.split("/", 1)[0] for p in own.values()}
    alt = ALT_DIR
    n = 0
    while alt in tops:
        n += 1
        alt = f"{ALT_DIR}-{n}"
    names = {d: f"data/{p}" for d, p in own.items()}
    names.update({d: f"data/{alt}/{d[:40]}" for d in other})
    return names


STORED_KEYS_MAX = 200_000    # stored-digest keys a process keeps (~80 bytes each), beyond the last resource's


def _key(digest: str) -> int:
    try:
        return int(digest[:15], 16)
    except ValueError:      # not hex (a damaged manifest line): matches no digest tinyfs computes
        return -1


def _stored_keys(archive: ArchiveRoot, rid: str, head: str, primary: str) -> set[int]:
    """Keys (the first 60 bits) of every digest that an instance up to `head` stores, from the bags'
    manifests the first time, then kept up to date by `_note_stored` (instances are never removed
    outside dynamic mode, which does not look back). The caller holds the resource lock."""
    with archive.stored_keys_lock:
        known = archive.stored_keys.get(rid)
        if known is not None and known[0] == head:
            archive.stored_keys.move_to_end(rid)
            return known[1]
    keys = set()
    for iid in archive.instance_ids(rid):
        keys.update(_key(d) for d in archive.manifest(rid, iid, primary).values())
        if iid == head:
            break
    _remember_keys(archive, rid, head, keys)
    return keys


def _note_stored(archive: ArchiveRoot, rid: str, head: str | None, iid: str, digests) -> None:
    """The new instance `iid` (on top of `head`) stores `digests`: move the resource's keys on to it."""
    with archive.stored_keys_lock:
        known = archive.stored_keys.pop(rid, None)
    if head is None:
        known = (None, set())
    if known is not None and known[0] == head:
        known[1].update(_key(d) for d in digests)
        _remember_keys(archive, rid, iid, known[1])


def _remember_keys(archive: ArchiveRoot, rid: str, iid: str, keys: set[int]) -> None:
    with archive.stored_keys_lock:
        archive.stored_keys[rid] = (iid, keys)
        archive.stored_keys.move_to_end(rid)
        while len(archive.stored_keys) > 1 and \
                sum(len(k) for _, k in archive.stored_keys.values()) > STORED_KEYS_MAX:
            archive.stored_keys.popitem(last=False)


def _stored_earlier(archive: ArchiveRoot, rid: str, head: str, wanted: set[str], primary: str) -> dict[str, str]:
    """digest -> stored path for wanted digests that an instance before the head stores (SPEC 3: content
    is stored once per resource). Reads each earlier bag's manifest: it lists exactly what that bag stores,
    but only when a wanted digest may be there at all: reading a long history for new bytes cost a
    commit 0.1 ms a small manifest and 7 ms a 10,000-line one, and new bytes are the common case."""
    keys = _stored_keys(archive, rid, head, primary)
    wanted = {d for d in wanted if _key(d) in keys}
    found: dict[str, str] = {}
    if not wanted:
        return found
    for iid in reversed(archive.instance_ids(rid)):
        if iid == head:
            continue
        for path, digest in archive.manifest(rid, iid, primary).items():
            if digest in wanted and digest not in found:
                found[digest] = f"instances/{iid}/{path}"
        if len(found) == len(wanted):
            break
    return found


def _manifest_digests(archive: ArchiveRoot, rid: str, stored_rel: str, algorithms) -> dict[str, str]:
    """Every configured digest of a stored file, from the manifests of the bag that holds it."""
    _instances, iid, inner = stored_rel.split("/", 2)          # instances/<iid>/data/...
    out = {}
    for alg in algorithms:
        digest = archive.manifest(rid, iid, alg).get(inner)
        if digest is None:
            digest = hash_file(archive.stored_path(rid, stored_rel), [alg])[alg]
        out[alg] = digest
    return out


def owner_writable(paths) -> None:
    """Worm mode makes a new bag read-only, and staged blobs are hard links of its files (one inode): a
    commit that fails or is interrupted gives them back their owner's write permission (a daemon that
    does not run as root could not write them again otherwise)."""
    for path in paths:
        try:
            if not os.lstat(path).st_mode & stat.S_IWUSR:
                os.chmod(path, 0o600)
        except FileNotFoundError:
            pass


def _make_read_only(top: Path) -> None:
    for dirpath, _dirs, files in tree.walk(top, topdown=False):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def set_immutable(path: Path, on: bool = True) -> bool:
    """chattr +i (or -i) through the ioctl; False where the file system does not support it."""
    import array
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] = (flags[0] | FS_IMMUTABLE_FL) if on else (flags[0] & ~FS_IMMUTABLE_FL)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError as e:
        if e.errno in (95, 25, 22):  # EOPNOTSUPP, ENOTTY, EINVAL: not supported here
            return False
        raise
    finally:
        os.close(fd)


def set_immutable_tree(top: Path) -> bool:
    ok = True
    for dirpath, _dirs, files in tree.walk(top, topdown=False):
        for name in files:
            ok = set_immutable(Path(dirpath, name)) and ok
        ok = set_immutable(Path(dirpath)) and ok
    return ok


def drop_older_instances(archive: ArchiveRoot, rid: str, keep: str) -> None:
    """Dynamic mode (a local store only: init refuses it on an object store): remove every instance but
    `keep`, each by one rename out of resources/ first."""
    for old in archive.instance_ids(rid):
        if old != keep:
            archive.store.drop_instance(rid, old)


def purge(archive: ArchiveRoot, rid: str) -> None:
    """Delete a resource (dynamic mode only), by one rename out of resources/ first."""
    if archive.config.mode != "dynamic":
        raise Forbidden(f"purge is allowed in dynamic mode only; this archive is {archive.config.mode}")
    archive.require(rid)
    with archive.resource_lock(rid):
        archive.store.purge(rid)
        from .formats import records_dir
        shutil.rmtree(records_dir(archive, rid), ignore_errors=True)     # (derived from what is gone)
    archive.events.append("resource.purged", rid, None)
