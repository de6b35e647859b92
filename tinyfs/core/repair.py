"""Copies that heal each other (docs/replicas.md): fsck of every store, `tinyfs repair`, and the repair a
verified read makes of the primary's copy when a replica holds a good one.

Every store of an archive (the primary and each replica) holds the same bags byte for byte, so a stored
file one store lost or damaged is taken from another whose copy matches the bag's manifests
(replicas.copy_checked checks every byte on the way) and put back with `Store.restore`, then read back
and checked once more. Each repair is logged as `stored.repaired` in the primary's log and in the
repaired store's own. A file no store holds intact is reported and left as it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .digests import CHUNK
from .errors import NotAnArchive, NotFound, TinyfsError
from .fsck import FsckReport, fsck
from .layout import ArchiveRoot
from .replicas import CopyFailed, Diverged, check_prefix, copy_checked, expected_digests, replicas_of

log = logging.getLogger(__name__)

PRIMARY = "primary"
TAG_PREFIXES = ("manifest-", "tagmanifest-")


# -- the stores of an archive --------------------------------------------------------------------------

@dataclass
class StoreRef:
    """One store of an archive by name: its archive, or why it cannot be opened."""

    name: str
    archive: ArchiveRoot | None
    error: str | None = None


def stores(archive: ArchiveRoot, names: list[str] | None = None) -> list[StoreRef]:
    """The primary and every replica (or those named; "primary" is the archive's own store), opened."""
    found = replicas_of(archive)
    known = [PRIMARY, *(r.name for r in found.replicas)]
    for name in names or []:
        if name not in known:
            raise NotFound(f"no store named {name!r} (stores: {', '.join(known)})")
    out = [StoreRef(PRIMARY, archive)] if not names or PRIMARY in names else []
    for r in found.replicas:
        if names and r.name not in names:
            continue
        try:
            if not r.spec.on_s3 and not (r.root / "tinyfs.json").exists():
                raise NotAnArchive(f"{r.root} is not a tinyfs archive (any more)")   # (a disk gone)
            out.append(StoreRef(r.name, r.archive))
        except (TinyfsError, OSError) as e:
            out.append(StoreRef(r.name, None, str(e)))
    return out


def behind(archive: ArchiveRoot, ref: StoreRef, rids: list[str]) -> tuple[int, list[str]]:
    """(instances of the primary's that the replica lacks, resources where it diverged)."""
    lacking, diverged = 0, []
    if ref.name == PRIMARY:
        return 0, []
    for rid in rids:
        try:
            lacking += len(check_prefix(archive, ref.archive, rid, what=f"store {ref.name}"))
        except Diverged:
            diverged.append(rid)
    return lacking, diverged


# -- fsck of every store -------------------------------------------------------------------------------

@dataclass
class StoreCheck:
    """fsck of one store: its report, or the error that kept it from being checked."""

    name: str
    report: FsckReport | None
    error: str | None = None
    behind: int = 0
    diverged: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.report is not None and self.report.clean and not self.diverged

    def lines(self) -> list[str]:
        if self.report is None:
            return [f"{self.name}: unreachable: {self.error}"]
        out = [f"{self.name}: {line}" for line in self.report.lines()]
        out += [f"{self.name}: diverged: resource {rid} has instances the primary does not" for rid in self.diverged]
        if self.behind:
            out.append(f"{self.name}: behind: lacks {self.behind} instance(s) of the primary's "
                       "(not damage: tinyfs replicate)")
        return out + [f"{self.name}: {self.report.summary()}"]

    def to_json(self) -> dict:
        if self.report is None:
            return {"reachable": False, "error": self.error, "clean": False}
        return {"reachable": True, **self.report.to_json(), "clean": self.clean, "behind": self.behind,
                "diverged": self.diverged}


def fsck_stores(archive: ArchiveRoot, rids: list[str] | None = None, names: list[str] | None = None,
                fast: bool = False, progress=None) -> list[StoreCheck]:
    """fsck of each store (each logs its own fixity.checked in its own log). A replica is checked for the
    resources it holds; what it lacks of the primary's is `behind`, not damage."""
    wanted = list(rids) if rids else archive.resource_ids()
    out = []
    for ref in stores(archive, names):
        if ref.archive is None:
            out.append(StoreCheck(ref.name, None, ref.error))
            continue
        try:
            out.append(_fsck_one(archive, ref, rids, wanted, fast, progress))
        except (TinyfsError, OSError) as e:
            if isinstance(e, NotFound) and ref.name == PRIMARY:
                raise                               # a RID the archive does not have: a usage error
            out.append(StoreCheck(ref.name, None, str(e)))
    return out


def _fsck_one(archive: ArchiveRoot, ref: StoreRef, rids: list[str] | None, wanted: list[str], fast: bool,
              progress) -> StoreCheck:
    if ref.name == PRIMARY:
        return StoreCheck(ref.name, fsck(archive, rids, fast=fast, progress=progress))
    theirs = set(ref.archive.resource_ids())
    extra = [] if rids else sorted(theirs - set(wanted))      # resources the primary does not have
    chosen = [rid for rid in wanted if rid in theirs] + extra
    if chosen:
        report = fsck(ref.archive, chosen, fast=fast, progress=progress)
    else:
        report = FsckReport(fast=fast)
        _log_empty_check(ref.archive, report)
    lacking, diverged = behind(archive, ref, wanted)
    return StoreCheck(ref.name, report, None, lacking, diverged + extra)


def _log_empty_check(archive: ArchiveRoot, report: FsckReport) -> None:
    """A store holding none of the resources checked was still checked (status shows when)."""
    try:
        archive.events.append("fixity.checked", None, None, resources=0, instances=0, files=0, bytes=0,
                              problems=0, fast=report.fast)
    except OSError as e:
        log.warning("could not log fixity.checked: %s", e)


# -- tinyfs repair --------------------------------------------------------------------------------------

@dataclass
class Repaired:
    store: str
    rid: str
    iid: str | None
    stored: str
    source: str
    algorithm: str
    digest: str

    def line(self) -> str:
        return (f"{self.store}: repaired {self.rid} {self.stored} from {self.source} "
                f"({self.algorithm} {self.digest[:16]}…)")


@dataclass
class RepairReport:
    checks: list[StoreCheck] = field(default_factory=list)    # the fsck before the repair
    repaired: list[Repaired] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)           # one line each; nothing changed for these
    notes: list[str] = field(default_factory=list)            # behind: not damage

    @property
    def healed(self) -> bool:
        return not self.failed


