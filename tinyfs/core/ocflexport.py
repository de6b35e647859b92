"""`tinyfs export --ocfl`: a resource with every instance as one OCFL 1.1 object (docs/ocfl.md).

One OCFL version per instance, in chain order (v1 is the oldest). The object is content-addressed with
sha512 (ocflmap.CONTENT_DIGEST), the archive's other digests that OCFL can name go in the fixity block,
each version's created/message/user come from the instance's created/message/creator, and its logical
state lists the instance's files. Each content is stored once in the object, under
`vN/content/<its first logical path>` of the version that first has it (a chosen short name when that
path is very long or deep). What OCFL does not carry travels in `logs/tinyfs/vN.instance.json`: the
instance's instance.json, byte for byte (ocflmap explains why there).

Verified: every content file is copied from the archive through a verified reader (the bytes are hashed
with the archive's first digest as they pass, compared with instance.json; a damaged or missing stored
file fails the export with FixityError, exit 1). The digests the object records come from the same pass
(sha512 when the archive does not key by it, and any fixity digest the storing bag's manifests lack), or
from the manifests of the bag that stores the bytes, which the verified digest has just shown to be the
recorded bytes (as the bag export does).

Crash-safe: the object is built in a temporary directory beside DEST, flushed with one syncfs, checked
with ocfl-py's validator (structure: the digests were just computed), and renamed to DEST; on any error
the temporary directory is removed and nothing is at DEST.

Why not ocfl-py's writer (ocfl.Object / NewVersion): it copies files from a source directory tree, which
we would first have to write (a second copy), reads every file twice (once to hash, once to copy), so
that the bytes it copies are not the ones it hashed, and neither syncs nor renames into place. Its
inventory is plain JSON, which this module writes in a few lines; its validator is what every export is
checked with here and in the tests.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import bagwrite, tree
from .digests import MultiHash, thread_buffer
from .durable import fsync_dir
from .errors import NotFound
from .export import checked_document, new_destination
from .fixity import FixityError, open_verified
from .fsck import ProgressFactory
from .ids import check_logical_path
from .layout import ArchiveRoot
from .model import InstanceDoc
from .ocflmap import (
    CONTENT,
    CONTENT_DIGEST,
    DECLARATION,
    DECLARATION_TEXT,
    FIXITY_NAMES,
    INVENTORY,
    INVENTORY_TYPE,
    RECORDS,
    RECORDS_README,
    object_id,
    record_name,
    sidecar_line,
    user_block,
    validate_object,
)

log = logging.getLogger(__name__)

# A content path named after its logical path stays within these (relative to the object root), so that
# the object can be moved and read anywhere; a longer or deeper one gets a chosen name.
MAX_CONTENT_PATH = 1024
MAX_CONTENT_DEPTH = 128
ALT_DIR = ".tinyfs"         # where chosen names go: vN/content/.tinyfs/<first 40 hex digits of the digest>


@dataclass
class OcflExportResult:
    dest: Path
    versions: int
    files: int              # content files written (each distinct content once)
    bytes: int


@dataclass
class _Content:
    """One content file of the object: the bytes of one digest, read from `path` of instance `doc`."""

    doc: InstanceDoc
    path: str
    content_path: str                               # relative to the object root: vN/content/...
    size: int
    digests: dict[str, str] = field(default_factory=dict)   # algorithm -> hex, as far as known


@dataclass
class _Version:
    dir: str                                        # v1, v2, ...
    doc: InstanceDoc
    raw_doc: bytes                                  # its instance.json as stored (the record)
    new: list[_Content]                             # the content this version is the first to have


def export_ocfl(archive: ArchiveRoot, rid: str, dest: str | os.PathLike, *,
                progress: ProgressFactory | None = None) -> OcflExportResult:
    """Export resource `rid`, every instance, as one OCFL object at `dest` (which must not exist)."""
    archive.require(rid)
    docs = [checked_document(archive, rid, iid) for iid in archive.instance_ids(rid)]
    for doc, _raw in docs:
        for path in doc.state.entries():
            check_logical_path(path)
    dest = new_destination(dest)
    plan = _ObjectPlan(archive, rid, docs)
    advance = progress("exporting", plan.total) if progress else None
    _write(plan, dest, advance)
    return OcflExportResult(dest, len(plan.versions), len(plan.contents), plan.total)


class _ObjectPlan:
    """What the object holds (versions, content paths, known digests), worked out before anything is
    written."""

    def __init__(self, archive: ArchiveRoot, rid: str, docs: list[tuple[InstanceDoc, bytes]]):
        self.archive, self.rid = archive, rid
        self.fixity = [alg for alg in archive.config.digests if alg in FIXITY_NAMES and alg != CONTENT_DIGEST]
        self.wanted = [CONTENT_DIGEST, *self.fixity]      # the digests the inventory gives every content file
        self.contents: dict[str, _Content] = {}            # the archive's digest -> its content file
        self._manifests: dict[tuple[str, str], dict[str, str]] = {}
        self.versions = [self._version(f"v{n}", doc, raw) for n, (doc, raw) in enumerate(docs, 1)]
        self.total = sum(c.size for c in self.contents.values())

    def _version(self, version: str, doc: InstanceDoc, raw: bytes) -> _Version:
        first_paths: dict[str, str] = {}
        for path, entry in sorted(doc.state.files.items()):
            if entry.digest not in self.contents:
                first_paths.setdefault(entry.digest, path)
        names = content_paths(version, first_paths)
        new = []
        for digest, path in first_paths.items():
            content = _Content(doc, path, names[digest], doc.state.files[path].size, self._known(doc, digest))
            self.contents[digest] = content
            new.append(content)
        return _Version(version, doc, raw, new)

    def _known(self, doc: InstanceDoc, digest: str) -> dict[str, str]:
        """The wanted digests of the bytes that the manifests of the bag storing them give."""
        rel = doc.stored.get(digest)
        if rel is None:
            raise NotFound(f"instance {doc.id} of {self.rid!r} records no stored copy of {digest[:16]}…")
        _instances, owner, inner = rel.split("/", 2)          # instances, <iid>, data/...
        known = {doc.digest: digest}
        for alg in self.wanted:
            if alg not in known and alg in self.archive.config.digests:
                key = (owner, alg)
                if key not in self._manifests:
                    self._manifests[key] = self.archive.manifest(self.rid, owner, alg)
                found = self._manifests[key].get(inner)
                if found is not None:
                    known[alg] = found
        return known


def content_paths(version: str, first_paths: dict[str, str]) -> dict[str, str]:
    """digest -> content path for the content a version brings: `vN/content/<logical path>`, or
    `vN/content/.tinyfs/<digest[:40]>` for a path past MAX_CONTENT_PATH bytes or MAX_CONTENT_DEPTH levels
    (`.tinyfs-1`, ... when one of the version's own content paths starts with that name)."""
    prefix = f"{version}/{CONTENT}/"
    names: dict[str, str] = {}
    chosen = []
    for digest, path in first_paths.items():
        name = prefix + path
        if len(name.encode("utf-8")) <= MAX_CONTENT_PATH and path.count("/") < MAX_CONTENT_DEPTH:
            names[digest] = name
        else:
            chosen.append(digest)
    tops = {name[len(prefix):].split("/", 1)[0] for name in names.values()}
    alt, n = ALT_DIR, 0
    while alt in tops:
        n += 1
        alt = f"{ALT_DIR}-{n}"
    names.update({digest: f"{prefix}{alt}/{digest[:40]}" for digest in chosen})
    return names


def _write(plan: _ObjectPlan, dest: Path, advance) -> None:
    """The object, written again from the start when a stored file was repaired from a replica after
    some of its damaged bytes were copied (as the bag export does); one repaired twice fails."""
    repaired: set[str | None] = set()
    while True:
        try:
            _write_once(plan, dest, advance)
            return
        except FixityError as e:
            if e.repaired is None or e.stored in repaired:
                raise
            repaired.add(e.stored)


def _write_once(plan: _ObjectPlan, dest: Path, advance) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:100]}.ocfl-export-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        for version in plan.versions:
            for content in version.new:
                _copy_content(plan, content, tmp, advance)
        _write_inventories(plan, tmp)
        _write_records(plan, tmp)
        _write_file(tmp / DECLARATION, DECLARATION_TEXT)
        bagwrite.syncfs(tmp)                 # every byte of the object, in one call
        _check_written(tmp)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tree.rmtree(tmp, ignore_errors=True)
        raise


