"""Migration: every resource with every instance from one archive into another (docs/migrate.md).

`migrate(src, dst)` copies each instance DST lacks with its own id (replicas.catch_up's copy: every
stored file checked against the bag's manifests on the way, each instance published whole or not at all),
so DST's chains must be prefixes of SRC's. With `merge`, a resource whose chains diverged after a common
prefix gets SRC's instances rebased on DST's head, oldest first: each SRC instance's change (its state
against its SRC predecessor's) applied to DST's head state and committed on DST by core commit, with the
original's id, times and events kept in the new instance's `origin`. DST's own instances never move:
they are immutable, and a reader's instance ids and labels must stay valid.

Everything that can refuse the migration is checked before anything is written; afterwards each step
is one atomic commit or copy on DST, and what DST already holds is skipped, so running it again after an
interruption finishes the job and running it twice adds nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import replicas, tree
from .commit import Change, CommitRequest, NewFile, _regrouped, _same_state, commit, state_changes
from .errors import AlreadyExists, InvalidName, NotFound
from .ids import check_rid, parent_of
from .layout import ArchiveRoot, init_archive
from .model import DirEntry, FileEntry, State, group_index, group_problems, link_groups

WORK_PREFIX = ".api-migrate-"     # copies of SRC's bytes for a merge, in DST's transactions/ (recover sweeps .api-*)


@dataclass
class MigrateReport:
    resources: int = 0
    copied: int = 0          # instances copied with their own ids
    merged: int = 0          # instances committed on DST from SRC instances rebased on DST's head
    unchanged: int = 0       # SRC instances whose change was empty on DST's head (recorded, not committed)
    held: int = 0            # SRC instances DST held already (same id, or an origin of a DST instance)
    created: bool = False    # DST was made by this migration


@dataclass
class Plan:
    """What a migration will do, decided (and refused) before anything is written."""

    dst: ArchiveRoot | None                 # None: a new local archive at dst_path
    dst_path: Path
    rids: list[str]
    diverged: list[str] = field(default_factory=list)    # resources to merge (--merge only)

    def instances(self, src: ArchiveRoot) -> int:
        return sum(len(src.instance_ids(rid)) for rid in self.rids)


# -- refusals ---------------------------------------------------------------------------------------

def plan(src: ArchiveRoot, dst_path: str | os.PathLike, rids: list[str] | None = None, merge: bool = False) -> Plan:
    """Check everything that can refuse the migration; reads only."""
    dst_path = Path(dst_path).absolute()
    _refuse_overlap(src, dst_path)
    dst = _open_target(src, dst_path)
    for rid in rids or []:
        check_rid(rid)
        if not src.exists(rid):
            raise NotFound(f"no resource {rid!r} in {src.root}")
    chosen = list(dict.fromkeys(rids)) if rids else src.resource_ids()
    found = Plan(dst, dst_path, chosen)
    if src.config.mode == "dynamic":
        # each resource keeps its head only, whose predecessor is gone: no store can take it after the
        # same predecessor, so its state is committed on DST (a new id; the original in `origin`)
        found.diverged = list(chosen)
    if dst is None:
        return found
    for rid in chosen:
        _refuse_shared_ids(src, dst, rid)
        if rid in found.diverged:
            continue
        try:
            replicas.check_prefix(src, dst, rid, what=str(dst.root))
        except replicas.Diverged as e:
            if not merge:
                raise replicas.Diverged(f"{e}; use --merge to commit {src.root}'s instances on top of "
                                        "them") from None
            found.diverged.append(rid)
    return found


def _refuse_overlap(src: ArchiveRoot, dst_path: Path) -> None:
    mine, there = src.root.resolve(), dst_path.resolve()
    if there == mine or mine in there.parents or there in mine.parents:
        raise InvalidName(f"{dst_path}: the target must be another archive, outside {src.root} (and not "
                          "holding it)")


def _open_target(src: ArchiveRoot, dst_path: Path) -> ArchiveRoot | None:
    """DST's archive, checked against SRC's; None for an absent or empty directory (a new archive)."""
    if not (dst_path / "tinyfs.json").exists():
        if dst_path.exists() and (not dst_path.is_dir() or any(dst_path.iterdir())):
            raise AlreadyExists(f"{dst_path} is not empty and not a tinyfs archive: nothing was written")
        return None
    dst = ArchiveRoot(dst_path)
    if _store_of(dst) is not None and _store_of(dst) == _store_of(src):
        raise InvalidName(f"{dst_path} is a working directory of the same store as {src.root}")
    theirs, mine = dst.config, src.config
    if theirs.mode != mine.mode or theirs.digests != mine.digests:
        raise InvalidName(f"{dst_path} is an archive in mode {theirs.mode} with {','.join(theirs.digests)}; "
                          f"{src.root} is {mine.mode} with {','.join(mine.digests)}")
    return dst


def _store_of(archive: ArchiveRoot) -> tuple | None:
    doc = json.loads((archive.root / "tinyfs.json").read_text())
    return (doc["store"], doc.get("endpoint")) if "store" in doc else None


def _refuse_shared_ids(src: ArchiveRoot, dst: ArchiveRoot, rid: str) -> None:
    """An instance id both hold must be the same instance (the same instance.json bytes)."""
    if not dst.exists(rid):
        return
    for iid in sorted(set(src.instance_ids(rid)) & set(dst.instance_ids(rid))):
        if src.instance_bytes(rid, iid) != dst.instance_bytes(rid, iid):
            raise replicas.Diverged(f"resource {rid!r}: instance {iid} is in both archives with different "
                                    "content (instance.json); nothing was written")


# -- the migration ----------------------------------------------------------------------------------

Progress = Callable[[str, str], None] | None       # told (rid, iid) after each SRC instance


def migrate(src: ArchiveRoot, dst_path: str | os.PathLike, rids: list[str] | None = None, merge: bool = False,
            progress: Progress = None, planned: Plan | None = None) -> MigrateReport:
    found = planned or plan(src, dst_path, rids, merge)
    report = MigrateReport(resources=len(found.rids))
    dst = found.dst
    if dst is None:
        cfg = src.config
        init_archive(found.dst_path, cfg.mode, list(cfg.digests), cfg.immutable)
        dst = ArchiveRoot(found.dst_path)
        report.created = True
    events = _events_by_instance(src) if found.diverged else {}
    logged = _merged_in_log(dst) if found.diverged else {}
    for rid in found.rids:
        if rid in found.diverged:
            merge_resource(src, dst, rid, report, events, logged.get(rid, set()), progress)
        else:
            _copy_resource(src, dst, rid, report, progress)
    dst.events.append("migrate.finished", source=address(src), resources=report.resources,
                      copied=report.copied, merged=report.merged, unchanged=report.unchanged, held=report.held)
    return report


def _copy_resource(src: ArchiveRoot, dst: ArchiveRoot, rid: str, report: MigrateReport, progress: Progress) -> None:
    """The instances DST lacks, with their ids, after the ones it has (catch_up's copy, one at a time for
    the progress); then DST's own replicas take them too."""
    missing = replicas.check_prefix(src, dst, rid, what=str(dst.root))
    sources = replicas.sources_of(src) if missing else [src]   # a file SRC's primary lost: from a replica
    for iid in src.instance_ids(rid):
        if iid in missing:
            replicas.copy_instance(sources, dst, rid, iid)
            report.copied += 1
        else:
            report.held += 1
        if progress:
            progress(rid, iid)
    if missing and replicas.replicas_of(dst):
        replicas.replicate_commit(dst, rid, missing[-1], None)


