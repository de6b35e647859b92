"""`tinyfs export`: one complete, standalone BagIt 1.0 bag of a resource's state (a DIP).

Directory form (default): DEST/ with data/<real logical path> for every file,
one manifest and tagmanifest per configured digest (paths percent-encoded as
RFC 8493 §2.1.3 says: CR, LF and %), bag-info.txt, and the exported instance's
instance.json as a tag file. A manifest cannot carry symbolic links, so they
are not placed in data/ (bagit-python counts them as payload, and fails on a
dangling one); they, and every directory's and file's exact mode, are in
instance.json, from which `ingest --bag` restores them. Empty directories are
created; the paths of a link group are hard links of one file; files get their
recorded mode (the owner may always read them, directories may always be read
and searched by the owner: else the bag could not be validated by its owner),
mtime and user xattrs. The bag is built in a temporary directory beside DEST,
flushed to disk (syncfs) and renamed to DEST in one step.

Tar form (`tar=True`): DEST is a tar file (PAX format; gzip/bzip2/xz when DEST
ends so) of the same bag under a top directory named after DEST's stem: no
symbolic links in data/, link groups as hard-link entries, modes as in the
directory form, nanosecond mtimes and user xattrs (SCHILY.xattr) as recorded.
Written to DEST.tmp, fsynced, renamed.

Every file's bytes are hashed while they are copied (one read pass) and compared
with the digest instance.json records: damaged or missing stored bytes fail the
export with FixityError (and a fixity.failed event), and nothing is left at DEST. On an
archive with replicas such a file is first repaired from one that holds it intact (fixity.open_verified),
and the export goes on with the good bytes.
The other configured digests come from the manifests of the bags that store the
bytes (a file is hashed only when such a manifest lacks one); the verified first
digest shows that the bytes are the ones those manifests describe.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import bagwrite, tree
from .digests import CHUNK, WRITEBACK_CHUNK, hash_file
from .durable import fsync_dir, start_writeback
from .errors import AlreadyExists, NotFound
from .fixity import FixityError, VerifiedReader, open_verified, record_failure
from .fsck import ProgressFactory
from .ids import check_logical_path
from .layout import ArchiveRoot
from .model import DirEntry, InstanceDoc

TAR_SUFFIXES = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tbz2": "bz2",
                ".tar.xz": "xz", ".txz": "xz"}


@dataclass
class ExportResult:
    dest: Path
    instance: str
    files: int
    bytes: int


def new_destination(dest: str | os.PathLike) -> Path:
    """`dest` as an absolute path that does not exist yet, in a directory that does (an export's target)."""
    dest = Path(dest).absolute()
    if os.path.lexists(dest):
        raise AlreadyExists(f"{dest} already exists")
    if not dest.parent.is_dir():
        raise NotFound(f"{dest.parent}: no such directory")
    return dest


def export(archive: ArchiveRoot, rid: str, dest: str | os.PathLike, *, instance: str | None = None,
           tar: bool = False, progress: ProgressFactory | None = None) -> ExportResult:
    """Export the state at `instance` (an id or a label; default: the head) as a bag at `dest`."""
    iid = archive.resolve_instance(rid, instance)
    doc, raw_doc = checked_document(archive, rid, iid)
    for path in doc.state.entries():
        check_logical_path(path)
    dest = new_destination(dest)
    plan = _Plan(archive, rid, doc, raw_doc)
    advance = progress("exporting", plan.total) if progress else None
    _write(plan, dest, tar, advance)
    return ExportResult(dest, iid, len(doc.state.files), plan.total)


def stream(archive: ArchiveRoot, rid: str, out, *, instance: str | None = None, form: str = "tar",
           top: str | None = None) -> str:
    """Write the bag of a state to the file object `out` as it is made: a tar (PAX, the tar form above) or
    a zip (no hard links or xattrs: each path of a link group is a copy; modes in the external attributes).
    `out` may be a pipe or a socket (nothing is sought). Returns the instance id. A damaged stored file
    raises FixityError in the middle: the consumer must treat the stream as failed (an HTTP server cuts
    the connection), never as a shorter bag."""
    iid = archive.resolve_instance(rid, instance)
    doc, raw_doc = checked_document(archive, rid, iid)
    for path in doc.state.entries():
        check_logical_path(path)
    plan = _Plan(archive, rid, doc, raw_doc)
    top = top or f"{rid}-{iid}"
    if form == "tar":
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            _fill_tar(plan, tf, top, None)
    elif form == "zip":
        _write_zip(plan, out, top)
    else:
        raise ValueError(f"no bag form {form!r} (tar or zip)")
    return iid


def checked_document(archive: ArchiveRoot, rid: str, iid: str) -> tuple[InstanceDoc, bytes]:
    """instance.json as stored, checked against the bag's tagmanifest first: an export computes its tag
    manifests afresh, so a damaged document would otherwise leave as part of a valid bag. Repaired from a
    replica that holds it intact (as any verified read); FixityError when none does."""
    alg = archive.config.primary
    rel = f"instances/{iid}/instance.json"
    try:
        listed = bagwrite.parse_manifest(archive.store.read_document(rid, f"instances/{iid}/tagmanifest-{alg}.txt")
                                         .decode("utf-8", "replace"))
    except NotFound:
        listed = {}
    expected = listed.get("instance.json")
    raw = archive.instance_bytes(rid, iid)
    found = hashlib.new(alg, raw).hexdigest()
    if expected is None or found == expected:      # (no tagmanifest: fsck reports it; nothing to check by)
        return archive.instance(rid, iid), raw
    error = FixityError(resource=rid, instance=iid, path="instance.json", algorithm=alg, expected=expected,
                        found=found, stored=rel)
    record_failure(archive, error, "export")
    from .repair import heal
    if heal(archive, rid, iid, rel, alg, expected, "export") is not None:
        archive.forget_document(rid, iid)
        raw = archive.instance_bytes(rid, iid)
        if hashlib.new(alg, raw).hexdigest() == expected:
            return archive.instance(rid, iid), raw
    raise error


def _write(plan: _Plan, dest: Path, tar: bool, advance) -> None:
    """The bag, written again from the start when a stored file was repaired from a replica after some
    of its damaged bytes were copied (a failed attempt leaves nothing at DEST); a file repaired once
    that fails again fails the export."""
    repaired: set[str | None] = set()
    while True:
        try:
            if tar:
                _write_tar(plan, dest, advance)
            else:
                _write_dir(plan, dest, advance)
            return
        except FixityError as e:
            if e.repaired is None or e.stored in repaired:
                raise
            repaired.add(e.stored)


class _Plan:
    """What the bag holds: sources, digests and tag files, worked out before anything is written."""

    def __init__(self, archive: ArchiveRoot, rid: str, doc: InstanceDoc, raw_doc: bytes):
        self.archive, self.rid, self.doc, self.raw_doc = archive, rid, doc, raw_doc
        self.algorithms = archive.config.digests
        self._manifests: dict[tuple[str, str], dict[str, str]] = {}
        self.payload: dict[str, dict[str, str]] = {}
        self.total = 0
        digests_of: dict[str, dict[str, str]] = {}
        for path, f in sorted(doc.state.files.items()):
            if f.digest not in digests_of:
                digests_of[f.digest] = self._digests(path, f.digest)
            self.payload[f"data/{path}"] = digests_of[f.digest]
            self.total += f.size

    def open(self, path: str) -> VerifiedReader:
        """The stored bytes of `path`, verified as they are read (FixityError when damaged or missing)."""
        return open_verified(self.archive, self.rid, self.doc, path, "export")

    def _digests(self, path: str, digest: str) -> dict[str, str]:
        """Every configured digest of the bytes, from the manifests of the bag that stores them."""
        rel = self.doc.stored.get(digest)
        if rel is None:
            raise NotFound(f"instance {self.doc.id} of {self.rid!r} records no stored copy of {digest[:16]}…")
        parts = rel.split("/", 2)              # instances, <iid>, data/...
        out = {self.doc.digest: digest}
        missing = []
        for alg in self.algorithms:
            if alg in out:
                continue
            key = (parts[1], alg)
            if key not in self._manifests:
                self._manifests[key] = self.archive.manifest(self.rid, parts[1], alg)
            found = self._manifests[key].get(parts[2])
            if found is None:
                missing.append(alg)
            else:
                out[alg] = found
        if missing:
            try:
                out.update(hash_file(self.archive.stored_path(self.rid, rel), missing))
            except FileNotFoundError:
                error = FixityError(resource=self.rid, instance=self.doc.id, path=path, algorithm=self.doc.digest,
                                    expected=digest, found=None, stored=rel)
                record_failure(self.archive, error, "export")
                raise error from None
        return {alg: out[alg] for alg in self.algorithms}

    def bag_info(self) -> bytes:
        from .. import __version__

        d = self.doc
        return bagwrite.bag_info(self.rid, self.total, len(self.payload), [
            ("Bag-Software-Agent", f"tinyfs {__version__}"),
            ("Internal-Sender-Description", d.message), ("Contact-Name", d.creator),
            ("Tinyfs-Label", d.label or ""), ("Tinyfs-Instance", d.id), ("Tinyfs-Previous", d.previous or ""),
            ("Tinyfs-Created", d.created)])

    def write_tags(self, bag: Path) -> None:
        bagwrite.write_tag_files(bag, self.algorithms, self.payload, self.bag_info(),
                                 {"instance.json": self.raw_doc})


# -- directory form -----------------------------------------------------------------

def _write_dir(plan: _Plan, dest: Path, advance) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:100]}.export-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "data").mkdir()
        data_fd = os.open(tmp / "data", os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fill_data(plan, data_fd, advance)
        finally:
            os.close(data_fd)
        plan.write_tags(tmp)
        bagwrite.syncfs(tmp)              # every payload file and directory, in one call
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tree.rmtree(tmp, ignore_errors=True)
        raise


def file_mode(mode: int) -> int:
    """A payload file's mode in an export: as recorded, readable by its owner (a bag its owner cannot
    read cannot be validated; instance.json keeps the exact mode)."""
    return mode | stat.S_IRUSR


def dir_mode(mode: int) -> int:
    """A directory's mode in an export: as recorded, readable and searchable by its owner."""
    return mode | stat.S_IRUSR | stat.S_IXUSR


def _fill_data(plan: _Plan, data_fd: int, advance) -> None:
    """Everything under data/, relative to its descriptor (so a 4,095-byte logical path still fits)."""
    state = plan.doc.state
    for path in sorted(state.dirs, key=lambda p: p.split("/")):
        os.mkdir(path, 0o700, dir_fd=data_fd)
    for path, f in sorted(state.files.items()):
        group = state.group_of(path)
        if group is not None and group[0] != path:     # sorted: the group's first path is written already
            os.link(group[0], path, src_dir_fd=data_fd, dst_dir_fd=data_fd, follow_symlinks=False)
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=data_fd)
        try:
            with plan.open(path) as src:
                _copy(src, fd, advance)
            for name, value in f.xattrs.items():
                _set_xattr(fd, name, base64.b64decode(value))
            os.chmod(fd, file_mode(f.mode))      # after the bytes: a write would clear setuid/setgid
            os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
        finally:
            os.close(fd)
    for path in sorted(state.dirs, key=lambda p: p.split("/"), reverse=True):   # children first
        d = state.dirs[path]
        os.chmod(path, dir_mode(d.mode), dir_fd=data_fd)
        os.utime(path, ns=(d.mtime_ns, d.mtime_ns), dir_fd=data_fd)
    if state.root is not None:      # data/ is the resource root
        os.chmod(data_fd, dir_mode(state.root.mode))
        os.utime(data_fd, ns=(state.root.mtime_ns, state.root.mtime_ns))


