"""`tinyfs export`: one complete, standalone BagIt 1.0 bag of a resource's state (a DIP).

Directory form (default): DEST/ with data/<real logical path> for every file,
one manifest and tagmanifest per configured digest (paths percent-encoded as
RFC 8493 §2.1.3 says: CR, LF and %), bag-info.txt, and the exported instance's
instance.json as a tag file. A manifest cannot carry symbolic links, so they
are not placed in data/ (a validator would count them as unlisted payload);
they, and every directory's mode and mtime, are in instance.json. Empty
directories are created; files get their recorded mode (always owner-readable)
mtime and user xattrs. The bag is built in a temporary directory beside DEST,
flushed to disk (syncfs) and renamed to DEST in one step.

Tar form (`tar=True`): DEST is a tar file (PAX format; gzip/bzip2/xz when DEST
ends so) of the same bag under a top directory named after DEST's stem, with
symbolic links in data/ as real symlink entries, modes, nanosecond mtimes and
user xattrs (SCHILY.xattr) as recorded. Written to DEST.tmp, fsynced, renamed.

Digests come from the manifests of the bags that store the bytes; a file is
hashed only when such a manifest lacks one of the configured algorithms.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import bagwrite, tree
from .digests import hash_file
from .durable import fsync_dir
from .errors import AlreadyExists, NotFound
from .fsck import ProgressFactory
from .ids import check_logical_path
from .layout import ArchiveRoot
from .model import InstanceDoc

TAR_SUFFIXES = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tbz2": "bz2",
                ".tar.xz": "xz", ".txz": "xz"}
CHUNK = 1 << 24


@dataclass
class ExportResult:
    dest: Path
    instance: str
    files: int
    bytes: int


def export(archive: ArchiveRoot, rid: str, dest: str | os.PathLike, *, instance: str | None = None,
           tar: bool = False, progress: ProgressFactory | None = None) -> ExportResult:
    """Export the state at `instance` (an id or a label; default: the head) as a bag at `dest`."""
    iid = archive.resolve_instance(rid, instance)
    doc = archive.instance(rid, iid)
    raw_doc = (archive.instance_dir(rid, iid) / "instance.json").read_bytes()
    for path in doc.state.entries():
        check_logical_path(path)
    dest = Path(dest).absolute()
    if os.path.lexists(dest):
        raise AlreadyExists(f"{dest} already exists")
    if not dest.parent.is_dir():
        raise NotFound(f"{dest.parent}: no such directory")
    plan = _Plan(archive, rid, doc, raw_doc)
    advance = progress("exporting", plan.total) if progress else None
    if tar:
        _write_tar(plan, dest, advance)
    else:
        _write_dir(plan, dest, advance)
    return ExportResult(dest, iid, len(doc.state.files), plan.total)


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
                digests_of[f.digest] = self._digests(f.digest)
            self.payload[f"data/{path}"] = digests_of[f.digest]
            self.total += f.size

    def source(self, digest: str) -> Path:
        return self.archive.stored_path(self.rid, self.doc.stored[digest])

    def _digests(self, digest: str) -> dict[str, str]:
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
                bag = self.archive.resource_dir(self.rid) / parts[0] / parts[1]
                self._manifests[key] = bagwrite.read_manifest(bag, alg)
            found = self._manifests[key].get(parts[2])
            if found is None:
                missing.append(alg)
            else:
                out[alg] = found
        if missing:
            out.update(hash_file(self.archive.stored_path(self.rid, rel), missing))
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


def _fill_data(plan: _Plan, data_fd: int, advance) -> None:
    """Everything under data/, relative to its descriptor (so a 4,095-byte logical path still fits)."""
    state = plan.doc.state
    for path in sorted(state.dirs, key=lambda p: p.split("/")):
        os.mkdir(path, 0o700, dir_fd=data_fd)
    for path, f in sorted(state.files.items()):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=data_fd)
        try:
            with open(plan.source(f.digest), "rb") as src:
                _copy(src.fileno(), fd, f.size, advance)
            for name, value in f.xattrs.items():
                _set_xattr(fd, name, base64.b64decode(value))
            os.chmod(fd, f.mode | stat.S_IRUSR)
            os.utime(fd, ns=(f.mtime_ns, f.mtime_ns))
        finally:
            os.close(fd)
    for path in sorted(state.dirs, key=lambda p: p.split("/"), reverse=True):   # children first
        d = state.dirs[path]
        os.chmod(path, d.mode | stat.S_IRWXU, dir_fd=data_fd)
        os.utime(path, ns=(d.mtime_ns, d.mtime_ns), dir_fd=data_fd)


def _copy(src: int, dst: int, size: int, advance) -> None:
    """In-kernel copy (copy_file_range: a reflink where the file system can), else sendfile."""
    done = 0
    use_range = hasattr(os, "copy_file_range")
    while done < size:
        try:
            n = (os.copy_file_range(src, dst, min(CHUNK, size - done)) if use_range
                 else os.sendfile(dst, src, None, min(CHUNK, size - done)))
        except OSError as e:
            if use_range and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                use_range = False
                continue
            raise
        if n == 0:
            raise OSError(errno.EIO, f"stored file ended after {done} of {size} bytes")
        done += n
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
    now_ns = int(os.path.getmtime(plan.archive.instance_dir(plan.rid, plan.doc.id)) * 1e9)
    tf.addfile(_info(top, tarfile.DIRTYPE, 0o755, now_ns))
    with tempfile.TemporaryDirectory(prefix=".tinyfs-export-tags-") as tags:
        plan.write_tags(Path(tags))
        for name in sorted(os.listdir(tags), key=_tag_order):
            with open(Path(tags, name), "rb") as f:
                info = _info(f"{top}/{name}", tarfile.REGTYPE, 0o644, now_ns)
                info.size = os.fstat(f.fileno()).st_size
                tf.addfile(info, f)
    tf.addfile(_info(f"{top}/data", tarfile.DIRTYPE, 0o755, now_ns))
    entries = state.entries()
    for path in sorted(entries, key=lambda p: p.split("/")):
        name = f"{top}/data/{path}"
        if path in state.dirs:
            d = state.dirs[path]
            tf.addfile(_info(name, tarfile.DIRTYPE, d.mode, d.mtime_ns))
        elif path in state.links:
            link = state.links[path]
            info = _info(name, tarfile.SYMTYPE, 0o777, link.mtime_ns)
            info.linkname = link.target
            tf.addfile(info)
        else:
            f = state.files[path]
            info = _info(name, tarfile.REGTYPE, f.mode, f.mtime_ns)
            info.size = f.size
            for key, value in f.xattrs.items():
                info.pax_headers[f"SCHILY.xattr.{key}"] = base64.b64decode(value).decode("utf-8", "surrogateescape")
            with open(plan.source(f.digest), "rb") as src:
                tf.addfile(info, _Counting(src, advance) if advance else src)


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
