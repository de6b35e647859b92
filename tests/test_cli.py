"""The command line end to end, through the installed `tinyfs` in a subprocess (SPEC section 8)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import tarfile
import time
from pathlib import Path

import bagit
import pytest
from conftest import run_tinyfs
from mounting import tinyfs_argv

from tinyfs import Archive
from tinyfs.core.layout import ArchiveRoot

pytestmark = pytest.mark.core

CONFORMANCE = Path(__file__).parent / "fixtures" / "bagit-conformance"
OLD_NS = 1_500_000_000_987_654_321


def make_source(base: Path) -> Path:
    (base / "sub" / "deep").mkdir(parents=True)
    (base / "sub" / "empty").mkdir()
    (base / "a.txt").write_text("alpha\n")
    (base / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    (base / "sub" / "deep" / "leaf.txt").write_text("leaf\n")
    (base / "sub" / "copy.txt").write_text("alpha\n")           # same bytes as a.txt: stored once
    (base / "sub" / "50% off\nnow.txt").write_text("odd name\n")  # stored under a chosen name
    (base / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(base / "run.sh", 0o750)
    os.symlink("deep/leaf.txt", base / "sub" / "link")
    os.utime(base / "a.txt", ns=(OLD_NS, OLD_NS))
    os.utime(base / "sub" / "deep", ns=(OLD_NS, OLD_NS))
    return base


def instances(root: Path, rid: str) -> list[str]:
    return ArchiveRoot(root).instance_ids(rid)


def events(root: Path, *since) -> list[dict]:
    out = run_tinyfs("events", root, *since).stdout
    return [json.loads(line) for line in out.splitlines()]


def assert_one_line_error(r: subprocess.CompletedProcess, code: int = 2, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyfs: "), r.stderr
    for word in words:
        assert word in lines[0], r.stderr


@pytest.mark.parametrize("mode", ["preservation", "worm", "dynamic"])
def test_every_command_in_every_mode(tmp_path, mode, archive_ok):
    root = tmp_path / "archive"
    src = make_source(tmp_path / "src")
    run_tinyfs("init", root, "--mode", mode, "--digest", "sha512", "sha256")
    assert json.loads((root / "tinyfs.json").read_text())["digests"] == ["sha512", "sha256"]

    first = run_tinyfs("ingest", root, "book", src, "--message", "scan\nbatch 1", "--label", "v1",
                       "--creator", "ana").stdout.strip()
    assert instances(root, "book") == [first]
    (src / "a.txt").write_text("alpha, revised\n")
    (src / "extra.txt").write_text("new\n")
    second = run_tinyfs("ingest", root, "book", src / "a.txt", src / "extra.txt", "-m", "fix").stdout.strip()
    assert run_tinyfs("ls", root).stdout.splitlines() == ["book"]

    rows = [line.split("\t") for line in run_tinyfs("ls", root, "book").stdout.splitlines()]
    if mode == "dynamic":
        assert [r[0] for r in rows] == [second]
    else:
        assert [r[0] for r in rows] == [first, second]
        assert rows[0][2:] == ["v1", "scan\\nbatch 1"]
        assert run_tinyfs("cat", root, "book", "src/a.txt", "--instance", "v1").stdout == "alpha\n"
        assert run_tinyfs("cat", root, "book", "src/a.txt", "--instance", first).stdout == "alpha\n"
    assert rows[-1][3] == "fix"
    assert run_tinyfs("cat", root, "book", "a.txt").stdout == "alpha, revised\n"
    raw = subprocess.run([*tinyfs_argv(), "cat", root, "book", "src/big.bin"], capture_output=True, check=True)
    assert raw.stdout == (src / "big.bin").read_bytes()
    assert run_tinyfs("cat", root, "book", "src/sub/50% off\nnow.txt").stdout == "odd name\n"

    kinds = [e["event"] for e in events(root)]
    assert kinds[0] == "archive.created" and kinds.count("transaction.committed") == 2
    committed = [e for e in events(root) if e["event"] == "transaction.committed"]
    later = events(root, "--since", committed[1]["time"])          # inclusive
    assert [e["instance"] for e in later if e["event"] == "transaction.committed"] == [second]

    fsck = run_tinyfs("fsck", root)
    assert fsck.stdout.splitlines()[-1].endswith(": clean")
    assert run_tinyfs("fsck", root, "book", "--fast").returncode == 0

    dest = tmp_path / "export"
    run_tinyfs("export", root, "book", dest)
    assert (dest / "data" / "a.txt").read_text() == "alpha, revised\n"
    assert (dest / "data" / "src" / "sub" / "50% off\nnow.txt").read_text() == "odd name\n"
    assert (dest / "data" / "src" / "sub" / "empty").is_dir()
    assert not os.path.lexists(dest / "data" / "src" / "sub" / "link")   # recorded in instance.json
    assert os.stat(dest / "data" / "src" / "a.txt").st_mtime_ns == OLD_NS
    assert os.stat(dest / "data" / "src" / "sub" / "deep").st_mtime_ns == OLD_NS
    assert os.stat(dest / "data" / "src" / "run.sh").st_mode & 0o777 == 0o750
    manifest = (dest / "manifest-sha256.txt").read_text()
    assert "data/src/sub/50%25 off%0Anow.txt" in manifest
    doc = json.loads((dest / "instance.json").read_text())
    assert doc["links"]["src/sub/link"]["target"] == "deep/leaf.txt"

    tar_dest = tmp_path / "book-v1.tar"
    if mode != "dynamic":
        run_tinyfs("export", root, "book", tar_dest, "--tar", "--instance", "v1")
        with tarfile.open(tar_dest) as t:
            names = t.getnames()
            assert "book-v1/bagit.txt" in names and "book-v1/instance.json" in names
            assert "book-v1/data/src/sub/link" not in names      # recorded in instance.json
            assert t.getmember("book-v1/data/src/a.txt").pax_headers["mtime"] == "1500000000.987654321"
            assert t.extractfile("book-v1/data/src/a.txt").read() == b"alpha\n"
            assert "book-v1/data/extra.txt" not in names

    assert run_tinyfs("recover", root).returncode == 0
    if mode == "dynamic":
        run_tinyfs("purge", root, "book")
        assert run_tinyfs("ls", root).stdout == ""
        assert events(root)[-1]["event"] == "resource.purged"
    else:
        assert_one_line_error(run_tinyfs("purge", root, "book", check=False), 2, "dynamic")
    if mode == "worm":
        inst = ArchiveRoot(root).instance_dir("book", first)
        assert all(os.stat(p).st_mode & 0o222 == 0 for p in inst.rglob("*"))
    archive_ok(root)


def test_exported_bag_without_special_names_validates_with_bagit(tmp_path, tinyfs):
    root = tmp_path / "archive"
    tinyfs("init", root)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("f\n")
    (src / "é ü.txt").write_text("unicode\n")
    tinyfs("ingest", root, "r", src)
    tinyfs("export", root, "r", tmp_path / "out")
    bag = bagit.Bag(str(tmp_path / "out"))
    bag.validate()
    assert bag.info["External-Identifier"] == "r"
    assert bag.info["Payload-Oxum"] == "10.2"


def test_errors_are_one_line_without_traceback(tmp_path, tinyfs):
    root = tmp_path / "archive"
    tinyfs("init", root)
    f = tmp_path / "f.txt"
    f.write_text("x")
    tinyfs("ingest", root, "r", f, "--label", "v1")
    assert_one_line_error(tinyfs("init", root, check=False), 2, "already")
    assert_one_line_error(tinyfs("ls", tmp_path, check=False), 2, "not a tinyfs archive")
    assert_one_line_error(tinyfs("cat", root, "nope", "x", check=False), 2, "nope")
    assert_one_line_error(tinyfs("cat", root, "r", "missing.txt", check=False), 2, "missing.txt")
    assert_one_line_error(tinyfs("ingest", root, "bad id!", f, check=False), 2, "invalid resource id")
    assert_one_line_error(tinyfs("ingest", root, "r", f, "--label", "v1", check=False), 2, "already used")
    assert_one_line_error(tinyfs("ingest", root, "r", tmp_path / "absent", check=False), 2, "absent")
    assert_one_line_error(tinyfs("events", root, "--since", "last tuesday", check=False), 2, "RFC 3339")
    assert_one_line_error(tinyfs("export", root, "r", tmp_path, check=False), 2, "exists")
    assert_one_line_error(tinyfs("fsck", root, "nope", check=False), 2, "nope")
    assert_one_line_error(tinyfs("frobnicate", check=False), 2, "invalid choice")
    assert_one_line_error(tinyfs("init", tmp_path / "x", "--digest", "md5", check=False), 2, "sha512")
    assert_one_line_error(tinyfs(check=False), 2)
    # the mount.fuse3 form reaches the mount command (which refuses an unknown option before mounting)
    assert_one_line_error(tinyfs(root, tmp_path / "mnt", "-o", "no_such_option", check=False), 2, "no_such_option")
    assert tinyfs("--version").stdout.strip().startswith("tinyfs ")
    assert len(instances(root, "r")) == 1


def test_special_files_and_bad_names_are_refused_and_nothing_committed(tmp_path, tinyfs):
    root = tmp_path / "archive"
    tinyfs("init", root)
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("ok")
    os.mkfifo(src / "pipe")
    assert_one_line_error(tinyfs("ingest", root, "r", src, check=False), 2, "pipe", "FIFO")
    os.unlink(src / "pipe")
    os.mknod(src / "null", 0o600 | 0o020000, os.makedev(1, 3))    # a character device (we run as root in CI)
    assert_one_line_error(tinyfs("ingest", root, "r", src, check=False), 2, "null", "device")
    os.unlink(src / "null")
    bad = os.path.join(os.fsencode(src), b"caf\xe9.txt")
    with open(bad, "wb") as fh:
        fh.write(b"latin-1 name")
    r = tinyfs("ingest", root, "r", src, check=False)
    assert_one_line_error(r, 2, "not valid UTF-8", "caf\\xe9.txt")
    assert tinyfs("ls", root).stdout == ""
    assert not any(e["event"] == "transaction.committed" for e in events(root))


def test_ingest_bag_valid_and_invalid(tmp_path, tinyfs, archive_ok):
    root = tmp_path / "archive"
    tinyfs("init", root)
    good = CONFORMANCE / "v0.97" / "valid" / "bag-with-encoded-names"
    iid = tinyfs("ingest", root, "sip", "--bag", good).stdout.strip()
    doc = ArchiveRoot(root).instance("sip", iid)
    assert doc.message.startswith("Uncompressed greyscale TIFF")   # from bag-info External-Description
    assert sorted(doc.state.files) == sorted(
        p.relative_to(good / "data").as_posix() for p in (good / "data").rglob("*") if p.is_file())

    bad = CONFORMANCE / "v0.97" / "invalid" / "corrupt-data-file"
    r = tinyfs("ingest", root, "sip2", "--bag", bad, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"tinyfs: invalid bag {bad}: 2 problems"
    assert len(lines) == 3 and any("checksum-mismatch" in line and "data/bare-filename" in line for line in lines)
    assert "sip2" not in tinyfs("ls", root).stdout

    holey = tmp_path / "holey"
    holey.mkdir()
    (holey / "here.txt").write_text("here\n")
    bagit.make_bag(str(holey))
    with open(holey / "fetch.txt", "w") as fh:
        fh.write("https://example.org/there.txt 5 data/there.txt\n")
    r = tinyfs("ingest", root, "sip3", "--bag", holey, check=False)
    assert r.returncode == 2
    assert "fetch.txt" in r.stderr and "not in the bag" in r.stderr
    assert tinyfs("ls", root).stdout.split() == ["sip"]
    archive_ok(root)


def test_init_immutable_says_whether_the_file_system_supports_it(tmp_path, tinyfs):
    r = tinyfs("init", tmp_path / "w", "--mode", "worm", "--immutable")
    assert "immutable" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not [n for n in os.listdir(tmp_path / "w" / "transactions") if n.startswith(".immutable-probe")]
    assert_one_line_error(tinyfs("init", tmp_path / "p", "--immutable", check=False), 2, "worm")


def test_progress_only_on_a_terminal(tmp_path, tinyfs):
    root = tmp_path / "archive"
    tinyfs("init", root)
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(1 << 20))
    quiet = tinyfs("ingest", root, "r", f)
    assert quiet.stderr == ""
    assert tinyfs("fsck", root).stderr == ""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*tinyfs_argv(), "fsck", str(root)], stdout=subprocess.PIPE, stderr=slave,
                                env={**os.environ, "COLUMNS": "80", "TERM": "xterm"})
        os.close(slave)
        out, _ = proc.communicate(timeout=60)
        drawn = b""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0 and out.decode().endswith(": clean\n")
    assert b"checking" in drawn and b"Traceback" not in drawn


def test_two_processes_committing_to_one_resource(tmp_path, tinyfs, archive_ok):
    root = tmp_path / "archive"
    tinyfs("init", root)
    seed = tmp_path / "seed.txt"
    seed.write_text("seed")
    base = tinyfs("ingest", root, "r", seed).stdout.strip()
    files = []
    for name in ("left", "right"):
        d = tmp_path / name
        d.mkdir()
        for i in range(20):
            (d / f"{i}.bin").write_bytes(os.urandom(64 * 1024))
        files.append(d)
    procs = [subprocess.Popen([*tinyfs_argv(), "ingest", str(root), "r", str(d)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in files]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    chain = instances(root, "r")
    assert len(chain) == 3 and chain[0] == base
    docs = [ArchiveRoot(root).instance("r", i) for i in chain]
    assert [d.previous for d in docs] == [None, chain[0], chain[1]]
    head = Archive(root).get("r")
    for d in files:
        for p in d.iterdir():
            assert head.read(f"{d.name}/{p.name}") == p.read_bytes()
    assert head.read("seed.txt") == b"seed"
    archive_ok(root)