def repair(archive: ArchiveRoot, rids: list[str] | None = None, names: list[str] | None = None,
           progress=None) -> RepairReport:
    """Full fsck of every store; then every damaged or missing stored file of the stores named (default:
    all) is taken from another store whose copy matches, restored, and checked again. Whatever a second
    fsck of the repaired resources still finds is reported as not repaired."""
    report = RepairReport(checks=fsck_stores(archive, rids, None, progress=progress))
    good = {c.name: c for c in report.checks if c.report is not None}
    refs = {r.name: r for r in stores(archive)}
    for check in report.checks:
        if names and check.name not in names:
            continue
        if check.report is None:
            report.failed.append(f"{check.name}: unreachable, not repaired: {check.error}")
            continue
        if check.behind:
            report.notes.append(f"{check.name}: behind: lacks {check.behind} instance(s) of the primary's "
                                "(not damage: tinyfs replicate)")
        report.failed += [f"{check.name}: diverged: resource {rid}: not repaired" for rid in check.diverged]
        if check.report.clean:
            continue
        _repair_store(archive, refs[check.name], check.report, refs, good, report)
    return report


ROUNDS = 3      # a repaired manifest or instance.json can show damage its loss hid: fsck again, repair again


def _repair_store(archive: ArchiveRoot, target: StoreRef, found: FsckReport, refs: dict[str, StoreRef],
                  checks: dict[str, StoreCheck], report: RepairReport) -> None:
    """Repair every stored file the target's findings name, fsck its resources again, and again while
    that finds more and repairs some; what the last fsck still finds is reported as not repaired."""
    others = [refs[n] for n in checks if n != target.name and refs[n].archive is not None]
    rids = sorted({f.resource for f in found.findings})
    failed: list[str] = []
    for _ in range(ROUNDS):
        failed = []
        progressed = False
        for rid, rel in _damaged_files(found):
            try:
                done = _repair_file(archive, target, rid, rel, others, checks)
            except (CopyFailed, TinyfsError, OSError) as e:
                failed.append(f"{target.name}: {rid} {rel}: not repaired: {e}")
                continue
            if done is not None:
                report.repaired.append(done)
                progressed = True
        found = fsck(target.archive, rids)
        if found.clean or not progressed:
            break
    report.failed += failed
    if not found.clean and not failed:
        report.failed += [f"{target.name}: not repaired: {line}" for line in found.lines()
                          if not line.startswith("  ")]


