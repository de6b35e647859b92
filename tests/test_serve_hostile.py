"""`tinyfs serve` against hostile clients: wrong and malformed credentials, another user's transaction,
paths that climb (also in absolute URLs and in Destination), oversized and malformed requests, malicious
XML, slow clients. Each is refused with the status that fits (and, where tinyfs answers, one line saying
why), changes nothing in the archive, and leaves the server serving others.

Requests are sent as raw bytes (http.client and requests normalise too much). One server serves the module
(with --timeout 2, so that slow clients are dropped quickly); every test leaves the archive as it found it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import os
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving import served

from tinyfs import Archive
from tinyfs.web.server import MAX_HEADER, THREADS

pytestmark = pytest.mark.core
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
TIMEOUT = 2                     # the module's server: --timeout 2
PROMPT = 1.5                    # seconds within which a normal request is answered, whatever else goes on
DRAFT = "/transactions/draft"   # alice's open transaction
PAGE = b"a page of the draft\n"


@dataclass
class Site:
    srv: object
    root: Path


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    archive = Archive.init(tmp_path_factory.mktemp("hostile") / "archive")
    with archive.new("book") as t:
        t.add_bytes("page.txt", b"a committed page\n")
    with served(archive, "--timeout", str(TIMEOUT), users=USERS) as srv:
        site = Site(srv, Path(archive.root.root))
        assert send(site, request("MKCOL", DRAFT)).status == 201
        assert send(site, request("PUT", f"{DRAFT}/page.txt", PAGE)).status == 201
        yield site


# -- sending ----------------------------------------------------------------------------------------------

def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(method: str, target: str, body: bytes = b"", user: str | None = "alice",
            headers: dict | None = None) -> bytes:
    """A request as bytes: Host, Basic credentials of `user`, Content-Length of `body` unless `headers` say
    otherwise (a header given None is left out)."""
    fields = {"Host": "127.0.0.1", "Authorization": basic(user, USERS[user]) if user else None,
              "Content-Length": str(len(body)) if body else None, **(headers or {})}
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return head.encode("latin-1") + b"\r\n" + body


def connect(site: Site, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", site.srv.port), timeout=timeout)


def send(site: Site, data: bytes, *, then_close_writing: bool = False, timeout: float = 10) -> Reply:
    """Send `data` on a new connection and read the answer."""
    with connect(site, timeout) as s:
        s.sendall(data)
        if then_close_writing:
            s.shutdown(socket.SHUT_WR)
        return read_reply(s)


def read_reply(s: socket.socket) -> Reply:
    r = http.client.HTTPResponse(s)
    r.begin()
    return Reply(r.status, r.headers, r.read())


# -- checking ---------------------------------------------------------------------------------------------

def archive_state(root: Path) -> dict[str, str]:
    """Every file of the archive (committed instances, events, open transactions) by its digest; the lock
    files and SQLite's journals aside."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if "/.locks/" in f"/{rel}" or rel.endswith(("-journal", "-wal", "-shm")):
            continue
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def assert_serving(site: Site) -> None:
    """A normal request is answered, and promptly."""
    started = time.monotonic()
    reply = send(site, request("GET", f"{DRAFT}/page.txt"), timeout=PROMPT + 5)
    assert (reply.status, reply.body) == (200, PAGE)
    assert time.monotonic() - started < PROMPT
    assert site.srv.alive()


def assert_says_why(reply: Reply, why: str) -> None:
    """tinyfs answers a refusal with one line of plain text; WsgiDAV and cheroot with a page or a phrase
    that holds the reason."""
    assert why in reply.text, reply.text
    if reply.headers.get("Content-Type", "").startswith("text/plain; charset=utf-8"):
        assert reply.text.count("\n") == 1 and reply.text.endswith("\n"), reply.text
    assert "Traceback" not in reply.text


def assert_refused(site: Site, data: bytes, status: int, why: str, **send_options) -> Reply:
    before = archive_state(site.root)
    reply = send(site, data, **send_options)
    assert reply.status == status, (reply.status, reply.text)
    assert_says_why(reply, why)
    assert archive_state(site.root) == before
    assert_serving(site)
    return reply


# -- credentials and owners -----------------------------------------------------------------------------

