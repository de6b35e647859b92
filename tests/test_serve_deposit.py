"""`tinyfs serve`, depositing over WebDAV: transactions by MKCOL, PUT and friends, commit by MOVE; owners,
conflicts, cut uploads and a killed server; and `Archive("http://...")` depositing and reading."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import check_archive_ok
from serving import served

import tinyfs
from tinyfs.core.errors import Forbidden, NotFound

pytestmark = pytest.mark.core
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def dav(srv, method: str, path: str, user: str = "alice", **kw) -> requests.Response:
    return requests.request(method, srv.url + path, auth=srv.auth(user), timeout=60, **kw)


def commit(srv, rid: str, user: str = "alice") -> requests.Response:
    return dav(srv, "MOVE", f"transactions/{rid}", user, headers={"Destination": srv.url + f"commit/{rid}"})


def instance_bag(archive, rid: str, iid: str) -> Path:
    [bag] = Path(archive.root.root, "resources").glob(f"**/{rid}/instances/{iid}")
    return bag


def validate_bag(bag: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(bag)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_deposit_by_webdav_is_committed_by_move_and_is_a_valid_bag(archive):
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/book").status_code == 201
        assert dav(srv, "MKCOL", "transactions/book").status_code == 405
        assert dav(srv, "MKCOL", "transactions/book/pages").status_code == 201
        r = dav(srv, "PUT", "transactions/book/pages/p1.txt", data=b"page one\n",
                headers={"X-OC-Mtime": "1600000000.5", "X-Tinyfs-Mode": "640"})
        assert r.status_code == 201, r.text
        assert dav(srv, "PUT", "transactions/book/notes.txt", data=b"first").status_code == 201
        assert dav(srv, "PUT", "transactions/book/notes.txt", data=b"second").status_code == 204
        assert dav(srv, "GET", "transactions/book/notes.txt").content == b"second"
        assert dav(srv, "COPY", "transactions/book/notes.txt",
                   headers={"Destination": srv.url + "transactions/book/copy.txt"}).status_code == 201
        assert dav(srv, "MOVE", "transactions/book/copy.txt",
                   headers={"Destination": srv.url + "transactions/book/pages/p2.txt"}).status_code == 201
        assert dav(srv, "PUT", "transactions/book/gone.txt", data=b"x").status_code == 201
        assert dav(srv, "DELETE", "transactions/book/gone.txt").status_code == 204
        assert dav(srv, "PUT", "transactions/book/missing/parent.txt", data=b"x").status_code == 409
        proppatch = ('<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:T="urn:tinyfs:"><D:set>'
                     "<D:prop><T:message>scanned pages</T:message><T:label>v1</T:label></D:prop>"
                     "</D:set></D:propertyupdate>")
        assert dav(srv, "PROPPATCH", "transactions/book", data=proppatch).status_code == 207
        r = commit(srv, "book")
        assert r.status_code == 201, r.text
        iid = r.json()["instance"]
        assert r.headers["Location"] == f"/instances/book/{iid}/"
        assert dav(srv, "PROPFIND", "transactions/book", headers={"Depth": "0"}).status_code == 404
        assert dav(srv, "GET", "resources/book/pages/p2.txt").content == b"second"
    doc = archive.root.instance("book", iid)
    assert doc.message == "scanned pages" and doc.label == "v1" and doc.creator == "alice"
    p1 = doc.state.files["pages/p1.txt"]
    assert (p1.mode & 0o777, p1.mtime_ns) == (0o640, 1_600_000_000_500_000_000)
    assert sorted(doc.state.files) == ["notes.txt", "pages/p1.txt", "pages/p2.txt"]
    validate_bag(instance_bag(archive, "book", iid))
    check_archive_ok(archive.root.root)


def test_only_the_owner_may_change_commit_or_drop_a_transaction(archive):
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/mine").status_code == 201
        assert dav(srv, "PUT", "transactions/mine/a.txt", data=b"a").status_code == 201
        assert dav(srv, "PUT", "transactions/mine/a.txt", "bob", data=b"evil").status_code == 403
        assert dav(srv, "PUT", "transactions/mine/b.txt", "bob", data=b"evil").status_code == 403
        assert dav(srv, "DELETE", "transactions/mine/a.txt", "bob").status_code == 403
        assert dav(srv, "DELETE", "transactions/mine", "bob").status_code == 403
        assert dav(srv, "MKCOL", "transactions/mine/d", "bob").status_code == 403
        assert commit(srv, "mine", "bob").status_code == 403
        assert dav(srv, "GET", "transactions/mine/a.txt", "bob").content == b"a"      # reading is allowed
        assert commit(srv, "mine").status_code == 201
    assert archive.get("mine").read("a.txt") == b"a"
    assert sorted(archive.get("mine").state().files) == ["a.txt"]


def test_a_conflicting_commit_answers_409_and_keeps_the_transaction(archive):
    with archive.new("shared") as t:
        t.add_bytes("doc.txt", b"v1")
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/shared").status_code == 201
        assert dav(srv, "GET", "transactions/shared/doc.txt").content == b"v1"
        assert dav(srv, "PUT", "transactions/shared/doc.txt", data=b"v2 from alice").status_code == 204
        with tinyfs.Archive(archive.root.root).get("shared", "a") as other:      # meanwhile, elsewhere
            other.add_bytes("doc.txt", b"v2 from the api")
        r = commit(srv, "shared")
        assert r.status_code == 409, r.text
        assert "doc.txt" in r.text
        assert dav(srv, "GET", "transactions/shared/doc.txt").content == b"v2 from alice"
        assert dav(srv, "DELETE", "transactions/shared").status_code == 204
        assert dav(srv, "PROPFIND", "transactions/shared", headers={"Depth": "0"}).status_code == 404
    assert archive.get("shared").read("doc.txt") == b"v2 from the api"


LOCK_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
             b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>davfs2</D:owner></D:lockinfo>')


def test_no_commit_while_a_lock_is_held_inside(archive):
    """davfs2 locks a file it creates and uploads it after close; its mv to commit/ comes first, with the
    tokens. The commit is refused while a lock is held, so the placeholder is never what gets stored."""
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/held").status_code == 201
        r = dav(srv, "LOCK", "transactions/held/scan.tif", data=LOCK_BODY,
                headers={"Depth": "0", "Timeout": "Second-600"})
        assert r.status_code == 201, r.text           # a lock on an unmapped name: an empty placeholder
        token = r.headers["Lock-Token"]
        moved = dav(srv, "MOVE", "transactions/held", headers={
            "Destination": srv.url + "commit/held", "If": f"<{srv.url}transactions/held/scan.tif> ({token})"})
        assert moved.status_code == 423, moved.text
        assert "/transactions/held/scan.tif is locked" in moved.text
        assert "held" not in [r.rid for r in archive]
        assert dav(srv, "PUT", "transactions/held/scan.tif", data=b"the scan",
                   headers={"If": f"({token})"}).status_code in (200, 204)
        assert dav(srv, "UNLOCK", "transactions/held/scan.tif", headers={"Lock-Token": token}).status_code == 204
        assert commit(srv, "held").status_code == 201
    assert archive.get("held").read("scan.tif") == b"the scan"


def test_a_cut_upload_leaves_nothing_and_the_server_serves_on(archive):
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/cut").status_code == 201
        assert dav(srv, "PUT", "transactions/cut/kept.txt", data=b"old").status_code == 201
        for name in ("new.bin", "kept.txt"):
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                import base64

                token = base64.b64encode(b"alice:alice-pw").decode()
                s.sendall(f"PUT /transactions/cut/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                          f"Content-Length: 1000000\r\n\r\n".encode() + b"y" * 1000)
            # the server notices the short body when the socket closes
        import time

        deadline = time.monotonic() + 10
        while dav(srv, "PROPFIND", "transactions/cut/new.bin", headers={"Depth": "0"}).status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert dav(srv, "GET", "transactions/cut/kept.txt").content == b"old"
        assert commit(srv, "cut").status_code == 201
    assert sorted(archive.get("cut").state().files) == ["kept.txt"]


def test_what_was_answered_survives_kill_9_of_the_server(archive):
    with served(archive, users=USERS) as srv:
        assert dav(srv, "MKCOL", "transactions/crash").status_code == 201
        assert dav(srv, "PUT", "transactions/crash/a.bin", data=os.urandom(300_000)).status_code == 201
        expected = dav(srv, "GET", "transactions/crash/a.bin").content
        srv.kill()
    with served(archive, users=USERS) as srv:
        assert dav(srv, "GET", "transactions/crash/a.bin").content == expected
        assert commit(srv, "crash").status_code == 201
    assert archive.get("crash").read("a.bin") == expected
    check_archive_ok(archive.root.root)


def tree_with_everything(top: Path) -> Path:
    src = top / "src"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    (src / "ü odd name.txt").write_bytes(b"odd\n")
    os.link(src / "sub" / "data.bin", src / "hard.bin")
    os.symlink("sub/data.bin", src / "link")
    os.setxattr(src / "ü odd name.txt", "user.note", b"kept")
    os.utime(src / "sub" / "data.bin", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    os.chmod(src / "ü odd name.txt", 0o600)
    return src


def test_archive_url_deposits_and_reads_like_a_local_archive(archive, tmp_path):
    src = tree_with_everything(tmp_path)
    with served(archive, users=USERS) as srv:
        with tinyfs.Archive(srv.url, auth=srv.auth("alice")) as remote:
            with remote.new("remote", message="over http") as t:
                t.add(src, path="tree")
                t.add_bytes("extra/note.txt", b"note")
            assert "remote" in list(remote)
            res = remote.get("remote")
            assert res.read("tree/sub/data.bin") == (src / "sub/data.bin").read_bytes()
            [doc] = res.instances
            assert doc.message == "over http" and doc.creator == "alice"
            events = list(remote.events(start="2000-01-01T00:00:00Z"))
            assert any(e["event"] == "transaction.committed" and e["resource"] == "remote" for e in events)
            with pytest.raises(RuntimeError):
                with remote.get("remote", "a") as t:
                    t.remove("extra/note.txt")
                    raise RuntimeError("rolled back")
            assert "extra/note.txt" in remote.get("remote").state().files
            with pytest.raises(NotFound):
                remote.get("absent")
        with tinyfs.Archive(srv.url, auth=("alice", "wrong")) as bad, pytest.raises(Forbidden):
            list(bad)
    local = archive.root.state("remote")
    data = local.files["tree/sub/data.bin"]
    assert data.digest == hashlib.sha512((src / "sub/data.bin").read_bytes()).hexdigest()
    assert data.mtime_ns == 1_500_000_000_123_456_789
    assert local.links["tree/link"].target == "sub/data.bin"
    assert "tree/sub/empty" in local.dirs
    odd = local.files["tree/ü odd name.txt"]
    assert odd.mode & 0o777 == 0o600 and odd.xattrs == {"user.note": "a2VwdA=="}
    assert local.group_of("tree/hard.bin") == local.group_of("tree/sub/data.bin") is not None
    validate_bag(instance_bag(archive, "remote", archive.root.head("remote")))
