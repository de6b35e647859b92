"""Checking an archive (SPEC sections 4, 6 and 7): `tinyfs fsck`.

For every instance of the resources checked:
  - the bag validates (tinyfs.core.bagcheck; full mode hashes every payload and
    tag file once, on all cores; fast mode checks structure, coverage and
    Payload-Oxum only);
  - instance.json parses and agrees with where it is (id, resource, digest
    algorithm, the `previous` chain, labels unique) and with itself (every
    state digest has a `stored` entry; logical paths are valid);
  - every `stored` path exists with the recorded size and is a payload file of
    its bag whose manifest digest is the recorded one. The file's bytes were
    hashed by the validation of the bag that holds it, so nothing is hashed
    twice: an instance whose state points at bytes that failed their check in
    an earlier bag gets a `stored-damaged` finding of its own.

Each finding has a stable code (the validator's codes for bag problems, and
the codes below); docs/format.md lists them all. A stored file that is damaged
or missing is named once, with every logical path of every instance whose
bytes come from it (`StoredDamage`), found in the same single pass over each
state that checks the stored files.

  bad-resource-json     resource.json missing, unreadable or naming another id
  misplaced-resource    a resource directory not under the XX/YY its id hashes to
  unexpected-entry      something in instances/ that is not an instance id
  no-instances          a resource with no instance
  bad-instance-json     instance.json missing or not a valid tinyfs-instance document
  instance-mismatch     instance.json's id, resource or digest algorithm is not what its place says
  broken-chain          `previous` is not the instance before it (or, in dynamic mode, not an earlier one)
  duplicate-label       two instances of a resource carry the same label
  bad-path              a logical path breaks the rules (relative, no ./.., UTF-8, lengths)
  orphan-entry          an entry whose parent directory is not in `dirs`
  bad-hardlinks         a link group of one path, naming a path that is not a file of the state,
                        or files that are recorded differently, or a path in two groups
  missing-stored        a state digest with no `stored` entry
  bad-stored-path       a `stored` path not of the form instances/<iid>/data/...
  missing-stored-file   a `stored` path that does not exist
  stored-size-mismatch  a stored file whose size is not the recorded one
  not-in-manifest       a stored file that is not a payload file of its bag
  stored-digest-mismatch the bag's manifest gives another digest than instance.json
  stored-damaged        a stored file (in an earlier instance) that failed its own bag's check
  unreferenced-file     a payload file that instance.json does not store
  bad-bag-info          bag-info.txt names another resource or instance, or breaks the tinyfs BagIt
                        profile (an element missing or repeated, the profile not named: core/profile.py)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import profile
from .bagcheck import BagReport, Problem, validate_bag
from .errors import InvalidName, NotFound, TinyfsError
from .ids import check_label, check_logical_path, is_instance_id, parent_of
from .layout import ArchiveRoot
from .model import InstanceDoc, group_problems

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]
_STORED = re.compile(r"instances/([0-9a-f-]{36})/(data/.+)\Z", re.DOTALL)
_OXUM = re.compile(r"\s*Payload-Oxum\s*:\s*(\d+)\.(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    resource: str
    instance: str | None
    path: str
    code: str
    message: str
    stored: str | None = None   # the stored file (relative to the resource directory) this finding is about

    def __str__(self) -> str:
        return f"{self.resource} {self.instance or '-'} {self.path or '-'}: {self.code}: {self.message}"

    def to_json(self) -> dict:
        return {"path": self.path, "code": self.code, "message": self.message}

    def to_report_json(self) -> dict:
        return {"resource": self.resource, "instance": self.instance, **self.to_json(), "stored": self.stored}


@dataclass
class StoredDamage:
    """A damaged or missing stored file, its findings, and every (instance, logical path) using it."""

    resource: str
    stored: str                         # relative to the resource directory: instances/<iid>/data/...
    findings: list[Finding]
    affected: list[tuple[str, str]]     # (instance, logical path), in chain order, sorted within each

    @property
    def missing(self) -> bool:
        return any(f.code in MISSING_CODES for f in self.findings)

    def lines(self) -> list[str]:
        """The stored file's line for each distinct problem, then one indented `<iid> <path>` per user."""
        shown = [f for f in self.findings if f.code != "stored-damaged"] or self.findings[:1]
        problems = dict.fromkeys((f.code, f.message) for f in shown)
        return ([f"{self.resource} {self.stored}: {code}: {message}" for code, message in problems]
                + [f"  {iid} {path}" for iid, path in self.affected])

    def to_json(self) -> dict:
        return {"resource": self.resource, "stored": self.stored, "status": "missing" if self.missing else "damaged",
                "codes": sorted({f.code for f in self.findings}),
                "affected": [{"instance": iid, "path": path} for iid, path in self.affected]}