@pytest.mark.parametrize("authorization, status, why", [
    (None, 401, "log in"),
    (basic("alice", "wrong"), 401, "wrong user name or password"),
    (basic("mallory", "alice-pw"), 401, "wrong user name or password"),
    ("Digest username=alice", 401, "unsupported authorization"),
    ("Basic !!not-base64!!", 400, "malformed Authorization header"),
    ("Basic " + base64.b64encode(b"alice-without-colon").decode(), 400, "malformed Authorization header"),
    ("Basic " + base64.b64encode(b"al\xefce:alice-pw").decode(), 400, "malformed Authorization header"),
    ("Basic", 400, "malformed Authorization header"),
])
def test_missing_wrong_or_malformed_credentials_change_nothing(site, authorization, status, why):
    data = request("PUT", f"{DRAFT}/page.txt", b"overwritten", user=None,
                   headers={"Authorization": authorization})
    reply = assert_refused(site, data, status, why)
    assert status != 401 or reply.headers["WWW-Authenticate"].startswith("Basic")


def test_an_authorization_header_of_raw_8_bit_bytes_is_400(site):
    data = request("DELETE", f"{DRAFT}/page.txt", user=None).replace(
        b"\r\n\r\n", b"\r\nAuthorization: Basic \xff\xfe\xfd\r\n\r\n")
    assert_refused(site, data, 400, "malformed Authorization header")


LOCKINFO = (b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
            b"<D:locktype><D:write/></D:locktype></D:lockinfo>")


def proppatch(namespace: str, name: str, value: str) -> bytes:
    return (f'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="{namespace}"><D:set><D:prop>'
            f"<Z:{name}>{value}</Z:{name}></D:prop></D:set></D:propertyupdate>").encode()


def propfind(namespace: str, name: str) -> bytes:
    return (f'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:Z="{namespace}"><D:prop><Z:{name}/></D:prop>'
            "</D:propfind>").encode()


def a_tar(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("method, target, body, headers, status", [
    ("LOCK", f"{DRAFT}/page.txt", LOCKINFO, {}, 403),
    ("LOCK", DRAFT, LOCKINFO, {"Depth": "infinity"}, 403),
    ("PUT", f"{DRAFT}/?format=tar", a_tar("evil.txt", b"evil"), {}, 403),
    ("COPY", f"{DRAFT}/page.txt", b"", {"Destination": f"{DRAFT}/copy.txt"}, 403),
    ("MOVE", f"{DRAFT}/page.txt", b"", {"Destination": f"{DRAFT}/moved.txt"}, 403),
    ("PROPPATCH", f"{DRAFT}/page.txt", proppatch("urn:x:", "note", "evil"), {}, 207),
    ("PROPPATCH", DRAFT, proppatch("urn:tinyfs:", "message", "evil"), {}, 207),
])
def test_another_users_transaction_is_refused(site, method, target, body, headers, status):
    reply = assert_refused(site, request(method, target, body, user="bob", headers=headers), status,
                           "belongs to another user")
    assert status != 207 or "403 Forbidden" in reply.text         # PROPPATCH: 403 per property (RFC 4918)
    assert send(site, request("PUT", f"{DRAFT}/page.txt", PAGE)).status == 204      # alice is not locked out


# -- paths, absolute URLs, Destination --------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "http://127.0.0.1/resources/../tinyfs.json",
    "http://127.0.0.1/resources/%2e%2e/tinyfs.json",
    "http://other.example/transactions/draft/page.txt",
    "https://127.0.0.1/transactions/draft/../draft/page.txt",
])
def test_an_absolute_url_as_the_request_target_is_400(site, target):
    assert_refused(site, request("PUT", target, b"overwritten"), 400, "Absolute URI not allowed")


@pytest.mark.parametrize("target, why", [
    ("transactions/draft/page.txt", "origin-form"),
    ("*", "origin-form"),
    (f"{DRAFT}/%2e%2e/%2E%2E/tinyfs.json", "'.' or '..'"),
    (f"{DRAFT}/%00", "NUL"),
    (f"{DRAFT}/%ff.txt", "not UTF-8"),
])
def test_a_request_target_that_names_nothing_is_400(site, target, why):
    assert_refused(site, request("PUT", target, b"overwritten"), 400, why)


