"""Replicas: more stores holding the same instances as an archive's own (docs/replicas.md).

An archive may have replicas, listed in ROOT/replicas.json (written by `tinyfs store add`). Each replica
is an archive of its own, with the same mode and digests: a local one is an archive root anywhere
(`/path`, in format tinyfs/1, readable by tinyfs on its own), an S3 one is an archive in a bucket whose
working directory is ROOT/replicas/<name>/. The archive's own store (the primary) orders every chain:
an instance is published there first, then copied to each replica after the same predecessor, so a
replica's chain is always a prefix of the primary's and every store only ever holds whole instances.

The copy of an instance (`copy_instance`) takes every stored file of its bag from a source store and
checks each against the bag's manifests as it is copied (a file that fails is taken from the next
source that holds it): no store ever receives bytes that do not match what was committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import tree
from .bagcheck import decode_manifest_path
from .bagwrite import parse_manifest, syncfs
from .digests import CHUNK
from .durable import fsync_dir, write_atomic
from .errors import AlreadyExists, InvalidName, NotAnArchive, NotFound, Stale, TinyfsError
from .ids import check_rid
from .layout import ArchiveRoot
from .model import utc_now

log = logging.getLogger(__name__)

REPLICAS_FILE = "replicas.json"
REPLICAS_DIR = "replicas"       # ROOT/replicas/<name>/: the working directory of an S3 replica
COPY_PREFIX = ".commit-"        # a copy's stage in the replica's transactions/ (its recover sweeps it)
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ReplicaUnavailable(TinyfsError):
    """Fewer stores than a commit needs can be reached: nothing was written."""


class Diverged(Stale):
    """A replica (or a migration's target) holds instances of a resource the source does not."""


class CopyFailed(TinyfsError):
    """No source store holds a good copy of a stored file."""


class WriteFailed(TinyfsError):
    """Writing a copy failed (the receiving store's disk, e.g. full): no source is to blame."""

    def __init__(self, dest: Path, error: OSError):
        super().__init__(f"cannot write the copy {dest}: {error.strerror or error}")
        self.errno = error.errno or self.errno


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    url: str                    # "/absolute/path" or "s3://bucket/prefix"
    endpoint: str | None = None
    added: str = ""

    @property
    def on_s3(self) -> bool:
        return self.url.startswith("s3://")

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "endpoint": self.endpoint, "added": self.added}


class Replica:
    """One replica of an archive, opened at first use (an unreachable store fails then, not before)."""

    def __init__(self, primary_root: Path, spec: ReplicaSpec):
        self.spec = spec
        self.name = spec.name
        self.root = primary_root / REPLICAS_DIR / spec.name if spec.on_s3 else Path(spec.url)
        self._archive: ArchiveRoot | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Replica({self.name}: {self.spec.url})"

    def probe(self, rid: str) -> str | None:
        """The resource's head in this store, asking it now: a store that does not answer raises. (A local
        replica whose disk went away since it was opened would otherwise look like an empty one.)"""
        archive = self.archive
        if archive.store.local and not (self.root / "tinyfs.json").exists():
            raise NotAnArchive(f"{self.root} is not a tinyfs archive (any more)")
        return archive.head(rid)

    @property
    def archive(self) -> ArchiveRoot:
        with self._lock:
            if self._archive is None:
                self._archive = ArchiveRoot(self.root)
            return self._archive


