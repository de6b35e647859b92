"""Tests for tinyfs.core.bagcheck: LoC conformance suite, bagit-python bags, hand-made bags."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import bagit
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfs.core.bagcheck import (
    BagReport,
    Problem,
    decode_manifest_path,
    encode_manifest_path,
    hash_file,
    validate_bag,
)
from tinyfs.core.digests import CHUNK

pytestmark = pytest.mark.core

# The Library of Congress conformance bags (public domain, CC0), copied from
# https://github.com/LibraryOfCongress/bagit-conformance-suite into tests/fixtures.
SUITE = Path(__file__).parent / "fixtures" / "bagit-conformance"


def _suite_bags() -> list[Path]:
    return sorted(d for d in SUITE.glob("v*/*/*") if d.is_dir() and d.parent.name != "windows-only")


# Problem codes each refused conformance bag must produce (at least these).
EXPECTED_PROBLEMS: dict[str, set[str]] = {
    "v0.97/invalid/baginfo-missing-encoding": {"bad-bagit-txt"},
    "v0.97/invalid/bom-in-bagit.txt": {"bad-bagit-txt"},
    "v0.97/invalid/corrupt-data-file": {"checksum-mismatch", "oxum-mismatch"},
    "v0.97/invalid/corrupt-tag-file": {"checksum-mismatch"},
    "v0.97/invalid/extra-file-in-bag": {"extra-file", "oxum-mismatch"},
    "v0.97/invalid/invalid-version-number": {"bad-version"},
    "v0.97/invalid/missing-baginfo": {"missing-file"},
    "v0.97/invalid/missing-bagit.txt": {"missing-bagit-txt"},
    "v0.97/invalid/out-of-scope-file-paths-using-dot-notation": {"unsafe-path"},
    "v0.97/invalid/out-of-scope-file-paths-using-dot-notation-for-fetch": {"unsafe-path"},
    "v0.97/invalid/same-filename-listed-twice-with-different-hashes": {"duplicate-entry"},
    "v0.97/linux-only/out-of-scope-file-paths-using-absolute-path": {"unsafe-path"},
    "v0.97/linux-only/out-of-scope-file-paths-using-absolute-path-for-fetch": {"unsafe-path"},
    "v0.97/linux-only/out-of-scope-file-paths-using-shortcut": {"unsafe-path"},
    "v0.97/linux-only/out-of-scope-file-paths-using-shortcut-for-fetch": {"unsafe-path"},
    "v0.97/linux-only/out-of-scope-file-paths-using-shortcut-username": {"unsafe-path"},
    "v0.97/linux-only/out-of-scope-file-paths-using-shortcut-username-for-fetch": {"unsafe-path"},
    "v1.0/invalid/bagit-with-invalid-whitespace": {"bad-bagit-txt"},
    "v1.0/invalid/notAllManifestsListAllFiles": {"extra-file"},
    "v1.0/invalid/same-filename-listed-twice-with-different-hashes": {"duplicate-entry"},
    # same entry, same hash: a warning before BagIt 1.0, an error from 1.0 on
    "v1.0/invalid/same-filename-listed-twice-with-the-same-hash": {"duplicate-entry"},
}

# Warning codes each "warning" bag must produce.  All of them are detectable on Linux:
# the case/normalization twins and the .DS_Store are listed but absent on disk
# (the suite was made on macOS), which we accept with "missing-alias"/"missing-system-file".
EXPECTED_WARNINGS: dict[str, set[str]] = {
    "v0.97/warning/duplicate-file-with-different-case": {"path-alias", "missing-alias"},
    "v0.97/warning/made-with-md5sum-tools": {"md5sum-style"},
    "v0.97/warning/relative-path": {"leading-dot-slash"},
    "v0.97/warning/same-filename-listed-twice-with-different-normalization": {"path-alias", "missing-alias"},
    "v0.97/warning/same-filename-listed-twice-with-the-same-hash": {"duplicate-entry"},
    "v0.97/warning/special-system-files": {"system-file", "missing-system-file"},
}


def _codes(items: list[Problem]) -> set[str]:
    return {p.code for p in items}


def _pairs(report: BagReport) -> set[tuple[str, str]]:
    return {(p.code, p.path) for p in report.problems}


# --------------------------------------------------------------------------- conformance suite


@pytest.mark.parametrize("bag", _suite_bags(), ids=lambda p: str(p.relative_to(SUITE)))
@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
def test_conformance_suite(bag: Path, fast: bool) -> None:
    name = str(bag.relative_to(SUITE))
    category = bag.parent.name
    report = validate_bag(bag, fast=fast)
    details = "\n".join(map(str, report.problems + report.warnings))
    if category == "valid":
        assert report.valid, details
    elif category == "warning":
        assert report.valid, details
        assert report.warnings, details
        assert EXPECTED_WARNINGS.get(name, set()) <= _codes(report.warnings), details
    else:
        assert category in ("invalid", "linux-only")
        if fast and name == "v0.97/invalid/corrupt-tag-file":
            # only the tag manifest digests are wrong: fast mode does not hash, by design
            return
        assert not report.valid, details
        assert report.problems
        expected = EXPECTED_PROBLEMS.get(name, set())
        if fast:
            expected = expected - {"checksum-mismatch"}
        assert expected <= _codes(report.problems), details


def test_conformance_suite_present() -> None:
    names = {str(b.relative_to(SUITE)) for b in _suite_bags()}
    assert set(EXPECTED_PROBLEMS) <= names
    assert set(EXPECTED_WARNINGS) <= names


def test_conformance_details() -> None:
    r = validate_bag(SUITE / "v0.97/valid/UTF-16-encoded-tag-files")
    assert r.encoding == "UTF-16"
    assert ("Contact-Name", "Chris Adams") in r.info
    assert set(r.payload) == {"data/bare-filename", "data/text-file.txt"}

    r = validate_bag(SUITE / "v0.97/valid/bag-with-encoded-names")
    assert "data/%7Etest1.txt" in r.payload  # only %25, %0A and %0D are decoded
    assert "data/%test2.txt" in r.payload

    r = validate_bag(SUITE / "v0.96/valid/bag-with-leading-dot-slash-in-manifest")
    assert "data/test2.txt" in r.payload

    r = validate_bag(SUITE / "v0.95/valid/basic-bag")
    assert r.version == (0, 95)
    assert ("External-Description", "Uncompressed greyscale TIFF images from the Yoshimuri papers collection.") in r.info

    r = validate_bag(SUITE / "v0.97/warning/duplicate-file-with-different-case")
    assert set(r.payload) == {"data/hello.txt"}  # the absent alias is not offered for ingest

    r = validate_bag(SUITE / "v1.0/invalid/bagit-with-invalid-whitespace")
    assert [p.path for p in r.problems] == ["bagit.txt", "bagit.txt"]


# --------------------------------------------------------------------------- bagit-python bags


@pytest.fixture
def made_bag(tmp_path: Path) -> Path:
    root = tmp_path / "bag"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "empty").write_bytes(b"")
    (root / "ünï cödé.txt").write_text("x")
    bagit.make_bag(str(root), {"Contact-Name": "Ada"}, checksums=["sha256", "sha512"])
    return root


def _flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _set_oxum(root: Path, value: str) -> None:
    info = root / "bag-info.txt"
    lines = [f"Payload-Oxum: {value}" if ln.startswith("Payload-Oxum:") else ln
             for ln in info.read_text().splitlines()]
    info.write_text("\n".join(lines) + "\n")


def test_bagit_python_bag_is_valid(made_bag: Path) -> None:
    r = validate_bag(made_bag)
    assert r.valid, r.problems
    assert r.warnings == []
    assert r.version in {(0, 97), (1, 0)}  # bagit-python 1.8 writes 0.97
    assert r.encoding == "UTF-8"
    assert set(r.payload) == {"data/a.txt", "data/sub/b.bin", "data/empty", "data/ünï cödé.txt"}
    b = (made_bag / "data/sub/b.bin").read_bytes()
    assert r.payload["data/sub/b.bin"] == {
        "sha256": hashlib.sha256(b).hexdigest(),
        "sha512": hashlib.sha512(b).hexdigest(),
    }
    assert ("Contact-Name", "Ada") in r.info
    assert any(k == "Payload-Oxum" for k, _ in r.info)


def test_flipped_byte(made_bag: Path) -> None:
    _flip_byte(made_bag / "data/sub/b.bin")
    r = validate_bag(made_bag)
    assert _pairs(r) == {("checksum-mismatch", "data/sub/b.bin")}
    assert len(r.problems) == 2  # one per algorithm
    assert {p.message.split()[0] for p in r.problems} == {"sha256", "sha512"}
    assert str(r.problems[0]).startswith("data/sub/b.bin: sha")
    assert " expected " in r.problems[0].message and " found " in r.problems[0].message


def test_deleted_file(made_bag: Path) -> None:
    (made_bag / "data/a.txt").unlink()
    r = validate_bag(made_bag)
    assert _pairs(r) == {("missing-file", "data/a.txt"), ("oxum-mismatch", "bag-info.txt")}


def test_extra_file(made_bag: Path) -> None:
    (made_bag / "data/sub/extra.txt").write_text("sneaky")
    r = validate_bag(made_bag)
    assert _pairs(r) == {("extra-file", "data/sub/extra.txt"), ("oxum-mismatch", "bag-info.txt")}


def test_broken_oxum(made_bag: Path) -> None:
    _set_oxum(made_bag, "1.1")
    r = validate_bag(made_bag)
    # bag-info.txt also no longer matches the tag manifests
    assert _pairs(r) == {("oxum-mismatch", "bag-info.txt"), ("checksum-mismatch", "bag-info.txt")}


def test_malformed_oxum(made_bag: Path) -> None:
    _set_oxum(made_bag, "12 bytes")
    r = validate_bag(made_bag, fast=True)
    assert _pairs(r) == {("bad-oxum", "bag-info.txt")}


def test_corrupt_tag_file(made_bag: Path) -> None:
    info = made_bag / "bag-info.txt"
    info.write_text(info.read_text().replace("Contact-Name: Ada", "Contact-Name: Eve"))
    r = validate_bag(made_bag)
    assert _pairs(r) == {("checksum-mismatch", "bag-info.txt")}
    assert len(r.problems) == 2  # sha256 and sha512 tag manifests
    assert validate_bag(made_bag, fast=True).valid  # tag files are not hashed in fast mode


def test_blank_line_in_manifest_is_a_warning_but_changes_its_digest(made_bag: Path) -> None:
    manifest = made_bag / "manifest-sha256.txt"
    manifest.write_text(manifest.read_text() + "\n")
    r = validate_bag(made_bag)
    assert _pairs(r) == {("checksum-mismatch", "manifest-sha256.txt")}
    assert _codes(r.warnings) == {"blank-line"}


def test_corrupt_manifest_digest(made_bag: Path) -> None:
    manifest = made_bag / "manifest-sha512.txt"
    text = manifest.read_text()
    digest = hashlib.sha512(b"hello\n").hexdigest()
    manifest.write_text(text.replace(digest, "0" * 128))
    r = validate_bag(made_bag)
    assert _pairs(r) == {("checksum-mismatch", "data/a.txt"), ("checksum-mismatch", "manifest-sha512.txt")}


def test_all_problems_reported_at_once(made_bag: Path) -> None:
    _flip_byte(made_bag / "data/sub/b.bin")
    (made_bag / "data/a.txt").unlink()
    (made_bag / "data/extra.txt").write_text("sneaky")
    _set_oxum(made_bag, "1.1")
    r = validate_bag(made_bag)
    assert _pairs(r) == {
        ("checksum-mismatch", "data/sub/b.bin"),
        ("missing-file", "data/a.txt"),
        ("extra-file", "data/extra.txt"),
        ("oxum-mismatch", "bag-info.txt"),
        ("checksum-mismatch", "bag-info.txt"),
    }
    assert not r.valid


def test_fast_mode(made_bag: Path) -> None:
    _flip_byte(made_bag / "data/sub/b.bin")
    assert validate_bag(made_bag, fast=True).valid  # no hashing in fast mode
    assert not validate_bag(made_bag).valid
    (made_bag / "data/a.txt").unlink()
    r = validate_bag(made_bag, fast=True)
    assert _pairs(r) == {("missing-file", "data/a.txt"), ("oxum-mismatch", "bag-info.txt")}


def test_fast_mode_catches_oxum_only(made_bag: Path) -> None:
    (made_bag / "data/a.txt").write_text("hello, longer\n")
    r = validate_bag(made_bag, fast=True)
    assert _pairs(r) == {("oxum-mismatch", "bag-info.txt")}


def test_progress_and_workers(made_bag: Path) -> None:
    seen: list[int] = []
    threads: set[str] = set()
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen.append(n)
            threads.add(threading.current_thread().name)

    r = validate_bag(made_bag, workers=3, progress=progress)
    assert r.valid
    payload_bytes = sum(f.stat().st_size for f in (made_bag / "data").rglob("*") if f.is_file())
    tag_bytes = sum((made_bag / n).stat().st_size
                    for n in ("bagit.txt", "bag-info.txt", "manifest-sha256.txt", "manifest-sha512.txt"))
    assert sum(seen) == payload_bytes + tag_bytes  # every byte read exactly once
    assert max(seen) <= 1 << 20
    assert 1 <= len(threads) <= 3   # workers=3: the calling thread and at most two helpers hash
    assert validate_bag(made_bag, workers=1) == validate_bag(made_bag, workers=8)


# --------------------------------------------------------------------------- hand-made bags


def _write_bag(
    root: Path,
    files: dict[str, bytes],
    *,
    algs: tuple[str, ...] = ("sha256",),
    extra_lines: dict[str, list[str]] | None = None,
    fetch: list[str] | None = None,
    info: str | None = None,
) -> Path:
    """Write a minimal BagIt 1.0 bag; ``files`` keys are paths under data/."""
    (root / "data").mkdir(parents=True)
    for rel, content in files.items():
        p = root / "data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    (root / "bagit.txt").write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n")
    for alg in algs:
        lines = [f"{hashlib.new(alg, c).hexdigest()}  {encode_manifest_path('data/' + rel)}"
                 for rel, c in files.items()]
        lines += (extra_lines or {}).get(alg, [])
        (root / f"manifest-{alg}.txt").write_bytes(("\n".join(lines) + "\n").encode())
    octets = sum(len(c) for c in files.values())
    (root / "bag-info.txt").write_text(info if info is not None else f"Payload-Oxum: {octets}.{len(files)}\n")
    if fetch is not None:
        (root / "fetch.txt").write_text("\n".join(fetch) + "\n")
    return root


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        validate_bag(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        validate_bag(tmp_path / "nonexistent")


def test_empty_directory(tmp_path: Path) -> None:
    r = validate_bag(tmp_path)
    assert _codes(r.problems) == {"missing-bagit-txt", "missing-manifest", "missing-payload-dir"}
    assert r.version is None


def test_hand_made_bag_with_awkward_names(tmp_path: Path) -> None:
    files = {"line\nbreak.txt": b"1", "carriage\rreturn%25.txt": b"22", "100%.txt": b"333", "sp ace/ü.txt": b""}
    root = _write_bag(tmp_path / "bag", files, algs=("md5", "sha1", "sha224", "sha384", "sha512"))
    r = validate_bag(root)
    assert r.valid, r.problems
    assert set(r.payload) == {f"data/{k}" for k in files}
    assert set(r.payload["data/100%.txt"]) == {"md5", "sha1", "sha224", "sha384", "sha512"}


def test_fetch_of_absent_file_is_refused(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"remote").hexdigest()
    root = _write_bag(
        tmp_path / "bag", {"here.txt": b"local"},
        extra_lines={"sha256": [f"{digest}  data/remote.bin"]},
        fetch=["https://example.org/remote.bin 6 data/remote.bin"],
        info="Payload-Oxum: 11.2\n",
    )
    r = validate_bag(root)
    assert _pairs(r) == {("fetch-unsupported", "data/remote.bin")}
    assert "does not fetch" in r.problems[0].message


def test_fetch_paths_must_be_safe(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a"}, fetch=[
        "https://example.org/x - ../x", "https://example.org/y - /etc/y", "https://example.org/z - ~/z",
        "https://example.org/t - tagfile.txt", "no-length-field data/a",
    ])
    r = validate_bag(root)
    assert [p.code for p in r.problems] == [
        "unsafe-path", "unsafe-path", "unsafe-path", "outside-payload", "bad-fetch-line"]


@pytest.mark.parametrize("bad", [
    "data/../../etc/passwd", "/etc/passwd", "~/x", "~root/x", "data/./x", "data//x", "C:\\x", "\\\\srv\\x",
])
def test_unsafe_manifest_paths(tmp_path: Path, bad: str) -> None:
    digest = hashlib.sha256(b"").hexdigest()
    root = _write_bag(tmp_path / "bag", {"a": b"a"}, extra_lines={"sha256": [f"{digest}  {bad}"]})
    r = validate_bag(root)
    assert _codes(r.problems) == {"unsafe-path"}, r.problems


def test_payload_paths_must_be_under_data(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"").hexdigest()
    root = _write_bag(tmp_path / "bag", {"a": b"a"}, extra_lines={"sha256": [f"{digest}  bagit.txt"]})
    assert _codes(validate_bag(root).problems) == {"outside-payload"}


def test_tag_manifest_may_not_list_payload(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a"})
    (root / "tagmanifest-sha256.txt").write_text(f"{hashlib.sha256(b'a').hexdigest()}  data/a\n")
    assert _codes(validate_bag(root).problems) == {"payload-in-tagmanifest"}


def test_symlinks_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = _write_bag(tmp_path / "bag", {"a": b"a"})
    (root / "data" / "link").symlink_to(outside / "secret")
    (root / "meta").symlink_to(outside)
    (root / "tagmanifest-sha256.txt").write_text(f"{hashlib.sha256(b'secret').hexdigest()}  meta/secret\n")
    r = validate_bag(root)
    assert _pairs(r) == {("not-regular-file", "data/link"), ("not-regular-file", "meta/secret")}


def test_incomplete_and_duplicate_manifest_entries(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a", "b": b"b"}, algs=("sha256", "md5"))
    md5 = root / "manifest-md5.txt"
    md5.write_text("".join(ln + "\n" for ln in md5.read_text().splitlines() if not ln.endswith("data/b")))
    sha = root / "manifest-sha256.txt"
    sha.write_text(sha.read_text() + sha.read_text().splitlines()[0] + "\n")
    r = validate_bag(root)
    assert _pairs(r) == {("incomplete-manifest", "data/b"), ("duplicate-entry", "data/a")}


def test_bad_manifest_lines_and_algorithms(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a"}, extra_lines={"sha256": ["abc  data/a", "nodigest"]})
    (root / "manifest-crc32.txt").write_text("00000000  data/a\n")
    r = validate_bag(root)
    assert [p.code for p in r.problems] == ["unsupported-algorithm", "bad-manifest-line", "bad-manifest-line"]


def test_bagit_txt_strictness(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a"})
    decl = root / "bagit.txt"
    decl.write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\nExtra: 1\n")
    assert _codes(validate_bag(root).problems) == {"bad-bagit-txt"}
    decl.write_text("Tag-File-Character-Encoding: UTF-8\nBagIt-Version: 1.0\n")
    assert _codes(validate_bag(root).problems) == {"bad-bagit-txt"}
    decl.write_text("BagIt-Version:  1.0\nTag-File-Character-Encoding: UTF-8\n")
    assert _codes(validate_bag(root).problems) == {"bad-bagit-txt"}
    decl.write_text("BagIt-Version: 9.9\nTag-File-Character-Encoding: UTF-8\n")
    assert _codes(validate_bag(root).problems) == {"bad-version"}
    decl.write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: KLINGON-8\n")
    assert _codes(validate_bag(root).problems) == {"bad-encoding"}
    decl.write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: rot13\n")  # not a text encoding
    assert _codes(validate_bag(root).problems) == {"bad-encoding"}
    decl.write_text("BagIt-Version: 1.0\r\nTag-File-Character-Encoding: UTF-8")  # CRLF, no final newline
    assert validate_bag(root).valid


def test_tag_file_encoding(tmp_path: Path) -> None:
    root = _write_bag(tmp_path / "bag", {"a": b"a"})
    (root / "bag-info.txt").write_bytes("Payload-Oxum: 1.1\nContact-Name: José\n".encode("latin-1"))
    r = validate_bag(root)
    assert _pairs(r) == {("bad-encoding", "bag-info.txt")}
    (root / "bagit.txt").write_text("BagIt-Version: 1.0\nTag-File-Character-Encoding: ISO-8859-1\n")
    r = validate_bag(root)
    assert r.valid, r.problems
    assert ("Contact-Name", "José") in r.info


def test_bag_info_parsing(tmp_path: Path) -> None:
    info = ("Payload-Oxum: 1.1\nExternal-Description: first part\n  second\tpart\n\tthird\n"
            "Empty:\nContact-Name: A\ncontact-name: B\n")
    root = _write_bag(tmp_path / "bag", {"a": b"a"}, info=info)
    r = validate_bag(root)
    assert r.valid, r.problems
    assert r.info == [("Payload-Oxum", "1.1"), ("External-Description", "first part second\tpart third"),
                      ("Empty", ""), ("Contact-Name", "A"), ("contact-name", "B")]
    (root / "bag-info.txt").write_text("  orphan continuation\nno colon here\nLabel :value\n")
    r = validate_bag(root, fast=True)
    assert [p.code for p in r.problems] == ["bad-tag-line"] * 3


def test_problem_str() -> None:
    assert str(Problem("missing-file", "data/x", "gone")) == "data/x: gone"
    assert str(Problem("missing-manifest", "", "no manifest")) == "no manifest"


# --------------------------------------------------------------------------- helpers


def test_hash_file_one_pass(tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) // 2 + 1000)
    f = tmp_path / "f"
    f.write_bytes(data)
    seen: list[int] = []
    got = hash_file(f, ["md5", "sha1", "sha256", "sha512"], seen.append)
    assert got == {a: hashlib.new(a, data).hexdigest() for a in ("md5", "sha1", "sha256", "sha512")}
    whole, rest = divmod(len(data), CHUNK)
    assert seen == [CHUNK] * whole + [rest] and rest      # one pass, in reads of CHUNK, progress for each
    assert hash_file(f, []) == {}
    with pytest.raises(ValueError):
        hash_file(f, ["crc32"])


@pytest.mark.parametrize(("encoded", "decoded"), [
    ("data/%0A%0d%25", "data/\n\r%"),
    ("data/%0a%0D", "data/\n\r"),
    ("data/%7Edir/%test", "data/%7Edir/%test"),
    ("data/%2525", "data/%25"),
    ("data/%250A", "data/%0A"),
    ("data/plain name.txt", "data/plain name.txt"),
])
def test_decode_manifest_path(encoded: str, decoded: str) -> None:
    assert decode_manifest_path(encoded) == decoded


def test_encode_manifest_path() -> None:
    assert encode_manifest_path("100%\r\n x") == "100%25%0D%0A x"
    assert encode_manifest_path("%0A") == "%250A"


_TRICKY = st.sampled_from(["%", "\r", "\n", "\r\n", " ", "0", "a", "A", "d", "D", "2", "5", "é", "ß", "漢", "🙂"])


@given(st.lists(st.one_of(_TRICKY, st.text()), max_size=20).map("".join))
def test_manifest_path_roundtrip(s: str) -> None:
    encoded = encode_manifest_path(s)
    assert "\r" not in encoded and "\n" not in encoded
    assert decode_manifest_path(encoded) == s


_GARBAGE = st.lists(
    st.one_of(st.binary(max_size=40), _TRICKY.map(str.encode), st.sampled_from([
        b"BagIt-Version: 1.0\n", b"Tag-File-Character-Encoding: UTF-16\n", b"\xef\xbb\xbf", b"data/a",
        b"*data/a", b"./data/a", b"../x", b"~/x", b"\x00", b"0" * 64 + b"  ", b"Payload-Oxum: 1.1\n",
        b"http://x - ", b"  cont\n", b"%0A", b"\xff\xfe",
    ])), max_size=12).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(bagit_txt=_GARBAGE, manifest=_GARBAGE, tagmanifest=_GARBAGE, info=_GARBAGE, fetch=_GARBAGE)
def test_garbage_never_raises(bagit_txt: bytes, manifest: bytes, tagmanifest: bytes, info: bytes,
                              fetch: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "data").mkdir()
        (root / "data" / "a").write_bytes(b"a")
        for name, content in [("bagit.txt", bagit_txt), ("manifest-sha256.txt", manifest),
                              ("tagmanifest-md5.txt", tagmanifest), ("bag-info.txt", info),
                              ("fetch.txt", fetch)]:
            (root / name).write_bytes(content)
        report = validate_bag(root, workers=2)
        assert all(isinstance(p, Problem) for p in report.problems + report.warnings)