MISSING_CODES = frozenset({"missing-file", "missing-stored-file"})


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    resources: int = 0
    instances: int = 0
    files: int = 0
    bytes: int = 0
    fast: bool = False
    stored: list[StoredDamage] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        """The text report: one line per finding, except that the findings about a damaged or missing
        stored file are shown together, where the first of them was found, with every path using it."""
        groups = {(g.resource, g.stored): g for g in self.stored}
        shown: set[tuple[str, str]] = set()
        out: list[str] = []
        for f in self.findings:
            key = (f.resource, f.stored)
            if key not in groups:
                out.append(str(f))
            elif key not in shown:
                shown.add(key)
                out += groups[key].lines()
        return out

    def to_json(self) -> dict:
        return {"clean": self.clean, "fast": self.fast, "resources": self.resources, "instances": self.instances,
                "files": self.files, "bytes": self.bytes, "summary": self.summary(),
                "findings": [f.to_report_json() for f in self.findings],
                "stored_files": [g.to_json() for g in self.stored]}

    def damaged(self) -> dict[tuple[str, str | None], list[Finding]]:
        """(resource, instance) -> its findings, in the order found."""
        out: dict[tuple[str, str | None], list[Finding]] = {}
        for f in self.findings:
            out.setdefault((f.resource, f.instance), []).append(f)
        return out

    def summary(self) -> str:
        what = (f"{self.resources} resources, {self.instances} instances, {self.files} files, "
                f"{self.bytes} bytes checked{' (fast: sizes only, nothing hashed)' if self.fast else ''}")
        if self.clean:
            return f"fsck: {what}: clean"
        n = len(self.findings)
        out = f"fsck: {what}: {n} problem{'s' if n != 1 else ''} in {len(self.damaged())} instances"
        if self.stored:
            paths = sum(len(g.affected) for g in self.stored)
            out += (f"; {len(self.stored)} stored file{'s' if len(self.stored) != 1 else ''} damaged or missing, "
                    f"used by {paths} path{'s' if paths != 1 else ''}")
        return out


def fsck(archive: ArchiveRoot, rids: list[str] | None = None, fast: bool = False,
         progress: ProgressFactory | None = None, workers: int | None = None) -> FsckReport:
    """Check the given resources (default: all); log fixity.checked (and fixity.failed per damaged instance).
    On an object store the store's objects are checked, downloaded afresh (not the read cache's copies)."""
    report = FsckReport(fast=fast)
    chosen = _chosen(archive, rids)
    if archive.store.local:         # the resources themselves: all their bags validated together
        _check(archive, chosen, report, fast, progress, workers)
    else:
        _check_store(archive, chosen, report, fast, progress, workers)
    _log(archive, report)
    return report


def _chosen(archive: ArchiveRoot, rids: list[str] | None) -> list[str]:
    if not rids:
        return archive.resource_ids()
    for rid in rids:
        # (a damaged resource without resource.json, or without instances, is still there to check)
        if not (archive.exists(rid) or archive.head(rid) is not None):
            raise NotFound(f"no resource {rid!r} in {archive.root}")
    return list(dict.fromkeys(rids))


