"""Copies that heal each other (docs/replicas.md): fsck of every store, `tinyfs repair`, and reads that
repair the primary's copy from a replica (cat, export, the API). Real archives, real replicas (local
directories, and a SeaweedFS bucket); the damage is done to the stored bytes themselves."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_tinyfs

from tinyfs.core.api import Archive
from tinyfs.core.fixity import FixityError

pytestmark = pytest.mark.core

MIB = 1 << 20


def stored(root: Path, rid: str, rel: str) -> Path:
    (path,) = root.glob(f"resources/*/*/{rid}/instances/*/{rel}")
    return path


def flip_byte(path: Path, offset: int = 0) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, mode | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.chmod(path, mode)


def events(root: Path, kind: str) -> list[dict]:
    lines = (root / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def cat_to(root: Path, name: str, out: Path):
    """`tinyfs cat` into a regular file (what it wrote before a failure is cut back)."""
    with open(out, "wb") as f:
        return run_tinyfs("cat", root, "book", name, stdout=f, stderr=subprocess.PIPE, capture_output=False,
                          check=False)


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
def files(tmp_path) -> dict[str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    files = {"small.txt": b"a small file\n", "big.bin": os.urandom(3 * MIB + 5)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


@pytest.fixture
def replicated(tmp_path, files):
    """An archive with two local replicas, resource `book` committed to all three stores."""
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    run_tinyfs("store", "add", root, tmp_path / "r1")
    run_tinyfs("store", "add", root, tmp_path / "r2")
    run_tinyfs("ingest", root, "book", *sorted((tmp_path / "src").iterdir()))
    return root, tmp_path / "r1", tmp_path / "r2"


def test_fsck_names_the_damage_of_each_store_and_repair_heals_it(replicated, files):
    root, r1, r2 = replicated
    flip_byte(stored(r1, "book", "data/big.bin"), 2 * MIB)
    stored(r2, "book", "data/small.txt").unlink()
    stored(r2, "book", "instance.json").unlink()
    stored(r2, "book", "manifest-sha512.txt").write_text("garbage\n")   # (as root: 0644 or not)
    r = run_tinyfs("fsck", root, check=False)
    assert r.returncode == 1, r.stdout
    assert "primary: fsck: 1 resources, 1 instances, 2 files" in r.stdout and "primary: fsck" in r.stdout
    big = [ln for ln in r.stdout.splitlines() if "data/big.bin: checksum-mismatch" in ln]
    assert big and all(ln.startswith("r1: ") for ln in big)
    assert any(ln.startswith("r2: ") and "instance.json" in ln for ln in r.stdout.splitlines())
    doc = json.loads(run_tinyfs("fsck", root, "--json", check=False).stdout)
    assert doc["clean"] is False and doc["stores"]["primary"]["clean"] is True
    assert [s["stored"].split("/")[-1] for s in doc["stores"]["r1"]["stored_files"]] == ["big.bin"]
    assert run_tinyfs("fsck", root, "--store", "primary").returncode == 0

    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("r1: repaired book instances/") and ln.endswith("data/big.bin from primary "
                                                                              f"(sha512 {sha512(files['big.bin'])[:16]}…)")
               for ln in lines), lines
    for name in ("data/small.txt", "instance.json", "manifest-sha512.txt"):
        assert any(ln.startswith("r2: repaired") and name in ln for ln in lines), (name, lines)
    assert run_tinyfs("fsck", root).returncode == 0
    assert stored(r1, "book", "data/big.bin").read_bytes() == files["big.bin"]
    assert stored(r2, "book", "data/small.txt").read_bytes() == files["small.txt"]
    assert stored(r2, "book", "instance.json").read_bytes() == stored(root, "book", "instance.json").read_bytes()
    # logged in the primary's log and in the repaired store's own
    mine = events(root, "stored.repaired")
    assert {(e["detail"]["store"], e["detail"]["stored"].split("/")[-1]) for e in mine} == {
        ("r1", "big.bin"), ("r2", "small.txt"), ("r2", "instance.json"), ("r2", "manifest-sha512.txt")}
    assert all(e["detail"]["source"] == "primary" and e["detail"]["via"] == "repair" for e in mine)
    assert [e["detail"]["digest"] for e in events(r1, "stored.repaired")] == [sha512(files["big.bin"])]
    assert len(events(r2, "stored.repaired")) == 3
    # every store's own log holds the fsck that checked it
    assert events(r1, "fixity.checked")[-1]["detail"]["problems"] == 0


def test_a_damaged_primary_is_repaired_from_a_replica_and_a_replica_behind_is_not_damage(replicated, files):
    root, r1, r2 = replicated
    flip_byte(stored(root, "book", "data/small.txt"))
    run_tinyfs("store", "add", root, r1.parent / "r3")      # a new, empty replica: behind
    r = run_tinyfs("repair", root, "--store", "primary", check=False)
    assert r.returncode == 0, r.stderr
    assert "primary: repaired book" in r.stdout and "from r1" in r.stdout
    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 0 and "r3: behind: lacks 1 instance(s)" in r.stdout and "tinyfs replicate" in r.stdout
    r = run_tinyfs("fsck", root, check=False)
    assert r.returncode == 0 and "r3: behind" in r.stdout


def test_a_file_damaged_in_every_store_is_reported_and_nothing_changes(replicated, files):
    root, r1, r2 = replicated
    damaged = [stored(s, "book", "data/big.bin") for s in (root, r1, r2)]
    for n, path in enumerate(damaged):
        flip_byte(path, n * MIB)
    before = [p.read_bytes() for p in damaged]
    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 1
    assert "not repaired" in r.stderr and "no good copy" in r.stderr and "repaired book" not in r.stdout
    assert [p.read_bytes() for p in damaged] == before
    assert not events(root, "stored.repaired")
    out = r1.parent / "out.bin"
    r = cat_to(root, "big.bin", out)
    assert r.returncode == 1 and out.stat().st_size == 0
    assert [p.read_bytes() for p in damaged] == before


def test_cat_heals_a_damaged_or_missing_primary_copy(replicated, files, tmp_path):
    root, r1, r2 = replicated
    small = stored(root, "book", "data/small.txt")
    mode = stat.S_IMODE(small.stat().st_mode)
    flip_byte(small)
    r = run_tinyfs("cat", root, "book", "small.txt", check=False, text=False)
    assert r.returncode == 0 and r.stdout == files["small.txt"]           # the reader got the good bytes
    assert small.read_bytes() == files["small.txt"] and stat.S_IMODE(small.stat().st_mode) == mode
    (failed,) = events(root, "fixity.failed")
    (repaired,) = events(root, "stored.repaired")
    assert failed["detail"]["via"] == repaired["detail"]["via"] == "cat"
    assert repaired["detail"]["source"] == "r1" and repaired["detail"]["store"] == "primary"

    # a file larger than one read: its damaged bytes were handed out before the end: this read fails
    big = stored(root, "book", "data/big.bin")
    flip_byte(big, 2 * MIB)
    out = tmp_path / "out.bin"
    r = cat_to(root, "big.bin", out)
    assert r.returncode == 1 and "repaired from store r1: a new read gives the good bytes" in r.stderr
    assert out.stat().st_size == 0
    assert cat_to(root, "big.bin", out).returncode == 0
    assert out.read_bytes() == files["big.bin"] == big.read_bytes()

    # missing at open: no byte was handed out
    big.unlink()
    r = run_tinyfs("cat", root, "book", "big.bin", check=False, text=False)
    assert r.returncode == 0 and r.stdout == files["big.bin"]
    assert [e["detail"]["via"] for e in events(root, "stored.repaired")] == ["cat", "cat", "cat"]
    assert run_tinyfs("fsck", root).returncode == 0


def test_export_and_the_api_heal_and_hand_out_only_good_bytes(replicated, files, tmp_path):
    root, r1, r2 = replicated
    flip_byte(stored(root, "book", "data/big.bin"), 3 * MIB)
    stored(r1, "book", "data/big.bin").unlink()             # the first replica lacks it: taken from r2
    run_tinyfs("export", root, "book", tmp_path / "bag")
    assert (tmp_path / "bag/data/big.bin").read_bytes() == files["big.bin"]
    (repaired,) = events(root, "stored.repaired")
    assert repaired["detail"]["source"] == "r2" and repaired["detail"]["via"] == "export"

    flip_byte(stored(root, "book", "data/small.txt"))
    assert Archive(root).get("book").read("small.txt") == files["small.txt"]
    flip_byte(stored(root, "book", "data/big.bin"), 1)
    with pytest.raises(FixityError, match="repaired from store r2"):
        Archive(root).get("book").read("big.bin")
    assert Archive(root).get("book").read("big.bin") == files["big.bin"]


def test_repair_keeps_a_worm_replicas_modes(tmp_path, files):
    root = tmp_path / "archive"
    run_tinyfs("init", root, "--mode", "worm")
    run_tinyfs("store", "add", root, tmp_path / "r1")
    run_tinyfs("ingest", root, "book", *sorted((tmp_path / "src").iterdir()))
    path = stored(tmp_path / "r1", "book", "data/big.bin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o444 and stat.S_IMODE(path.parent.stat().st_mode) == 0o555
    flip_byte(path, 5)
    assert run_tinyfs("repair", root).returncode == 0
    assert path.read_bytes() == files["big.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444 and stat.S_IMODE(path.parent.stat().st_mode) == 0o555
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]


# -- a replica in a SeaweedFS bucket ---------------------------------------------------------------------

def test_repair_with_a_replica_in_a_bucket(tmp_path, files, s3_env, bucket):
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    run_tinyfs("store", "add", root, tmp_path / "r1")
    run_tinyfs("store", "add", root, f"s3://{bucket}/rep", "--endpoint", s3_env.endpoint)
    iid = run_tinyfs("ingest", root, "book", *sorted((tmp_path / "src").iterdir())).stdout.strip()
    raw = s3_env.raw()
    key = f"rep/resources/book/instances/{iid}/data/small.txt"
    assert raw.get_object(Bucket=bucket, Key=key)["Body"].read() == files["small.txt"]

    flip_byte(stored(tmp_path / "r1", "book", "data/big.bin"), MIB)
    raw.delete_object(Bucket=bucket, Key=key)
    r = run_tinyfs("fsck", root, check=False)
    assert r.returncode == 1
    assert any(ln.startswith("r1: ") and "data/big.bin" in ln for ln in r.stdout.splitlines())
    assert any(ln.startswith("r2: ") and "data/small.txt" in ln and "missing" in ln for ln in r.stdout.splitlines())
    # reads of the archive never hand out the bad bytes meanwhile
    assert run_tinyfs("cat", root, "book", "big.bin", text=False).stdout == files["big.bin"]

    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "r1: repaired" in r.stdout and "r2: repaired" in r.stdout
    assert raw.get_object(Bucket=bucket, Key=key)["Body"].read() == files["small.txt"]
    assert run_tinyfs("fsck", root).returncode == 0
    assert {e["detail"]["store"] for e in events(root, "stored.repaired")} == {"r1", "r2"}

    # a damaged primary copy, healed from the bucket when the other local replica lost it too
    flip_byte(stored(root, "book", "data/small.txt"))
    stored(tmp_path / "r1", "book", "data/small.txt").unlink()
    r = run_tinyfs("cat", root, "book", "small.txt", text=False)
    assert r.stdout == files["small.txt"]
    assert events(root, "stored.repaired")[-1]["detail"]["source"] == "r2"


def test_repair_of_a_lost_version_in_a_versioned_bucket(tmp_path, files, s3_env, bucket):
    """Reads are pinned to the version each claim records; a repair writes a new version and the reads
    of the lost one fall back to it (the bytes are verified as every read's are)."""
    raw = s3_env.raw()
    raw.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    root = tmp_path / "archive"
    run_tinyfs("init", root)
    run_tinyfs("store", "add", root, f"s3://{bucket}/rep", "--endpoint", s3_env.endpoint)
    iid = run_tinyfs("ingest", root, "book", *sorted((tmp_path / "src").iterdir())).stdout.strip()
    key = f"rep/resources/book/instances/{iid}/data/big.bin"
    (version,) = [v["VersionId"] for v in raw.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]]
    assert version not in (None, "null")
    raw.delete_object(Bucket=bucket, Key=key, VersionId=version)        # the server lost it
    r = run_tinyfs("fsck", root, check=False)
    assert r.returncode == 1 and any(ln.startswith("r1: ") and "data/big.bin" in ln for ln in r.stdout.splitlines())
    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 0 and "r1: repaired" in r.stdout, r.stdout + r.stderr
    assert run_tinyfs("fsck", root).returncode == 0
    # a reader of the replica on its own gets the repaired bytes
    from tinyfs.core.layout import ArchiveRoot
    from tinyfs.core.replicas import replicas_of
    replica = replicas_of(ArchiveRoot(root)).replicas[0].archive
    assert Archive(replica.root).get("book").read("big.bin") == files["big.bin"]


