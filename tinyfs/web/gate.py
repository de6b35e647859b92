"""cheroot, hardened against slow and hostile clients: no worker thread waits for a client that is slow to
say what it wants.

cheroot hands every new (or newly readable kept-alive) connection straight to a worker thread, which then
blocks reading the request line and headers; with TLS, the accepting thread itself blocks in the handshake.
So 32 connections that send a header byte now and then (or one that never says hello over TLS) stopped the
whole server for the timeout. Here one thread, the gate, waits for all of them at once (a selector):

- it completes the TLS handshake and reads the request line and headers, without blocking, until they are
  complete (or too long, or cut), and only then queues the connection for a worker, with the bytes it read
  put back in front of the socket. A head not complete `timeout` seconds after the connection opened (on a
  kept-alive one, after its first byte) is answered 408 and dropped, however steadily it trickles in;
- it closes the connections whose request body was not read (a refusal, a timeout): the answer is sent, then
  what the client still sends is read and thrown away for a short while, so that a client busy sending its
  body still gets to read the answer (a plain close() with unread data would reset the connection). cheroot
  would instead read the whole body, in a worker, before answering: a `Content-Length: 10**15` made it
  allocate that much memory, a slow one held a worker;
- request bodies (`wsgi.input`) are read in bounded pieces: a chunk size of 2**40 costs only the bytes that
  arrive, a malformed chunked encoding is a 400 and a client silent inside its body a 408 (BadBody), never a
  500.

A request whose head is complete still holds a worker while its body arrives (an upload; `--threads`).
"""

from __future__ import annotations

import _pyio
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.makefile import StreamReader
from cheroot.ssl.builtin import BuiltinSSLAdapter

from .errors import BadBody

log = logging.getLogger(__name__)
PIECE = 64 * 1024              # bytes read from a client at once
LINGER_SECONDS = 30            # at most this long, a refused body is read and thrown away ...
LINGER_IDLE_SECONDS = 5        # ... unless the client is silent for this long
MAX_CHUNK_LINE = 1024          # a chunk-size line (with extensions); a trailer line
MAX_TRAILERS = 64
DISCARD_PIECES = 16            # pieces of a refused body thrown away at a time
HEX_DIGITS = b"0123456789abcdefABCDEF"


class Server(wsgi.Server):
    """cheroot's WSGI server with the gate in front of its workers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ConnectionClass = Connection
        self.gateway = Gateway
        self.gate = Gate(self)

    def prepare(self) -> None:
        super().prepare()
        self.gate.start()

    def process_conn(self, conn) -> None:
        """A connection with something to read (new, or kept alive): to the gate, not straight to a worker."""
        self.gate.admit(conn)

    def to_worker(self, conn) -> None:
        super().process_conn(conn)

    def stop(self) -> None:
        self.gate.stop()
        super().stop()


class TLSAdapter(BuiltinSSLAdapter):
    """The builtin TLS adapter, minus the handshake in cheroot's accepting thread: the gate does it."""

    def wrap(self, sock):
        return self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True), {}


# -- the gate ---------------------------------------------------------------------------------------------

class _Waiting:
    """A connection the gate waits for: its TLS handshake, its head, or the end of a refused body."""

    def __init__(self, conn, state: str, deadline: float, head: bytes = b""):
        self.conn = conn
        self.state = state                 # "tls", "head" or "linger"
        self.deadline = deadline
        self.idle_deadline = deadline
        self.head = bytearray(head)
        self.scanned = 0                   # bytes of `head` searched for its end already

    def fileno(self) -> int:
        return self.conn.socket.fileno()