def _copy_content(plan: _ObjectPlan, content: _Content, obj: Path, advance) -> None:
    """Copy one content file through the verified reader (FixityError at its end when the stored bytes
    are damaged), hashing on the way the wanted digests no manifest gave."""
    missing = [alg for alg in plan.wanted if alg not in content.digests]
    hasher = MultiHash(missing)
    target = obj / content.content_path
    os.makedirs(target.parent, exist_ok=True)
    buf, view = thread_buffer()
    with open_verified(plan.archive, plan.rid, content.doc, content.path, "export") as src, \
            open(target, "xb", buffering=0) as out:
        while n := src.readinto(buf):
            hasher.update(view[:n])
            out.write(view[:n])
            if advance:
                advance(n)
    content.digests.update(hasher.hexdigests())


def _write_inventories(plan: _ObjectPlan, obj: Path) -> None:
    """Each version's inventory (as of that version) in its directory, the last one also in the root,
    each with its sha512 sidecar."""
    raw = b""
    for version, raw in zip(plan.versions, inventories(plan), strict=True):
        (obj / version.dir).mkdir(exist_ok=True)     # (made already when it has content)
        _write_inventory(obj / version.dir, raw)
    _write_inventory(obj, raw)


def inventories(plan: _ObjectPlan) -> list[bytes]:
    """The inventory of each version in turn: the manifest, fixity and versions up to it."""
    manifest: dict[str, list[str]] = {}
    fixity: dict[str, dict[str, list[str]]] = {alg: {} for alg in plan.fixity}
    versions: dict[str, dict] = {}
    out = []
    for version in plan.versions:
        for content in version.new:
            manifest[content.digests[CONTENT_DIGEST]] = [content.content_path]
            for alg in plan.fixity:
                fixity[alg].setdefault(content.digests[alg], []).append(content.content_path)
        state: dict[str, list[str]] = {}
        for path, entry in sorted(version.doc.state.files.items()):
            state.setdefault(plan.contents[entry.digest].digests[CONTENT_DIGEST], []).append(path)
        doc = version.doc
        versions[version.dir] = {"created": doc.created, "message": doc.message,
                                 "user": user_block(doc.creator), "state": state}
        inventory = {"digestAlgorithm": CONTENT_DIGEST, "head": version.dir, "id": object_id(plan.rid),
                     "manifest": manifest, "type": INVENTORY_TYPE, "versions": versions}
        if plan.fixity:
            inventory["fixity"] = fixity
        out.append(_json(inventory))       # (encoded now: the dicts grow with the next version)
    return out


