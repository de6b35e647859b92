"""Format identification (core.formats): FIDO's PUID, MIME type and name of each new file, recorded beside
the instance after the commit; `tinyfs formats`; the user.tinyfs.format xattr of the mount."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import threading
import time
import zipfile
import zlib

import pytest
from conftest import run_tinyfs

from tinyfs import Archive
from tinyfs.core import formats
from tinyfs.core.errors import NotFound
from tinyfs.core.layout import ArchiveRoot

pytestmark = pytest.mark.core


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def zipped() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("inside.txt", "hi")
    return out.getvalue()


SAMPLES = {
    "scan.png": (png(), ("fmt/11", "image/png", "signature")),
    "report.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", ("fmt/18", "application/pdf", "signature")),
    "log.gz": (gzip.compress(b"log"), ("x-fmt/266", "application/gzip", "signature")),
    "data.zip": (zipped(), ("x-fmt/263", "application/zip", "signature")),
    "empty": (b"", (None, None, "empty")),
}


def deposit(archive: Archive, rid: str = "r") -> str:
    with archive.new(rid) as t:
        for name, (data, _expected) in SAMPLES.items():
            t.add_bytes(f"in/{name}", data)
    return t.result.instance


def test_a_commit_through_the_api_records_the_format_of_every_new_file(archive):
    iid = deposit(archive)
    root = archive.root
    record = json.loads((formats.records_dir(root, "r") / f"{iid}.json").read_text())
    assert record["tool"].startswith("fido ") and record["signatures"].startswith("PRONOM v")
    doc = root.instance("r", iid)
    for name, (_data, (puid, mime, basis)) in SAMPLES.items():
        fmt = formats.format_of(root, "r", doc, f"in/{name}")
        assert (fmt.puid, fmt.mime, fmt.basis) == (puid, mime, basis), name
    [event] = [e for e in archive.events() if e["event"] == "formats.identified"]
    assert (event["instance"], event["detail"]["files"]) == (iid, len(SAMPLES))


def test_only_new_bytes_are_identified_and_old_files_keep_their_record(archive):
    first = deposit(archive)
    with archive.get("r", "a") as t:
        t.add_bytes("copy.png", SAMPLES["scan.png"][0])     # bytes the resource already stores
        t.add_bytes("notes.gz", gzip.compress(b"new"))
    second = t.result.instance
    record = formats.read_record(archive.root, "r", second)
    assert len(record["files"]) == 1                          # only notes.gz is new
    doc = archive.root.instance("r", second)
    assert formats.format_of(archive.root, "r", doc, "copy.png").puid == "fmt/11"   # (first's record)
    assert formats.format_of(archive.root, "r", doc, "notes.gz").puid == "x-fmt/266"
    assert formats.read_record(archive.root, "r", first) is not None


def test_formats_summarises_identifies_what_is_pending_and_says_so(archive):
    deposit(archive)
    root = archive.root.root
    for record in (root / "index").rglob("*.json"):         # an archive made before identification
        record.unlink()
    r = run_tinyfs("formats", root)
    assert "pending" in r.stdout and "not identified yet" in r.stderr
    r = run_tinyfs("formats", root, "--identify", "--json")
    report = json.loads(r.stdout)
    assert report["pending"] == []
    by_puid = {f.get("puid"): f["files"] for f in report["formats"]}
    assert by_puid["fmt/11"] == 1 and by_puid["x-fmt/263"] == 1
    lines = run_tinyfs("formats", root, "r").stdout.splitlines()
    assert "1\tfmt/18\tapplication/pdf\tAcrobat PDF 1.4 - Portable Document Format\tsignature" in lines
    bad = run_tinyfs("formats", root, "nope", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def test_many_files_are_identified_on_worker_processes(archive):
    with archive.new("many") as t:
        for i in range(formats.IN_PROCESS + 50):
            t.add_bytes(f"f{i:04}.gz", gzip.compress(str(i).encode()))
    record = formats.read_record(archive.root, "many", t.result.instance)
    assert len(record["files"]) == formats.IN_PROCESS + 50
    assert {f["puid"] for f in record["files"].values()} == {"x-fmt/266"}


def test_no_identify_at_init_identifies_nothing_and_nothing_is_pending(tmp_path):
    archive = Archive.init(tmp_path / "a", identify=False)
    deposit(archive)
    assert not (tmp_path / "a" / "index" / "formats").exists()
    assert formats.summary(ArchiveRoot(tmp_path / "a"))["pending"] == []
    run_tinyfs("init", tmp_path / "b", "--no-identify")
    assert json.loads((tmp_path / "b" / "tinyfs.json").read_text())["identify"] is False


def test_a_record_is_written_whole_once(archive):
    iid = deposit(archive)
    folder = formats.records_dir(archive.root, "r")
    before = (folder / f"{iid}.json").read_bytes()
    formats.identify_instance(archive.root, "r", iid)          # again: the record is kept as it is
    assert (folder / f"{iid}.json").read_bytes() == before
    assert [p.name for p in folder.iterdir()] == [f"{iid}.json"]      # no temporary file left
    assert os.stat(folder / f"{iid}.json").st_size > 0


def test_the_background_identifier_ends_its_workers_when_idle(tmp_path, monkeypatch):
    """A mount or server identifies on worker processes, then gives them back: an idle daemon holds no
    workers, pipes or memory for identification."""
    monkeypatch.setattr(formats, "WORKERS_IDLE", 0.5)
    archive = Archive.init(tmp_path / "a", identify=False)      # the test hands the commit over itself
    with archive.new("many") as t:
        for i in range(10):
            t.add_bytes(f"f{i:04}.gz", gzip.compress(str(i).encode()))
    root = ArchiveRoot(tmp_path / "a")
    identifier = formats.Identifier(root)
    try:
        identifier.submit("many", t.result.instance)
        assert identifier.idle(timeout=120)
        workers = identifier.workers
        assert workers is not None                                 # the workers did the work...
        record = formats.read_record(root, "many", t.result.instance)
        assert len(record["files"]) == 10
        deadline = time.monotonic() + 30
        while identifier.workers is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert identifier.workers is None                          # ...and were ended once idle
        assert all(proc.returncode is not None for proc in workers.procs)
    finally:
        identifier.close()


def test_workers_ended_while_working_fail_the_job_not_the_caller(tmp_path):
    """An unmount ends the workers in the middle of an instance: the identification fails with
    WorkersGone (the instance stays pending) and no worker is left running."""
    files = []
    for i in range(formats.BATCH * 4):
        f = tmp_path / f"f{i}.gz"
        f.write_bytes(gzip.compress(str(i).encode()))
        files.append((str(i), str(f)))
    with formats.Workers(2) as workers:
        assert workers.identify(files[:3]) == {str(i): formats.Format("x-fmt/266", "application/gzip",
                                                                      "GZIP Format", "signature") for i in range(3)}
        threading.Timer(0.2, workers.terminate).start()
        with pytest.raises(formats.WorkersGone):
            for _ in range(50):
                workers.identify(files)
    assert all(proc.returncode is not None for proc in workers.procs)


def test_the_python_api_gives_a_file_s_format_and_the_summary(tmp_path):
    archive = Archive.init(tmp_path / "a")
    iid = deposit(archive)
    r = archive.get("r")
    assert r.format("in/scan.png") == formats.Format("fmt/11", "image/png", "Portable Network Graphics", "signature")
    assert r.format("in/empty", iid).basis == "empty"
    with pytest.raises(NotFound):
        r.format("in/nothing-here")
    formats.records_dir(archive.root, "r").joinpath(f"{iid}.json").unlink()
    assert archive.formats()["pending"] == [("r", iid)]
    report = archive.formats(["r"], identify=True)
    assert report["pending"] == [] and r.format("in/log.gz").puid == "x-fmt/266"
    assert sum(n for _fmt, n in report["formats"]) == len(SAMPLES)
