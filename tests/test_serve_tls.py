"""TLS for `tinyfs serve`: directly (--cert/--key), and behind nginx with docs/nginx-tinyfs.conf as shipped
(paths and ports replaced), nginx checking passwords and telling tinyfs who logged in (--proxy-header)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from seaweed import free_ports
from serving import served

import tinyfs
from tinyfs.core.errors import Forbidden

pytestmark = pytest.mark.core
PROJECT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "tls.crt", where / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def deposit_and_read(url: str, auth, cert: Path, rid: str) -> None:
    with tinyfs.Archive(url, auth=auth, verify=str(cert)) as remote:
        with remote.new(rid, message="over tls") as t:
            t.add_bytes("a/b.txt", b"secret bytes")
        assert remote.get(rid).read("a/b.txt") == b"secret bytes"
        assert remote.get(rid).instances[0].creator == auth[0]


def test_tls_directly(archive, tmp_path):
    cert, key = self_signed(tmp_path)
    with served(archive, "--cert", str(cert), "--key", str(key), users={"alice": "pw"}, scheme="https") as srv:
        deposit_and_read(srv.url, ("alice", "pw"), cert, "direct")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(srv.url + "resources/", auth=("alice", "pw"))          # an unknown certificate
        plain = srv.url.replace("https://", "http://")
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(plain + "resources/", auth=("alice", "pw"), timeout=5)


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx missing (apt-get install nginx-light)")
def test_behind_nginx_with_the_shipped_config(archive, tmp_path):
    cert, key = self_signed(tmp_path)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "nginx-pw"], check=True, capture_output=True,
                            text=True).stdout.strip()
    (tmp_path / "htpasswd").write_text(f"carol:{hashed}\n")
    nginx_port, = free_ports(1)
    with served(archive, "--proxy-header", "X-Remote-User") as srv:
        conf = (PROJECT / "docs" / "nginx-tinyfs.conf").read_text()
        for old, new in [("listen 443 ssl;", f"listen 127.0.0.1:{nginx_port} ssl;"), ("listen [::]:443 ssl;", ""),
                         ("/etc/tinyfs/tls/archive.crt", str(cert)), ("/etc/tinyfs/tls/archive.key", str(key)),
                         ("/etc/tinyfs/htpasswd", str(tmp_path / "htpasswd")),
                         ("http://127.0.0.1:8080", f"http://127.0.0.1:{srv.port}")]:
            assert old in conf, old
            conf = conf.replace(old, new)
        (tmp_path / "site.conf").write_text(conf)
        (tmp_path / "nginx.conf").write_text(
            ("user root; " if os.geteuid() == 0 else "") +     # (workers read the test's private files)
            f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
            "events {}\n"
            f"http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
            f"  include {tmp_path}/site.conf; }}\n")
        proc = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                                stderr=subprocess.PIPE)
        try:
            url = f"https://127.0.0.1:{nginx_port}/"
            deadline = time.monotonic() + 10
            while True:
                try:
                    requests.get(url, verify=str(cert), timeout=2)
                    break
                except requests.exceptions.ConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "error.log").read_text()
                    time.sleep(0.1)
            deposit_and_read(url, ("carol", "nginx-pw"), cert, "proxied")
            with tinyfs.Archive(url, auth=("carol", "wrong"), verify=str(cert)) as bad, pytest.raises(Forbidden):
                list(bad)
            forged = requests.get(url + "resources/", headers={"X-Remote-User": "carol"}, verify=str(cert))
            assert forged.status_code == 401
            moved = requests.request("MKCOL", url + "transactions/viaproxy", auth=("carol", "nginx-pw"),
                                     verify=str(cert))
            assert moved.status_code == 201
            r = requests.request("MOVE", url + "transactions/viaproxy", auth=("carol", "nginx-pw"), verify=str(cert),
                                 headers={"Destination": url + "commit/viaproxy"})
            assert r.status_code in (200, 201), r.text         # (nothing in it: nothing committed, 200)
        finally:
            proc.terminate()
            proc.wait(10)
