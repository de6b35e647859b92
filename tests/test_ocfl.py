"""OCFL (docs/ocfl.md): `export --ocfl` writes a resource, every instance, as an OCFL 1.1 object that
ocfl-py validates without a warning; `ingest --ocfl` imports an object as a new resource, one instance per
version; the round trip gives the same states. The official fixtures: every good and warn object imports
with its logical states, every bad one is refused with its error code and leaves the archive as it was.

The official fixtures (OCFL/fixtures on GitHub, `1.1/{good,bad,warn}-objects`, CC BY 4.0) are third-party
data this repository does not carry: they are read from $TINYFS_OCFL_FIXTURES or ../shared/ocfl-fixtures/1.1
(beside the project, as the acceptance suite is), and their tests are skipped, visibly, without them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from ocfl.validator import Validator

from tinyfs import Archive, FixityError
from tinyfs.core import ocflingest
from tinyfs.core.errors import AlreadyExists, InvalidOcfl
from tinyfs.core.model import DirEntry
from tinyfs.core.ocflingest import created_ns
from tinyfs.core.ocflmap import creator_of, user_block

pytestmark = pytest.mark.core

FIXTURES = Path(os.environ.get("TINYFS_OCFL_FIXTURES")
                or Path(__file__).resolve().parent.parent.parent / "shared" / "ocfl-fixtures" / "1.1")
NS = 1_400_000_000_000_000_123
LONG = "/".join([f"level-{n}-" + "x" * 90 for n in range(12)])     # 1,200 bytes: a chosen content path
# Bad fixtures for which ocfl-py reports another code than the fixture's name: ocfl-py's own tests
# (tests/test_validator.py) expect exactly these codes for them; a validator is only required to refuse.
OCFL_PY_CODES = {
    "E010_missing_versions": "E046",
    "E015_content_not_in_content_dir": "E042",
    "E019_inconsistent_content_dir": "E042",
    "E040_wrong_version_in_version_dir": "E066",
    "E100_E099_fixity_invalid_content_paths": "E057",
}


def fixtures(kind: str) -> list:
    if not (FIXTURES / kind).is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"the official OCFL fixtures are not at {FIXTURES}"))]
    return sorted((FIXTURES / kind).iterdir())


def official(kind: str, name: str) -> Path:
    """One official fixture; the test is skipped when they are not here."""
    path = FIXTURES / kind / name
    if not path.is_dir():
        pytest.skip(f"the official OCFL fixtures are not at {FIXTURES}")
    return path


def ocfl_py(path: Path) -> Validator:
    """ocfl-py's verdict on an object, every content file hashed, warnings kept."""
    validator = Validator(log_warnings=True, check_digests=True)
    validator.validate_object(str(path))
    return validator


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ROOT: its kind, mode and (files) content digest, to see that nothing changed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = os.lstat(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
def resource(tmp_path) -> Archive:
    """Resource r with four instances: files with odd names (spaces, unicode, '%', LF, a long path), a mode,
    mtimes, an xattr, hard links, symlinks (one dangling), an empty directory, the root's mode and mtime;
    then a change, a removal and an addition; then content an earlier instance had back under another
    name; then the same state with a label."""
    archive = Archive.init(tmp_path / "archive", digests=["sha512", "sha256", "md5"])
    src = tmp_path / "src"
    (src / "d" / "empty").mkdir(parents=True)
    (src / "d" / "a b.txt").write_text("hello\n")
    (src / "100%.txt").write_text("percent\n")
    (src / "ünï").mkdir()
    (src / "ünï" / "çødé.txt").write_text("unicode\n")
    (src / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "x.sh", 0o700)
    os.link(src / "100%.txt", src / "hard link")
    os.symlink("d/a b.txt", src / "link")
    os.symlink("nowhere", src / "dangling")
    (src / "line\nfeed").write_text("lf\n")
    (src / LONG).parent.mkdir(parents=True)
    (src / LONG).write_text("long\n")
    try:
        os.setxattr(src / "x.sh", "user.origin", b"\x00\xffscanner")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    os.utime(src / "d" / "a b.txt", ns=(NS, NS))
    os.utime(src / "d" / "empty", ns=(NS + 1, NS + 1))
    os.chmod(src / "d", 0o750)
    os.utime(src / "d", ns=(NS + 2, NS + 2))
    with archive.new("r", message="first", creator="Alice <alice@example.org>", label="v1") as txn:
        for p in sorted(src.iterdir()):
            txn.add(p)
        txn.root = DirEntry(0o750, NS + 3)          # the resource root's mode and mtime, as a mount keeps them
    with archive.get("r", "a", message="second\nof two lines", creator="bob") as txn:
        txn.add_bytes("d/a b.txt", b"hello again\n")
        txn.remove("ünï")
        txn.add_bytes("new%20name", b"new\n")
    with archive.get("r", "a", message="third", creator="carol@example.org") as txn:
        txn.add_bytes("back.txt", b"unicode\n")
        txn.remove("link")
    with archive.get("r", "a", label="final") as txn:
        pass
    assert len(archive.get("r").instances) == 4
    return archive


def test_export_is_an_ocfl_object_without_a_warning(resource, tmp_path):
    dest = tmp_path / "object"
    result = resource.get("r").export_ocfl(dest)
    assert (result.versions, result.files) == (4, 8)
    validator = ocfl_py(dest)
    assert (validator.log.num_errors, validator.log.num_warnings) == (0, 0), validator.status_str()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".object")] == []

    inventory = json.loads((dest / "inventory.json").read_text("utf-8"))
    assert inventory["digestAlgorithm"] == "sha512" and inventory["id"] == "urn:tinyfs:r"
    assert inventory["head"] == "v4" and sorted(inventory["fixity"]) == ["md5", "sha256"]
    content_paths = [p for paths in inventory["manifest"].values() for p in paths]
    assert len(content_paths) == 8          # each content once, though v3 brings back v1's bytes
    for alg in ("md5", "sha256"):
        assert sorted(p for paths in inventory["fixity"][alg].values() for p in paths) == sorted(content_paths)
    for path in content_paths:
        data = (dest / path).read_bytes()
        assert sha512(data) in inventory["manifest"]
        assert path in inventory["fixity"]["md5"][hashlib.md5(data).hexdigest()]
    assert not (dest / "v3" / "content").exists() and not (dest / "v4" / "content").exists()
    assert {"v1/content/100%.txt", "v1/content/ünï/çødé.txt", "v1/content/line\nfeed"} <= set(content_paths)
    long_digest = resource.get("r").state("v1").files[LONG].digest
    assert f"v1/content/.tinyfs/{long_digest[:40]}" in content_paths

    for n, doc in enumerate(resource.get("r").instances, 1):
        version = inventory["versions"][f"v{n}"]
        logical = {p: d for d, paths in version["state"].items() for p in paths}
        assert logical == {p: f.digest for p, f in doc.state.files.items()}
        assert (version["created"], version["message"]) == (doc.created, doc.message)
        assert creator_of(version["user"]) == doc.creator
        record = dest / "logs" / "tinyfs" / f"v{n}.instance.json"
        assert record.read_bytes() == (resource.root.instance_dir("r", doc.id) / "instance.json").read_bytes()
    assert inventory["versions"]["v1"]["user"] == {"name": "Alice", "address": "mailto:alice@example.org"}
    assert inventory["versions"]["v3"]["user"]["address"] == "mailto:carol@example.org"
    assert (dest / "v4" / "inventory.json").read_bytes() == (dest / "inventory.json").read_bytes()


