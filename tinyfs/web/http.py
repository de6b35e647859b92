"""Plain HTTP beside WebDAV: what a program needs, answered here before WsgiDAV sees the request.

  GET/HEAD of a file in a read-only section   verified bytes; Range, ETag (= its digest), Last-Modified,
                                              If-None-Match, If-Modified-Since, If-Range
  GET /resources/?format=json                 [{"id": rid, "head": iid}, ...]
  GET /instances/<rid>/?format=json           the instances, oldest first: id, previous, created, message,
                                              creator, label
  GET /resources/<rid>?format=json            instance.json of the head, as stored
  GET /instances/<rid>/<iid|label>?format=json   instance.json of that instance
  GET ...?format=tar | ?format=zip            the state as one bag, streamed (core.export.stream)
  GET /events.jsonl?since=<RFC 3339>          the events at or after that time

Verified bytes: a file is hashed as it is sent and compared with its recorded digest. One of up to
WHOLE_IN_MEMORY bytes is read and checked before the answer starts, so damage answers 500 with a line
naming the file; a bigger one is streamed, and damage found at its end cuts the connection before the
last bytes (the client sees a short body, never a complete bad one). A Range of a file of up to
VERIFY_FOR_RANGE bytes is served after the whole file was checked; of a bigger one, as stored (as the
mount's random reads are).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import parse_qs

from ..core.errors import InvalidName, NotFound, TinyfsError
from ..core.export import stream as export_stream
from ..core.ids import is_rid
from ..core.model import InstanceDoc
from .errors import BadBody, one_line, status_of
from .views import Found, locate, state_at

log = logging.getLogger(__name__)
CHUNK = 1 << 20
WHOLE_IN_MEMORY = 4 << 20
VERIFY_FOR_RANGE = 64 << 20
READ_ONLY = ("resources", "instances", "aip", "events.jsonl")


def route(ctx, environ):
    """The handler of a plain-HTTP request, or None for WebDAV."""
    method = environ["REQUEST_METHOD"]
    parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    form = (query.get("format") or [""])[0]
    if parts[:1] == ["transactions"] and ctx.deposits is not None:
        if method == "MOVE" and len(parts) == 2 and _destination(environ)[:1] == ["commit"]:
            return lambda environ, start_response: _commit(ctx, parts[1], environ, start_response)
        if method == "PUT" and len(parts) >= 2 and form == "tar":
            return lambda environ, start_response: _untar(ctx, parts[1], "/".join(parts[2:]), environ,
                                                          start_response)
        return None
    if method not in ("GET", "HEAD") or not parts or parts[0] not in READ_ONLY:
        return None
    try:
        if form:
            return _formatted(ctx, parts, form, environ)
        if parts == ["events.jsonl"] and "since" in query:
            return _events_since(ctx, query["since"][0])
        found = locate(ctx.archive, parts)
    except TinyfsError as e:
        return _error(e)
    if found is None:
        return None
    return lambda environ, start_response: _send_file(found, environ, start_response)


def _error(e: BaseException):
    return lambda environ, start_response: _answer(start_response, status_of(e), one_line(str(e)))


def _answer(start_response, status: int, text: str, headers: list | None = None) -> list[bytes]:
    from .app import answer

    return answer(start_response, status, text, headers)


# -- deposits ---------------------------------------------------------------------------------------------

def _destination(environ) -> list[str]:
    from .app import _destination_path

    return [p for p in (_destination_path(environ) or "").split("/") if p]


def _commit(ctx, rid: str, environ, start_response):
    """MOVE /transactions/<rid> to /commit/<rid>: answered once the instance is durable (201, its JSON);
    a refusal answers the status of its error with the line saying why, the transaction left as it was."""
    from .app import USER

    dest = _destination(environ)
    if dest not in (["commit"], ["commit", rid]):
        return _answer(start_response, 400, f"commit by MOVE to /commit/{rid}")
    held = _locked_inside(ctx, rid)
    if held:
        return _answer(start_response, 423, f"{held} is locked: a client is still writing it; "
                                            "commit once it has been unlocked")
    try:
        result = ctx.deposits.commit(rid, environ.get(USER) or "")
    except (TinyfsError, OSError) as e:
        return _answer(start_response, status_of(e), one_line(str(e)))
    body = {"resource": rid, "instance": result.instance, "added": result.added, "changed": result.changed,
            "removed": result.removed, "files_stored": result.files_stored, "bytes_stored": result.bytes_stored}
    data = (json.dumps(body) + "\n").encode("utf-8")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    if result.instance:
        headers.append(("Location", f"/instances/{rid}/{result.instance}/"))
    start_response("201 Created" if result.instance else "200 OK", headers)
    return [data]


def _locked_inside(ctx, rid: str) -> str:
    """A path inside the transaction that a WebDAV lock is held on, or ''.

    A lock is a client saying it is still writing: davfs2, for one, locks a file when it creates it and
    uploads the bytes seconds after `close`, then unlocks; its `mv` of the transaction to commit/ comes
    before that upload, carrying the lock tokens. Committing then would store the empty placeholder and
    lose the upload, so the commit is refused (423, EACCES to davfs2's mv) until the locks are gone."""
    if ctx.locks is None:
        return ""
    for lock in ctx.locks.get_url_lock_list(f"/transactions/{rid}", recursive=True):
        return lock["root"]
    return ""


def _untar(ctx, rid: str, under: str, environ, start_response):
    """PUT /transactions/<rid>/<dir>?format=tar: a tar stream unpacked into the transaction, as `tar -x`
    into the mount would (core.deposit.PathTxn.extract_tar)."""
    from .app import USER

    txn = ctx.deposits.get(rid)
    if txn is None:
        return _answer(start_response, 404, f"no open transaction for {rid!r}")
    try:
        txn.check_owner(environ.get(USER) or "")
        count = txn.extract_tar(environ["wsgi.input"], under)
    except (TinyfsError, OSError) as e:
        return _answer(start_response, status_of(e), one_line(str(e)))
    except BadBody as e:            # a malformed chunked body, a client silent inside it
        return _answer(start_response, e.value, one_line(str(e)))
    except Exception as e:          # tarfile.ReadError and the like: the body is not a tar
        return _answer(start_response, 400, f"not a tar stream: {one_line(str(e))}")
    return _json({"members": count})(environ, start_response)


# -- JSON and bags ------------------------------------------------------------------------------------------

def _formatted(ctx, parts: list[str], form: str, environ):
    archive = ctx.archive
    if form not in ("json", "tar", "zip"):
        return _error(InvalidName(f"?format={form!r}: json, tar or zip"))
    if form == "json" and parts == ["resources"]:
        rids = archive.resource_ids()
        heads = archive.heads(rids)
        return _json([{"id": rid, "head": heads.get(rid)} for rid in rids])
    if form == "json" and parts[0] == "instances" and len(parts) == 2 and is_rid(parts[1]):
        iids = archive.instance_ids(parts[1])
        if not iids:
            raise NotFound(f"no resource {parts[1]!r}")
        return _json([_summary(archive.instance(parts[1], iid)) for iid in iids])
    at = state_at(archive, parts)
    if at is None or at.path:
        raise NotFound(f"?format={form} names a resource (/resources/<rid>) or an instance "
                       "(/instances/<rid>/<iid>)")
    if form == "json":
        body = archive.instance_bytes(at.rid, at.doc.id)
        return _bytes(body, "application/json", etag=f"{at.doc.id}")
    return _bag_stream(archive, at.rid, at.doc.id, form)


def _summary(doc: InstanceDoc) -> dict:
    return {"id": doc.id, "previous": doc.previous, "created": doc.created, "message": doc.message,
            "creator": doc.creator, "label": doc.label}


def _json(value) -> callable:
    return _bytes((json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8"), "application/json")


def _bytes(body: bytes, content_type: str, etag: str | None = None):
    def handler(environ, start_response):
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if etag:
            headers.append(("ETag", f'"{etag}"'))
        start_response("200 OK", headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]
    return handler


def _bag_stream(archive, rid: str, iid: str, form: str):
    name = f"{rid}-{iid}.{form}"

    def handler(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/x-tar" if form == "tar" else "application/zip"),
                                  ("Content-Disposition", f'attachment; filename="{name}"')])
        if environ["REQUEST_METHOD"] == "HEAD":
            return []
        return _produced(lambda out: export_stream(archive, rid, out, instance=iid, form=form,
                                                   top=f"{rid}-{iid}"))
    return handler


class _Pipe:
    """A file object whose writes become the chunks of a response (written by a worker thread)."""

    def __init__(self):
        self.chunks: queue.Queue = queue.Queue(maxsize=8)     # bounded: a slow client slows the writer
        self.closed = False
        self._buffer = bytearray()

    def write(self, data) -> int:
        if self.closed:
            raise BrokenPipeError("the client went away")
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()

    def _put(self, item) -> None:
        while not self.closed:
            try:
                self.chunks.put(item, timeout=1)
                return
            except queue.Full:
                continue
        raise BrokenPipeError("the client went away")

    def tell(self) -> int:
        raise OSError("not seekable")


def _produced(write):
    """The chunks `write(out)` writes, as a WSGI body; an error while writing ends the body early (the
    connection is cut: the client must not take a part of a bag for a bag)."""
    pipe = _Pipe()
    failure: list[BaseException] = []

    def worker():
        try:
            write(pipe)
            pipe.flush()
        except BaseException as e:       # noqa: BLE001 - handed to the response below
            failure.append(e)
        finally:
            if not pipe.closed:
                try:
                    pipe._put(None)
                except BrokenPipeError:
                    pass

    thread = threading.Thread(target=worker, name="tinyfs-bag", daemon=True)
    thread.start()

    def body():
        try:
            while (chunk := pipe.chunks.get()) is not None:
                yield chunk
            if failure:
                log.error("a streamed bag failed: %s", failure[0])
                raise failure[0]
        finally:
            pipe.closed = True
    return body()


# -- events ---------------------------------------------------------------------------------------------

def _events_since(ctx, since: str):
    try:
        events = list(ctx.archive.events.read(since))
    except ValueError:
        raise InvalidName(f"since={since!r}: not an RFC 3339 time") from None
    body = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in events).encode("utf-8")
    return _bytes(body, "application/jsonl")


# -- files --------------------------------------------------------------------------------------------

def _send_file(found: Found, environ, start_response):
    etag = f'"{found.etag}"' if found.etag else None
    headers = [("Content-Type", found.content_type), ("Last-Modified", formatdate(found.mtime, usegmt=True)),
               ("Accept-Ranges", "bytes")]
    if etag:
        headers.append(("ETag", etag))
    if _not_modified(environ, etag, found.mtime):
        start_response("304 Not Modified", headers)
        return []
    span = _range(environ, found.size, etag, found.mtime)
    if span == "unsatisfiable":
        return _answer(start_response, 416, "the range is outside the file",
                       [("Content-Range", f"bytes */{found.size}")])
    head = environ["REQUEST_METHOD"] == "HEAD"
    try:
        if span is None:
            return _whole(found, headers, start_response, head)
        return _part(found, span, headers, start_response, head)
    except (OSError, TinyfsError) as e:
        log.error("GET %s: %s", environ.get("PATH_INFO"), e)
        return _answer(start_response, status_of(e), one_line(str(e)))


def _whole(found: Found, headers: list, start_response, head: bool):
    if head:
        start_response("200 OK", [*headers, ("Content-Length", str(found.size))])
        return []
    if found.size <= WHOLE_IN_MEMORY:
        with found.open() as f:
            body = f.read()                 # verified (FixityError) before a byte is sent
        if len(body) != found.size:
            raise OSError(5, f"the stored file has {len(body)} bytes, {found.size} recorded")
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [body]
    reader = found.open()
    start_response("200 OK", [*headers, ("Content-Length", str(found.size))])
    return _chunks(reader, found.size)


def _chunks(reader, length: int, to_end: bool = True):
    """`length` bytes from `reader`; with `to_end` (the whole file) a verified reader then checks the file's
    end before the last bytes are handed out. A failure raises: the server cuts the connection."""
    try:
        left = length
        while left > 0:
            data = reader.read(min(CHUNK, left))
            if not data:
                raise OSError(5, "the stored file is shorter than recorded")
            left -= len(data)
            if left == 0 and to_end and hasattr(reader, "finish"):
                reader.finish()             # verify before handing out the last bytes
            yield data
    finally:
        reader.close()


def _part(found: Found, span: tuple[int, int], headers: list, start_response, head: bool):
    first, last = span
    length = last - first + 1
    reader = found.open()
    try:
        if found.digest_checked and found.size <= VERIFY_FOR_RANGE:
            reader.finish()                 # the whole file checked before any part of it is handed out
        reader.seek(first)
    except BaseException:
        reader.close()
        raise
    start_response("206 Partial Content", [*headers, ("Content-Length", str(length)),
                                           ("Content-Range", f"bytes {first}-{last}/{found.size}")])
    if head:
        reader.close()
        return []
    return _chunks(reader, length, to_end=False)



def _not_modified(environ, etag: str | None, mtime: float) -> bool:
    match = environ.get("HTTP_IF_NONE_MATCH")
    if match is not None:
        return etag is not None and (match.strip() == "*" or etag in [m.strip().removeprefix("W/")
                                                                       for m in match.split(",")])
    since = environ.get("HTTP_IF_MODIFIED_SINCE")
    if since:
        try:
            return int(mtime) <= parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False
    return False


def _range(environ, size: int, etag: str | None, mtime: float):
    """(first, last) of a single satisfiable byte range, None for the whole file (no Range, several ranges,
    a stale If-Range), or "unsatisfiable"."""
    header = environ.get("HTTP_RANGE", "")
    if not header.startswith("bytes=") or "," in header:
        return None
    if_range = environ.get("HTTP_IF_RANGE")
    if if_range and if_range.strip() != etag and if_range.strip() != formatdate(mtime, usegmt=True):
        return None
    first_text, dash, last_text = header[6:].strip().partition("-")
    if not dash or not (first_text.isdigit() or last_text.isdigit()):
        return None
    if not first_text:                       # the last N bytes
        n = int(last_text)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text.isdigit() else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last

