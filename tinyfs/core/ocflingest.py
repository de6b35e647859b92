"""`tinyfs ingest ROOT RID --ocfl SRC`: an OCFL object as a resource, one instance per version, in order
(docs/ocfl.md).

Everything that can refuse the object is found before anything is committed:

1. SRC is walked: a symbolic link or special file anywhere is refused (an OCFL object is files and
   directories; a link would let the object pull in bytes from elsewhere).
2. ocfl-py's validator decides validity (every content file hashed): an invalid object is refused with
   its error codes (E0xx) in one line; warnings are logged.
3. Every version's message, creator, label and logical paths are held to tinyfs's rules and limits.
4. Each content file the versions use is copied once into a work directory of the archive's
   transactions/ (swept by `recover` as `.api-*`), hashed on the way with the object's digest (compared
   with the inventory: a file that changed since validation is refused) and every digest the archive
   and the records need.
5. A version with a tinyfs record (logs/tinyfs/vN.instance.json, what `export --ocfl` writes) gets the
   recorded state (modes, mtimes, xattrs, symlinks, directories, link groups, label) once the record is
   found to describe exactly the version's logical state (every path, digest and size); other versions
   get their logical state with modes 0644/0755, the version's created time as the mtime of what it adds,
   and what stays unchanged from the version before keeps its entry.
6. A resource RID that exists must hold exactly the instances an earlier, interrupted run made (the
   first versions' states): the run then commits the rest. Anything else is refused.

Then each version is committed through the core's commit (the one path every commit takes: a full target
state, its bytes hard-linked from the work directory, deduplicated against what the resource stores).
A version whose state is that of the instance before it (and that brings no label) commits nothing, as
any commit without a change; an empty first version too. Should a commit fail (disk full), the versions
committed so far stay, the error says which, and running the same command again commits the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import tree
from .api import Archive
from .commit import Change, CommitRequest, NewFile, _same_state, commit
from .digests import copy_and_hash, parallel
from .errors import AlreadyExists, Forbidden, InvalidOcfl, NotFound, Stale, TinyfsError
from .fsck import ProgressFactory
from .ids import check_logical_path, check_rid, parent_of
from .ingest import state_problems
from .limits import check_metadata
from .model import DirEntry, FileEntry, InstanceDoc, State, link_groups
from .ocflmap import (
    CONTENT_DIGEST,
    INVENTORY,
    creator_of,
    record_name,
    validate_object,
    version_dirs,
)

log = logging.getLogger(__name__)

WORK_PREFIX = ".api-ocfl-"      # the copied content, in transactions/ (recover sweeps .api-*)
FILE_MODE, DIR_MODE = 0o644, 0o755
SHOWN_ERRORS = 3                # ocfl-py messages quoted in the one-line refusal (all codes are listed)


class IngestStopped(TinyfsError):
    """A commit failed after earlier versions of the object were committed: the message says which (they
    stay: instances are never taken back), and that the same ingest again commits the rest."""

    def __init__(self, message: str, errno: int | None):
        super().__init__(message)
        if errno:
            self.errno = errno


@dataclass
class OcflIngestResult:
    committed: list[tuple[str, str]] = field(default_factory=list)   # (version, the instance it made)
    held: list[str] = field(default_factory=list)        # versions an earlier run committed already
    unchanged: list[str] = field(default_factory=list)   # versions that change nothing: no instance


@dataclass
class _Version:
    """One OCFL version as the inventory gives it."""

    dir: str
    created: str
    message: str
    creator: str
    state: dict[str, str]              # logical path -> content digest (lower case)


@dataclass
class _Blob:
    """One content file, copied into the work directory."""

    path: Path
    size: int
    digests: dict[str, str]            # algorithm -> hex


@dataclass
class _Target:
    """What the instance of a version will be."""

    version: str
    state: State                       # keyed by the archive's first digest; root: the effective one
    message: str
    creator: str
    label: str | None


def ingest_ocfl(archive: Archive, rid: str, src: str | os.PathLike, *,
                progress: ProgressFactory | None = None) -> OcflIngestResult:
    """Import the OCFL object at `src` as resource `rid` (see the module's docstring)."""
    check_rid(rid)
    src = Path(src)
    if not src.is_dir():
        raise NotFound(f"{src}: not a directory (an OCFL object is a directory)")
    _refuse_links(src)
    inventory = _validated_inventory(src)
    algorithm = inventory["digestAlgorithm"]
    versions = _versions(inventory)
    records = {v.dir: _record(src, v.dir) for v in versions}
    _check_rules(src, versions, records)
    root = archive.root
    work = root.transactions / f"{WORK_PREFIX}{uuid.uuid4().hex}"
    work.mkdir()
    try:
        needs = sorted({*root.config.digests, algorithm, *(r.digest for r in records.values() if r)})
        blobs = _copy_content(src, inventory, versions, work, needs, progress)
        targets = _targets(src, versions, records, blobs, root.config.primary)
        return _commit_versions(archive, rid, targets, blobs, root.config.primary)
    finally:
        tree.rmtree(work, ignore_errors=True, force=True)


# -- 1, 2: what SRC is ---------------------------------------------------------------------------

def _refuse_links(src: Path) -> None:
    """An OCFL object holds regular files and directories only."""
    for dirpath, dirs, files in tree.walk(src):
        for name in dirs + files:
            full = Path(dirpath, name)
            mode = os.lstat(full).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
                raise Forbidden(f"{full}: is {kind}; an OCFL object holds regular files and directories only "
                                "(nothing was committed)", path=str(full))


def _validated_inventory(src: Path) -> dict:
    """The root inventory of an object ocfl-py finds valid; InvalidOcfl with its findings otherwise."""
    report = validate_object(src)
    for warning in report.warnings:
        log.warning("OCFL object %s: %s", src, warning)
    if not report.valid:
        raise InvalidOcfl(refusal(src, report.error_codes(), report.errors), report.errors)
    return json.loads((src / INVENTORY).read_bytes())


def refusal(src: Path, codes: list[str], errors: list[str]) -> str:
    """One line: every error code, then the first few of ocfl-py's messages."""
    shown = "; ".join(errors[:SHOWN_ERRORS])
    more = len(errors) - SHOWN_ERRORS
    return (f"invalid OCFL object {src}: {', '.join(codes)}: {shown}{f'; and {more} more' if more > 0 else ''}"
            " (nothing was committed)")


def _versions(inventory: dict) -> list[_Version]:
    out = []
    for name in version_dirs(inventory):
        block = inventory["versions"][name]
        state = {path: digest.lower() for digest, paths in block["state"].items() for path in paths}
        out.append(_Version(name, block["created"], block.get("message", ""), creator_of(block.get("user")),
                            state))
    return out


def _record(src: Path, version: str) -> InstanceDoc | None:
    """The tinyfs record of a version (None: the version has none), its sidecar checked."""
    name = record_name(version)
    path = src / name
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        expected = (src / f"{name}.{CONTENT_DIGEST}").read_text("utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        raise InvalidOcfl(f"OCFL object {src}: {name} has no readable {CONTENT_DIGEST} sidecar "
                          "(nothing was committed)", [name]) from None
    if hashlib.sha512(raw).hexdigest() != expected.lower():
        raise InvalidOcfl(f"OCFL object {src}: {name} does not match its {CONTENT_DIGEST} sidecar: "
                          "damaged (nothing was committed)", [name])
    try:
        return InstanceDoc.from_json_bytes(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidOcfl(f"OCFL object {src}: {name} is not a tinyfs instance record: {e!r} "
                          "(nothing was committed)", [name]) from None


# -- 3: tinyfs's rules ----------------------------------------------------------------------------

def _check_rules(src: Path, versions: list[_Version], records: dict[str, InstanceDoc | None]) -> None:
    """Metadata within tinyfs's limits and logical paths tinyfs can hold, for every version."""
    for v in versions:
        record = records[v.dir]
        try:
            check_metadata(v.message, record.creator if record else v.creator, record.label if record else None)
            for path in v.state:
                check_logical_path(path)
        except TinyfsError as e:
            raise type(e)(f"OCFL object {src}: version {v.dir}: {e} (nothing was committed)") from None


# -- 4: the content ---------------------------------------------------------------------------------

def _copy_content(src: Path, inventory: dict, versions: list[_Version], work: Path, algorithms: list[str],
                  progress: ProgressFactory | None) -> dict[str, _Blob]:
    """content digest -> its bytes copied into `work`, for every digest a version uses."""
    algorithm = inventory["digestAlgorithm"]
    content_path = {digest.lower(): paths[0] for digest, paths in inventory["manifest"].items()}
    used = sorted({digest for v in versions for digest in v.state.values()})
    total = sum(os.stat(src / content_path[d]).st_size for d in used)
    advance = progress("ingesting", total) if progress else None

    def copy(item: tuple[int, str]) -> tuple[str, _Blob]:
        n, digest = item
        source = src / content_path[digest]
        digests, size = copy_and_hash(source, work / str(n), algorithms, advance)
        if digests[algorithm] != digest:
            raise InvalidOcfl(f"invalid OCFL object {src}: {content_path[digest]}: its {algorithm} is "
                              f"{digests[algorithm][:16]}…, the inventory says {digest[:16]}… "
                              "(changed since it was validated?) [E092] (nothing was committed)", [str(source)])
        return digest, _Blob(work / str(n), size, digests)

    return dict(parallel(copy, list(enumerate(used))))


# -- 5: the states ----------------------------------------------------------------------------------

def _targets(src: Path, versions: list[_Version], records: dict[str, InstanceDoc | None],
             blobs: dict[str, _Blob], primary: str) -> list[_Target]:
    out: list[_Target] = []
    before = State()
    for v in versions:
        record = records[v.dir]
        if record is None:
            state = _plain_state(v, blobs, primary, before)
            target = _Target(v.dir, state, v.message, v.creator, None)
        else:
            state = _recorded_state(src, v, record, blobs, primary)
            target = _Target(v.dir, state, v.message, record.creator, record.label)
        if state.root is None:
            state.root = before.root         # (a commit without a root keeps the head's)
        out.append(target)
        before = state
    return out


def _plain_state(v: _Version, blobs: dict[str, _Blob], primary: str, before: State) -> State:
    """The logical state of a version without a record: what is unchanged from the state before keeps
    its entry, the rest is new (mode 0644, directories 0755, the version's created time)."""
    now = created_ns(v.created)
    state = State()
    for path, digest in sorted(v.state.items()):
        blob = blobs[digest]
        kept = before.files.get(path)
        if kept is not None and kept.digest == blob.digests[primary]:
            state.files[path] = kept
        else:
            state.files[path] = FileEntry(blob.digests[primary], blob.size, FILE_MODE, now)
        parent = parent_of(path)
        while parent and parent not in state.dirs:
            state.dirs[parent] = before.dirs.get(parent) or DirEntry(DIR_MODE, now)
            parent = parent_of(parent)
    kept_groups = [g for g in before.hardlinks if all(state.files.get(p) is before.files[p] for p in g)]
    state.hardlinks = link_groups(kept_groups)
    return state


def _recorded_state(src: Path, v: _Version, record: InstanceDoc, blobs: dict[str, _Blob],
                    primary: str) -> State:
    """The record's state, keyed by the archive's digest, once it is found to describe the version."""
    name = record_name(v.dir)
    problems = [str(p) for p in state_problems(record.state, name)]
    recorded = record.state.files
    problems += [f"{p}: in the version's logical state, not in {name}" for p in sorted(v.state.keys() - recorded)]
    problems += [f"{p}: in {name}, not in the version's logical state" for p in sorted(recorded.keys() - v.state)]
    if record.digest not in ("sha512", "sha256"):
        problems.append(f"{name}: records {record.digest!r} digests (sha512 or sha256 expected)")
    files = {}
    for path, entry in sorted(recorded.items()):
        blob = blobs.get(v.state.get(path, ""))
        if blob is None:
            continue
        found = blob.digests.get(record.digest)
        if found != entry.digest:
            problems.append(f"{path}: {name} records {record.digest} {entry.digest[:16]}…, the content has "
                            f"{(found or '?')[:16]}…")
        elif blob.size != entry.size:
            problems.append(f"{path}: {name} records {entry.size} bytes, the content has {blob.size}")
        files[path] = FileEntry(blob.digests[primary], entry.size, entry.mode, entry.mtime_ns, entry.xattrs)
    if problems:
        n = len(problems)
        raise InvalidOcfl(f"OCFL object {src}: {name} does not describe version {v.dir}: {n} "
                          f"problem{'s' if n != 1 else ''}: {'; '.join(problems[:SHOWN_ERRORS])}"
                          f"{'; ...' if n > SHOWN_ERRORS else ''} (nothing was committed)", problems)
    return State(files, dict(record.state.links), dict(record.state.dirs), record.state.hardlinks,
                 record.state.root)


# -- 6: the commits -----------------------------------------------------------------------------------

def _commit_versions(archive: Archive, rid: str, targets: list[_Target], blobs: dict[str, _Blob],
                     primary: str) -> OcflIngestResult:
    result = OcflIngestResult()
    making = _instances(targets, result)
    held = _held(archive, rid, making)
    result.held = [t.version for t in making[:held]]
    todo = making[held:]
    taken = [t.label for t in todo if t.label is not None and t.label in archive.root.labels(rid)]
    if taken:
        raise AlreadyExists(f"resource {rid!r}: label {taken[0]!r} is taken (nothing was committed)")
    sources = {blob.digests[primary]: blob for blob in blobs.values()}
    algorithms = archive.root.config.digests
    head = archive.root.head(rid)
    for target in todo:
        if archive.root.head(rid) != head:
            raise Stale(f"resource {rid!r} changed meanwhile" + _so_far(result))
        req = CommitRequest(rid, head, _changes(target.state, sources, algorithms), full=True,
                            message=target.message, creator=target.creator, label=target.label,
                            hardlinks=target.state.hardlinks, root=target.state.root, copies=archive.copies)
        try:
            done = commit(archive.root, req)
        except (TinyfsError, OSError) as e:
            if not result.committed:
                raise
            raise IngestStopped(f"{e}{_so_far(result)}", getattr(e, "errno", None)) from e
        if done.instance is not None:
            result.committed.append((target.version, done.instance))
            head = done.instance
    return result


def _instances(targets: list[_Target], result: OcflIngestResult) -> list[_Target]:
    """The versions that make an instance, as a commit decides: a change from the one before, or a label
    on an existing resource; the others are noted as unchanged."""
    making: list[_Target] = []
    for target in targets:
        if making:
            changes = not _same_state(target.state, making[-1].state) or target.label is not None
        else:
            changes = bool(target.state.entries())
        if changes:
            making.append(target)
        else:
            result.unchanged.append(target.version)
    return making


def _held(archive: Archive, rid: str, making: list[_Target]) -> int:
    """How many of the instances to make the resource holds already (an earlier, interrupted run of the
    same import); a resource that holds anything else is refused."""
    root = archive.root
    if not root.exists(rid):
        return 0
    iids = root.instance_ids(rid)
    if len(iids) > len(making) or any(not _same_state(root.state(rid, iid), t.state)
                                      for iid, t in zip(iids, making[:len(iids)], strict=True)):
        raise AlreadyExists(f"resource {rid!r} exists and its instances are not the first versions of this "
                            "object (an OCFL object is imported as a new resource; nothing was committed)")
    return len(iids)


def _changes(state: State, sources: dict[str, _Blob], algorithms) -> dict[str, Change]:
    """The whole target state as a commit request: files as copies to link into the new bag (the commit
    stores the bytes it has not stored yet and points at the others)."""
    changes: dict[str, Change] = {**state.dirs, **state.links}
    for path, entry in state.files.items():
        blob = sources[entry.digest]
        changes[path] = NewFile(os.fspath(blob.path), entry.size, entry.mode, entry.mtime_ns, dict(entry.xattrs),
                                digests={alg: blob.digests[alg] for alg in algorithms}, linkable=True)
    return changes


def _so_far(result: OcflIngestResult) -> str:
    done = ", ".join(f"{version} as {iid}" for version, iid in result.committed)
    return (f"; committed so far: {done or 'nothing'}; run the same ingest again to commit the rest"
            if result.committed else " (nothing was committed)")


_CREATED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


def created_ns(created: str) -> int:
    """A version's `created` (RFC 3339, checked by the validator) as nanoseconds since the epoch, exact
    to the nanosecond (datetime keeps microseconds)."""
    m = _CREATED.fullmatch(created.strip())
    if m is None:
        raise InvalidOcfl(f"version created {created!r} is not an RFC 3339 time", [created])
    zone = "+00:00" if m[3].upper() == "Z" else m[3]
    seconds = datetime.fromisoformat(m[1] + zone) - datetime(1970, 1, 1, tzinfo=UTC)
    fraction = int((m[2] or "0")[:9].ljust(9, "0"))
    return (seconds.days * 86400 + seconds.seconds) * 1_000_000_000 + fraction