def test_round_trip_gives_the_same_states(resource, tmp_path, archive_ok):
    dest = tmp_path / "object"
    resource.get("r").export_ocfl(dest)
    result = resource.ingest_ocfl("copy", dest)
    assert [v for v, _iid in result.committed] == ["v1", "v2", "v3", "v4"]
    originals, copies = resource.get("r").instances, resource.get("copy").instances
    assert [c.id for c in copies] == [iid for _v, iid in result.committed]
    for original, copy in zip(originals, copies, strict=True):
        assert copy.state == original.state          # files, modes, mtimes, xattrs, links, dirs, groups, root
        assert (copy.message, copy.creator, copy.label) == (original.message, original.creator, original.label)
    first = copies[0].state
    assert first.links["dangling"].target == "nowhere" and "d/empty" in first.dirs
    assert first.hardlinks == (("100%.txt", "hard link"),) and first.files["x.sh"].mode == 0o700
    assert first.files["x.sh"].xattrs and first.files["d/a b.txt"].mtime_ns == NS
    assert first.root == DirEntry(0o750, NS + 3)
    assert resource.get("copy").read("back.txt") == b"unicode\n"
    archive_ok(resource.root.root)


def test_a_sha256_archive_exports_sha512_content_with_its_sha256_as_fixity(tmp_path):
    archive = Archive.init(tmp_path / "archive", digests=["sha256"])
    with archive.new("r", message="one") as txn:
        txn.add_bytes("a.txt", b"a\n")
        txn.add_bytes("b/c.txt", b"c\n")
    dest = tmp_path / "object"
    archive.get("r").export_ocfl(dest)
    validator = ocfl_py(dest)
    assert (validator.log.num_errors, validator.log.num_warnings) == (0, 0), validator.status_str()
    inventory = json.loads((dest / "inventory.json").read_text())
    assert inventory["digestAlgorithm"] == "sha512"      # sha256 would be warning W004
    state = archive.get("r").state()
    assert sorted(inventory["fixity"]["sha256"]) == sorted(f.digest for f in state.files.values())
    archive.ingest_ocfl("copy", dest)
    assert archive.get("copy").state() == state