@dataclass
class ReplicaSet:
    """An archive's replicas and how many stores (the primary included) a commit must reach."""

    replicas: list[Replica] = field(default_factory=list)
    copies: int | None = None       # None: every store

    def __bool__(self) -> bool:
        return bool(self.replicas)

    def required(self, copies: int | None = None) -> int:
        """How many stores (the primary counted) a commit must reach: `copies`, else the configured number,
        else all of them."""
        wanted = copies if copies is not None else self.copies
        total = 1 + len(self.replicas)
        if wanted is None:
            return total
        if not 1 <= wanted <= total:
            raise InvalidName(f"--copies {wanted}: this archive has {total} store(s)")
        return wanted

    def get(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise NotFound(f"no store named {name!r} (see tinyfs status)")


# -- the list in ROOT/replicas.json -----------------------------------------------------------------------

def replicas_of(archive: ArchiveRoot) -> ReplicaSet:
    """The archive's replicas (read once per ArchiveRoot: `store add` from another process shows to a
    running mount after its restart)."""
    found = getattr(archive, "_replicas", None)
    if found is None:
        found = load(archive.root)
        archive._replicas = found
    return found


def load(root: Path) -> ReplicaSet:
    try:
        doc = json.loads((root / REPLICAS_FILE).read_text())
    except FileNotFoundError:
        return ReplicaSet()
    except ValueError as e:
        raise TinyfsError(f"{root / REPLICAS_FILE}: not valid JSON: {e}") from None
    specs = [ReplicaSpec(r["name"], r["url"], r.get("endpoint"), r.get("added", "")) for r in doc["replicas"]]
    return ReplicaSet([Replica(root, s) for s in specs], doc.get("copies"))


def save(root: Path, found: ReplicaSet) -> None:
    doc = {"replicas": [r.spec.to_json() for r in found.replicas], "copies": found.copies}
    write_atomic(root / REPLICAS_FILE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def add_replica(archive: ArchiveRoot, url: str, *, endpoint: str | None = None, name: str | None = None,
                copies: int | None = None) -> Replica:
    """Add a replica: a new archive with the primary's mode and digests where `url` is absent or empty
    (an S3 prefix: empty), or an existing one whose chains are all prefixes of the primary's (it is then
    behind, and `tinyfs replicate` catches it up). Nothing is written to ROOT on a refusal."""
    found = load(archive.root)
    taken = {r.name for r in found.replicas}
    name = name or next(f"r{n}" for n in range(1, len(taken) + 2) if f"r{n}" not in taken)
    if not NAME.fullmatch(name):
        raise InvalidName(f"store name {name!r}: lower-case letters, digits, '-' and '_', at most 32")
    if any(r.name == name for r in found.replicas):
        raise AlreadyExists(f"{archive.root} already has a store named {name!r}")
    if url.startswith("s3://"):
        spec = ReplicaSpec(name, url, endpoint, utc_now())
        if any(r.spec.url == url and r.spec.endpoint == endpoint for r in found.replicas):
            raise AlreadyExists(f"{url} is already a store of {archive.root}")
    else:
        if endpoint is not None:
            raise InvalidName("--endpoint goes with an s3:// store")
        path = Path(url).absolute()
        _refuse_overlap(archive, found, path)
        spec = ReplicaSpec(name, str(path), None, utc_now())
    replica = Replica(archive.root, spec)
    if copies is not None and not 1 <= copies <= len(found.replicas) + 2:
        raise InvalidName(f"--copies {copies}: the archive will have {len(found.replicas) + 2} stores")
    _create_or_check(archive, replica)
    found.replicas.append(replica)
    if copies is not None:
        found.copies = copies
    save(archive.root, found)
    archive._replicas = None
    archive.events.append("store.added", name=name, url=spec.url, endpoint=endpoint)
    return replica


def _refuse_overlap(archive: ArchiveRoot, found: ReplicaSet, path: Path) -> None:
    mine = archive.root.resolve()
    there = path.resolve()
    if there == mine or mine in there.parents or there in mine.parents:
        raise InvalidName(f"{path}: a replica must be outside the archive (and not hold it)")
    for r in found.replicas:
        if not r.spec.on_s3 and Path(r.spec.url).resolve() == there:
            raise AlreadyExists(f"{path} is already a store of {archive.root}")


def _create_or_check(archive: ArchiveRoot, replica: Replica) -> None:
    """Make the replica's archive, or check the one there: same mode and digests, nothing the primary
    does not hold."""
    from .layout import init_archive

    cfg = archive.config
    spec = replica.spec
    if cfg.mode == "dynamic":
        raise InvalidName("a dynamic archive drops replaced instances: it cannot have replicas")
    if spec.on_s3:
        from .s3archive import init_s3_archive
        if (replica.root / "tinyfs.json").exists():
            raise AlreadyExists(f"{replica.root} exists already")
        try:
            init_s3_archive(replica.root, spec.url, spec.endpoint, mode=cfg.mode, digests=list(cfg.digests))
            _check_replica(archive, replica)
        except BaseException:
            tree.rmtree(replica.root, ignore_errors=True, force=True)      # (only this host's working dir)
            raise
        return
    if not (replica.root / "tinyfs.json").exists():
        init_archive(replica.root, cfg.mode, list(cfg.digests), cfg.immutable)
    _check_replica(archive, replica)


def _check_replica(archive: ArchiveRoot, replica: Replica) -> None:
    cfg, theirs = archive.config, replica.archive.config
    if theirs.mode != cfg.mode or theirs.digests != cfg.digests:
        raise InvalidName(f"{replica.spec.url} is an archive in mode {theirs.mode} with "
                          f"{','.join(theirs.digests)}; this one is {cfg.mode} with {','.join(cfg.digests)}")
    for rid in replica.archive.resource_ids():
        check_prefix(archive, replica.archive, rid, what=f"store {replica.spec.url}")


def check_prefix(src: ArchiveRoot, dst: ArchiveRoot, rid: str, what: str) -> list[str]:
    """The instances of `rid` that `dst` lacks (src's chain after dst's); Diverged when dst's chain is not
    a prefix of src's."""
    theirs = dst.instance_ids(rid)
    mine = src.instance_ids(rid)
    if mine[:len(theirs)] != theirs:
        extra = sorted(set(theirs) - set(mine))
        raise Diverged(f"{what}: resource {rid!r} has instance(s) {', '.join(extra) or 'in another order'} "
                       f"that {src.root} does not have")
    return mine[len(theirs):]


# -- copying instances --------------------------------------------------------------------------------

def catch_up(sources: list[ArchiveRoot], dst: ArchiveRoot, rid: str) -> int:
    """Copy every instance of `rid` that `dst` lacks from the first of `sources`, oldest first; the number
    copied. A store that has only some of the instances resumes after the last it has."""
    missing = check_prefix(sources[0], dst, rid, what=str(dst.root))
    for iid in missing:
        copy_instance(sources, dst, rid, iid)
    return len(missing)


def copy_instance(sources: list[ArchiveRoot], dst: ArchiveRoot, rid: str, iid: str) -> bool:
    """Publish instance `iid` of `rid`, as the first of `sources` holds it, in `dst` after the same
    predecessor; every stored file is checked against the bag's manifests as it is copied, and one that
    fails is taken from the next source. False when `dst` has it already. Stale when `dst`'s head is not
    the instance's predecessor."""
    check_rid(rid)
    src = sources[0]
    doc = src.instance(rid, iid)
    with dst.resource_lock(rid):
        have = dst.instance_ids(rid)
        if iid in have:
            return False
        head = have[-1] if have else None
        if head != doc.previous:
            raise Stale(f"{dst.root}: resource {rid!r} is at {head or 'no instance'}, not at {doc.previous or 'no instance'} "
                        f"which {iid} follows")
        stage = dst.transactions / f"{COPY_PREFIX}{rid}-{iid}"
        tree.rmtree(stage, ignore_errors=True, force=True)    # an interrupted copy's (we hold the lock)
        stage.mkdir()
        try:
            resource_json = _copy_bag(sources, rid, iid, stage, dst)
            syncfs(stage)
            dst.store.publish(rid, iid, doc.previous, stage / "instances" / iid, resource_json=resource_json)
        finally:
            tree.rmtree(stage, ignore_errors=True, force=True)
        if dst.config.immutable and dst.store.local:
            from .commit import set_immutable_tree
            set_immutable_tree(dst.instance_dir(rid, iid))
    dst.events.append("instance.copied", rid, iid, source=str(src.root))
    return True


def _copy_bag(sources: list[ArchiveRoot], rid: str, iid: str, stage: Path, dst: ArchiveRoot) -> bytes | None:
    """Every stored file of the bag into `stage`, checked; resource.json's bytes for a first instance."""
    src = sources[0]
    expected = expected_digests(sources, rid, iid)
    files = src.store.published_files(rid, iid)
    missing = sorted(set(expected) - set(files))
    if missing:
        files = sorted({*files, *missing})     # another source may hold what this one lost
    read_only = dst.config.mode == "worm"
    (stage / "instances" / iid / "data").mkdir(parents=True)    # a bag's payload dir, empty or not
    for rel in files:
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)

    def one(rel: str) -> None:
        copy_checked(sources, rid, rel, expected.get(rel), stage / rel)
        if read_only:
            os.chmod(stage / rel, 0o444)

    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy") as pool:
        list(pool.map(one, files))
    if read_only:
        for dirpath, _dirs, _files in tree.walk(stage / "instances" / iid, topdown=False):
            os.chmod(dirpath, 0o555)
    fsync_dir(stage)
    if src.instance(rid, iid).previous is not None:
        return None
    return src.store.read_document(rid, "resource.json")


COPY_THREADS = 8    # files in flight: a small file on an object store costs a round trip, not bandwidth


def expected_digests(sources: list[ArchiveRoot], rid: str, iid: str) -> dict[str, tuple[str, str]]:
    """Stored path -> (algorithm, digest) of every file of the instance's bag that the manifests list: the
    payload (manifest) and the tag files (tagmanifest), in the archive's first algorithm, and the
    tagmanifest itself. Taken from the first source whose manifest matches its tagmanifest: a damaged
    manifest is never trusted to check the copies against."""
    alg = sources[0].config.primary
    base = f"instances/{iid}/"
    problems = []
    for src in sources:
        try:
            tags = src.store.read_document(rid, f"{base}tagmanifest-{alg}.txt")
            manifest = src.store.read_document(rid, f"{base}manifest-{alg}.txt")
        except (NotFound, OSError) as e:
            problems.append(f"{src.root}: {e}")
            continue
        listed = {decode_manifest_path(p): d for p, d in parse_manifest(tags.decode("utf-8")).items()}
        if listed.get(f"manifest-{alg}.txt") != hashlib.new(alg, manifest).hexdigest():
            problems.append(f"{src.root}: manifest-{alg}.txt does not match its tagmanifest")
            continue
        out = {base + name: (alg, digest) for name, digest in listed.items()}
        out.update({base + decode_manifest_path(p): (alg, d)
                    for p, d in parse_manifest(manifest.decode("utf-8")).items()})
        out[f"{base}tagmanifest-{alg}.txt"] = (alg, hashlib.new(alg, tags).hexdigest())
        return out
    raise CopyFailed(f"{rid}: instance {iid}: no store has intact manifests ({'; '.join(problems)})")


def copy_checked(sources: list[ArchiveRoot], rid: str, rel: str, expected: tuple[str, str] | None,
                 dest: Path) -> str:
    """Copy stored file `rel` to the new file `dest` from the first source whose bytes match `expected`
    (None: a file no manifest lists, e.g. a tagmanifest: the first source that has it); the root of the
    source used. CopyFailed when none does."""
    problems = []
    for src in sources:
        try:
            path = src.store.stored_file(rid, rel)
            found = _copy_hashing(path, dest, expected[0] if expected else None)
        except (NotFound, FileNotFoundError):
            problems.append(f"{src.root}: missing")
            continue
        except OSError as e:
            problems.append(f"{src.root}: {e.strerror or e}")
            continue
        if expected is None or found == expected[1]:
            return str(src.root)
        src.store.forget(rid, rel)
        problems.append(f"{src.root}: damaged ({expected[0]} {found[:16]}, expected {expected[1][:16]})")
    os.unlink(dest) if dest.exists() else None
    raise CopyFailed(f"{rid}/{rel}: no good copy ({'; '.join(problems)})")


def _copy_hashing(src: Path, dest: Path, algorithm: str | None) -> str:
    """Copy `src` to `dest` and return the digest of the bytes copied. A large file is hashed by a second
    thread while the next chunk is read and written (hashlib releases the GIL): sha512 runs at about
    700 MiB/s a core here, as slow as the copy itself. An error writing `dest` is a WriteFailed (the
    caller must not blame the source for it)."""
    h = hashlib.new(algorithm) if algorithm else None
    with open(src, "rb", buffering=0) as fin, _created(dest) as fout:
        def write(chunk: bytes) -> None:
            try:
                fout.write(chunk)
            except OSError as e:
                raise WriteFailed(dest, e) from None

        if h is None or os.fstat(fin.fileno()).st_size <= PIPELINE_ABOVE:
            while chunk := fin.read(CHUNK):
                if h:
                    h.update(chunk)
                write(chunk)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="copy-hash") as hasher:
                hashing = None
                while chunk := fin.read(PIPELINE_CHUNK):
                    if hashing is not None:
                        hashing.result()
                    hashing = hasher.submit(h.update, chunk)
                    write(chunk)
                if hashing is not None:
                    hashing.result()
    return h.hexdigest() if h else ""


