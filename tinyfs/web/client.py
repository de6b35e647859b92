"""`Archive("http://host:port/")`: the Python API over `tinyfs serve`, on requests.

Reading: the resource list, instances and states come as JSON (`?format=json`), a file's bytes by GET and
are hashed here too: a read that reaches the end of a file checks its digest (FixityError on a mismatch),
so damage on the way is caught as well as damage on the server's disk. Depositing: a transaction is
`MKCOL /transactions/<rid>`; `add` sends a file with PUT (its mtime in X-OC-Mtime, its mode in
X-Tinyfs-Mode) and a directory or a symbolic link as one tar stream (`PUT ...?format=tar`, unpacked by
the server as `tar -x` into the mount would), made while it is sent; the commit is the MOVE to
/commit/<rid>, answered when the instance is durable; an exception in the `with` block rolls back
(DELETE). HTTP refusals come back as the core's errors (404 NotFound, 409 Stale, 423 Busy, 507 NoSpace,
403 Forbidden, 400 InvalidName, ...), with the server's line as their message.

Credentials: `auth=("user", "password")`, or in the URL (`http://user:password@host/`), or none.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from ..core import errors as core_errors
from ..core.commit import CommitResult
from ..core.fixity import FixityError
from ..core.ids import check_logical_path, check_rid, new_instance_id
from ..core.limits import check_metadata
from ..core.model import InstanceDoc, State

CHUNK = 1 << 20
TIMEOUT = (10, 600)             # connect, and between bytes (a commit of a large deposit takes a while)
ERRORS = {400: core_errors.InvalidName, 403: core_errors.Forbidden, 404: core_errors.NotFound,
          405: core_errors.AlreadyExists, 409: core_errors.Stale, 414: core_errors.NameTooLong,
          423: core_errors.Busy, 507: core_errors.NoSpace}
InstanceRef = InstanceDoc | str | None


class HttpArchive:
    """An archive served by `tinyfs serve`, with the API of a local Archive (core.api)."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, verify: bool | str = True,
                 copies: int | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise core_errors.InvalidName(f"{url!r}: an http:// or https:// URL expected")
        if parts.username and auth is None:
            from urllib.parse import unquote
            auth = (unquote(parts.username), unquote(parts.password or ""))
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))
        self.session = requests.Session()
        self.session.auth = auth
        self.session.verify = verify
        if copies is not None:
            raise core_errors.InvalidName("copies= is the server's setting (replicas.json), not a client's")

    # -- plumbing ------------------------------------------------------------------------------------------
    def href(self, *parts: str) -> str:
        return self.url + "/".join(quote(p, safe="/") for p in parts if p)

    def request(self, method: str, *parts: str, ok: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("verify", self.session.verify)   # (else REQUESTS_CA_BUNDLE in the environment wins)
        try:
            r = self.session.request(method, self.href(*parts), **kwargs)
        except requests.ConnectionError as e:
            raise core_errors.StoreUnreachable(f"{self.url}: {e}") from None
        if r.status_code not in ok:
            raise refusal(r)
        return r

    def __enter__(self) -> HttpArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    # -- the Archive API ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter([r["id"] for r in self.request("GET", "resources/", params={"format": "json"}).json()])

    def __contains__(self, rid: str) -> bool:
        return any(r == rid for r in self)

    def new(self, rid: str | None = None, *, message: str = "", creator: str = "", label: str | None = None
            ) -> HttpTransaction:
        rid = check_rid(rid or new_instance_id())
        if rid in self:
            raise core_errors.AlreadyExists(f"resource {rid!r} already exists")
        return HttpTransaction(self, rid, message=message, creator=creator, label=label)

    def get(self, rid: str, mode: str = "r", *, message: str = "", creator: str = "",
            label: str | None = None) -> HttpResource | HttpTransaction:
        check_rid(rid)
        if rid not in self:
            raise core_errors.NotFound(f"no resource {rid!r} at {self.url}")
        if mode == "r":
            return HttpResource(self, rid)
        if mode in ("a", "t"):
            return HttpTransaction(self, rid, message=message, creator=creator, label=label)
        raise core_errors.InvalidName(f"unknown mode {mode!r} (use 'r', 'a' or 't')")

    def events(self, start: str | None = None) -> Iterator[dict]:
        r = self.request("GET", "events.jsonl", params={"since": start} if start else None, stream=True)
        with r:
            for line in r.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def purge(self, rid: str) -> None:
        raise core_errors.Forbidden("purge is an administrator's act on the archive's host (tinyfs purge)")


def refusal(r: requests.Response) -> core_errors.TinyfsError:
    """The core error of an HTTP refusal, with the server's one line."""
    text = " ".join(r.text.split())[:500] if r.headers.get("Content-Type", "").startswith("text/plain") \
        else f"{r.status_code} {r.reason}"
    if r.status_code == 401:
        return core_errors.Forbidden(f"{r.url}: not authenticated (401): user or password wrong or missing")
    cls = ERRORS.get(r.status_code)
    if cls is None and r.status_code in (502, 503, 504):
        cls = core_errors.StoreUnreachable
    error = (cls or core_errors.TinyfsError)(f"{text} ({r.request.method} {r.url}: {r.status_code})")
    error.status = r.status_code
    return error


class HttpResource:
    """Read access to a resource's current state (or any instance's), as core.api.Resource."""

    def __init__(self, archive: HttpArchive, rid: str):
        self.archive, self.id = archive, rid
        self._docs: dict[str, InstanceDoc] = {}

    @property
    def instances(self) -> list[InstanceDoc]:
        listed = self.archive.request("GET", "instances", self.id, "", params={"format": "json"}).json()
        return [self._doc(item["id"]) for item in listed]

    def state(self, instance: InstanceRef = None) -> State:
        return self._doc(instance).state

    def _doc(self, instance: InstanceRef) -> InstanceDoc:
        if isinstance(instance, InstanceDoc):
            if instance.resource != self.id:
                raise core_errors.NotFound(f"instance {instance.id} belongs to {instance.resource!r}")
            instance = instance.id
        if instance is not None and instance in self._docs:
            return self._docs[instance]
        where = ("resources", self.id) if instance is None else ("instances", self.id, instance)
        doc = InstanceDoc.from_json_bytes(self.archive.request("GET", *where, params={"format": "json"}).content)
        self._docs[doc.id] = doc
        return doc

    def open(self, path: str, instance: InstanceRef = None) -> BinaryIO:
        """The file's bytes as they arrive, checked against the recorded digest at the end (FixityError)."""
        check_logical_path(path)
        doc = self._doc(instance)
        entry = doc.state.files.get(path)
        if entry is None:
            raise core_errors.NotFound(f"{self.id}: no file {path!r} in instance {doc.id}")
        r = self.archive.request("GET", "instances", self.id, doc.id, path, stream=True)
        return io.BufferedReader(_CheckedBody(r, doc, path, entry.digest, entry.size), CHUNK)

    def read(self, path: str, instance: InstanceRef = None) -> bytes:
        with self.open(path, instance) as f:
            return f.read()

    def __iter__(self) -> Iterator[str]:
        return iter(self.state().files)


class _CheckedBody(io.RawIOBase):
    """A response body hashed as it is read; the end is compared with the recorded digest."""

    def __init__(self, response: requests.Response, doc: InstanceDoc, path: str, digest: str, size: int):
        super().__init__()
        self._r, self._doc, self._path, self._digest, self._size = response, doc, path, digest, size
        self._raw = response.raw
        self._hash = hashlib.new(doc.digest)
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._raw.read(len(buffer), decode_content=True)
        except Exception as e:           # the server cut the body: it found damage, or the network did
            raise OSError(errno.EIO, f"{self._doc.resource}/{self._path}: the transfer broke off ({e})") from None
        n = len(data)
        buffer[:n] = data
        if self._hash is not None:          # (None: checked already)
            self._hash.update(data)
            self._seen += n
            if n == 0 or self._seen >= self._size:
                self._check()
        return n

    def _check(self) -> None:
        found, self._hash = self._hash.hexdigest(), None
        if self._seen != self._size or found != self._digest:
            raise FixityError(resource=self._doc.resource, instance=self._doc.id, path=self._path,
                              algorithm=self._doc.digest, expected=self._digest, found=found, stored=None)

    def close(self) -> None:
        try:
            self._r.close()
        finally:
            super().close()


class HttpTransaction:
    """A transaction on the server, committed on a clean `with` exit, rolled back on an exception."""

    def __init__(self, archive: HttpArchive, rid: str, *, message: str = "", creator: str = "",
                 label: str | None = None):
        check_metadata(message, creator, label)
        self.archive, self.rid = archive, rid
        self.message, self.creator, self.label = message, creator, label
        self.result: CommitResult | None = None
        self._done = False
        archive.request("MKCOL", "transactions", rid, ok=(201,))
        try:
            for key, value in (("message", message), ("creator", creator), ("label", label)):
                if value:
                    self._set(key, value)
        except BaseException:
            self.rollback()
            raise

    def __enter__(self) -> HttpTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def _set(self, key: str, value: str) -> None:
        from xml.sax.saxutils import escape

        body = ('<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:T="urn:tinyfs:">'
                f"<D:set><D:prop><T:{key}>{escape(value)}</T:{key}></D:prop></D:set></D:propertyupdate>")
        r = self.archive.request("PROPPATCH", "transactions", self.rid, "", ok=(207,), data=body.encode("utf-8"),
                                 headers={"Content-Type": "application/xml"})
        if "200 OK" not in r.text:
            raise core_errors.InvalidName(f"{key}: refused by the server: {' '.join(r.text.split())[:300]}")

    def _check_open(self) -> None:
        if self._done:
            raise core_errors.TinyfsError("this transaction is already committed or rolled back")

    # -- changes -------------------------------------------------------------------------------------------
    def add(self, source: str | os.PathLike, path: str | None = None) -> None:
        """Add a file, symlink or directory tree at `path` (default: its base name)."""
        self._check_open()
        source = Path(source)
        path = check_logical_path(path if path is not None else os.path.basename(os.path.abspath(source)))
        st = os.lstat(source)
        self._make_parents(path)
        if stat.S_ISREG(st.st_mode):
            with open(source, "rb") as f:
                self._put(path, f, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            return
        self._remove_if_there(path)
        parent, _, name = path.rpartition("/")
        self.archive.request("PUT", "transactions", self.rid, parent, ok=(200,), params={"format": "tar"},
                             data=_tar_stream(source, name), headers={"Content-Type": "application/x-tar"})

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._check_open()
        check_logical_path(path)
        self._make_parents(path)
        self._put(path, io.BytesIO(data), len(data), mode, None)

    def remove(self, path: str) -> None:
        self._check_open()
        check_logical_path(path)
        self.archive.request("DELETE", "transactions", self.rid, path, ok=(204,))

    def _put(self, path: str, body, size: int, mode: int, mtime_ns: int | None) -> None:
        headers = {"Content-Length": str(size), "X-Tinyfs-Mode": f"{mode:o}", "Content-Type":
                   "application/octet-stream"}
        if mtime_ns is not None:
            headers["X-OC-Mtime"] = f"{mtime_ns // 1_000_000_000}.{mtime_ns % 1_000_000_000:09d}"
        self.archive.request("PUT", "transactions", self.rid, path, ok=(201, 204), data=body, headers=headers)

    def _make_parents(self, path: str) -> None:
        """MKCOL the directories above `path` that are missing, highest first."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            r = self.archive.session.request("MKCOL", self.archive.href("transactions", self.rid,
                                                                        "/".join(parts[:i])), timeout=TIMEOUT,
                                             verify=self.archive.session.verify)
            if r.status_code not in (201, 405):
                raise refusal(r)

    def _remove_if_there(self, path: str) -> None:
        r = self.archive.session.request("DELETE", self.archive.href("transactions", self.rid, path),
                                         timeout=TIMEOUT, verify=self.archive.session.verify)
        if r.status_code not in (204, 404):
            raise refusal(r)

    # -- ending --------------------------------------------------------------------------------------------
    def commit(self) -> CommitResult:
        self._check_open()
        r = self.archive.request("MOVE", "transactions", self.rid, ok=(200, 201),
                                 headers={"Destination": self.archive.href("commit", self.rid), "Overwrite": "F"})
        self._done = True
        body = r.json()
        self.result = CommitResult(body["instance"], body.get("added", 0), body.get("changed", 0),
                                   body.get("removed", 0), body.get("bytes_stored", 0), body.get("files_stored", 0))
        return self.result

    def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        self.archive.request("DELETE", "transactions", self.rid, "", ok=(204, 404))


def _tar_stream(source: Path, name: str) -> Iterator[bytes]:
    """`source` (a directory tree or a symbolic link) as a PAX tar under `name`, made in a thread while
    it is sent: nothing is staged on the client's disk."""
    import queue

    chunks: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []

    class Writer:
        def write(self, data) -> int:
            chunks.put(bytes(data))
            return len(data)

    def make() -> None:
        try:
            with tarfile.open(fileobj=Writer(), mode="w|", format=tarfile.PAX_FORMAT) as tf:
                _fill_tar(tf, source, name)
        except BaseException as e:     # noqa: BLE001 - raised in the sending thread below
            failure.append(e)
        finally:
            chunks.put(None)

    threading.Thread(target=make, name="tinyfs-tar", daemon=True).start()
    while (chunk := chunks.get()) is not None:
        yield chunk
    if failure:
        raise failure[0]


def _fill_tar(tf: tarfile.TarFile, source: Path, name: str) -> None:
    """Every entry of `source` under `name`, parents first: nanosecond mtimes (PAX), user xattrs
    (SCHILY.xattr), hard links as links (tarfile notices a second name of an inode)."""
    from ..core import tree

    _add_entry(tf, source, name)
    if not source.is_dir() or source.is_symlink():
        return
    for dirpath, dirs, files in tree.walk(source):
        rel = os.path.relpath(dirpath, source)
        for entry in sorted(dirs + files):
            full = os.path.join(dirpath, entry)
            _add_entry(tf, Path(full), f"{name}/{entry}" if rel == "." else f"{name}/{rel}/{entry}")


def _add_entry(tf: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = tf.gettarinfo(str(path), arcname)
    st = os.lstat(path)
    info.pax_headers = {"mtime": _ns_text(st.st_mtime_ns)}
    try:
        for key in os.listxattr(path, follow_symlinks=False):
            if key.startswith("user."):
                value = os.getxattr(path, key, follow_symlinks=False)
                info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    except OSError:
        pass
    info.uname = info.gname = ""
    if info.isreg():
        with open(path, "rb") as f:
            tf.addfile(info, f)
    else:
        tf.addfile(info)


def _ns_text(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return f"{seconds}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(seconds)