# -- merge ------------------------------------------------------------------------------------------

def merge_resource(src: ArchiveRoot, dst: ArchiveRoot, rid: str, report: MigrateReport,
                   events: dict[tuple[str, str], list[dict]], logged: set[str], progress: Progress = None) -> None:
    """Rebase every SRC instance of `rid` that DST does not hold on DST's head, in SRC's chain order
    (`events`: SRC's records by instance; `logged`: the SRC instances DST's log records as merged)."""
    held = holds(dst, rid) | logged
    src_ids = src.instance_ids(rid)
    bring = Bringer(src, rid, dst)
    waiting: list[dict] = []                # records of unchanged instances, for the next merged one
    try:
        for iid in src_ids:
            if iid in held or _came_from(src, rid, iid) & held:
                report.held += 1                # (or SRC got it from DST by an earlier merge the other way)
            else:
                record = origin_record(src, rid, iid, events.get((rid, iid), []))
                made, record = _rebase_one(src, dst, rid, iid, record, waiting, bring)
                if made is None:
                    waiting.append(record)
                    dst.events.append("migrate.merged", rid, dst.head(rid), source=address(src), origin=iid,
                                      unchanged=True, record={k: v for k, v in record.items() if k != "events"})
                    report.unchanged += 1
                else:
                    waiting = []
                    report.merged += 1
            if progress:
                progress(rid, iid)
    finally:
        bring.close()


def holds(dst: ArchiveRoot, rid: str) -> set[str]:
    """The SRC instance ids DST's chain holds: its own ids and the origins of its instances (with the
    unchanged ones each names)."""
    held = set(dst.instance_ids(rid))
    for iid in dst.instance_ids(rid):
        origin = dst.instance(rid, iid).origin
        if origin:
            held.add(origin["instance"])
            held.update(o["instance"] for o in origin.get("unchanged", ()))
    return held