def _created(dest: Path):
    try:
        return open(dest, "wb", buffering=0)
    except OSError as e:
        raise WriteFailed(dest, e) from None


PIPELINE_ABOVE = 8 << 20      # smaller files: hashed in line (a thread hand-off costs more)
PIPELINE_CHUNK = 4 << 20


# -- a commit on an archive with replicas -------------------------------------------------------------

def check_reachable(archive: ArchiveRoot, rid: str, copies: int | None) -> None:
    """Before a commit writes anything: enough stores (the primary counted) answer to take its instance,
    else ReplicaUnavailable naming those that do not."""
    found = replicas_of(archive)
    if not found:
        return
    need = found.required(copies)
    failures = {}
    for r in found.replicas:
        try:
            r.probe(rid)
        except (TinyfsError, OSError) as e:
            failures[r.name] = str(e)
    reachable = 1 + len(found.replicas) - len(failures)
    if reachable < need:
        why = "; ".join(f"store {n} ({found.get(n).spec.url}): {e}" for n, e in failures.items())
        raise ReplicaUnavailable(f"{rid}: a commit needs {need} store(s) and {reachable} answer: {why}; "
                                 f"nothing was committed")


def replicate_commit(archive: ArchiveRoot, rid: str, iid: str, copies: int | None) -> tuple[list[str], bool]:
    """After the primary published `iid`: copy the resource's missing instances to every replica (all at
    once). Returns the names of the stores left behind, and whether fewer stores than required hold the
    instance. Never raises for a store that failed: the instance is committed (it exists on the primary,
    readers see it), so the commit is answered as made and the shortfall is reported and logged
    (`replica.behind`); check_reachable refused the commit beforehand when too few stores answered."""
    found = replicas_of(archive)
    if not found:
        return [], False
    need = found.required(copies)
    failures = _catch_up_all(archive, found.replicas, rid)
    for name, why in failures.items():
        archive.events.append("replica.behind", rid, iid, store=name, error=why)
    return sorted(failures), 1 + len(found.replicas) - len(failures) < need