@pytest.mark.parametrize("destination, status, why", [
    (f"http://127.0.0.1{DRAFT}/../../../tinyfs.json", 400, "'.' or '..'"),
    (f"http://127.0.0.1{DRAFT}/%2e%2e/%2e%2e/tinyfs.json", 400, "'.' or '..'"),
    (f"http://127.0.0.1{DRAFT}/a%00b", 400, "NUL"),
    ("::: not a url", 400, "not an http(s) URL"),
    ("", 400, "not an http(s) URL"),
    ("relative/page.txt", 400, "not an http(s) URL"),
    (f"ftp://127.0.0.1{DRAFT}/moved.txt", 400, "not an http(s) URL"),
    (f"http://[::1{DRAFT}/moved.txt", 400, "Invalid IPv6 URL"),
    (f"http://127.0.0.1:99999999{DRAFT}/moved.txt", 400, "out of range"),
    (f"http://other.example{DRAFT}/moved.txt", 502, "same host name"),
    ("http://127.0.0.1/resources/book/moved.txt", 502, "stay inside one transaction"),
])
def test_a_destination_elsewhere_or_malformed_is_refused(site, destination, status, why):
    data = request("MOVE", f"{DRAFT}/page.txt", headers={"Destination": destination})
    assert_refused(site, data, status, why)


# -- oversized requests -----------------------------------------------------------------------------------

def test_a_request_line_over_the_limit_is_414(site):
    assert_refused(site, request("GET", "/resources/" + "a" * (MAX_HEADER + 10)), 414, "Request-URI")


@pytest.mark.parametrize("extra", [
    {"X-Big": "b" * (MAX_HEADER + 10)},
    {f"X-Many-{i}": "m" * 100 for i in range(MAX_HEADER // 100)},
], ids=["one header", "many headers"])
def test_headers_over_the_limit_are_413(site, extra):
    assert_refused(site, request("PUT", f"{DRAFT}/page.txt", b"overwritten", headers=extra), 413,
                   "headers sent with the request exceed")


def test_an_upload_larger_than_the_free_space_is_507_before_its_body(site):
    data = request("PUT", f"{DRAFT}/huge.bin", headers={"Content-Length": str(10 ** 15)})
    started = time.monotonic()
    assert_refused(site, data, 507, "do not fit")
    assert time.monotonic() - started < PROMPT + 1          # answered without waiting for 1 PB


def test_an_upload_shorter_than_its_content_length_keeps_nothing(site):
    data = request("PUT", f"{DRAFT}/short.bin", headers={"Content-Length": "100000"}) + b"x" * 1000
    assert_refused(site, data, 400, "the body ended after 1,000 of 100,000 bytes", then_close_writing=True)


def test_a_refused_upload_is_answered_while_its_body_is_still_coming(site):
    """A wrong password on an 8 MiB PUT: 401 at once; the body that follows is read and thrown away, so
    that a client still sending it reads the answer rather than a reset connection."""
    body = os.urandom(8 << 20)
    data = request("PUT", f"{DRAFT}/big.bin", body, user=None,
                   headers={"Authorization": basic("alice", "wrong")})
    assert_refused(site, data, 401, "wrong user name or password")


@pytest.mark.parametrize("sent", [0, 2 << 20], ids=["announced", "sent"])
def test_an_xml_body_over_1_mib_is_413(site, sent):
    data = request("PROPFIND", DRAFT, headers={"Depth": "0", "Content-Length": str(max(sent, 10 ** 9))})
    assert_refused(site, data + b"<" * sent, 413, "the body of a PROPFIND holds at most 1 MiB")


# -- malformed requests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("data, status, why", [
    (b"\x00\x01\x02 garbage\r\n\r\n", 400, "Malformed Request-Line"),
    (b"GET / HTTP/1.1\nHost: x\n\n", 400, "CRLF"),
    (b"GET /resources/ HTTP/2.0\r\nHost: x\r\n\r\n", 505, "Cannot fulfill"),
    (b"GET /resources/ HTTP/x.y\r\nHost: x\r\n\r\n", 400, "Malformed Request-Line"),
    (b"GET /resources/ SPDY/1.1\r\nHost: x\r\n\r\n", 400, "bad protocol"),
    (b"GET /resources/\r\n\r\n", 400, "Malformed Request-Line"),
    (b"PUT /transactions/draft/page.txt HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", 400, "Illegal header"),
], ids=["garbage", "LF only", "HTTP/2.0", "HTTP/x.y", "SPDY", "no version", "header without colon"])
def test_a_malformed_request_line_or_header_is_refused(site, data, status, why):
    assert_refused(site, data, status, why)