def test_damaged_stored_bytes_fail_the_export_and_leave_nothing(resource, tmp_path):
    doc = resource.get("r").instances[0]
    stored = resource.root.stored_path("r", doc.stored[doc.state.files["d/a b.txt"].digest])
    os.chmod(stored, 0o644)
    stored.write_bytes(b"HELLO\n")
    with pytest.raises(FixityError, match="stored bytes damaged"):
        resource.get("r").export_ocfl(tmp_path / "object")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "src"]
    with pytest.raises(AlreadyExists):
        resource.get("r").export_ocfl(tmp_path / "src")


@pytest.mark.parametrize("fixture", fixtures("good-objects") + fixtures("warn-objects"), ids=lambda p: p.name if p else "missing")
def test_every_valid_fixture_imports_with_its_logical_states(fixture, tmp_path):
    archive = Archive.init(tmp_path / "archive")
    result = archive.ingest_ocfl("obj", fixture)
    inventory = json.loads((fixture / "inventory.json").read_text())
    versions = sorted(inventory["versions"], key=lambda v: int(v[1:]))
    assert sorted([v for v, _ in result.committed] + result.unchanged) == sorted(versions) and not result.held
    if not result.committed:            # one empty version: nothing to commit, no resource
        assert fixture.name == "minimal_no_content" and "obj" not in archive
        return
    assert [iid for _v, iid in result.committed] == archive.root.instance_ids("obj")
    manifest = {d.lower(): paths[0] for d, paths in inventory["manifest"].items()}
    before: dict[str, str] = {}
    entries: dict = {}                  # the entries of the instance before
    for version in versions:
        block = inventory["versions"][version]
        logical = {p: d.lower() for d, paths in block["state"].items() for p in paths}
        iid = dict(result.committed).get(version)
        if iid is None:                 # unchanged: the same logical state as the version before
            assert logical == before
            continue
        doc = archive.root.instance("obj", iid)
        assert sorted(doc.state.files) == sorted(logical)
        if inventory["digestAlgorithm"] == "sha512":
            assert {p: f.digest for p, f in doc.state.files.items()} == logical
        for path, entry in doc.state.files.items():          # the bytes are the content's
            assert archive.get("obj").read(path, iid) == (fixture / manifest[logical[path]]).read_bytes()
            if before.get(path) == logical[path]:      # unchanged: keeps its entry (and mtime)
                assert entry == entries[path]
            else:                                       # new: the version's created time
                assert entry.mtime_ns == created_ns(block["created"])
            assert entry.mode == 0o644
        assert doc.message == block.get("message", "") and doc.creator == creator_of(block.get("user"))
        before, entries = logical, doc.state.files


