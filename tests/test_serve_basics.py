"""`tinyfs serve`: who may do what, and requests that cannot name anything in the archive."""

from __future__ import annotations

import pytest
import requests
from conftest import run_tinyfs
from serving import served

pytestmark = pytest.mark.core


def test_no_credentials_and_a_wrong_password_are_refused_with_401(archive):
    with served(archive, users={"alice": "s3cret"}) as srv:
        r = requests.get(srv.url + "resources/")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(srv.url + "resources/", auth=("alice", "wrong")).status_code == 401
        assert requests.get(srv.url + "resources/", auth=("bob", "s3cret")).status_code == 401
        assert requests.request("PROPFIND", srv.url, auth=srv.auth("alice"),
                                headers={"Depth": "0"}).status_code == 207


def test_anonymous_read_may_read_but_not_write(archive):
    with served(archive, "--anonymous", "read") as srv:
        assert requests.request("PROPFIND", srv.url, headers={"Depth": "0"}).status_code == 207
        assert requests.request("MKCOL", srv.url + "transactions/r1").status_code == 401


@pytest.mark.parametrize("path", ["resources/%2e%2e/tinyfs.json", "resources/../tinyfs.json",
                                  "resources/%2E%2E/%2e%2e/etc/passwd", "a/./b", "resources/%00"])
def test_paths_that_climb_or_hold_nul_are_400(archive, path):
    import http.client

    with served(archive, "--anonymous", "read") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/" + path)          # sent as written (requests would normalise '..')
        r = conn.getresponse()
        assert r.status == 400, (path, r.status, r.read())
        conn.close()
        assert requests.request("PROPFIND", srv.url, headers={"Depth": "0"}).status_code == 207


def test_serve_passwd_writes_an_argon2_hash_never_the_password(tmp_path):
    users = tmp_path / "users"
    run_tinyfs("serve-passwd", users, "alice", input="correct horse\n")
    text = users.read_text()
    assert text.startswith("alice:$argon2") and "correct horse" not in text
    r = run_tinyfs("serve-passwd", users, "bad name", input="x\n", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