def _check_store(archive: ArchiveRoot, rids: list[str], report: FsckReport, fast: bool,
                 progress: ProgressFactory | None, workers: int | None) -> None:
    """One resource at a time, each from a fresh download of its published objects that is removed after
    it (s3archive.mirrored): the local disk needs room for the largest resource, not the archive."""
    from .s3archive import mirrored

    for rid in rids:
        with mirrored(archive, rid):
            _check(archive, [rid], report, fast, progress, workers)


def _check(archive: ArchiveRoot, rids: list[str], report: FsckReport, fast: bool,
           progress: ProgressFactory | None, workers: int | None) -> None:
    chains = {rid: archive.instance_ids(rid) for rid in rids}
    jobs = [(rid, iid) for rid in rids for iid in chains[rid]]
    sizes = {job: _oxum_bytes(archive.instance_dir(*job)) for job in jobs}
    advance = None
    if progress:
        advance = progress("checking", None if fast else sum(sizes.values()))
    bags = _validate_all(archive, sorted(jobs, key=lambda j: -sizes[j]), fast, advance, workers)
    for rid in rids:
        _Resource(archive, rid, chains[rid], bags, report).check()


def _validate_all(archive: ArchiveRoot, jobs: list[tuple[str, str]], fast: bool, advance,
                  workers: int | None) -> dict[tuple[str, str], BagReport]:
    """Validate every instance bag, several bags at once, each hashing its files on all cores; twice as
    many threads as cores keep reads in flight while others hash (cold data: ~20% faster, measured)."""
    cpus = workers or 2 * (os.cpu_count() or 1)

    def one(job: tuple[str, str]) -> BagReport:
        bag = archive.instance_dir(*job)
        try:
            return validate_bag(bag, fast=fast, workers=cpus, progress=advance)
        except NotADirectoryError:
            return BagReport(bag, problems=[Problem("not-regular-file", "", "the instance is not a directory")])

    if len(jobs) <= 1:
        return {job: one(job) for job in jobs}
    with ThreadPoolExecutor(max_workers=min(cpus, len(jobs)), thread_name_prefix="fsck") as pool:
        return dict(zip(jobs, pool.map(one, jobs), strict=True))


