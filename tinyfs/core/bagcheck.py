"""Strict BagIt (RFC 8493) reader and validator.

``validate_bag`` reads a bag directory and returns a :class:`BagReport` listing
every problem (the bag is invalid) and every warning (the bag is valid, but
something deserves a human's attention).  It never raises for a broken bag; it
raises :class:`NotADirectoryError` only when the path is not a directory.

It is stricter than bagit-python where RFC 8493 and the Library of Congress
conformance suite are: ``bagit.txt`` must be exactly ``BagIt-Version: M.N`` and
``Tag-File-Character-Encoding: ENC`` (no BOM, no stray whitespace), payload
paths must stay under ``data/`` and may not use ``..``, absolute paths or
``~`` shortcuts, every payload manifest must list every payload file, and
files named in ``fetch.txt`` must already be present (tinyfs never fetches
from the network).

Two modes:

* ``fast=True``: structure, manifest coverage (no missing, no extra payload
  files) and Payload-Oxum; nothing is hashed.
* full (default): additionally hashes every payload file and every tag file
  listed in a tag manifest, all algorithms of one file in one read pass,
  files spread over a thread pool (hashlib releases the GIL).

Problem codes (``BagReport.problems``; any of them makes the bag invalid)
-------------------------------------------------------------------------
missing-bagit-txt      no ``bagit.txt``
bad-bagit-txt          ``bagit.txt`` has a BOM, is not UTF-8, has stray whitespace,
                       missing, misordered or extra lines
bad-version            ``BagIt-Version`` malformed (``.97``) or not a known version
bad-encoding           unknown ``Tag-File-Character-Encoding``, or a tag file that does
                       not decode with it
missing-payload-dir    no ``data/`` directory
missing-manifest       no ``manifest-ALG.txt``
unsupported-algorithm  ``manifest-ALG.txt``/``tagmanifest-ALG.txt`` with an unknown ALG
bad-manifest-line      manifest line that is not ``DIGEST<whitespace>PATH`` or whose
                       digest has the wrong length for its algorithm
bad-tag-line           malformed ``bag-info.txt`` line (no colon, orphan continuation,
                       and for BagIt >= 1.0 whitespace before the colon or none after)
bad-fetch-line         malformed ``fetch.txt`` line
duplicate-entry        a path listed twice in one manifest (with different digests in
                       any version; with the same digest from BagIt 1.0 on)
unsafe-path            ``..``, absolute, ``~``, drive-letter/UNC, NUL or non-canonical
                       (empty or ``.`` component) path in a manifest or fetch.txt
outside-payload        payload manifest or fetch.txt path not under ``data/``
payload-in-tagmanifest tag manifest lists a payload (``data/...``) file
missing-file           a file listed in a manifest or tag manifest is absent
extra-file             payload file listed in no payload manifest
incomplete-manifest    payload file (or fetch.txt entry) missing from one of the payload
                       manifests
not-regular-file       symlink, device, FIFO... where a regular file or directory is
                       expected
unreadable-file        OS error while reading a file
checksum-mismatch      digest differs from the manifest (one problem per algorithm)
bad-oxum               Payload-Oxum is not ``OCTETS.FILES``
oxum-mismatch          Payload-Oxum disagrees with the payload on disk
fetch-unsupported      ``fetch.txt`` names a file that is not in the bag

Warning codes (``BagReport.warnings``; the bag stays valid)
-----------------------------------------------------------
leading-dot-slash      manifest path written ``./data/...``
md5sum-style           manifest path written ``*data/...`` (md5sum binary-mode marker)
duplicate-entry        same path and digest listed twice (BagIt < 1.0)
path-alias             manifest paths that differ only by letter case or Unicode
                       normalization (they collide on macOS/Windows file systems)
missing-alias          a listed path is absent but its alias (see above) is present with
                       the same digests; it is left out of ``BagReport.payload``
system-file            payload contains an OS junk file (``.DS_Store``, ``Thumbs.db``...)
missing-system-file    a listed OS junk file is absent; left out of ``BagReport.payload``
bom                    a UTF-8 tag file other than bagit.txt starts with a BOM
blank-line             blank line in a tag file
nonstandard-separator  ``bag-info.txt`` ``Label : value`` or ``Label:value`` (BagIt < 1.0)
fetch-ignored          ``fetch.txt`` present but every file in it is already in the bag

Payload-Oxum is accepted if it matches the payload on disk, or the payload on
disk plus the excused absent entries (``missing-alias``/``missing-system-file``)
when their sizes are known (an alias has its twin's size; an entry whose
digests are those of empty input has size 0) — bags made on macOS count them.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .digests import hash_file as _hash_file
from .digests import parallel

logger = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS: tuple[str, ...] = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
KNOWN_VERSIONS: frozenset[tuple[int, int]] = frozenset(
    {(0, 93), (0, 94), (0, 95), (0, 96), (0, 97), (1, 0)}
)
SYSTEM_FILE_NAMES: frozenset[str] = frozenset(
    {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", ".directory"}
)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_PCT_DECODE = re.compile(r"%(25|0[aAdD])")
_PCT_ENCODE = re.compile(r"[%\r\n]")
_PCT_ENCODINGS = MappingProxyType({"%": "%25", "\r": "%0D", "\n": "%0A"})
_MANIFEST_NAME = re.compile(r"(tag)?manifest-(.+)\.txt")
_MANIFEST_LINE = re.compile(r"([^ \t]+)[ \t]+(.*)")
_FETCH_LINE = re.compile(r"([^ \t]+)[ \t]+([^ \t]+)[ \t]+(.+)")
_DECL_LINE = re.compile(r"([^:]*):(.*)")
_VERSION = re.compile(r"(\d+)\.(\d+)")
_OXUM = re.compile(r"(\d+)\.(\d+)")
_HEX = re.compile(r"[0-9a-f]*")
_DRIVE_OR_UNC = re.compile(r"[A-Za-z]:[\\/]|\\\\")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Problem:
    """One finding about a bag: ``code`` is stable, ``message`` is for humans."""

    code: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class BagReport:
    """Everything ``validate_bag`` learned about a bag."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    version: tuple[int, int] | None = None
    encoding: str | None = None
    info: list[tuple[str, str]] = field(default_factory=list)
    payload: dict[str, dict[str, str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)   # regular files found under data/, as lstat saw them
    tags: dict[str, dict[str, str]] = field(default_factory=dict)   # tag file -> {alg: digest}, from tag manifests

    @property
    def valid(self) -> bool:
        return not self.problems

    def problem(self, code: str, path: str, message: str) -> None:
        self.problems.append(Problem(code, path, message))

    def warn(self, code: str, path: str, message: str) -> None:
        self.warnings.append(Problem(code, path, message))


# --------------------------------------------------------------------------- public helpers


def encode_manifest_path(p: str) -> str:
    """Percent-encode ``%``, CR and LF (RFC 8493 §2.1.3) in one pass."""
    return _PCT_ENCODE.sub(lambda m: _PCT_ENCODINGS[m.group()], p)


def decode_manifest_path(p: str) -> str:
    """Decode exactly ``%25``, ``%0A`` and ``%0D`` (case-insensitive) in one pass."""
    return _PCT_DECODE.sub(lambda m: chr(int(m.group(1), 16)), p)


def hash_file(
    path: str | os.PathLike[str],
    algorithms: Sequence[str],
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Hash ``path`` with every algorithm in one read pass (refusing algorithms a bag may not use)."""
    for alg in algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"unsupported hash algorithm {alg!r}")
    return _hash_file(path, algorithms, progress)


def validate_bag(
    path: str | os.PathLike[str],
    *,
    fast: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BagReport:
    """Validate the bag at ``path``; collect every problem instead of stopping at the first."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    report = BagReport(path=root)
    _Checker(root, report, workers=workers, progress=progress).run(fast=fast)
    logger.info(
        "%s: %s (%d problems, %d warnings)",
        root,
        "valid" if report.valid else "INVALID",
        len(report.problems),
        len(report.warnings),
    )
    return report


# --------------------------------------------------------------------------- small pure helpers


def _split_lines(text: str) -> list[str]:
    """Split on LF, CR or CRLF only (not on the other characters str.splitlines knows)."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _unsafe_reason(p: str) -> str | None:
    if not p:
        return "empty path"
    if "\x00" in p:
        return "path contains a NUL character"
    if p.startswith("/"):
        return "absolute path"
    if p.startswith("~"):
        return "home-directory shortcut (~)"
    if _DRIVE_OR_UNC.match(p):
        return "Windows drive-letter or UNC path"
    parts = p.split("/")
    if ".." in parts:
        return "parent-directory reference (..)"
    if any(part in ("", ".") for part in parts):
        return "non-canonical path (empty or '.' component)"
    return None


def _alias_key(p: str) -> str:
    return unicodedata.normalize("NFC", p).casefold()


def _is_system_file(p: str) -> bool:
    name = p.rsplit("/", 1)[-1]
    return name.casefold() in SYSTEM_FILE_NAMES or name.startswith("._")


def _show(p: str) -> str:
    """Quote a path; spell out non-ASCII code points so NFC/NFD twins look different."""
    return repr(p) if p.isascii() else f"{p!r} [{p!a}]"


def _short(digest: str) -> str:
    return digest if len(digest) <= 16 else digest[:16] + "…"


def _empty_digest(alg: str) -> str:
    return hashlib.new(alg, usedforsecurity=False).hexdigest()


def _digest_len(alg: str) -> int:
    return hashlib.new(alg, usedforsecurity=False).digest_size * 2


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except (OSError, ValueError):  # ValueError: embedded NUL
        return None


# --------------------------------------------------------------------------- the checker

# path -> alg -> list of digests (a list, because a path may be listed twice)
_Listing = dict[str, dict[str, list[str]]]


@dataclass
class _Manifest:
    name: str
    alg: str
    entries: dict[str, list[str]] = field(default_factory=dict)


class _Checker:
    """One validation run: holds the state a run accumulates; never shared."""

    def __init__(
        self,
        root: Path,
        report: BagReport,
        *,
        workers: int | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.root = root
        self.report = report
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress
        self.codec = "utf-8"
        self.payload_manifests: list[_Manifest] = []
        self.tag_manifests: list[_Manifest] = []
        self.disk: dict[str, int] = report.sizes
        self.fetch_absent: set[str] = set()
        self.excused: dict[str, int | None] = {}

    # -- driver

    def run(self, *, fast: bool) -> None:
        self._read_declaration()
        self._find_manifests()
        self._scan_payload()
        self._read_info()
        self._read_fetch()
        self._check_payload_coverage()
        self._check_tag_files()
        self._check_oxum()
        self._fill_payload()
        if not fast:
            self._verify_checksums()

    @property
    def _strict_version(self) -> bool:
        return (self.report.version or (1, 0)) >= (1, 0)

    # -- bagit.txt

    def _read_declaration(self) -> None:
        rep = self.report
        path = self.root / "bagit.txt"
        st = _lstat(path)
        if st is None:
            rep.problem("missing-bagit-txt", "bagit.txt", "bagit.txt is missing; this is not a bag")
            return
        if not stat.S_ISREG(st.st_mode):
            rep.problem("not-regular-file", "bagit.txt", "bagit.txt is not a regular file")
            return
        raw = self._read_bytes("bagit.txt")
        if raw is None:
            return
        text = self._decode_declaration(raw)
        self._parse_declaration(_split_lines(text))

    def _decode_declaration(self, raw: bytes) -> str:
        for bom in (codecs.BOM_UTF8, codecs.BOM_UTF16_BE, codecs.BOM_UTF16_LE):
            if raw.startswith(bom):
                self.report.problem("bad-bagit-txt", "bagit.txt", "starts with a byte-order mark (BOM)")
                raw = raw[len(bom):]
                break
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.report.problem("bad-bagit-txt", "bagit.txt", f"not valid UTF-8 ({e.reason} at byte {e.start})")
            return raw.decode("utf-8", errors="replace")

    def _parse_declaration(self, lines: list[str]) -> None:
        expected = ("BagIt-Version", "Tag-File-Character-Encoding")
        while lines and not lines[-1].strip():
            lines.pop()
            self.report.warn("blank-line", "bagit.txt", "blank line at the end")
        values: dict[str, str] = {}
        for lineno, line in enumerate(lines, 1):
            label, value = self._declaration_line(lineno, line)
            if label is None:
                continue
            if lineno > len(expected) or label != expected[lineno - 1]:
                self.report.problem(
                    "bad-bagit-txt", "bagit.txt", f"line {lineno}: unexpected {label!r} (expected exactly "
                    "'BagIt-Version' then 'Tag-File-Character-Encoding')"
                )
            values.setdefault(label, value)
        for label in expected:
            if label not in values:
                self.report.problem("bad-bagit-txt", "bagit.txt", f"{label} is missing")
        self._set_version(values.get("BagIt-Version"))
        self._set_encoding(values.get("Tag-File-Character-Encoding"))

    def _declaration_line(self, lineno: int, line: str) -> tuple[str | None, str]:
        m = _DECL_LINE.fullmatch(line)
        if m is None:
            self.report.problem("bad-bagit-txt", "bagit.txt", f"line {lineno}: not 'Label: value': {line!r}")
            return None, ""
        label, rest = m.group(1), m.group(2)
        if label != label.strip():
            self.report.problem("bad-bagit-txt", "bagit.txt", f"line {lineno}: whitespace around label {label!r}")
        if not rest.startswith(" ") or rest[1:] != rest[1:].strip():
            self.report.problem(
                "bad-bagit-txt", "bagit.txt", f"line {lineno}: value must follow ': ' with no other "
                f"whitespace: {line!r}"
            )
        return label.strip(), rest.strip()

    def _set_version(self, value: str | None) -> None:
        if value is None:
            return
        m = _VERSION.fullmatch(value)
        if m is None:
            self.report.problem("bad-version", "bagit.txt", f"malformed BagIt-Version {value!r}")
            return
        version = (int(m.group(1)), int(m.group(2)))
        if version not in KNOWN_VERSIONS:
            self.report.problem("bad-version", "bagit.txt", f"unsupported BagIt-Version {value}")
            return
        self.report.version = version

    def _set_encoding(self, value: str | None) -> None:
        if value is None:
            return
        self.report.encoding = value
        try:
            codec = codecs.lookup(value).name
            b"a".decode(codec, "replace")  # rejects codecs that are not text encodings (rot13, hex...)
            self.codec = codec
        except LookupError:
            self.report.problem("bad-encoding", "bagit.txt", f"unknown Tag-File-Character-Encoding {value!r}")

    # -- reading tag files

    def _read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except OSError as e:
            self.report.problem("unreadable-file", rel, f"cannot read: {e.strerror or e}")
            return None

    def _read_tag_text(self, rel: str) -> str | None:
        st = _lstat(self.root / rel)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            self.report.problem("not-regular-file", rel, "tag file is not a regular file")
            return None
        raw = self._read_bytes(rel)
        if raw is None:
            return None
        try:
            text = raw.decode(self.codec)
        except UnicodeDecodeError as e:
            self.report.problem(
                "bad-encoding", rel, f"not valid {self.report.encoding or 'UTF-8'} ({e.reason} at byte {e.start})"
            )
            errors = "surrogateescape" if self.codec == "utf-8" else "replace"
            text = raw.decode(self.codec, errors=errors)
        if self.codec == "utf-8" and text.startswith("\ufeff"):
            self.report.warn("bom", rel, "starts with a byte-order mark (BOM); ignored")
            text = text[1:]
        return text

    def _tag_lines(self, rel: str, text: str) -> Iterator[tuple[int, str]]:
        blank = False
        for lineno, line in enumerate(_split_lines(text), 1):
            if line.strip():
                yield lineno, line
            else:
                blank = True
        if blank:
            self.report.warn("blank-line", rel, "contains blank lines; ignored")

    # -- manifests

    def _find_manifests(self) -> None:
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            self.report.problem("unreadable-file", "", f"cannot list the bag directory: {e.strerror or e}")
            return
        for name in names:
            m = _MANIFEST_NAME.fullmatch(name)
            if m is None:
                continue
            alg = m.group(2)
            if alg not in SUPPORTED_ALGORITHMS:
                self.report.problem(
                    "unsupported-algorithm", name,
                    f"unsupported checksum algorithm {alg!r} (supported: {', '.join(SUPPORTED_ALGORITHMS)})",
                )
                continue
            manifest = self._read_manifest(name, alg, tag=bool(m.group(1)))
            (self.tag_manifests if m.group(1) else self.payload_manifests).append(manifest)
        if not self.payload_manifests:
            self.report.problem("missing-manifest", "", "no payload manifest (manifest-ALG.txt)")

    def _read_manifest(self, name: str, alg: str, *, tag: bool) -> _Manifest:
        manifest = _Manifest(name, alg)
        text = self._read_tag_text(name)
        if text is None:
            return manifest
        want = _digest_len(alg)
        for lineno, line in self._tag_lines(name, text):
            m = _MANIFEST_LINE.fullmatch(line)
            digest = m.group(1).lower() if m else ""
            if m is None or not m.group(2) or len(digest) != want or not _is_hex(digest):
                self.report.problem(
                    "bad-manifest-line", name, f"line {lineno}: expected a {want}-digit {alg} digest, "
                    f"whitespace and a path: {line!r}"
                )
                continue
            path = self._manifest_path(name, lineno, m.group(2), tag=tag)
            if path is not None:
                self._add_entry(manifest, lineno, path, digest)
        return manifest

    def _manifest_path(self, name: str, lineno: int, raw: str, *, tag: bool) -> str | None:
        path = decode_manifest_path(raw)
        if path.startswith("*") and not os.path.lexists(self.root / path):
            self.report.warn("md5sum-style", name, f"line {lineno}: '*' before {path[1:]!r} (md5sum binary "
                             "marker) ignored")
            path = path[1:]
        if path.startswith("./"):
            self.report.warn("leading-dot-slash", name, f"line {lineno}: leading './' in {path!r} ignored")
            path = path[2:]
        return self._check_area(name, lineno, path, tag=tag)

    def _check_area(self, name: str, lineno: int, path: str, *, tag: bool) -> str | None:
        reason = _unsafe_reason(path)
        if reason is not None:
            self.report.problem("unsafe-path", name, f"line {lineno}: {reason}: {path!r}")
            return None
        in_payload = path.startswith("data/")
        if tag and (in_payload or path == "data"):
            self.report.problem("payload-in-tagmanifest", name, f"line {lineno}: payload file {path!r} in a "
                                "tag manifest")
            return None
        if not tag and not in_payload:
            self.report.problem("outside-payload", name, f"line {lineno}: {path!r} is not under data/")
            return None
        return path

    def _add_entry(self, manifest: _Manifest, lineno: int, path: str, digest: str) -> None:
        previous = manifest.entries.setdefault(path, [])
        if previous:
            same = digest in previous
            message = f"listed again on line {lineno} of {manifest.name}" + (
                " with the same digest" if same else f" with a different digest ({_short(digest)})"
            )
            if same and not self._strict_version:
                self.report.warn("duplicate-entry", path, message)
            else:
                self.report.problem("duplicate-entry", path, message)
            if same:
                return
        previous.append(digest)

    # -- payload on disk

    def _scan_payload(self) -> None:
        data = self.root / "data"
        st = _lstat(data)
        if st is None:
            self.report.problem("missing-payload-dir", "data", "payload directory data/ is missing")
            return
        if not stat.S_ISDIR(st.st_mode):
            self.report.problem("not-regular-file", "data", "data is not a directory")
            return
        self._walk(data, "data")

    def _walk(self, directory: Path, rel: str) -> None:
        """Every file under `directory`, depth first in name order; a stack of listings, not recursion
        (a payload may be 2,000 directories deep)."""
        stack = [(rel, self._entries(directory, rel))]
        while stack:
            rel, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            child = f"{rel}/{entry.name}"
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                self.report.problem("unreadable-file", child, f"cannot stat: {e.strerror or e}")
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((child, self._entries(Path(entry.path), child)))
            elif stat.S_ISREG(st.st_mode):
                self.disk[child] = st.st_size
            else:
                kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "special file"
                self.report.problem("not-regular-file", child, f"{kind} in the payload (only regular files "
                                    "and directories are allowed)")

    def _entries(self, directory: Path, rel: str) -> Iterator[os.DirEntry]:
        try:
            return iter(sorted(os.scandir(directory), key=lambda e: e.name))
        except OSError as e:
            self.report.problem("unreadable-file", rel, f"cannot list directory: {e.strerror or e}")
            return iter(())

    # -- bag-info.txt

    def _info_file(self) -> str:
        if (self.report.version or (1, 0)) < (0, 96) and not (self.root / "bag-info.txt").exists():
            return "package-info.txt"
        return "bag-info.txt"

    def _read_info(self) -> None:
        name = self._info_file()
        text = self._read_tag_text(name)
        if text is None:
            return
        info = self.report.info
        for lineno, line in self._tag_lines(name, text):
            if line[0] in " \t":
                if not info:
                    self.report.problem("bad-tag-line", name, f"line {lineno}: continuation line without "
                                        "an element before it")
                    continue
                label, value = info[-1]
                info[-1] = (label, f"{value} {line.strip()}" if value else line.strip())
                continue
            element = self._info_element(name, lineno, line)
            if element is not None:
                info.append(element)

    def _info_element(self, name: str, lineno: int, line: str) -> tuple[str, str] | None:
        label, colon, rest = line.partition(":")
        if not colon or not label.strip():
            self.report.problem("bad-tag-line", name, f"line {lineno}: not 'Label: value': {line!r}")
            return None
        if label != label.rstrip() or (rest and rest[0] not in " \t"):
            message = f"line {lineno}: label, colon and value should be 'Label: value': {line!r}"
            if self._strict_version:
                self.report.problem("bad-tag-line", name, message)
            else:
                self.report.warn("nonstandard-separator", name, message)
        return label.strip(), rest.strip()

    # -- fetch.txt

    def _read_fetch(self) -> None:
        text = self._read_tag_text("fetch.txt")
        if text is None:
            return
        present = 0
        for lineno, line in self._tag_lines("fetch.txt", text):
            path = self._fetch_entry(lineno, line)
            if path is None:
                continue
            if path in self.disk:
                present += 1
                continue
            self.fetch_absent.add(path)
            self.report.problem(
                "fetch-unsupported", path, "listed in fetch.txt but not in the bag; tinyfs does not fetch "
                "from the network - download it into the bag (or remove fetch.txt) first"
            )
        if present and not self.fetch_absent:
            self.report.warn("fetch-ignored", "fetch.txt", f"all {present} files it lists are already in the "
                             "bag; nothing is fetched")

    def _fetch_entry(self, lineno: int, line: str) -> str | None:
        m = _FETCH_LINE.fullmatch(line)
        if m is None or ":" not in m.group(1) or not (m.group(2) == "-" or m.group(2).isdigit()):
            self.report.problem("bad-fetch-line", "fetch.txt", f"line {lineno}: expected 'URL LENGTH PATH' "
                                f"(LENGTH a number or '-'): {line!r}")
            return None
        path = self._check_area("fetch.txt", lineno, decode_manifest_path(m.group(3)), tag=False)
        if path is None:
            return None
        for manifest in self.payload_manifests:
            if path not in manifest.entries:
                self.report.problem("incomplete-manifest", path, f"listed in fetch.txt but not in {manifest.name}")
        return path

    # -- coverage

    def _listing(self) -> _Listing:
        listing: _Listing = {}
        for manifest in self.payload_manifests:
            for path, digests in manifest.entries.items():
                listing.setdefault(path, {})[manifest.alg] = digests
        return listing

    def _check_payload_coverage(self) -> None:
        listing = self._listing()
        for path in self.disk:
            missing_from = [m.name for m in self.payload_manifests if path not in m.entries]
            if path not in listing:
                if self.payload_manifests:
                    self.report.problem("extra-file", path, "payload file listed in no payload manifest")
            else:
                for name in missing_from:
                    self.report.problem("incomplete-manifest", path, f"payload file not listed in {name}")
            if _is_system_file(path):
                self.report.warn("system-file", path, "operating-system junk file in the payload")
        groups = self._alias_groups(listing)
        for path in sorted(listing):
            if path not in self.disk and path not in self.fetch_absent:
                self._missing_payload_file(path, listing, groups)

    def _alias_groups(self, listing: _Listing) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for path in sorted(listing):
            groups.setdefault(_alias_key(path), []).append(path)
        for members in groups.values():
            if len(members) > 1:
                self.report.warn(
                    "path-alias", members[0], f"{_show(members[0])} differs only by letter case or Unicode "
                    "normalization from " + ", ".join(_show(p) for p in members[1:]) + "; they collide on "
                    "case-insensitive or normalizing file systems"
                )
        return groups

    def _missing_payload_file(self, path: str, listing: _Listing, groups: dict[str, list[str]]) -> None:
        twin = self._present_twin(path, listing, groups[_alias_key(path)])
        if twin is not None:
            self.excused[path] = self.disk[twin]
            self.report.warn("missing-alias", path, f"{_show(path)} is absent, but its alias {_show(twin)} "
                             "is present with the same digests; ignored")
        elif _is_system_file(path):
            empty = all(d == _empty_digest(alg) for alg, ds in listing[path].items() for d in ds)
            self.excused[path] = 0 if empty else None
            self.report.warn("missing-system-file", path, "operating-system junk file listed in the manifest "
                             "is absent; ignored")
        else:
            self.report.problem("missing-file", path, "listed in the manifest but absent from the bag")

    def _present_twin(self, path: str, listing: _Listing, group: list[str]) -> str | None:
        mine = listing[path]
        for other in group:
            if other == path or other not in self.disk:
                continue
            theirs = listing[other]
            common = set(mine) & set(theirs)
            if common and all(set(mine[a]) == set(theirs[a]) for a in common):
                return other
        return None

    # -- tag files

    def _tag_listing(self) -> _Listing:
        listing: _Listing = {}
        for manifest in self.tag_manifests:
            for path, digests in manifest.entries.items():
                listing.setdefault(path, {})[manifest.alg] = digests
        return listing

    def _check_tag_files(self) -> None:
        for path in sorted(self._tag_listing()):
            problem = self._regular_file_problem(path)
            if problem is not None:
                self.report.problem(problem[0], path, problem[1])

    def _regular_file_problem(self, rel: str) -> tuple[str, str] | None:
        """Check every component of ``rel`` with lstat, so a symlinked directory cannot sneak in."""
        current = self.root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            current = current / part
            st = _lstat(current)
            if st is None:
                return "missing-file", "listed in a tag manifest but absent from the bag"
            last = i == len(parts) - 1
            if (last and not stat.S_ISREG(st.st_mode)) or (not last and not stat.S_ISDIR(st.st_mode)):
                return "not-regular-file", f"{'/'.join(parts[: i + 1])!r} is not a regular file or directory"
        return None

    # -- Payload-Oxum

    def _check_oxum(self) -> None:
        name = self._info_file()
        values = [v for k, v in self.report.info if k.casefold() == "payload-oxum"]
        if not values or self.fetch_absent or not (self.root / "data").is_dir():
            return
        octets, files = sum(self.disk.values()), len(self.disk)
        accepted = {(octets, files)}
        if self.excused and None not in self.excused.values():
            extra = sum(s for s in self.excused.values() if s is not None)
            accepted.add((octets + extra, files + len(self.excused)))
        for value in values:
            m = _OXUM.fullmatch(value)
            if m is None:
                self.report.problem("bad-oxum", name, f"Payload-Oxum {value!r} is not OCTETS.FILES")
            elif (int(m.group(1)), int(m.group(2))) not in accepted:
                self.report.problem(
                    "oxum-mismatch", name, f"Payload-Oxum {value} but the payload has {octets} bytes in "
                    f"{files} files"
                )

    # -- payload list

    def _fill_payload(self) -> None:
        for path, by_alg in sorted(self._listing().items()):
            if path not in self.excused:
                self.report.payload[path] = {alg: digests[0] for alg, digests in by_alg.items()}
        for path, by_alg in sorted(self._tag_listing().items()):
            self.report.tags[path] = {alg: digests[0] for alg, digests in by_alg.items()}

    # -- hashing

    def _hash_jobs(self) -> dict[str, dict[str, list[str]]]:
        jobs = {p: d for p, d in self._listing().items() if p in self.disk}
        for path, by_alg in self._tag_listing().items():
            if self._regular_file_problem(path) is None:
                jobs[path] = by_alg
        return jobs

    def _verify_checksums(self) -> None:
        jobs = self._hash_jobs()
        order = sorted(jobs, key=lambda p: self.disk.get(p, 0), reverse=True)
        found = parallel(lambda p: self._hash_one(p, sorted(jobs[p])), order, self.workers)
        results = dict(zip(order, found, strict=True))
        for path in sorted(results):
            self._compare(path, jobs[path], results[path])

    def _hash_one(self, rel: str, algs: list[str]) -> dict[str, str] | OSError:
        try:
            return hash_file(os.path.join(self.root, rel), algs, self.progress)
        except OSError as e:
            return e

    def _compare(self, path: str, expected: dict[str, list[str]], found: dict[str, str] | OSError) -> None:
        if isinstance(found, OSError):
            self.report.problem("unreadable-file", path, f"cannot read: {found.strerror or found}")
            return
        for alg in sorted(expected):
            for digest in expected[alg]:
                if digest != found[alg]:
                    self.report.problem(
                        "checksum-mismatch", path, f"{alg} expected {_short(digest)} found {_short(found[alg])}"
                    )


def _is_hex(s: str) -> bool:
    return _HEX.fullmatch(s) is not None