def test_repair_of_an_immutable_archive_puts_chattr_back(tmp_path, files):
    from tinyfs.core.commit import set_immutable
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if not set_immutable(probe):
        pytest.skip("no chattr +i on this file system")
    set_immutable(probe, False)
    root = tmp_path / "archive"
    run_tinyfs("init", root, "--mode", "worm", "--immutable")
    run_tinyfs("store", "add", root, tmp_path / "r1")
    run_tinyfs("ingest", root, "book", *sorted((tmp_path / "src").iterdir()))
    path = stored(root, "book", "data/small.txt")
    set_immutable(path, False)
    flip_byte(path)
    set_immutable(path, True)
    assert run_tinyfs("cat", root, "book", "small.txt", text=False).stdout == files["small.txt"]
    assert path.read_bytes() == files["small.txt"]
    for p in (path, path.parent):
        flags = subprocess.run(["lsattr", "-d", str(p)], capture_output=True, text=True).stdout.split()[0]
        assert "i" in flags, (p, flags)
    with pytest.raises(PermissionError):
        os.unlink(path)


def test_a_store_that_went_away_is_a_finding(replicated, files):
    root, r1, r2 = replicated
    r2.rename(r2.with_name("r2-gone"))
    r = run_tinyfs("fsck", root, check=False)
    assert r.returncode == 1 and "r2: unreachable: " in r.stdout and "r1: fsck: " in r.stdout
    assert run_tinyfs("fsck", root, "--store", "primary", "--store", "r1").returncode == 0
    r = run_tinyfs("repair", root, check=False)
    assert r.returncode == 1 and "r2: unreachable, not repaired" in r.stderr
    assert run_tinyfs("fsck", root, "--store", "nope", check=False).returncode == 2