def _copy(src: VerifiedReader, dst: int, advance) -> None:
    """Copy through one buffer, so that the bytes are hashed as they pass (the read that reaches the end
    raises FixityError when they do not match). An in-kernel copy (copy_file_range, a reflink where the
    file system can) would spare the read, but then nothing would check what was copied."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while n := src.readinto(buf):
        chunk = view[:n]
        while chunk:
            chunk = chunk[os.write(dst, chunk):]
        done += n
        if done % WRITEBACK_CHUNK < n:      # crossed a chunk boundary: start that chunk's writeback
            start_writeback(dst, done - done % WRITEBACK_CHUNK - WRITEBACK_CHUNK, WRITEBACK_CHUNK)
        if advance:
            advance(n)


def _set_xattr(fd: int, name: str, value: bytes) -> None:
    try:
        os.setxattr(fd, name, value)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise   # a destination without user xattrs keeps them in instance.json only


# -- tar form ------------------------------------------------------------------------

def tar_compression(dest: Path) -> tuple[str, str]:
    """(top directory name, tarfile compression) for a DEST file name."""
    name = dest.name
    for suffix, comp in TAR_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], comp
    return dest.stem or name, ""


def _write_tar(plan: _Plan, dest: Path, advance) -> None:
    top, comp = tar_compression(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(tmp, "xb") as out:
            with tarfile.open(fileobj=out, mode=f"w:{comp}" if comp else "w", format=tarfile.PAX_FORMAT) as tf:
                _fill_tar(plan, tf, top, advance)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except FileExistsError:
        raise AlreadyExists(f"{tmp} exists (left by an interrupted export?); remove it first") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fill_tar(plan: _Plan, tf: tarfile.TarFile, top: str, advance) -> None:
    state = plan.doc.state
    now_ns = int(plan.archive.instance_mtime(plan.rid, plan.doc.id) * 1e9)
    tf.addfile(_info(top, tarfile.DIRTYPE, 0o755, now_ns))
    with tempfile.TemporaryDirectory(prefix=".tinyfs-export-tags-") as tags:
        plan.write_tags(Path(tags))
        for name in sorted(os.listdir(tags), key=_tag_order):
            with open(Path(tags, name), "rb") as f:
                info = _info(f"{top}/{name}", tarfile.REGTYPE, 0o644, now_ns)
                info.size = os.fstat(f.fileno()).st_size
                tf.addfile(info, f)
    root = state.root or DirEntry(0o755, now_ns)      # data/ is the resource root
    tf.addfile(_info(f"{top}/data", tarfile.DIRTYPE, dir_mode(root.mode), root.mtime_ns))
    written: dict[tuple[str, ...], str] = {}     # link group -> the member name holding its bytes
    for path in sorted([*state.dirs, *state.files], key=lambda p: p.split("/")):   # no symlinks: see above
        name = f"{top}/data/{path}"
        if path in state.dirs:
            d = state.dirs[path]
            tf.addfile(_info(name, tarfile.DIRTYPE, dir_mode(d.mode), d.mtime_ns))
        else:
            f = state.files[path]
            group = state.group_of(path)
            if group is not None and group in written:
                info = _info(name, tarfile.LNKTYPE, file_mode(f.mode), f.mtime_ns)
                info.linkname = written[group]
                tf.addfile(info)
                continue
            if group is not None:
                written[group] = name
            info = _info(name, tarfile.REGTYPE, file_mode(f.mode), f.mtime_ns)
            info.size = f.size
            for key, value in f.xattrs.items():
                info.pax_headers[f"SCHILY.xattr.{key}"] = base64.b64decode(value).decode("utf-8", "surrogateescape")
            with plan.open(path) as src:
                tf.addfile(info, _Counting(src, advance) if advance else src)
                src.finish()        # tar took the recorded size: a longer stored file is damaged too


def _write_zip(plan: _Plan, out, top: str) -> None:
    state = plan.doc.state
    now_ns = int(plan.archive.instance_mtime(plan.rid, plan.doc.id) * 1e9)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, strict_timestamps=False,
                         allowZip64=True) as zf:
        with tempfile.TemporaryDirectory(prefix=".tinyfs-export-tags-") as tags:
            plan.write_tags(Path(tags))
            for name in sorted(os.listdir(tags), key=_tag_order):
                zf.writestr(_zip_info(f"{top}/{name}", 0o644, now_ns), Path(tags, name).read_bytes())
        root = state.root or DirEntry(0o755, now_ns)
        zf.writestr(_zip_info(f"{top}/data/", dir_mode(root.mode), root.mtime_ns, directory=True), b"")
        for path in sorted([*state.dirs, *state.files], key=lambda p: p.split("/")):
            if path in state.dirs:
                d = state.dirs[path]
                zf.writestr(_zip_info(f"{top}/data/{path}/", dir_mode(d.mode), d.mtime_ns, directory=True), b"")
                continue
            f = state.files[path]
            info = _zip_info(f"{top}/data/{path}", file_mode(f.mode), f.mtime_ns)
            info.file_size = f.size
            with plan.open(path) as src, zf.open(info, "w", force_zip64=f.size > 2**31) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                src.finish()


def _zip_info(name: str, mode: int, mtime_ns: int, directory: bool = False) -> zipfile.ZipInfo:
    import time

    seconds = max(mtime_ns // 1_000_000_000, 315532800)        # zip times start in 1980
    info = zipfile.ZipInfo(name, time.gmtime(seconds)[:6])
    kind = stat.S_IFDIR if directory else stat.S_IFREG
    info.external_attr = ((kind | mode) << 16) | (0x10 if directory else 0)
    info.compress_type = zipfile.ZIP_STORED if directory else zipfile.ZIP_DEFLATED
    return info


def _info(name: str, kind: bytes, mode: int, mtime_ns: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": _ns_text(mtime_ns)}
    info.uid = info.gid = 0
    return info


def _ns_text(ns: int) -> str:
    """Nanoseconds as the exact decimal seconds a PAX mtime record holds."""
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    seconds, frac = divmod(ns, 1_000_000_000)
    return f"{sign}{seconds}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{sign}{seconds}"


def _tag_order(name: str) -> tuple[int, str]:
    first = ("bagit.txt", "bag-info.txt")
    return (first.index(name), name) if name in first else (2 + name.startswith("tagmanifest-"), name)


class _Counting:
    """A file object telling `advance` of every read (tarfile copies with read())."""

    def __init__(self, f, advance):
        self._f, self._advance = f, advance

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._advance(len(data))
        return data
