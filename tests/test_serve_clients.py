"""Real WebDAV and HTTP clients against `tinyfs serve`: the litmus suite, curl."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
from serving import served

pytestmark = pytest.mark.core
USERS = {"alice": "alice-pw"}


@pytest.mark.skipif(not shutil.which("litmus"), reason="litmus missing (apt-get install litmus)")
def test_litmus_passes_every_test_in_a_transaction(archive, tmp_path):
    with served(archive, users=USERS) as srv:
        assert requests.request("MKCOL", srv.url + "transactions/litmus", auth=srv.auth("alice")).status_code == 201
        r = subprocess.run(["litmus", srv.url + "transactions/litmus/", "alice", "alice-pw"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        summaries = [line for line in r.stdout.splitlines() if "summary for" in line]
        assert len(summaries) == 5, r.stdout[-3000:]          # basic, copymove, props, locks, http
        assert all(" 0 failed" in line for line in summaries), "\n".join(summaries)
        assert "WARNING" not in r.stdout, r.stdout[-3000:]
        assert r.returncode == 0


@pytest.mark.skipif(not shutil.which("curl"), reason="curl missing")
def test_curl_deposits_commits_and_fetches_ranges_and_the_tar(archive, tmp_path):
    src = tmp_path / "report.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    with served(archive, users=USERS) as srv:
        def curl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["curl", "-sS", "-u", "alice:alice-pw", *args], capture_output=True, timeout=60)

        assert curl("-X", "MKCOL", "-o", "/dev/null", "-w", "%{http_code}", srv.url + "transactions/cr").stdout == b"201"
        assert curl("-T", str(src), "-o", "/dev/null", "-w", "%{http_code}",
                    srv.url + "transactions/cr/report.bin").stdout == b"201"
        moved = curl("-X", "MOVE", "-H", f"Destination: {srv.url}commit/cr", srv.url + "transactions/cr")
        assert b'"instance"' in moved.stdout, moved
        part = curl("-r", "1000-1999", srv.url + "resources/cr/report.bin")
        assert part.stdout == src.read_bytes()[1000:2000]
        head = curl("-I", srv.url + "resources/cr/report.bin").stdout.decode()
        assert "ETag: \"sha512-" in head and "Last-Modified:" in head
        bag = tmp_path / "cr.tar"
        assert curl("-o", str(bag), srv.url + "resources/cr?format=tar").returncode == 0
    with tarfile.open(bag) as tf:
        tf.extractall(tmp_path / "out", filter="tar")
    [top] = (tmp_path / "out").iterdir()
    assert hashlib.sha512((top / "data" / "report.bin").read_bytes()).digest() == hashlib.sha512(src.read_bytes()).digest()
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(top)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(top / "bagit.txt").exists()


@pytest.mark.skipif(not shutil.which("rclone"), reason="rclone missing (apt-get install rclone)")
def test_rclone_copies_a_tree_into_a_transaction_and_commits_it(archive, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(Path(__file__).parent / "fixtures", src, symlinks=False,
                    # (no '%' in names: bagit-python does not decode the %25 that RFC 8493 manifests hold)
                    ignore=lambda d, names: [n for n in names if (Path(d) / n).is_symlink() or "%" in n])
    env = {"RCLONE_CONFIG": str(tmp_path / "rclone.conf"), "PATH": "/usr/bin:/bin"}
    with served(archive, users=USERS) as srv:
        def rclone(*args: str) -> subprocess.CompletedProcess:
            r = subprocess.run(["rclone", *args], capture_output=True, text=True, timeout=300, env=env)
            assert r.returncode == 0, r.stderr
            return r

        obscured = rclone("obscure", "alice-pw").stdout.strip()
        rclone("config", "create", "arc", "webdav", f"url={srv.url}", "vendor=owncloud", "user=alice",
               f"pass={obscured}")
        rclone("mkdir", "arc:transactions/rc")
        rclone("copy", str(src), "arc:transactions/rc/tree")
        rclone("moveto", "arc:transactions/rc", "arc:commit/rc")
        rclone("check", str(src), "arc:resources/rc/tree")
    out = tmp_path / "bag"
    subprocess.run([sys.executable, "-m", "tinyfs.cli.main", "export", str(archive.root.root), "rc", str(out)],
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["diff", "-r", str(src), str(out / "data" / "tree")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for path in src.rglob("*"):
        if path.is_file():
            copied = out / "data" / "tree" / path.relative_to(src)
            assert int(copied.stat().st_mtime) == int(path.stat().st_mtime), path   # vendor=owncloud: X-OC-Mtime


CADAVER_SCRIPT = """\
mkcol transactions/cd
cd transactions/cd
lcd {src}
mput *.txt
mkcol sub
put nested.bin sub/nested.bin
set namespace urn:tinyfs:
propset /transactions/cd/ message "scanned at the reading room"
cd /
move transactions/cd commit/cd
get resources/cd/sub/nested.bin {fetched}
quit
"""


@pytest.mark.skipif(not shutil.which("cadaver"), reason="cadaver missing (apt-get install cadaver)")
def test_cadaver_deposits_sets_the_message_commits_and_fetches(archive, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"page {i}.txt").write_text(f"page {i}\n" * 100)
    (src / "nested.bin").write_bytes(os.urandom(100_000))
    home = tmp_path / "home"                  # cadaver takes the credentials from ~/.netrc
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1\nlogin alice\npassword alice-pw\n")
    (home / ".netrc").chmod(0o600)
    fetched = tmp_path / "fetched.bin"
    with served(archive, users=USERS) as srv:
        r = subprocess.run(["cadaver", srv.url], input=CADAVER_SCRIPT.format(src=src, fetched=fetched),
                           capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "failed" not in r.stdout, r.stdout
    assert fetched.read_bytes() == (src / "nested.bin").read_bytes()
    resource = archive.get("cd")
    [doc] = resource.instances
    assert (doc.message, doc.creator) == ("scanned at the reading room", "alice")
    files = {"sub/nested.bin": src / "nested.bin", **{f"page {i}.txt": src / f"page {i}.txt" for i in range(3)}}
    assert sorted(resource) == sorted(files)
    for name, path in files.items():
        assert resource.read(name) == path.read_bytes()