def forge_message(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, mode | stat.S_IWUSR)
    path.write_bytes(path.read_bytes().replace(b'"message": ""', b'"message": "forged"'))
    os.chmod(path, mode)


def test_export_checks_instance_json_against_the_tagmanifest(replicated, files, tmp_path):
    """An export computes its tag manifests afresh: a damaged instance.json must not leave inside a valid
    bag (found by a newcomer's trial). With a replica it is repaired first; without, the export fails."""
    root, r1, r2 = replicated
    doc = stored(root, "book", "instance.json")
    original = doc.read_bytes()
    forge_message(doc)
    run_tinyfs("export", root, "book", tmp_path / "out")
    assert (next((tmp_path / "out").glob("instance.json"))).read_bytes() == original
    assert doc.read_bytes() == original                              # repaired from a replica
    assert [e["detail"]["stored"] for e in events(root, "stored.repaired")][-1].endswith("instance.json")
    lone = tmp_path / "lone"
    run_tinyfs("init", lone)
    run_tinyfs("ingest", lone, "book", *sorted((tmp_path / "src").iterdir()))
    forge_message(stored(lone, "book", "instance.json"))
    r = run_tinyfs("export", lone, "book", tmp_path / "out2", check=False)
    assert r.returncode == 1 and "instance.json" in r.stderr and not (tmp_path / "out2").exists()
    assert events(lone, "fixity.failed")[-1]["detail"]["path"] == "instance.json"
