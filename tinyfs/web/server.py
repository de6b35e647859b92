"""The `tinyfs serve` process: one archive, one cheroot server (a thread per request, TLS optional).

The server holds the archive's lock as a mount does (core.layout.lock_archive): one process owns an
archive's open transactions, so a mount and a server of one archive are not run at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from cheroot import wsgi

from ..core.deposit import Deposits
from ..core.formats import start_identifier, stop_identifier
from ..core.layout import ArchiveRoot
from ..core.recover import recover
from . import gate
from .app import Context, make_app
from .auth import Access, Users

log = logging.getLogger(__name__)
THREADS = 32                     # requests served at once (readers, uploads, a commit waiting for its disk)
TIMEOUT = 60                     # seconds for a request's line and headers; of silence inside its body
MAX_HEADER = 64 * 1024           # bytes of request line and headers
# connections the kernel completes before the server accepts them: cheroot's 5 dropped the handshakes of a
# burst of clients (they waited for TCP's retransmission, a second or more)
BACKLOG = 1024
# idle keep-alive connections kept open. cheroot keeps one between requests in its selector (no thread), but
# by default only 10: past that every answer said `Connection: close`, so with more clients than that (55
# in tests/test_serve_load.py) most requests opened a new TCP connection, and their reconnects overflowed
# the listen queue. An idle connection costs a descriptor and a few KiB; 256 stay well inside the usual
# limit of 1,024 descriptors.
KEEP_ALIVE = 256


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def build(root: str | os.PathLike, listen: str, *, users: str | None = None, anonymous: str = "none",
          proxy_header: str | None = None, cert: str | None = None, key: str | None = None,
          threads: int = THREADS, timeout: int = TIMEOUT) -> tuple[wsgi.Server, Context]:
    """The server, not started; ValueError/TinyfsError for a bad option (nothing changed)."""
    host, port = parse_listen(listen)
    if not timeout > 0:
        raise ValueError(f"--timeout {timeout}: a number of seconds above 0")
    archive = ArchiveRoot(root)
    access = Access(Users(users) if users else None, anonymous, proxy_header)
    if access.users is None and proxy_header is None and anonymous != "write":
        log.warning("no --users and no --proxy-header: only anonymous %s access is possible",
                    "read" if anonymous == "read" else "(none)")
    if bool(cert) != bool(key):
        raise ValueError("--cert and --key go together")
    ctx = Context(archive, access)
    server = gate.Server((host, port), make_app(ctx), numthreads=threads, timeout=timeout, server_name="tinyfs")
    server.max_request_header_size = MAX_HEADER
    server.request_queue_size = BACKLOG
    server.keep_alive_conn_limit = KEEP_ALIVE
    if cert:
        server.ssl_adapter = gate.TLSAdapter(cert, key)
    return server, ctx


def serve(root: str | os.PathLike, listen: str, **options) -> int:
    """Serve until SIGTERM or SIGINT; recovery first, as a mount does."""
    from ..core.layout import lock_archive

    # the CLI lets SIGPIPE end it (`tinyfs cat | head`); a server must see EPIPE of a client gone instead
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    server, ctx = build(root, listen, **options)
    lock = lock_archive(ctx.archive)
    try:
        for line in recover(ctx.archive, store=False):
            log.info("recovery: %s", line)
        ctx.deposits = Deposits(ctx.archive)
        ctx.archive.history.open()
        start_identifier(ctx.archive)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        server.prepare()
        scheme = "https" if options.get("cert") else "http"
        host, port = server.bind_addr[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"tinyfs: serving {ctx.archive.root} on {scheme}://{shown}:{port}/", file=sys.stderr, flush=True)
        _notify_ready()
        try:
            server.serve()
        except Stopping:
            log.info("stopping")
    finally:
        server.stop()
        if ctx.deposits is not None:
            ctx.deposits.close()
        stop_identifier(ctx.archive)
        os.close(lock)
    return 0


class Stopping(SystemExit):
    """SIGTERM or SIGINT: raised in the main thread; cheroot's loop lets SystemExit through (and logs others)."""


def _stop(*_) -> None:
    raise Stopping()


def _notify_ready() -> None:
    """sd_notify READY=1 when run as a Type=notify systemd service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(b"READY=1")


__all__ = ["build", "serve", "parse_listen"]