def _oxum_bytes(bag) -> int:
    try:
        with open(bag / "bag-info.txt", encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _OXUM.match(line)
                if m:
                    return int(m.group(1))
    except OSError:
        pass
    return 0


class _Resource:
    """The checks of one resource, over reports its bags' validation already made."""

    def __init__(self, archive: ArchiveRoot, rid: str, chain: list[str],
                 bags: dict[tuple[str, str], BagReport], report: FsckReport):
        self.archive, self.rid, self.chain, self.bags, self.report = archive, rid, chain, bags, report
        self.dir = archive.resource_dir(rid)
        self.dynamic = archive.config.mode == "dynamic"
        self._bad: dict[str, set[str]] = {}
        self._affected: dict[str, list[tuple[str, str]]] = {}   # damaged or missing stored file -> its users

    def find(self, iid: str | None, path: str, code: str, message: str, stored: str | None = None) -> None:
        self.report.findings.append(Finding(self.rid, iid, path, code, message, stored))

    def check(self) -> None:
        if self.dynamic and not self.dir.exists():
            return                      # purged while we looked
        self.report.resources += 1
        first = len(self.report.findings)
        self._check_resource_dir()
        labels: dict[str, str] = {}
        previous = None
        for iid in self.chain:
            if self.dynamic and not self.archive.instance_dir(self.rid, iid).exists():
                continue                # replaced by a newer instance while we looked
            self.report.instances += 1
            bag = self.bags[(self.rid, iid)]
            for p in bag.problems:
                self.find(iid, p.path, p.code, p.message, f"instances/{iid}/{p.path}" if p.path.startswith("data/") else None)
            doc = self._load(iid)
            if doc is not None:
                self._check_doc(iid, doc, previous, labels)
                self._check_stored(iid, doc, bag)
            self._check_bag_info(iid, bag)
            previous = iid
        self._group_stored(self.report.findings[first:])

    def _group_stored(self, findings: list[Finding]) -> None:
        """One StoredDamage per damaged or missing stored file that some path uses, with its findings."""
        about: dict[str, list[Finding]] = {}
        for f in findings:
            if f.stored in self._affected:
                about.setdefault(f.stored, []).append(f)
        for rel in sorted(self._affected, key=lambda rel: self._affected[rel][0]):
            self.report.stored.append(StoredDamage(self.rid, rel, about.get(rel, []), self._affected[rel]))

    # -- the resource directory ---------------------------------------------
    def _check_resource_dir(self) -> None:
        import json

        try:
            doc = json.loads((self.dir / "resource.json").read_bytes())
            if doc.get("id") != self.rid:
                self.find(None, "resource.json", "bad-resource-json", f"names resource {doc.get('id')!r}")
        except (OSError, ValueError, AttributeError) as e:
            self.find(None, "resource.json", "bad-resource-json", f"cannot be read: {_why(e)}")
        for name in sorted(os.listdir(self.dir / "instances") if (self.dir / "instances").is_dir() else []):
            if not is_instance_id(name):
                self.find(None, f"instances/{name}", "unexpected-entry", "not an instance id")
        if not self.chain:
            self.find(None, "instances", "no-instances", "the resource has no instance")

    # -- instance.json -------------------------------------------------------
    def _load(self, iid: str) -> InstanceDoc | None:
        try:
            return InstanceDoc.from_json_bytes((self.archive.instance_dir(self.rid, iid) / "instance.json").read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.find(iid, "instance.json", "bad-instance-json", f"not a valid tinyfs instance document: {_why(e)}")
            return None

    def _check_doc(self, iid: str, doc: InstanceDoc, previous: str | None, labels: dict[str, str]) -> None:
        for name, found, wanted in (("id", doc.id, iid), ("resource", doc.resource, self.rid),
                                    ("digest", doc.digest, self.archive.config.primary)):
            if found != wanted:
                self.find(iid, "instance.json", "instance-mismatch", f"{name} is {found!r}, expected {wanted!r}")
        if self.dynamic:
            if doc.previous is not None and not (is_instance_id(doc.previous) and doc.previous < iid):
                self.find(iid, "instance.json", "broken-chain", f"previous {doc.previous!r} is not an earlier instance")
        elif doc.previous != previous:
            self.find(iid, "instance.json", "broken-chain", f"previous is {doc.previous!r}, expected {previous!r}")
        if doc.label is not None:
            try:
                check_label(doc.label)
            except InvalidName as e:
                self.find(iid, "instance.json", "instance-mismatch", str(e))
            if doc.label in labels:
                self.find(iid, "instance.json", "duplicate-label",
                          f"label {doc.label!r} is also used by instance {labels[doc.label]}")
            labels.setdefault(doc.label, iid)
        entries = doc.state.entries()
        for path in entries:
            try:
                check_logical_path(path)
            except TinyfsError as e:
                self.find(iid, path, "bad-path", str(e))
                continue
            parent = parent_of(path)
            if parent and parent not in doc.state.dirs:
                self.find(iid, path, "orphan-entry", f"parent directory {parent!r} is not in the state")
        for path, why in group_problems(doc.state):
            self.find(iid, path, "bad-hardlinks", why)

    # -- stored bytes ----------------------------------------------------------
    def _check_stored(self, iid: str, doc: InstanceDoc, bag: BagReport) -> None:
        """One pass over the state: the stored file of each digest is checked at its first path, and
        every path whose stored file is damaged or missing is noted under that file."""
        bad: dict[str, str | None] = {}     # digest -> its stored path when damaged or missing, else None
        own: set[str] = set()
        for path, f in sorted(doc.state.files.items()):
            if f.digest not in bad:
                bad[f.digest] = self._check_digest(iid, doc, path, own)
            rel = bad[f.digest]
            if rel is not None:
                self._affected.setdefault(rel, []).append((iid, path))
        self.report.files += len(own)
        for inner in sorted(set(bag.payload) - own):
            self.find(iid, inner, "unreferenced-file", "payload file that instance.json does not store")

    def _check_digest(self, iid: str, doc: InstanceDoc, path: str, own: set[str]) -> str | None:
        """Check the stored file of `path`'s bytes; its stored path when it is damaged or missing."""
        digest, size = doc.state.files[path].digest, doc.state.files[path].size
        rel = doc.stored.get(digest)
        if rel is None:
            self.find(iid, path, "missing-stored", f"no stored entry for digest {digest[:16]}…")
            return None
        m = _STORED.match(rel)
        if m is None:
            self.find(iid, path, "bad-stored-path", f"stored path {rel!r} is not instances/<iid>/data/...")
            return None
        holder, inner = m.groups()
        if holder == iid:
            own.add(inner)
        return rel if self._check_one(iid, path, digest, size, rel, holder, inner) else None

    def _check_one(self, iid: str, path: str, digest: str, size: int, rel: str, holder: str, inner: str) -> bool:
        """Findings about one stored file as instance `iid` uses it; True when it is damaged or missing."""
        holder_bag = self.bags.get((self.rid, holder))
        if holder_bag is None or holder > iid:
            self.find(iid, path, "missing-stored-file", f"stored in {rel}, but instance {holder} "
                      f"{'does not exist' if holder_bag is None else 'is later than this one'}", rel)
            return True
        if inner in self._problem_paths(holder):
            if holder != iid:   # the holder's own findings already name the file
                self.find(iid, path, "stored-damaged", f"its bytes, stored in {rel}, failed their check", rel)
            return True
        found = holder_bag.sizes.get(inner)      # what the bag's validation saw a moment ago
        if found is None:
            found = self._size(rel)
        if found is None:
            self.find(iid, path, "missing-stored-file", f"{rel} does not exist", rel)
            return True
        if holder == iid:
            self.report.bytes += found
        damaged = found != size
        if damaged:
            self.find(iid, path, "stored-size-mismatch", f"{rel} has {found} bytes, recorded {size}", rel)
        listed = holder_bag.payload.get(inner)
        if listed is None:
            self.find(iid, path, "not-in-manifest", f"{rel} is not a payload file of its bag", rel)
            return True
        primary = self.archive.config.primary
        if listed.get(primary) != digest:
            self.find(iid, path, "stored-digest-mismatch",
                      f"the manifest of {holder} gives {primary} {str(listed.get(primary))[:16]}…, "
                      f"instance.json {digest[:16]}…", rel)
            return True
        return damaged

    def _problem_paths(self, iid: str) -> set[str]:
        if iid not in self._bad:
            self._bad[iid] = {p.path for p in self.bags[(self.rid, iid)].problems}
        return self._bad[iid]

    def _size(self, rel: str) -> int | None:
        try:
            return os.stat(os.path.join(self.dir, rel)).st_size
        except OSError:
            return None

    def _check_bag_info(self, iid: str, bag: BagReport) -> None:
        for p in profile.info_problems(bag.info):
            self.find(iid, p.path, "bad-bag-info", p.message)
        info = dict(bag.info)
        for name, wanted in (("External-Identifier", self.rid), ("Tinyfs-Instance", iid)):
            if name in info and info[name] != wanted:
                self.find(iid, "bag-info.txt", "bad-bag-info", f"{name} is {info[name]!r}, expected {wanted!r}")


def _log(archive: ArchiveRoot, report: FsckReport) -> None:
    """One fixity.failed per damaged instance, then one fixity.checked for the run."""
    try:
        for (rid, iid), findings in report.damaged().items():
            archive.events.append("fixity.failed", rid, iid, findings=[f.to_json() for f in findings])
        archive.events.append("fixity.checked", None, None, resources=report.resources,
                              instances=report.instances, files=report.files, bytes=report.bytes,
                              problems=len(report.findings), fast=report.fast)
    except OSError as e:  # a read-only archive can still be checked
        log.warning("could not log the fixity events: %s", _why(e))


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