def _damaged_files(found: FsckReport) -> list[tuple[str, str]]:
    """(rid, stored path) of every file the findings are about: stored payload files, the bag's tag files
    (instance.json, manifests, bag-info.txt ...) and resource.json, in the order found."""
    out: dict[tuple[str, str], None] = {}
    for f in found.findings:
        if f.stored is not None:
            out[(f.resource, f.stored)] = None
        elif f.instance is not None and (f.path.startswith("data/") or (f.path and "/" not in f.path
                                                                         and f.path != "data")):
            out[(f.resource, f"instances/{f.instance}/{f.path}")] = None
        elif f.instance is None and f.path == "resource.json":
            out[(f.resource, "resource.json")] = None
    return list(out)


def _repair_file(archive: ArchiveRoot, target: StoreRef, rid: str, rel: str, others: list[StoreRef],
                 checks: dict[str, StoreCheck]) -> Repaired | None:
    """Restore one stored file of `target` from the first of `others` whose copy matches; None when the
    target's copy matches already (the finding was not about its bytes)."""
    holder = rel.split("/")[1] if rel.startswith("instances/") else None
    vouching = [o for o in others if _vouches(o, checks[o.name].report, rid, holder, rel)]
    if not vouching:
        raise CopyFailed("no good copy: every other store's copy (or its manifests) is damaged or missing")
    algorithm, digest = _expected([o.archive for o in vouching], rid, holder, rel)
    if _digest_of(target.archive, rid, rel, algorithm) == digest:
        return None
    sources = vouching + [o for o in others if o not in vouching]
    with tempfile.TemporaryDirectory(dir=target.archive.transactions, prefix=".repair-") as tmp:
        copy = Path(tmp) / "copy"
        used = copy_checked([o.archive for o in sources], rid, rel, (algorithm, digest), copy)
        target.archive.store.restore(rid, rel, copy)
    if _digest_of(target.archive, rid, rel, algorithm) != digest:
        raise CopyFailed("the restored copy does not read back intact")
    source = next(o.name for o in sources if str(o.archive.root) == used)
    done = Repaired(target.name, rid, holder, rel, source, algorithm, digest)
    _log_repair(archive, target.archive, done, via="repair")
    return done


def _vouches(ref: StoreRef, found: FsckReport | None, rid: str, holder: str | None, rel: str) -> bool:
    """Whether a store holds `rel` and its fsck found that copy, and the manifests giving its digest,
    intact."""
    if found is None:
        return False
    inner = rel.split("/", 2)[2] if holder else rel
    for f in found.findings:
        if f.resource != rid:
            continue
        if f.stored == rel or (f.instance == holder and (f.path == inner or f.path.startswith(TAG_PREFIXES))):
            return False
    return holder is None and ref.archive.exists(rid) or holder in ref.archive.instance_ids(rid)


