"""/transactions and /commit over WebDAV: the open transactions (core.deposit), writable by their owner.

  MKCOL /transactions/<rid>              opens a transaction (the head's state; empty for a new resource)
  PUT, MKCOL, DELETE, MOVE, COPY inside   change it; PUT bodies are hashed as they arrive (core.deposit.put)
  DELETE /transactions/<rid>             rolls it back
  PROPPATCH /transactions/<rid>          tinyfs:message, tinyfs:creator, tinyfs:label (namespace NS)
  MOVE /transactions/<rid> -> /commit/<rid>   commits: answered by http.py (the answer names the instance)

Only the user who opened a transaction may change, commit or roll it back (403 for anyone else, as the
mount's sticky transactions/ is); anyone who may read sees it. A PUT may carry `X-OC-Mtime` (seconds, the
ownCloud convention rclone and others send) and `X-Tinyfs-Mode` (octal permission bits).

Every core error becomes a DAVError with the status of its errno (errors.status_of) and its one line.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

from wsgidav.dav_error import HTTP_BAD_GATEWAY, HTTP_FORBIDDEN, DAVError
from wsgidav.dav_provider import DAVCollection, DAVNonCollection

from ..core.errors import InvalidName, TinyfsError
from ..core.ids import is_rid
from .app import USER, Context
from .errors import etag_of, one_line, status_of

log = logging.getLogger(__name__)
NS = "urn:tinyfs:"                 # PROPPATCH names: {urn:tinyfs:}message, creator, label; state, error read-only
SETTABLE = ("message", "creator", "label")
SHOWN = ("message", "creator", "label", "state", "error")
SYMLINK_TYPE = "inode/symlink"


def dav_error(e: BaseException) -> DAVError:
    return DAVError(status_of(e), context_info=one_line(str(e)))


def call(fn, *args, **kwargs):
    """A core call with its errors as DAV statuses."""
    try:
        return fn(*args, **kwargs)
    except DAVError:
        raise
    except (TinyfsError, OSError) as e:
        raise dav_error(e) from None


def user_of(environ: dict) -> str | None:
    return environ.get(USER)


def resource(ctx: Context, parts: list[str], path: str, environ: dict):
    if ctx.deposits is None:
        return None
    if parts[0] == "commit":
        return CommitCollection(path, environ, ctx) if len(parts) == 1 else None
    if len(parts) == 1:
        return Transactions(path, environ, ctx)
    txn = ctx.deposits.get(parts[1])
    if txn is None:
        return None
    return entry(ctx, txn, "/".join(parts[2:]), path, environ)


def entry(ctx: Context, txn, sub: str, path: str, environ: dict):
    """The DAV resource of `sub` in a transaction, or None when nothing is there."""
    try:
        info = txn.stat(sub)
    except (TinyfsError, OSError):
        return None
    if info.kind == "d":
        return TxnDir(path, environ, ctx, txn, sub, info)
    return TxnFile(path, environ, ctx, txn, sub, info)


def _sub_of(txn, dest_path: str) -> str:
    """The path inside `txn` that a Destination names; 502 for another transaction or section (RFC 4918:
    a destination this resource cannot reach)."""
    parts = [p for p in dest_path.split("/") if p]
    if len(parts) < 3 or parts[0] != "transactions" or parts[1] != txn.rid:
        raise DAVError(HTTP_BAD_GATEWAY, context_info="moves and copies stay inside one transaction "
                                                      "(MOVE the transaction to /commit/<rid> to commit it)")
    return "/".join(parts[2:])


class Transactions(DAVCollection):
    """/transactions: the open transactions; MKCOL opens one."""

    def __init__(self, path: str, environ: dict, ctx: Context):
        super().__init__(path, environ)
        self.ctx = ctx

    def get_member_names(self) -> list[str]:
        return self.ctx.deposits.rids()

    def get_member(self, name: str):
        txn = self.ctx.deposits.get(name)
        return entry(self.ctx, txn, "", f"/transactions/{name}", self.environ) if txn else None

    def create_collection(self, name: str):
        user = user_of(self.environ)
        if not user:
            raise DAVError(HTTP_FORBIDDEN, context_info="anonymous users cannot open transactions")
        if not is_rid(name):
            raise dav_error(InvalidName(f"{name!r} is not a valid resource id"))
        call(self.ctx.deposits.open, name, user)

    def create_empty_resource(self, name: str):
        raise DAVError(HTTP_FORBIDDEN, context_info="a transaction is a collection: MKCOL /transactions/<rid>")

    def delete(self):
        raise DAVError(HTTP_FORBIDDEN, context_info="/transactions cannot be removed")

    def get_last_modified(self) -> float:
        return self.ctx.archive.transactions.stat().st_mtime

    def get_etag(self):
        return None

    def support_etag(self) -> bool:
        return False

    def prevent_locking(self) -> bool:
        return True


class CommitCollection(DAVCollection):
    """/commit: always empty; MOVE a transaction here (http.py answers it)."""

    def __init__(self, path: str, environ: dict, ctx: Context):
        super().__init__(path, environ)
        self.ctx = ctx

    def get_last_modified(self) -> float:
        return self.ctx.archive.root.stat().st_mtime

    def get_member_names(self) -> list[str]:
        return []

    def get_etag(self):
        return None

    def support_etag(self) -> bool:
        return False

    def _refuse(self, *_):
        raise DAVError(HTTP_FORBIDDEN, context_info="/commit is the target of MOVE /transactions/<rid>, "
                                                    "nothing is made here")

    create_collection = create_empty_resource = delete = _refuse

    def prevent_locking(self) -> bool:
        return True


class _InTxn:
    """What files and directories of a transaction share: owner checks, deletes, moves, copies."""

    def _setup(self, ctx: Context, txn, sub: str, info):
        self.ctx, self.txn, self.sub, self.info = ctx, txn, sub, info

    def _owner(self) -> None:
        call(self.txn.check_owner, user_of(self.environ) or "")

    def get_last_modified(self) -> float:
        return self.info.mtime_ns / 1e9

    def get_creation_date(self) -> float:
        return self.info.ctime_ns / 1e9

    def delete(self):
        self._owner()
        if self.sub == "":
            call(self.ctx.deposits.rollback, self.txn.rid, user_of(self.environ))
        else:
            call(self.txn.delete, self.sub)
        self.remove_all_properties(recursive=True)
        self.remove_all_locks(recursive=True)

    def support_recursive_delete(self) -> bool:
        return True

    def prevent_locking(self) -> bool:
        """Only the owner may LOCK (403 for anyone else, saying why): WsgiDAV asks nothing else before it
        grants one, and another user's lock made the owner's own writes 423. Other methods ask only whether
        locks are supported (PROPFIND shows them to every reader)."""
        if self.environ.get("REQUEST_METHOD") == "LOCK":
            self._owner()
        return False

    def support_recursive_move(self, dest_path: str) -> bool:
        return self.sub != ""

    def move_recursive(self, dest_path: str):
        self._owner()
        call(self.txn.move, self.sub, _sub_of(self.txn, dest_path), True)
        if self.provider.prop_manager:
            self.provider.prop_manager.move_properties(self.get_ref_url(), _ref_url(self, dest_path),
                                                       with_children=True)

    def copy_move_single(self, dest_path: str, *, is_move: bool):
        """COPY (and a MOVE WsgiDAV splits): one resource, a directory without its members."""
        self._owner()
        if self.sub == "":
            raise DAVError(HTTP_FORBIDDEN, context_info="a transaction is committed with MOVE to /commit/<rid>")
        call(self.txn.copy, self.sub, _sub_of(self.txn, dest_path), True, recursive=False)
        if self.provider.prop_manager:
            self.provider.prop_manager.copy_properties(self.get_ref_url(), _ref_url(self, dest_path))

    # -- tinyfs properties of the transaction root --------------------------------------------------------
    def get_property_names(self, *, is_allprop: bool) -> list[str]:
        names = super().get_property_names(is_allprop=is_allprop)
        return names + [f"{{{NS}}}{k}" for k in SHOWN] if self.sub == "" else names

    def get_property_value(self, name: str):
        if self.sub == "" and name.startswith(f"{{{NS}}}") and name[len(NS) + 2:] in SHOWN:
            return call(self.txn.meta).get(name[len(NS) + 2:]) or ""
        return super().get_property_value(name)

    def set_property_value(self, name: str, value, dry_run: bool = False):
        if name.startswith(f"{{{NS}}}"):
            key = name[len(NS) + 2:]
            if self.sub != "" or key not in SETTABLE:
                raise DAVError(HTTP_FORBIDDEN, context_info=f"{key} cannot be set here")
            self._owner()
            text = "" if value is None else (value.text or "")
            if not dry_run:
                call(self.txn.set_meta, key, text)
            return
        self._owner()
        return super().set_property_value(name, value, dry_run=dry_run)


class TxnDir(_InTxn, DAVCollection):
    def __init__(self, path: str, environ: dict, ctx: Context, txn, sub: str, info):
        DAVCollection.__init__(self, path, environ)
        self._setup(ctx, txn, sub, info)

    def get_member_names(self) -> list[str]:
        return [name for name, _ in call(self.txn.list, self.sub)]

    def get_member_list(self) -> list:
        base = self.path.rstrip("/")
        out = []
        for name, info in call(self.txn.list, self.sub):
            sub = f"{self.sub}/{name}" if self.sub else name
            cls = TxnDir if info.kind == "d" else TxnFile
            out.append(cls(f"{base}/{name}", self.environ, self.ctx, self.txn, sub, info))
        return out

    def get_member(self, name: str):
        sub = f"{self.sub}/{name}" if self.sub else name
        return entry(self.ctx, self.txn, sub, f"{self.path.rstrip('/')}/{name}", self.environ)

    def _child(self, name: str) -> str:
        return f"{self.sub}/{name}" if self.sub else name

    def create_collection(self, name: str):
        self._owner()
        call(self.txn.mkdir, self._child(name), mtime_ns=_mtime_ns(self.environ))

    def create_empty_resource(self, name: str):
        """A new file: for PUT, nothing is made until its whole body has arrived (a failed upload leaves
        nothing); for LOCK of an unmapped name, an empty file (RFC 4918 7.3)."""
        self._owner()
        sub = self._child(name)
        if self.environ.get("REQUEST_METHOD") != "PUT":
            call(self.txn.put, sub, io.BytesIO(b""), 0)
            return self.get_member(name)
        return TxnFile(f"{self.path.rstrip('/')}/{name}", self.environ, self.ctx, self.txn, sub, None)

    def get_etag(self):
        return None

    def support_etag(self) -> bool:
        return False


class TxnFile(_InTxn, DAVNonCollection):
    """A file (or a symbolic link, shown as a file holding its target) of a transaction; `info` None: a
    file a PUT is about to make."""

    def __init__(self, path: str, environ: dict, ctx: Context, txn, sub: str, info):
        DAVNonCollection.__init__(self, path, environ)
        self._setup(ctx, txn, sub, info)

    def get_content_length(self) -> int:
        return self.info.size if self.info else 0

    def get_content_type(self) -> str:
        if self.info and self.info.kind == "l":
            return SYMLINK_TYPE
        import mimetypes

        return mimetypes.guess_type(self.sub, strict=False)[0] or "application/octet-stream"

    def get_last_modified(self) -> float:
        return self.info.mtime_ns / 1e9 if self.info else 0.0

    def get_creation_date(self) -> float:
        return self.info.ctime_ns / 1e9 if self.info else 0.0

    def get_etag(self):
        if self.info is None or self.info.kind != "f" or not self.info.digest:
            return None
        return etag_of(self.ctx.archive.config.primary, self.info.digest)

    def support_etag(self) -> bool:
        return self.get_etag() is not None

    def support_ranges(self) -> bool:
        return True

    def get_content(self):
        if self.info and self.info.kind == "l":
            return io.BytesIO((self.info.target or "").encode("utf-8", "surrogateescape"))
        return call(self.txn.open_read, self.sub)

    def begin_write(self, *, content_type: str | None = None):
        self._owner()
        return _Upload(self)

    def end_write(self, *, with_errors: bool):
        if not with_errors:
            self.info = call(self.txn.stat, self.sub)


class _Upload:
    """What WsgiDAV's PUT writes the body to: it hands over the whole body as an iterable of chunks
    (`writelines`), which becomes the stream of one core put."""

    def __init__(self, res: TxnFile):
        self.res = res

    def writelines(self, chunks: Iterable[bytes]) -> None:
        environ = self.res.environ
        length = environ.get("CONTENT_LENGTH")
        stream = _ChunkStream(chunks)
        call(self.res.txn.put, self.res.sub, stream, int(length) if length else None,
             mode=_mode(environ), mtime_ns=_mtime_ns(environ))
        # The put stops after Content-Length bytes without asking for more, so WsgiDAV's reader of the body
        # has not seen its end: it would then take the body as unread and close the connection after the
        # answer (`Connection: close` on every PUT: a client uploading 10,000 files made 10,000 TCP
        # connections, and under load their reconnects overflowed the listen queue). Reading to the end
        # (nothing is left: the server's input stops at Content-Length) lets it mark the body read.
        stream.read_to_end()

    def close(self) -> None:
        pass


class _ChunkStream(io.RawIOBase):
    """An iterable of byte chunks as a readable stream."""

    def __init__(self, chunks: Iterable[bytes]):
        super().__init__()
        self._chunks = iter(chunks)
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read_to_end(self) -> None:
        """Ask for what follows (nothing, after a whole body: the server's input stops at its
        Content-Length), so that the iterable reaches its end."""
        for _ in self._chunks:
            pass

    def readinto(self, buffer) -> int:
        while not self._left:
            try:
                self._left = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _ref_url(res, path: str) -> str:
    """The ref URL (WsgiDAV's key of dead properties) of a provider path, as get_ref_url makes it."""
    from wsgidav.util import quote

    return quote(res.provider.share_path + path)


def _mtime_ns(environ: dict) -> int | None:
    text = environ.get("HTTP_X_OC_MTIME")
    if not text:
        return None
    try:
        ns = Decimal(text.strip()) * 1_000_000_000
    except InvalidOperation:
        ns = None
    # NaN, Infinity and 1e400 are Decimals too: an mtime is a 64-bit count of nanoseconds (not a 500)
    if ns is None or not ns.is_finite() or not -(1 << 63) <= ns < 1 << 63:
        raise DAVError(400, context_info=f"X-OC-Mtime {text[:40]!r}: seconds expected")
    return int(ns)


def _mode(environ: dict) -> int | None:
    text = environ.get("HTTP_X_TINYFS_MODE")
    if not text:
        return None
    try:
        mode = int(text.strip(), 8)
    except ValueError:
        raise DAVError(400, context_info=f"X-Tinyfs-Mode {text!r}: octal permission bits expected") from None
    if not 0 <= mode <= 0o7777:
        raise DAVError(400, context_info=f"X-Tinyfs-Mode {text!r}: octal permission bits expected")
    return mode