def test_spec_ex_full_maps_users_times_and_unchanged_files(tmp_path):
    archive = Archive.init(tmp_path / "archive")
    result = archive.ingest_ocfl("obj", official("good-objects", "spec-ex-full"))
    v1, v2, v3 = (archive.root.instance("obj", iid) for _v, iid in result.committed)
    assert (v1.creator, v1.message) == ("Alice <alice@example.com>", "Initial import")
    assert v1.state.files["foo/bar.xml"].mtime_ns == created_ns("2018-01-01T01:01:01Z")
    assert v1.state.dirs["foo"].mode == 0o755
    assert v2.state.files["empty.txt"] == v1.state.files["empty.txt"]          # unchanged: kept whole
    assert v2.state.files["foo/bar.xml"].mtime_ns == created_ns("2018-02-02T02:02:02Z")
    assert v3.state.files["image.tiff"].mtime_ns == created_ns("2018-03-03T03:03:03Z")
    assert created_ns("2018-01-01T01:01:01.123456789+01:00") == created_ns("2018-01-01T00:01:01Z") + 123456789


@pytest.mark.parametrize("fixture", fixtures("bad-objects"), ids=lambda p: p.name if p else "missing")
def test_every_bad_fixture_is_refused_with_its_code(fixture, tmp_path):
    archive = Archive.init(tmp_path / "archive")
    with archive.new("obj", message="before") as txn:         # something the refusal must leave alone
        txn.add_bytes("kept.txt", b"kept\n")
    before = snapshot(archive.root.root)
    with pytest.raises(InvalidOcfl) as refused:
        archive.ingest_ocfl("new", fixture)
    message = str(refused.value)
    code = OCFL_PY_CODES.get(fixture.name, fixture.name.split("_")[0])
    assert re.search(rf"\b{code}[a-z]?\b", message), message
    assert "\n" not in message and "nothing was committed" in message
    assert snapshot(archive.root.root) == before


def test_a_damaged_export_is_refused_and_nothing_changes(resource, tmp_path):
    dest = tmp_path / "object"
    resource.get("r").export_ocfl(dest)
    before = snapshot(resource.root.root)
    broken = tmp_path / "broken"
    shutil.copytree(dest, broken)
    content = broken / "v2" / "content" / "d" / "a b.txt"
    content.write_bytes(content.read_bytes()[:-1])                   # truncated
    with pytest.raises(InvalidOcfl, match=r"E092a.*nothing was committed"):
        resource.ingest_ocfl("copy", broken)
    (broken / "inventory.json").unlink()
    with pytest.raises(InvalidOcfl, match="E063"):
        resource.ingest_ocfl("copy", broken)
    assert snapshot(resource.root.root) == before


def test_content_that_changed_after_validation_is_refused(tmp_path):
    """The copy compares each file with the inventory again: bytes changed since ocfl-py hashed them
    (here, after it, as a concurrent writer would) are refused, not committed."""
    obj = tmp_path / "object"
    shutil.copytree(official("good-objects", "spec-ex-full"), obj)
    inventory = json.loads((obj / "inventory.json").read_text())
    (obj / "v1" / "content" / "foo" / "bar.xml").write_bytes(b"<changed/>")
    versions = ocflingest._versions(inventory)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidOcfl, match=r"v1/content/foo/bar.xml: its sha512 is .*\[E092\]"):
        ocflingest._copy_content(obj, inventory, versions, work, ["sha512"], None)


def test_records_must_describe_their_versions(resource, tmp_path):
    dest = tmp_path / "object"
    resource.get("r").export_ocfl(dest)
    before = snapshot(resource.root.root)
    record = dest / "logs" / "tinyfs" / "v2.instance.json"
    original = record.read_bytes()
    record.write_bytes(original.replace(b'"x.sh"', b'"y.sh"'))
    with pytest.raises(InvalidOcfl, match="does not match its sha512 sidecar"):
        resource.ingest_ocfl("copy", dest)
    sidecar = dest / "logs" / "tinyfs" / "v2.instance.json.sha512"
    sidecar.write_text(f"{sha512(record.read_bytes())} v2.instance.json\n")
    with pytest.raises(InvalidOcfl, match=r"v2.instance.json does not describe version v2: 2 problems: x.sh: in "
                                          r"the version's logical state.*y.sh: in logs/tinyfs/v2"):
        resource.ingest_ocfl("copy", dest)
    assert snapshot(resource.root.root) == before