@pytest.mark.parametrize("length, why", [
    ("abc", "Malformed Content-Length"),
    ("-5", "Content-Length '-5' is not a number of bytes"),
    ("+5", "Content-Length '+5' is not a number of bytes"),
    ("1_0", "Content-Length '1_0' is not a number of bytes"),
])
def test_a_bad_content_length_is_400(site, length, why):
    data = request("PUT", f"{DRAFT}/page.txt", headers={"Content-Length": length}) + b"x" * 10
    assert_refused(site, data, 400, why)


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("body, headers, status, why", [
    (b"ZZ\r\nabc\r\n0\r\n\r\n", {}, 400, "chunk size"),
    (b"3\r\nabcXY0\r\n\r\n", {}, 400, "does not end in CRLF"),
    (b"10000000000\r\nonly a few bytes", {}, 400, "ended inside a chunk"),
    (b"3;" + b"e" * 2000 + b"\r\nabc\r\n0\r\n\r\n", {}, 400, "line is too long"),
    (chunked(b"abc"), {"Content-Length": "3"}, 400, "not both"),
    (chunked(b"abc"), {"Transfer-Encoding": "gzip, chunked"}, 501, ""),
])
def test_a_malformed_chunked_body_is_refused(site, body, headers, status, why):
    data = request("PUT", f"{DRAFT}/chunked.txt", headers={"Transfer-Encoding": "chunked", **headers}) + body
    assert_refused(site, data, status, why, then_close_writing=True)


def test_a_well_formed_chunked_upload_is_taken(site):
    data = request("PUT", f"{DRAFT}/chunked.txt", headers={"Transfer-Encoding": "chunked"})
    assert send(site, data + chunked(b"chunked ", b"body")).status == 201
    assert send(site, request("GET", f"{DRAFT}/chunked.txt")).body == b"chunked body"
    assert send(site, request("DELETE", f"{DRAFT}/chunked.txt")).status == 204


@pytest.mark.parametrize("method, headers, status, why", [
    ("PROPFIND", {"Depth": "banana"}, 400, "Invalid Depth header"),
    ("PUT", {"X-OC-Mtime": "NaN"}, 400, "seconds expected"),
    ("PUT", {"X-OC-Mtime": "1e400"}, 400, "seconds expected"),
    ("PUT", {"X-Tinyfs-Mode": "rwx"}, 400, "octal permission bits expected"),
    ("PUT", {"Content-Range": "bytes 0-3/4"}, 400, "Content-range header is not allowed"),
    ("COPY", {"Destination": f"{DRAFT}/copy.txt", "Overwrite": "perhaps"}, 400, "Invalid Overwrite header"),
])
def test_a_malformed_webdav_header_is_400(site, method, headers, status, why):
    body = b"new page" if method == "PUT" else b""
    assert_refused(site, request(method, f"{DRAFT}/page.txt", body, headers=headers), status, why)


def test_a_bad_range_is_ignored_and_one_beyond_the_end_is_416(site):
    page = request("GET", "/resources/book/page.txt", headers={"Range": "bytes=zz-"})
    reply = send(site, page)
    assert (reply.status, reply.body) == (200, b"a committed page\n")        # RFC 9110: ignore it
    reply = send(site, request("GET", "/resources/book/page.txt", headers={"Range": "bytes=999-"}))
    assert reply.status == 416 and reply.headers["Content-Range"] == "bytes */17"
    assert_says_why(reply, "the range is outside the file")


# -- malicious XML ------------------------------------------------------------------------------------------

BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b']><D:propfind xmlns:D="DAV:"><D:prop><D:displayname>&lol9;</D:displayname></D:prop>'
                  b"</D:propfind>")
EXTERNAL_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY secret SYSTEM "file:///etc/passwd">]>'
                   b'<D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:x:"><D:set><D:prop><Z:note>&secret;</Z:note>'
                   b"</D:prop></D:set></D:propertyupdate>")


@pytest.mark.parametrize("method, body", [
    ("PROPFIND", BILLION_LAUGHS), ("PROPPATCH", EXTERNAL_ENTITY), ("PROPFIND", b"<D:propfind xmlns:D='DAV:'"),
], ids=["billion laughs", "external entity", "unclosed"])
def test_malicious_or_broken_xml_is_400_and_expands_nothing(site, method, body):
    reply = assert_refused(site, request(method, DRAFT, body, headers={"Depth": "0"}), 400, "Invalid XML")
    assert "lollollol" not in reply.text and "root:" not in reply.text
    note = send(site, request("PROPFIND", DRAFT, propfind("urn:x:", "note"), headers={"Depth": "0"}))
    assert note.status == 207 and b"root:" not in note.body


