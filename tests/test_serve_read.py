"""`tinyfs serve`, reading: the views over WebDAV and plain HTTP, verified bytes, ranges, ETags, JSON, bags."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import requests
from conftest import run_tinyfs
from serving import served

pytestmark = pytest.mark.core
BIG = 5 * 1024 * 1024 + 17          # over http.WHOLE_IN_MEMORY: streamed


@pytest.fixture
def deposited(archive, tmp_path):
    src = tmp_path / "src"
    (src / "docs" / "empty").mkdir(parents=True)
    (src / "docs" / "a.txt").write_bytes(b"alpha\n")
    (src / "docs" / "ü n.txt").write_bytes(b"odd name\n")
    (src / "big.bin").write_bytes(os.urandom(BIG))
    os.symlink("docs/a.txt", src / "link")
    run_tinyfs("ingest", archive.root.root, "walrus", *sorted(str(p) for p in src.iterdir()),
               "--message", "first")
    return archive, src


def stored_file(archive, logical: str) -> Path:
    found = list(Path(archive.root.root, "resources").glob(f"**/walrus/instances/*/data/{logical}"))
    assert len(found) == 1, found
    return found[0]


def test_a_file_is_its_bytes_with_digest_etag_time_and_ranges(deposited):
    archive, src = deposited
    with served(archive, "--anonymous", "read") as srv:
        url = srv.url + "resources/walrus/big.bin"
        whole = requests.get(url)
        assert whole.status_code == 200 and whole.content == (src / "big.bin").read_bytes()
        digest = hashlib.sha512(whole.content).hexdigest()
        assert whole.headers["ETag"] == f'"sha512-{base64.b64encode(bytes.fromhex(digest)).decode()}"'
        assert whole.headers["Accept-Ranges"] == "bytes"
        head = requests.head(url)
        assert head.headers["Content-Length"] == str(BIG) and not head.content
        part = requests.get(url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == whole.content[1000:2000]
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{BIG}"
        assert requests.get(url, headers={"Range": "bytes=-10"}).content == whole.content[-10:]
        assert requests.get(url, headers={"Range": f"bytes={BIG}-"}).status_code == 416
        assert requests.get(url, headers={"If-None-Match": whole.headers["ETag"]}).status_code == 304
        small = requests.get(srv.url + "resources/walrus/docs/%C3%BC%20n.txt")
        assert small.content == b"odd name\n"
        assert small.headers["Last-Modified"] == whole.headers["Last-Modified"] or small.headers["Last-Modified"]
        link = requests.get(srv.url + "resources/walrus/link")
        assert link.content == b"docs/a.txt" and link.headers["Content-Type"] == "inode/symlink"
        assert requests.get(srv.url + "resources/walrus/nothing").status_code == 404


def test_listings_json_and_events(deposited):
    archive, _ = deposited
    head = archive.root.head("walrus")
    with served(archive, "--anonymous", "read") as srv:
        assert requests.get(srv.url + "resources/?format=json").json() == [{"id": "walrus", "head": head}]
        [summary] = requests.get(srv.url + "instances/walrus/?format=json").json()
        assert summary["id"] == head and summary["message"] == "first"
        doc = requests.get(srv.url + "resources/walrus?format=json")
        assert doc.content == archive.root.instance_bytes("walrus", head)
        assert requests.get(srv.url + f"instances/walrus/{head}?format=json").content == doc.content
        assert requests.get(srv.url + "resources/nope?format=json").status_code == 404
        assert requests.get(srv.url + "resources/walrus?format=pdf").status_code == 400
        events = [json.loads(line) for line in requests.get(srv.url + "events.jsonl?since=2000-01-01").text.splitlines()]
        assert any(e["event"] == "transaction.committed" for e in events)
        assert requests.get(srv.url + "events.jsonl?since=2999-01-01").text == ""
        assert requests.get(srv.url + "events.jsonl?since=yesterday").status_code == 400
        listing = requests.request("PROPFIND", srv.url + "resources/walrus/", headers={"Depth": "1"})
        assert listing.status_code == 207
        for name in ("big.bin", "docs", "link"):
            assert f"/resources/walrus/{name}" in listing.text
        assert requests.put(srv.url + "resources/walrus/new", data=b"x").status_code in (401, 403)


def test_views_refuse_every_change_with_403(deposited):
    archive, _ = deposited
    with served(archive, "--anonymous", "write") as srv:
        for method, path in [("PUT", "resources/walrus/new"), ("PUT", "resources/walrus/docs/a.txt"),
                             ("DELETE", "resources/walrus/docs/a.txt"), ("MKCOL", "resources/walrus/d"),
                             ("DELETE", "aip/walrus/resource.json"), ("PUT", "events.jsonl")]:
            data = b"x" if method == "PUT" else None
            assert requests.request(method, srv.url + path, data=data).status_code == 403, (method, path)
        assert requests.get(srv.url + "resources/walrus/docs/a.txt").content == b"alpha\n"


def test_the_state_as_a_tar_or_zip_bag(deposited, tmp_path):
    archive, src = deposited
    with served(archive, "--anonymous", "read") as srv:
        tar = requests.get(srv.url + "resources/walrus?format=tar")
        assert tar.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as tf:
            tf.extractall(tmp_path / "bag", filter="tar")
        [bag] = (tmp_path / "bag").iterdir()
        check = subprocess.run([sys.executable, "-m", "bagit", "--validate", str(bag)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert (bag / "data" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        zipped = requests.get(srv.url + "resources/walrus?format=zip")
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
            assert zf.testzip() is None
            names = zf.namelist()
            top = names[0].split("/")[0]
            assert zf.read(f"{top}/data/docs/a.txt") == b"alpha\n"
            assert f"{top}/data/docs/empty/" in names


def test_damaged_bytes_are_never_handed_out_as_good(deposited):
    archive, _ = deposited
    for logical in ("docs/a.txt", "big.bin"):
        path = stored_file(archive, logical)
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(3)
            byte = f.read(1)
            f.seek(3)
            f.write(bytes([byte[0] ^ 1]))
    with served(archive, "--anonymous", "read") as srv:
        small = requests.get(srv.url + "resources/walrus/docs/a.txt")
        assert small.status_code == 500 and "damaged" in small.text
        assert requests.get(srv.url + "resources/walrus/docs/a.txt", headers={"Range": "bytes=0-1"}).status_code == 500
        with pytest.raises(requests.exceptions.RequestException):
            r = requests.get(srv.url + "resources/walrus/big.bin", stream=True)
            for _ in r.iter_content(1 << 16):
                pass
        with pytest.raises(requests.exceptions.RequestException):
            r = requests.get(srv.url + "resources/walrus?format=tar", stream=True)
            for _ in r.iter_content(1 << 16):
                pass
        assert requests.get(srv.url + "aip/walrus/resource.json").status_code == 200
        events = requests.get(srv.url + "events.jsonl?since=2000-01-01").text
        assert '"fixity.failed"' in events
