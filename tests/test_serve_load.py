"""One `tinyfs serve` under load: 50 clients reading and 5 depositing at once, for a minute.

Readers GET files of committed resources (whole, and single ranges), list directories with PROPFIND and
fetch `?format=json`; depositors open a transaction (MKCOL), PUT a few files and commit (MOVE to
/commit/<rid>), over and over. Every client keeps its connection alive (a requests.Session each), so
there are more open connections (55) than the server has worker threads (server.THREADS, 32).

What must hold: every answer has the expected status, every body read equals the bytes stored, every
deposit answered 201 is in the archive with exactly the files sent and nothing else is (no partial
deposit, no transaction left), readers see only whole deposits, every client gets on with its work (no
starvation), no answer closes its connection, the archive is clean afterwards (fsck, bagit), and the
server's memory does not grow with the number of requests served.

Below it, two quick tests of what the load test first found: a PUT closed its connection, and so did
every answer while more than 10 clients sat idle on theirs (server.KEEP_ALIVE, server.BACKLOG).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import random
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests
from conftest import check_archive_ok
from serving import served

from tinyfs.core.layout import LOCKS

pytestmark = pytest.mark.core

# The issue asks for a minute; TINYFS_LOAD_SECONDS shortens it for a quick try while changing the server.
SECONDS = float(os.environ.get("TINYFS_LOAD_SECONDS", "60"))
READERS, DEPOSITORS = 50, 5
USERS = {f"user{i}": f"pw-{i}-secret" for i in range(5)}
FILES_PER_DEPOSIT = 6
TIMEOUT = 120                   # of one request: a request stuck this long is a hang, reported as an error
MIB = 1 << 20
# Memory bounds, from measurements on a 2-core VM (see the comment at the assertions)
RSS_CAP_MIB = 200
RSS_GROWTH_MIB = 40
SLOWEST = 30                    # seconds: no request may wait longer (a connection left unserved would)


# -- what the archive holds before the load: a few resources of files of every size class -------------

def library_files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"notes/n{i:02d}.txt": rng.randbytes(rng.randrange(0, 40_000)) for i in range(12)}
    files.update({f"data/part {i} ü.bin": rng.randbytes(rng.randrange(100_000, 600_000)) for i in range(4)})
    files["empty.txt"] = b""
    files["data/medium.bin"] = rng.randbytes(2 * MIB + 123)          # whole in memory (<= 4 MiB)
    if seed == 0:
        # over http.WHOLE_IN_MEMORY: streamed and checked at its end; a Range is served after a check of
        # the whole file (<= VERIFY_FOR_RANGE)
        files["data/big.bin"] = rng.randbytes(6 * MIB + 7)
    return files


LIBRARY = {f"lib{k}": library_files(k) for k in range(3)}


# -- what depositors send: derived from (rid, round, index), so a reader can check it too ----------------

def deposit_file(rid: str, rnd: int, j: int) -> tuple[str, bytes]:
    rng = random.Random(f"{rid}/{rnd}/{j}")
    size = rng.choice((0, 1, 4096, rng.randrange(1, 300_000)))
    return f"r{rnd:03d}/f{j}.dat", rng.randbytes(size)


def deposit_files(rid: str, rnd: int) -> dict[str, bytes]:
    return dict(deposit_file(rid, rnd, j) for j in range(FILES_PER_DEPOSIT))


@dataclass
class Chain:
    """The deposits of one resource, as answered: round i made instance iids[i]; each round adds the
    directory r<i>/ (a resource of one depositor holds rounds 0..n)."""
    rid: str
    iids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def committed(self) -> int:
        with self.lock:
            return len(self.iids)


@dataclass
class Tally:
    errors: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slowest: dict[str, float] = field(default_factory=dict)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    def count(self, what: str, took: float) -> None:
        with self.lock:
            self.ops[what] = self.ops.get(what, 0) + 1
            self.slowest[what] = max(self.slowest.get(what, 0.0), took)


class Client:
    """One client: a session (keep-alive) as one user; each call checks the status it gets."""

    def __init__(self, srv, user: str, tally: Tally, name: str):
        self.base, self.tally, self.name = srv.url, tally, name
        self.session = requests.Session()
        self.session.auth = srv.auth(user)
        self.done = 0

    def call(self, what: str, method: str, path: str, expect: int, **kw) -> requests.Response | None:
        t0 = time.monotonic()
        try:
            r = self.session.request(method, self.base + path, timeout=TIMEOUT, **kw)
            body = r.content
        except requests.RequestException as e:
            self.tally.error(f"{self.name}: {method} /{path}: {type(e).__name__}: {e}")
            return None
        took = time.monotonic() - t0
        self.tally.count(what, took)
        if r.headers.get("Connection", "").lower() == "close":
            self.tally.error(f"{self.name}: {method} /{path}: the server closed the connection (keep-alive)")
        self.done += 1
        if r.status_code != expect:
            self.tally.error(f"{self.name}: {method} /{path}: {r.status_code}, expected {expect}: {body[:300]!r}")
            return None
        return r

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.tally.error(f"{self.name}: {text}")


def url_of(rid: str, path: str = "") -> str:
    return f"resources/{rid}/" + quote(path)


def reader(client: Client, chains: list[Chain], until: float, seed: int) -> None:
    rng = random.Random(seed)
    rids = sorted(LIBRARY)
    while time.monotonic() < until:
        rid = rng.choice(rids)
        files = LIBRARY[rid]
        path = rng.choice(sorted(files))
        data = files[path]
        op = rng.random()
        if op < 0.40:                                       # a whole file
            if path == "data/big.bin" and rng.random() < 0.7:
                continue                                    # (it is big: fewer whole reads of it)
            r = client.call("get", "GET", url_of(rid, path), 200)
            if r is not None:
                client.check(r.content == data, f"GET {rid}/{path}: {len(r.content)} bytes differ from the "
                                                 f"{len(data)} stored")
        elif op < 0.55 and data:                            # one range
            first = rng.randrange(len(data))
            last = min(len(data) - 1, first + rng.randrange(1, 300_000))
            r = client.call("range", "GET", url_of(rid, path), 206, headers={"Range": f"bytes={first}-{last}"})
            if r is not None:
                client.check(r.content == data[first:last + 1], f"GET {rid}/{path} bytes={first}-{last} differ")
                client.check(r.headers.get("Content-Range") == f"bytes {first}-{last}/{len(data)}",
                             f"Content-Range {r.headers.get('Content-Range')}")
        elif op < 0.70:                                     # a listing
            folder = rng.choice(["", "notes/", "data/"])
            r = client.call("propfind", "PROPFIND", url_of(rid, folder), 207, headers={"Depth": "1"})
            if r is not None:
                expected = {p[len(folder):].split("/")[0] for p in files if p.startswith(folder)}
                client.check(members(r.content, f"/resources/{rid}/{folder}") == expected,
                             f"PROPFIND {rid}/{folder}: {sorted(members(r.content, f'/resources/{rid}/{folder}'))}")
        elif op < 0.80:                                     # the instance as JSON
            r = client.call("json", "GET", f"resources/{rid}?format=json", 200)
            if r is not None:
                state = r.json()["state"]
                client.check({p: e["digest"] for p, e in state.items()} ==
                             {p: hashlib.sha512(b).hexdigest() for p, b in files.items()},
                             f"?format=json of {rid}: another state")
        else:                                               # something a depositor committed
            read_deposit(client, rng.choice(chains), rng)


def read_deposit(client: Client, chain: Chain, rng: random.Random) -> None:
    """The head of a depositor's resource is a whole round: rounds 0..m, every file of each, where m is at
    least the last round answered 201 before the request (a commit is visible once answered)."""
    seen = chain.committed()
    if seen == 0:
        return
    r = client.call("deposit-json", "GET", f"resources/{chain.rid}?format=json", 200)
    if r is None:
        return
    state = r.json()["state"]
    rounds = {p.split("/")[0] for p in state}
    m = len(rounds)
    expected = {p: hashlib.sha512(b).hexdigest() for rnd in range(m) for p, b in deposit_files(chain.rid, rnd).items()}
    client.check(m >= seen and {p: e["digest"] for p, e in state.items()} == expected,
                 f"{chain.rid}: the head holds {sorted(rounds)}, not rounds 0..{m - 1} whole "
                 f"(at least {seen} answered)")
    rnd, j = rng.randrange(seen), rng.randrange(FILES_PER_DEPOSIT)
    path, data = deposit_file(chain.rid, rnd, j)
    r = client.call("deposit-get", "GET", url_of(chain.rid, path), 200)
    if r is not None:
        client.check(r.content == data, f"GET {chain.rid}/{path}: the bytes differ")


def members(xml: bytes, folder: str) -> set[str]:
    """The names a Depth 1 PROPFIND of `folder` lists (the folder itself left out)."""
    names = set()
    for href in ET.fromstring(xml).iter("{DAV:}href"):
        path = unquote(urlsplit(href.text).path)
        if path.rstrip("/") != folder.rstrip("/"):
            names.add(path.rstrip("/").rsplit("/", 1)[1])
    return names


def depositor(client: Client, chain: Chain, srv, until: float) -> None:
    rid = chain.rid
    while time.monotonic() < until:
        rnd = chain.committed()
        if client.call("mkcol", "MKCOL", f"transactions/{rid}", 201) is None:
            return
        if client.call("mkcol", "MKCOL", f"transactions/{rid}/r{rnd:03d}", 201) is None:
            return
        for path, data in deposit_files(rid, rnd).items():
            if client.call("put", "PUT", f"transactions/{rid}/{path}", 201, data=data) is None:
                return
        r = client.call("commit", "MOVE", f"transactions/{rid}", 201,
                        headers={"Destination": srv.url + f"commit/{rid}"})
        if r is None:
            return
        answer = r.json()
        client.check(answer["added"] == FILES_PER_DEPOSIT, f"commit of {rid} round {rnd}: {answer}")
        with chain.lock:
            chain.iids.append(answer["instance"])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_fifty_readers_and_five_depositors_for_a_minute(archive):
    for rid, files in LIBRARY.items():
        with archive.new(rid, message="library") as t:
            for path, data in files.items():
                t.add_bytes(path, data)
    chains = [Chain(f"dep{k}") for k in range(DEPOSITORS)]
    tally = Tally()
    users = sorted(USERS)
    with served(archive, users=USERS) as srv:
        # every user logs in once before the clock starts (argon2 takes ~50 ms a check, then it is remembered)
        for user in users:
            assert requests.get(srv.url + "resources/", auth=srv.auth(user), timeout=30).status_code in (200, 207)
        until = time.monotonic() + SECONDS
        clients, threads = [], []
        for k in range(READERS):
            c = Client(srv, users[k % len(users)], tally, f"reader{k}")
            clients.append(c)
            threads.append(threading.Thread(target=reader, args=(c, chains, until, k), name=c.name))
        for k, chain in enumerate(chains):
            c = Client(srv, users[k % len(users)], tally, f"depositor{k}")
            clients.append(c)
            threads.append(threading.Thread(target=depositor, args=(c, chain, srv, until), name=c.name))
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - started, rss_mib(srv.process.pid)))
            time.sleep(0.5)
        for t in threads:
            t.join()
        log = srv.output()
    slowest = {k: round(v, 2) for k, v in tally.slowest.items()}
    print(f"\n{sum(tally.ops.values())} requests in {SECONDS:.0f} s: {tally.ops}; slowest (s) {slowest}; "
          f"deposits {[len(c.iids) for c in chains]}; RSS MiB every 3 s {[round(m) for _, m in samples[::6]]}")
    assert not tally.errors, f"{len(tally.errors)} errors, the first:\n" + "\n".join(tally.errors[:20])
    assert "Traceback" not in log, log[-5000:]

    # no client starved: no request waited long, every reader got answers all along, every depositor
    # committed several times
    assert max(tally.slowest.values()) < SLOWEST, tally.slowest
    assert all(c.done >= 20 for c in clients[:READERS]), sorted(c.done for c in clients[:READERS])[:5]
    assert all(len(chain.iids) >= 2 for chain in chains), [len(chain.iids) for chain in chains]

    # every deposit answered 201 is there, with exactly the files sent, and nothing else is
    root = archive.root
    assert [p.name for p in root.transactions.iterdir() if p.name != LOCKS] == []
    assert sorted(root.resource_ids()) == sorted([*LIBRARY, *(c.rid for c in chains)])
    for chain in chains:
        assert root.instance_ids(chain.rid) == chain.iids
        sent: dict[str, bytes] = {}
        for rnd, iid in enumerate(chain.iids):
            sent.update(deposit_files(chain.rid, rnd))
            state = root.instance(chain.rid, iid).state
            assert {p: e.digest for p, e in state.files.items()} == \
                {p: hashlib.sha512(b).hexdigest() for p, b in sent.items()}, (chain.rid, rnd)
    check_archive_ok(root.root)

    # Memory. Measured on a 2-core VM: the server starts at ~45 MiB, reaches 60-65 MiB within seconds
    # (worker threads, their buffers, WsgiDAV's first requests), then climbs slowly as the cache of parsed
    # instance documents fills (core.layout: a budget of 32 MiB, estimated): ~70 MiB after a minute, 75-80
    # MiB in the third minute of a 3-minute run. So the last third's peak may pass the first third's by
    # the cache's budget and some slack of the allocator (RSS_GROWTH_MIB); a leak of ~3 KiB a request
    # would pass it (the clients make over 10,000 requests a minute). RSS_CAP_MIB is over twice the
    # highest figure seen.
    third = len(samples) // 3
    first, last = max(m for _, m in samples[:third]), max(m for _, m in samples[-third:])
    assert last <= first + RSS_GROWTH_MIB, (first, last, samples)
    assert max(m for _, m in samples) <= RSS_CAP_MIB, samples


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