# -- slow clients ---------------------------------------------------------------------------------------

class Trickler:
    """Connections that send their request a byte at a time, a byte every `every` seconds."""

    def __init__(self, site: Site, count: int, data: bytes, every: float = 0.3):
        self.sockets = [connect(site, timeout=TIMEOUT + 5) for _ in range(count)]
        self.data, self.every = data, every
        self.opened = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for byte in self.data:
            for s in self.sockets:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    pass                    # dropped by the server: what the test waits for
            if self._stop.wait(self.every):
                return

    def replies(self) -> list[Reply]:
        return [read_reply(s) for s in self.sockets]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.sockets:
            s.close()


def test_heads_trickling_in_on_more_connections_than_threads_stop_no_one(site):
    """A worker thread only takes a request whose line and headers are complete: THREADS + 8 connections
    sending theirs a byte at a time do not delay others, and are answered 408 and dropped `--timeout`
    seconds after they began, however steadily they trickle."""
    before = archive_state(site.root)
    slow = Trickler(site, THREADS + 8, request("PUT", f"{DRAFT}/page.txt", b"slowly overwritten"))
    try:
        time.sleep(0.5)
        assert_serving(site)
        replies = slow.replies()
        took = time.monotonic() - slow.opened
    finally:
        slow.close()
    assert all(r.status == 408 and "did not arrive within 2 s" in r.text for r in replies), replies[0]
    assert TIMEOUT - 0.5 < took < TIMEOUT + 2
    assert archive_state(site.root) == before
    assert_serving(site)


def test_connections_that_send_nothing_are_closed_after_the_timeout(site):
    silent = [connect(site, timeout=TIMEOUT + 5) for _ in range(THREADS + 8)]
    try:
        opened = time.monotonic()
        assert_serving(site)
        assert all(s.recv(100) == b"" for s in silent)          # closed without a word: no request began
        assert TIMEOUT - 0.5 < time.monotonic() - opened < TIMEOUT + 2
    finally:
        for s in silent:
            s.close()


def test_a_body_that_stops_arriving_is_408_after_the_timeout_and_keeps_nothing(site):
    data = request("PUT", f"{DRAFT}/stalled.bin", headers={"Content-Length": "100000"}) + b"x" * 1000
    started = time.monotonic()
    assert_refused(site, data, 408, f"the client sent nothing for {TIMEOUT} s inside the request body")
    assert TIMEOUT - 0.5 < time.monotonic() - started < TIMEOUT + 2 + PROMPT


def test_refused_bodies_on_more_connections_than_threads_stop_no_one(site):
    """A refusal does not wait for the body it refuses: THREADS + 8 unauthenticated uploads that stall
    inside their bodies are answered 401 at once, and hold no worker thread meanwhile."""
    before = archive_state(site.root)
    stalled = [connect(site) for _ in range(THREADS + 8)]
    try:
        for s in stalled:
            s.sendall(request("PUT", f"{DRAFT}/page.txt", user=None, headers={"Content-Length": "100000"})
                      + b"x" * 100)
        assert_serving(site)
        assert all(read_reply(s).status == 401 for s in stalled)
    finally:
        for s in stalled:
            s.close()
    assert archive_state(site.root) == before


# -- the default timeout, TLS -----------------------------------------------------------------------------

def test_the_default_timeout_is_60_seconds(tmp_path):
    archive = Archive.init(tmp_path / "archive")
    with served(archive, "--anonymous", "read") as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /resources/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            reply = read_reply(s)
    assert reply.status == 200 and reply.headers["Keep-Alive"] == "timeout=60"


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "tls.crt", where / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls_clients_that_never_say_hello_stop_no_one(tmp_path):
    """The TLS handshake happens at the gate too: a connection that never sends its ClientHello held
    cheroot's accepting thread, so no one else got in until it timed out."""
    archive = Archive.init(tmp_path / "archive")
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    with served(archive, "--cert", str(cert), "--key", str(key), "--anonymous", "read", "--timeout",
                str(TIMEOUT), scheme="https") as srv:
        mute = [socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT + 5) for _ in range(THREADS + 8)]
        try:
            started = time.monotonic()
            conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=context, timeout=PROMPT + 5)
            conn.request("GET", "/resources/?format=json")
            assert conn.getresponse().status == 200
            assert time.monotonic() - started < PROMPT
            assert all(s.recv(100) == b"" for s in mute)
        finally:
            for s in mute:
                s.close()