def _came_from(src: ArchiveRoot, rid: str, iid: str) -> set[str]:
    """The instances an SRC instance was merged from (its origin and the unchanged ones it names): where
    DST holds them, DST has its change already — merging A into B and then B into A settles."""
    origin = src.instance(rid, iid).origin
    if not origin:
        return set()
    return {origin["instance"], *(o["instance"] for o in origin.get("unchanged", ()))}


def _merged_in_log(dst: ArchiveRoot) -> dict[str, set[str]]:
    """rid -> the SRC instances DST's log records as merged (the only record of one that changed nothing
    at the end of a chain), read once per run."""
    out: dict[str, set[str]] = {}
    for event in dst.events.read():
        if event.get("event") == "migrate.merged" and event.get("resource"):
            out.setdefault(event["resource"], set()).add((event.get("detail") or {}).get("origin"))
    return out


def origin_record(src: ArchiveRoot, rid: str, iid: str, events: list[dict]) -> dict:
    doc = src.instance(rid, iid)
    return {"archive": address(src), "instance": iid, "previous": doc.previous, "created": doc.created,
            "label": doc.label, "events": events}


def address(archive: ArchiveRoot) -> str:
    """Where an archive is: its store's address (s3://...), else its root."""
    store = _store_of(archive)
    return store[0] if store else str(archive.root)


# events that name an instance as the base of a later transaction, not as their subject
NOT_ABOUT = ("transaction.opened", "transaction.rolled_back", "transaction.unchanged")


def _events_by_instance(src: ArchiveRoot) -> dict[tuple[str, str], list[dict]]:
    """(rid, iid) -> SRC's event records about that instance (its commit, copies, fixity findings)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for event in src.events.read():
        if event.get("resource") and event.get("instance") and event.get("event") not in NOT_ABOUT:
            out.setdefault((event["resource"], event["instance"]), []).append(event)
    return out


def _rebase_one(src: ArchiveRoot, dst: ArchiveRoot, rid: str, iid: str, record: dict, waiting: list[dict],
                bring: Bringer) -> tuple[str | None, dict]:
    """Commit SRC's instance `iid`, rebased on DST's head: (its new id, or None when it changes nothing
    there; its origin record, with what the rebase dropped)."""
    doc = src.instance(rid, iid)
    head = dst.head(rid)
    head_doc = dst.instance(rid, head) if head else None
    head_state = head_doc.state if head_doc else State()
    if doc.previous is None:
        before = State()
    elif doc.previous in src.instance_ids(rid):
        before = src.state(rid, doc.previous)
    else:       # dynamic mode dropped it: the change is the whole state
        before = head_state
    target, dropped = rebased_state(before, doc.state, head_state)
    label = doc.label
    if label is not None and label in dst.labels(rid):
        record = {**record, "label_dropped": True}
        label = None
    if dropped:
        record = {**record, "dropped": dropped}
    if _same_state(target, head_state) and label is None:
        return None, record
    known = _stored_digests(dst, rid, head, head_doc)
    changes = _changes(doc, target, known, bring)
    req = CommitRequest(rid, head, changes, full=True, message=doc.message, creator=doc.creator, label=label,
                        hardlinks=target.hardlinks, root=target.root, origin={**record, "unchanged": waiting} if waiting else record)
    result = commit(dst, req)
    if result.instance is not None:
        dst.events.append("migrate.merged", rid, result.instance, source=address(src), origin=iid,
                          unchanged=False)
    return result.instance, record


def rebased_state(before: State, after: State, head: State) -> tuple[State, list[str]]:
    """`head` with the change from `before` to `after` applied, made a valid tree: a missing parent
    directory is re-created (as `after`, else `head`, else `before` had it); an entry under a path that is
    no longer a directory is dropped (their paths, sorted: the later change wins)."""
    delta = state_changes(before, after.entries())
    touched = set(delta) | _regrouped(group_index(before.hardlinks), group_index(after.hardlinks), delta)
    result = State(dict(head.files), dict(head.links), dict(head.dirs))
    for path, entry in delta.items():
        result.files.pop(path, None)
        result.links.pop(path, None)
        result.dirs.pop(path, None)
        if isinstance(entry, FileEntry):
            result.files[path] = entry
        elif entry is not None:
            (result.dirs if isinstance(entry, DirEntry) else result.links)[path] = entry
    result.root = after.root if after.root != before.root else head.root
    dropped = _make_tree(result, (after, head, before))
    result.hardlinks = _groups(result, after, head, touched)
    return result, dropped


def _make_tree(state: State, sources: tuple[State, ...]) -> list[str]:
    dropped = []
    for path in sorted(state.entries()):
        ancestors = []
        parent = parent_of(path)
        while parent:
            ancestors.append(parent)
            parent = parent_of(parent)
        for a in reversed(ancestors):
            if a in state.files or a in state.links:
                dropped.append(path)
                break
            if a not in state.dirs:
                state.dirs[a] = next((s.dirs[a] for s in sources if a in s.dirs), DirEntry(0o755, 0))
        else:
            continue
        state.files.pop(path, None)
        state.links.pop(path, None)
        state.dirs.pop(path, None)
    return dropped


def _groups(state: State, after: State, head: State, touched: set[str]):
    """SRC's link groups for the paths its change touched, the head's for the rest; each kept only where
    its paths are still one file of the new state (else its paths stay, as separate files)."""
    claimed: set[str] = set()
    groups = []
    for group in after.hardlinks:
        if any(p in touched for p in group):
            first = after.files.get(group[0])
            kept = [p for p in group if state.files.get(p) == first]
            groups.append(kept)
            claimed.update(kept)
    for group in head.hardlinks:
        groups.append([p for p in group if p not in touched and p not in claimed])
    out = link_groups(groups)
    bad = {path for path, _why in group_problems(State(state.files, hardlinks=out))}
    return tuple(g for g in out if not bad.intersection(g))


def _stored_digests(dst: ArchiveRoot, rid: str, head: str | None, head_doc) -> set[str]:
    """The digests whose bytes DST's resource stores (commit finds them; the rest must be brought)."""
    if head_doc is None:
        return set()
    if dst.config.mode == "dynamic":        # only the head is left, and commit looks at it alone
        return set(head_doc.stored)
    known: set[str] = set()
    for iid in dst.instance_ids(rid):
        known.update(dst.instance(rid, iid).stored)
    return known