def _json(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def _write_inventory(directory: Path, raw: bytes) -> None:
    _write_file(directory / INVENTORY, raw)
    _write_file(directory / f"{INVENTORY}.{CONTENT_DIGEST}", sidecar_line(raw, INVENTORY))


def _write_records(plan: _ObjectPlan, obj: Path) -> None:
    """logs/tinyfs/: each version's instance.json (with its sidecar), and a README saying what they are."""
    (obj / RECORDS).mkdir(parents=True)
    _write_file(obj / RECORDS / "README.txt", RECORDS_README)
    for version in plan.versions:
        name = record_name(version.dir)
        _write_file(obj / name, version.raw_doc)
        _write_file(obj / f"{name}.{CONTENT_DIGEST}", sidecar_line(version.raw_doc, name.rsplit("/", 1)[1]))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _check_written(obj: Path) -> None:
    """The object just written, checked by ocfl-py before it is renamed into place (the structure and
    the inventories; the content digests were computed while copying). An error here is a bug of this
    module: nothing is left at DEST."""
    report = validate_object(obj, check_digests=False)
    for warning in report.warnings:
        log.warning("OCFL export: %s", warning)
    if not report.valid:
        raise RuntimeError("the OCFL object written is not valid (a bug): " + "; ".join(report.errors))
