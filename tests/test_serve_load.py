"""One `tinyfs serve` and many clients: connections kept alive.
"""

from __future__ import annotations

import base64
import http.client
import os

import pytest
from serving import served

pytestmark = pytest.mark.core
USERS = {f"user{i}": f"pw-{i}-secret" for i in range(5)}


# -- what keeps the load test's clients on their connections -------------------------------------------

def basic(srv, user: str) -> str:
    return "Basic " + base64.b64encode(":".join(srv.auth(user)).encode()).decode()


def test_a_put_keeps_the_connection_alive(archive):
    """rclone or davfs2 upload thousands of files over a few connections: the server must not close one
    after each PUT (it did: the body was taken as unread when the upload stopped at its Content-Length)."""
    with served(archive, users=USERS) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        headers = {"Authorization": basic(srv, "user0")}

        def send(method: str, path: str, body=None, **kw) -> http.client.HTTPResponse:
            conn.request(method, path, body=body, headers=headers, **kw)
            r = conn.getresponse()
            r.read()
            return r

        assert send("MKCOL", "/transactions/ka").status == 201
        sock = conn.sock
        for i in range(5):
            r = send("PUT", f"/transactions/ka/f{i}", os.urandom(100_000 * i))
            assert r.status == 201 and r.getheader("Connection") != "close", (i, r.getheaders())
            r = send("PUT", f"/transactions/ka/c{i}", iter([b"chunked ", b"body"]), encode_chunked=True)
            assert r.status == 201 and r.getheader("Connection") != "close", (i, r.getheaders())
        assert conn.sock is sock, "the client had to connect again"
        assert send("GET", "/transactions/ka/c0").status == 200 and conn.sock is sock
        conn.close()


def test_many_idle_clients_keep_their_connections(archive):
    """More idle keep-alive clients than cheroot keeps by default (10): each is answered on its own
    connection, which stays open for its next request."""
    with archive.new("lib") as t:
        t.add_bytes("a.txt", b"a")
    with served(archive, users=USERS) as srv:
        conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in range(60)]
        headers = {"Authorization": basic(srv, "user1")}
        for rnd in range(2):
            for k, conn in enumerate(conns):
                conn.request("GET", "/resources/lib/a.txt", headers=headers)
                r = conn.getresponse()
                assert r.read() == b"a" and r.getheader("Connection") != "close", (rnd, k, r.getheaders())
        socks = [c.sock for c in conns]
        assert all(s is not None for s in socks)
        for conn, sock in zip(conns, socks, strict=True):
            conn.request("GET", "/resources/lib/a.txt", headers=headers)
            assert conn.getresponse().read() == b"a" and conn.sock is sock
            conn.close()