def _changes(doc, target: State, known: set[str], bring: Bringer) -> dict[str, Change]:
    """The target state as a full request: bytes DST stores as entries (commit deduplicates), the others as
    NewFiles from checked copies of SRC's stored files."""
    changes: dict[str, Change] = {**target.dirs, **target.links}
    for path, entry in target.files.items():
        if entry.digest in known:
            changes[path] = entry
            continue
        stored = doc.stored[entry.digest]
        changes[path] = NewFile(os.fspath(bring.copy(stored)), entry.size, entry.mode, entry.mtime_ns,
                                dict(entry.xattrs), digests=bring.digests(stored), linkable=True)
    return changes


class Bringer:
    """Checked copies of SRC's stored files of one resource, in a work directory of DST's transactions/
    (on DST's file system: commit links them into the new bag)."""

    def __init__(self, src: ArchiveRoot, rid: str, dst: ArchiveRoot):
        self.src, self.rid = src, rid
        self.sources = replicas.sources_of(src)
        self.work = dst.transactions / f"{WORK_PREFIX}{uuid.uuid4().hex}"
        self.copies: dict[str, Path] = {}                    # stored path -> its copy
        self.manifests: dict[tuple[str, str], dict[str, str]] = {}

    def copy(self, stored: str) -> Path:
        """SRC's stored file, copied and checked against its bag's manifest on the way (once)."""
        dest = self.copies.get(stored)
        if dest is None:
            _instances, owner, inner = stored.split("/", 2)      # instances/<iid>/data/...
            digest = self._manifest(owner, self.src.config.primary).get(inner)
            if digest is None:
                raise NotFound(f"{self.src.root}: {self.rid}/{stored} is in no manifest of its bag")
            self.work.mkdir(exist_ok=True)
            dest = self.work / str(len(self.copies))
            replicas.copy_checked(self.sources, self.rid, stored, (self.src.config.primary, digest), dest)
            self.copies[stored] = dest
        return dest

    def digests(self, stored: str) -> dict[str, str] | None:
        """Every configured digest of a stored file, from its bag's manifests (the first one the copy
        checked); None where one is missing (commit then hashes the copy)."""
        _instances, owner, inner = stored.split("/", 2)
        out = {}
        for alg in self.src.config.digests:
            digest = self._manifest(owner, alg).get(inner)
            if digest is None:
                return None
            out[alg] = digest
        return out

    def _manifest(self, owner: str, alg: str) -> dict[str, str]:
        key = (owner, alg)
        if key not in self.manifests:
            self.manifests[key] = self.src.manifest(self.rid, owner, alg)
        return self.manifests[key]

    def close(self) -> None:
        tree.rmtree(self.work, ignore_errors=True, force=True)