def _expected(vouching: list[ArchiveRoot], rid: str, holder: str | None, rel: str) -> tuple[str, str]:
    """(algorithm, digest) of `rel`: from the bag's manifests as the first store with intact ones holds
    them (replicas.expected_digests), or for resource.json, which no manifest lists, the digest of the
    first vouching store's own copy."""
    alg = vouching[0].config.primary
    if holder is not None:
        listed = expected_digests(vouching, rid, holder).get(rel)
        if listed is None:
            raise CopyFailed("no manifest lists it")
        return listed
    found = _digest_of(vouching[0], rid, rel, alg)
    if found is None:
        raise CopyFailed(f"{vouching[0].root} lacks it too")
    return alg, found


def _digest_of(archive: ArchiveRoot, rid: str, rel: str, algorithm: str) -> str | None:
    """The digest of the store's copy, read afresh (an object store's cached copy is dropped first);
    None when it is missing."""
    try:
        archive.store.forget(rid, rel)
        path = archive.store.stored_file(rid, rel)
    except (NotFound, FileNotFoundError):
        return None
    return hash_path(path, algorithm)


def hash_path(path: Path, algorithm: str) -> str | None:
    h = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def _log_repair(archive: ArchiveRoot, repaired_store: ArchiveRoot, done: Repaired, via: str) -> None:
    """`stored.repaired` in the primary's log and, for a replica, in its own log too."""
    detail = {"store": done.store, "stored": done.stored, "source": done.source, "algorithm": done.algorithm,
              "digest": done.digest, "via": via}
    logs = [archive] if repaired_store is archive else [archive, repaired_store]
    for where in logs:
        try:
            where.events.append("stored.repaired", done.rid, done.iid, **detail)
        except OSError as e:
            log.warning("could not log stored.repaired in %s: %s", where.root, e)


# -- self-healing reads ----------------------------------------------------------------------------------

_healing: dict[tuple[str, str, str], threading.Lock] = {}
_healing_lock = threading.Lock()


def heal(archive: ArchiveRoot, rid: str, iid: str | None, rel: str, algorithm: str, digest: str,
         via: str) -> str | None:
    """(blocking) A verified read found the primary's copy of stored file `rel` damaged or missing: take
    a good copy from a replica, restore it, check it back, log `stored.repaired`. The name of the store it
    came from; None when the archive has no replica holding a good copy (nothing is changed then)."""
    found = replicas_of(archive)
    if not found:
        return None
    with _lock_for(archive, rid, rel):
        sources = [ref for ref in stores(archive) if ref.name != PRIMARY and ref.archive is not None]
        if not sources:
            return None
        try:
            with tempfile.TemporaryDirectory(dir=archive.transactions, prefix=".heal-") as tmp:
                copy = Path(tmp) / "copy"
                used = copy_checked([s.archive for s in sources], rid, rel, (algorithm, digest), copy)
                archive.store.restore(rid, rel, copy)
        except (TinyfsError, OSError) as e:
            log.warning("%s %s: no replica could repair it: %s", rid, rel, e)
            return None
        if _digest_of(archive, rid, rel, algorithm) != digest:
            log.error("%s %s: the repaired copy does not read back intact", rid, rel)
            return None
    source = next(s.name for s in sources if str(s.archive.root) == used)
    _log_repair(archive, archive, Repaired(PRIMARY, rid, iid, rel, source, algorithm, digest), via=via)
    log.warning("%s %s: damaged or missing; repaired from store %s", rid, rel, source)
    return source


def _lock_for(archive: ArchiveRoot, rid: str, rel: str) -> threading.Lock:
    key = (os.fspath(archive.root), rid, rel)
    with _healing_lock:
        return _healing.setdefault(key, threading.Lock())