def _catch_up_all(archive: ArchiveRoot, replicas: list[Replica], rid: str) -> dict[str, str]:
    def one(r: Replica) -> str | None:
        try:
            catch_up([archive, *(o.archive for o in replicas if o is not r and _opens(o))], r.archive, rid)
        except (TinyfsError, OSError) as e:
            log.warning("store %s: %s", r.name, e)
            return str(e)
        return None

    if len(replicas) == 1:
        results = [one(replicas[0])]
    else:
        with ThreadPoolExecutor(len(replicas), thread_name_prefix="replicate") as pool:
            results = list(pool.map(one, replicas))
    return {r.name: why for r, why in zip(replicas, results, strict=True) if why is not None}


# -- tinyfs replicate / status ------------------------------------------------------------------------

@dataclass
class ReplicateReport:
    copied: dict[str, int] = field(default_factory=dict)        # store -> instances copied
    failed: dict[str, list[str]] = field(default_factory=dict)  # store -> one line a failure


def replicate(archive: ArchiveRoot, rids: list[str] | None = None, stores: list[str] | None = None,
              progress=None) -> ReplicateReport:
    """Catch every replica (or those named) up with the primary, resource by resource."""
    found = replicas_of(archive)
    chosen = [found.get(n) for n in stores] if stores else found.replicas
    if not chosen:
        raise NotFound(f"{archive.root} has no replica (tinyfs store add)")
    report = ReplicateReport()
    rids = rids if rids is not None else archive.resource_ids()
    for r in chosen:
        report.copied[r.name] = 0
        try:
            dst = r.archive
        except (TinyfsError, OSError) as e:
            report.failed[r.name] = [f"unreachable: {e}"]
            continue
        others = [archive, *(o.archive for o in found.replicas if o is not r and _opens(o))]
        for rid in rids:
            try:
                report.copied[r.name] += catch_up(others, dst, rid)
            except (TinyfsError, OSError) as e:
                report.failed.setdefault(r.name, []).append(f"{rid}: {e}")
            if progress:
                progress(r.name, rid)
    if any(report.copied.values()) or report.failed:
        archive.events.append("replicate.finished", copied=report.copied,
                              failed={k: len(v) for k, v in report.failed.items()})
    return report