class Gate(threading.Thread):
    """The thread that waits for connections not ready for a worker; `admit` and `linger` hand it one."""

    def __init__(self, server: Server):
        super().__init__(name="tinyfs-gate", daemon=True)
        self.server = server
        self._inbox: deque = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._waiting: dict[int, _Waiting] = {}
        self._stopping = False

    # -- called from other threads
    def admit(self, conn) -> None:
        self._post("admit", conn)

    def linger(self, conn) -> None:
        self._post("linger", conn)

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self.is_alive():
            self.join(5)

    def _post(self, what: str, conn) -> None:
        self._inbox.append((what, conn))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass                            # already awake (the pair's buffer is full) or shut down

    # -- the gate's own thread
    def run(self) -> None:
        try:
            while not self._stopping:
                self._loop_once()
        finally:
            for waiting in list(self._waiting.values()):
                self._drop(waiting)
            while self._inbox:
                _real_close(self._inbox.popleft()[1])
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _loop_once(self) -> None:
        now = time.monotonic()
        soonest = min((w.idle_deadline for w in self._waiting.values()), default=now + 1)
        for key, _ in self._selector.select(timeout=min(max(soonest - now, 0), 1)):
            if key.fileobj is self._wake_r:
                self._drain_wake()
            else:
                self._step(key.data)
        while self._inbox:
            what, conn = self._inbox.popleft()
            self._start(what, conn)
        self._expire(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _start(self, what: str, conn) -> None:
        try:
            conn.socket.setblocking(False)
        except OSError:
            _real_close(conn)
            return
        now = time.monotonic()
        if what == "linger":
            self._start_linger(conn, now)
            return
        state = "tls" if isinstance(conn.socket, ssl.SSLSocket) and not conn.tls_ready else "head"
        waiting = _Waiting(conn, state, now + self.server.timeout, _buffered(conn))
        if state == "head" and self._head_ready(waiting):
            self._to_worker(waiting)
            return
        self._watch(waiting, selectors.EVENT_READ)
        self._step(waiting)                 # (TLS: the ClientHello may be there already)

    def _start_linger(self, conn, now: float) -> None:
        try:
            socket.socket.shutdown(conn.socket, socket.SHUT_WR)     # the answer is complete: FIN after it
        except OSError:
            _real_close(conn)
            return
        waiting = _Waiting(conn, "linger", now + min(LINGER_SECONDS, self.server.timeout))
        waiting.idle_deadline = now + min(LINGER_IDLE_SECONDS, self.server.timeout)
        self._watch(waiting, selectors.EVENT_READ)

    def _watch(self, waiting: _Waiting, events: int) -> None:
        fd = waiting.fileno()
        if fd in self._waiting:
            self._selector.modify(fd, events, waiting)
        else:
            self._waiting[fd] = waiting
            self._selector.register(fd, events, waiting)

    def _forget(self, waiting: _Waiting) -> None:
        fd = waiting.fileno()
        if self._waiting.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def _step(self, waiting: _Waiting) -> None:
        try:
            if waiting.state == "tls":
                self._handshake(waiting)
            elif waiting.state == "head":
                self._read_head(waiting)
            else:
                self._discard(waiting)
        except Exception:                   # a connection's trouble never stops the gate
            log.exception("a connection failed at the gate")
            self._drop(waiting)

    def _handshake(self, waiting: _Waiting) -> None:
        sock = waiting.conn.socket
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(waiting, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(waiting, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as e:
            log.info("TLS handshake with %s failed: %s", waiting.conn.remote_addr, e)
            self._drop(waiting)
            return
        waiting.conn.tls_ready = True
        waiting.conn.ssl_env = self.server.ssl_adapter.get_environ(sock)
        waiting.state = "head"
        self._watch(waiting, selectors.EVENT_READ)
        self._read_head(waiting)

    def _read_head(self, waiting: _Waiting) -> None:
        while True:
            data = _recv(waiting.conn.socket)
            if data is None:
                return                      # nothing more now
            if not data:                    # the client closed: cheroot answers what came (or nothing)
                if waiting.head:
                    self._to_worker(waiting)
                else:
                    self._drop(waiting)
                return
            waiting.head += data
            if self._head_ready(waiting):
                self._to_worker(waiting)
                return

    def _head_ready(self, waiting: _Waiting) -> bool:
        """Whether cheroot can parse the head without waiting: it ends, it is too long already (cheroot
        answers 413/414), or its first line does not end in CRLF (cheroot answers 400)."""
        head = waiting.head
        start = max(waiting.scanned - 2, 0)
        waiting.scanned = len(head)
        if head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0:
            return True
        if len(head) > self.server.max_request_header_size + 1024:
            return True
        first_end = head.find(b"\n")
        return first_end > 0 and head[first_end - 1] != 0x0D

    def _to_worker(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        conn = waiting.conn
        conn.socket.settimeout(self.server.timeout)
        _put_back(conn, bytes(waiting.head))
        self.server.to_worker(conn)

    def _discard(self, waiting: _Waiting) -> None:
        sock = waiting.conn.socket
        for _ in range(DISCARD_PIECES):     # (then the others' turn: a client may send faster than this)
            try:
                data = socket.socket.recv(sock, PIECE)       # the raw bytes (of TLS records too)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._drop(waiting)
                return
        idle = min(LINGER_IDLE_SECONDS, self.server.timeout)
        waiting.idle_deadline = min(waiting.deadline, time.monotonic() + idle)

    def _expire(self, now: float) -> None:
        for waiting in [w for w in self._waiting.values() if w.idle_deadline <= now]:
            if waiting.state == "head" and waiting.head:      # a request began: 408, then linger
                _send_quietly(waiting.conn.socket, _timeout_answer(self.server.timeout))
                self._forget(waiting)
                self._start_linger(waiting.conn, now)
            else:
                self._drop(waiting)

    def _drop(self, waiting: _Waiting) -> None:
        try:
            self._forget(waiting)
        except (KeyError, ValueError, OSError):
            pass
        _real_close(waiting.conn)


def _recv(sock) -> bytes | None:
    """What the client sent (b"" when it closed), or None when it sent nothing more yet."""
    try:
        return sock.recv(PIECE)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except (ssl.SSLError, OSError):
        return b""


def _timeout_answer(seconds: float) -> bytes:
    text = f"the request line and headers did not arrive within {seconds:g} s\n".encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.send(data)
    except (OSError, ValueError):
        pass


def _real_close(conn) -> None:
    try:
        cheroot_server.HTTPConnection.close(conn)
    except (OSError, ValueError):
        pass


# -- what a worker reads: the head the gate read, then the socket -------------------------------------------

class _Replay(_pyio.RawIOBase):
    """A socket's bytes, with some read already (by the gate) put back in front of them."""

    def __init__(self, sock):
        super().__init__()
        self._socket_io = socket.SocketIO(sock, "rb")
        self._pending = memoryview(b"")

    def put_back(self, data: bytes) -> None:
        self._pending = memoryview(bytes(self._pending) + data)

    def take(self) -> bytes:
        data, self._pending = bytes(self._pending), memoryview(b"")
        return data

    def has_pending(self) -> bool:
        return len(self._pending) > 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1):
        # a reader asking for 10**12 bytes (cheroot: a chunk size, a Content-Length) gets what there is,
        # in pieces, rather than a buffer of that size allocated up front
        return super().read(PIECE if size is None or size < 0 or size > PIECE else size)

    def readinto(self, buffer) -> int | None:
        if self._pending:
            n = min(len(buffer), len(self._pending))
            buffer[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._socket_io.readinto(buffer)

    def close(self) -> None:
        self._socket_io.close()
        super().close()


class _GatedReader(StreamReader):
    """cheroot's socket reader (`conn.rfile`) over a _Replay."""

    def __init__(self, sock, bufsize: int = _pyio.DEFAULT_BUFFER_SIZE):
        _pyio.BufferedReader.__init__(self, _Replay(sock), bufsize)
        self.bytes_read = 0

    def has_data(self) -> bool:
        return super().has_data() or self.raw.has_pending()


def _buffered(conn) -> bytes:
    """The bytes a connection's reader holds that were not read yet (a pipelined request)."""
    rfile, out = conn.rfile, bytearray()
    while rfile.has_data():
        out += rfile.read(len(rfile.peek(1)))
    if isinstance(rfile, _GatedReader):
        out += rfile.raw.take()
    return bytes(out)


def _put_back(conn, head: bytes) -> None:
    if not isinstance(conn.rfile, _GatedReader):
        old, conn.rfile = conn.rfile, _GatedReader(conn.socket, conn.rbufsize)
        old.close()
    conn.rfile.raw.put_back(head)


# -- connections and requests -----------------------------------------------------------------------------

class Request(cheroot_server.HTTPRequest):
    body = None                            # the request's wsgi.input (Gateway)

    def send_headers(self) -> None:
        """An answer to a request whose body was not read (a refusal, a timeout) closes the connection,
        through the gate; cheroot would read the rest of the body first, in this thread."""
        if self.body is not None and not self.body.finished():
            self.close_connection = True
            self.conn.discard_rest = True
        super().send_headers()


class Connection(cheroot_server.HTTPConnection):
    RequestHandlerClass = Request
    tls_ready = False                      # the gate did the TLS handshake
    discard_rest = False                   # close through the gate (Request.send_headers)

    def close(self) -> None:
        """Through the gate when the client sent more than was read (a refused body, the rest of a request
        cheroot refused, 414 or 413): closing a socket with unread bytes resets the connection, and the
        client may lose the answer it was about to read."""
        if self.server.gate.is_alive() and (self.discard_rest or self._unread()):
            self.discard_rest = False
            self.server.gate.linger(self)
            return
        super().close()

    def _unread(self) -> bool:
        if self.rfile.has_data():
            return True
        try:
            # (a socket with a timeout waits for data before any recv, MSG_DONTWAIT or not)
            self.socket.setblocking(False)
            return bool(socket.socket.recv(self.socket, 1, socket.MSG_PEEK))
        except (OSError, ValueError):        # BlockingIOError: nothing unread; others: closed already
            return False


class Gateway(wsgi.Gateway_10):
    def get_environ(self) -> dict:
        env = super().get_environ()
        req = self.req
        timeout = self.req.server.timeout
        req.body = ChunkedBody(req.conn.rfile, timeout) if req.chunked_read else SizedBody(req.rfile, timeout)
        env["wsgi.input"] = req.body
        return env


# -- request bodies ---------------------------------------------------------------------------------------

class _Body:
    """wsgi.input: a client silent for the timeout is a BadBody(408), not an OSError (a 500)."""

    def __init__(self, rfile, timeout: float):
        self.rfile = rfile
        self.timeout = timeout

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except TimeoutError:
            raise BadBody(408, f"the client sent nothing for {self.timeout:g} s inside the request body") from None

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line

    def close(self) -> None:
        pass


class SizedBody(_Body):
    """A body of Content-Length bytes (cheroot's KnownLengthRFile)."""

    def read(self, size: int | None = -1) -> bytes:
        return self._call(self.rfile.read, None if size is None or size < 0 else size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._call(self.rfile.readline, None if size is None or size < 0 else size)

    def finished(self) -> bool:
        return self.rfile.remaining <= 0


class ChunkedBody(_Body):
    """A body in the chunked transfer coding, decoded as it is read, at most PIECE bytes at a time (cheroot's
    ChunkedRFile reads a whole chunk into memory, whatever size it announces)."""

    def __init__(self, rfile, timeout: float):
        super().__init__(rfile, timeout)
        self._left = 0                     # bytes left in the current chunk
        self._done = False

    def finished(self) -> bool:
        return self._done

    def read(self, size: int | None = -1) -> bytes:
        out = bytearray()
        while not self._done and (size is None or size < 0 or len(out) < size):
            if not self._left:
                self._next_chunk()
                continue
            want = self._left if size is None or size < 0 else min(self._left, size - len(out))
            out += self._piece(self.rfile.read, min(want, PIECE))
        return bytes(out)

    def readline(self, size: int | None = -1) -> bytes:
        out = bytearray()
        while not self._done and not out.endswith(b"\n") and (size is None or size < 0 or len(out) < size):
            if not self._left:
                self._next_chunk()
                continue
            want = self._left if size is None or size < 0 else min(self._left, size - len(out))
            out += self._piece(self.rfile.readline, min(want, PIECE))
        return bytes(out)

    def _piece(self, fn, n: int) -> bytes:
        data = self._call(fn, n)
        if not data:
            raise BadBody(400, "the chunked request body ended inside a chunk")
        self._left -= len(data)
        if not self._left and self._call(self.rfile.read, 2) != b"\r\n":
            raise BadBody(400, "malformed chunked request body: a chunk does not end in CRLF")
        return data

    def _next_chunk(self) -> None:
        line = self._line("a chunk size")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 15 or size_text.translate(None, HEX_DIGITS):
            raise BadBody(400, f"malformed chunked request body: chunk size {size_text[:20]!r}")
        self._left = int(size_text, 16)
        if not self._left:
            self._skip_trailers()
            self._done = True

    def _skip_trailers(self) -> None:
        for _ in range(MAX_TRAILERS):
            if self._line("the trailer").strip() == b"":
                return
        raise BadBody(400, "malformed chunked request body: too many trailer lines")

    def _line(self, what: str) -> bytes:
        line = self._call(self.rfile.readline, MAX_CHUNK_LINE)
        if not line:
            raise BadBody(400, f"the chunked request body ended before {what}")
        if not line.endswith(b"\n"):
            raise BadBody(400, f"malformed chunked request body: {what} line is too long")
        return line