def test_without_records_the_logical_states_are_imported(resource, tmp_path):
    dest = tmp_path / "object"
    resource.get("r").export_ocfl(dest)
    shutil.rmtree(dest / "logs")
    result = resource.ingest_ocfl("plain", dest)
    assert [v for v, _ in result.committed] == ["v1", "v2", "v3"] and result.unchanged == ["v4"]
    for original, copy in zip(resource.get("r").instances, resource.get("plain").instances, strict=False):
        assert {p: f.digest for p, f in copy.state.files.items()} == \
            {p: f.digest for p, f in original.state.files.items()}
        assert not copy.state.links and "d/empty" not in copy.state.dirs
        assert {f.mode for f in copy.state.files.values()} == {0o644}
        assert (copy.message, copy.creator) == (original.message, original.creator)


def test_an_interrupted_import_is_finished_by_running_it_again(resource, tmp_path):
    dest = tmp_path / "object"
    resource.get("r").export_ocfl(dest)
    first_two = tmp_path / "first-two"               # the object as it was at v2: what v1, v2 committed
    shutil.copytree(dest, first_two, ignore=shutil.ignore_patterns("v3", "v4", "v3.*", "v4.*"))
    for name in ("inventory.json", "inventory.json.sha512"):
        shutil.copy(first_two / "v2" / name, first_two / name)
    assert resource.ingest_ocfl("copy", first_two).committed[-1][0] == "v2"
    result = resource.ingest_ocfl("copy", dest)
    assert result.held == ["v1", "v2"] and [v for v, _ in result.committed] == ["v3", "v4"]
    assert [d.state for d in resource.get("copy").instances] == [d.state for d in resource.get("r").instances]
    again = resource.ingest_ocfl("copy", dest)
    assert again.held == ["v1", "v2", "v3", "v4"] and again.committed == []
    before = snapshot(resource.root.root)
    with pytest.raises(AlreadyExists, match="not the first versions of this object"):
        resource.ingest_ocfl("r", official("good-objects", "spec-ex-full"))
    assert snapshot(resource.root.root) == before


@pytest.mark.parametrize("creator", ["Alice <alice@example.org>", "alice@example.org", "alice", "", "uid 1000",
                                     "Bob <https://orcid.org/0000-0002-1825-0097>", "A <not an address>"])
def test_the_version_user_gives_back_the_creator(creator):
    user = user_block(creator)
    assert re.match(r"\w{3,6}:", user["address"])     # ocfl-py's test for a URI address (else W009)
    assert creator_of(user) == creator


def test_the_command_line(resource, tmp_path, tinyfs):
    root, dest = resource.root.root, tmp_path / "object"
    tinyfs("export", root, "r", dest, "--ocfl")
    validator = ocfl_py(dest)
    assert (validator.log.num_errors, validator.log.num_warnings) == (0, 0)
    out = tinyfs("ingest", root, "copy", "--ocfl", dest).stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == ["v1", "v2", "v3", "v4"]
    assert [line.split("\t")[1] for line in out] == [d.id for d in resource.get("copy").instances]

    bad = tinyfs("ingest", root, "other", "--ocfl", official("bad-objects", "E058_no_sidecar"), check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert re.fullmatch(r"tinyfs: invalid OCFL object .*E058_no_sidecar: E058a: \[E058a\] .* \(nothing was "
                        r"committed\)\n", bad.stderr), bad.stderr
    usage = tinyfs("export", root, "r", tmp_path / "o2", "--ocfl", "--tar", check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("tinyfs: export --ocfl")
    usage = tinyfs("ingest", root, "other", "--ocfl", dest, "--message", "m", check=False)
    assert usage.returncode == 2 and "do not apply" in usage.stderr
    assert "other" not in resource

    doc = resource.get("r").instances[1]
    stored = resource.root.stored_path("r", doc.stored[doc.state.files["new%20name"].digest])
    os.chmod(stored, 0o644)
    stored.write_bytes(b"damaged\n")
    damaged = tinyfs("export", root, "r", tmp_path / "o3", "--ocfl", check=False)
    assert damaged.returncode == 1 and "r/new%20name: stored bytes damaged" in damaged.stderr
    assert not (tmp_path / "o3").exists()