def sources_of(archive: ArchiveRoot) -> list[ArchiveRoot]:
    """The archive's stores that answer, the primary first: where a copy may take each file from."""
    return [archive, *(r.archive for r in replicas_of(archive).replicas if _opens(r))]


def _opens(r: Replica) -> bool:
    try:
        return r.archive is not None
    except (TinyfsError, OSError):
        return False


def status(archive: ArchiveRoot) -> list[dict]:
    """Per store (the primary first): its address, whether it answers, how many instances it lacks of the
    primary's, and its last full fixity check (from the event log)."""
    found = replicas_of(archive)
    primary_ids = {rid: archive.instance_ids(rid) for rid in archive.resource_ids()}
    rows = [{"name": "primary", "url": _primary_url(archive), "reachable": True, "error": None,
             "resources": len(primary_ids), "instances": sum(map(len, primary_ids.values())),
             "behind": 0, "behind_resources": 0, "diverged": [], "last_fsck": last_check(archive)}]
    for r in found.replicas:
        row = {"name": r.name, "url": r.spec.url, "reachable": True, "error": None, "resources": 0,
               "instances": 0, "behind": 0, "behind_resources": 0, "diverged": [],
               "last_fsck": None}
        try:
            _compare(r.archive, primary_ids, row)
            row["last_fsck"] = last_check(r.archive)
        except (TinyfsError, OSError) as e:
            row.update(reachable=False, error=str(e), behind=None, behind_resources=None)
        rows.append(row)
    return rows


def _compare(dst: ArchiveRoot, primary_ids: dict[str, list[str]], row: dict) -> None:
    if dst.store.local and not (dst.root / "tinyfs.json").exists():
        raise NotAnArchive(f"{dst.root} is not a tinyfs archive (any more)")
    theirs_rids = dst.resource_ids()
    row["resources"] = len(theirs_rids)
    for rid in sorted(set(theirs_rids) - set(primary_ids)):
        row["diverged"].append(rid)
    for rid, mine in primary_ids.items():
        theirs = dst.instance_ids(rid) if rid in theirs_rids else []
        row["instances"] += len(theirs)
        if mine[:len(theirs)] != theirs:
            row["diverged"].append(rid)
        elif len(theirs) < len(mine):
            row["behind"] += len(mine) - len(theirs)
            row["behind_resources"] += 1


def _primary_url(archive: ArchiveRoot) -> str:
    try:
        doc = json.loads((archive.root / "tinyfs.json").read_text())
    except (OSError, ValueError):
        return str(archive.root)
    return doc.get("store") or str(archive.root)


def last_check(archive: ArchiveRoot) -> dict | None:
    """The store's last full fixity check, from its own event log: its time and what it found."""
    last = None
    for event in archive.events.read():
        if event.get("event") == "fixity.checked" and not (event.get("detail") or {}).get("fast"):
            last = event
    if last is None:
        return None
    detail = last.get("detail") or {}
    return {"time": last["time"], "problems": detail.get("problems"), "resources": detail.get("resources"),
            "instances": detail.get("instances"), "files": detail.get("files")}
