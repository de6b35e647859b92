"""Ingest without a mount (SPEC section 8): local paths, and BagIt bags given as SIPs.

Both commit through the Python API (`Archive` / `Transaction.add`), on top of
the resource's current state, creating the resource when it does not exist.

A bag is validated in full first (every problem is listed before anything is
copied). A bag that carries a tinyfs `instance.json` tag file (a tinyfs export)
is restored as that record says, once the record is found to describe exactly
the bag's payload: symbolic links, directories, modes, mtimes, user xattrs and
hard links come back with the files. Its payload is then copied into the new instance by the commit,
which hashes each file while copying it; those digests are compared with the
bag's manifests (for the algorithms both have) before the instance is
published, so a bag that changes while it is being ingested is refused too.

`progress`, where accepted, is a factory: `progress(description, total_bytes)`
starts one phase and returns a callable told of each chunk of bytes read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from . import profile, tree
from .api import Archive, Transaction
from .bagcheck import Problem, validate_bag
from .commit import CommitResult, NewFile
from .errors import (
    AlreadyExists,
    BadEncoding,
    Forbidden,
    InvalidBag,
    InvalidName,
    NotFound,
    TinyfsError,
    TooLarge,
)
from .fsck import ProgressFactory
from .ids import check_logical_path, check_rid, parent_of
from .limits import check_bag_info_size, check_text
from .model import InstanceDoc, State, group_problems

log = logging.getLogger(__name__)


# bag-info elements that become the instance's message / creator when none is given
MESSAGE_ELEMENTS = ("External-Description", "Internal-Sender-Description")
CREATOR_ELEMENTS = ("Contact-Name",)


def ingest_paths(archive: Archive, rid: str, paths: Sequence[str | os.PathLike], *, message: str = "",
                 creator: str = "", label: str | None = None,
                 progress: ProgressFactory | None = None) -> CommitResult:
    """Add each path (file, symlink or directory tree) under its own base name and commit."""
    check_rid(rid)
    if not paths:
        raise InvalidName("nothing to ingest: give at least one path")
    sources = [Path(p) for p in paths]
    names: dict[str, Path] = {}
    total = 0
    for source in sources:
        name = _base_name(source)
        if name in names:
            raise InvalidName(f"{names[name]} and {source} would both be stored as {name!r}")
        names[name] = source
        total += scan(source)
    txn = open_transaction(archive, rid, message=message, creator=creator, label=label)
    try:
        for source in sources:
            txn.add(source)
    except BaseException:
        txn.rollback()
        raise
    return txn.commit(progress=progress("ingesting", total) if progress else None)


def ingest_bag(archive: Archive, rid: str, bag: str | os.PathLike, *, message: str | None = None,
               creator: str | None = None, label: str | None = None,
               progress: ProgressFactory | None = None) -> CommitResult:
    """Validate a bag; refuse it with every problem listed, or commit its payload (data/...)."""
    check_rid(rid)
    bag = Path(bag)
    if not bag.is_dir():
        raise NotFound(f"{bag}: not a directory (a bag is a directory)")
    _check_bag_info_size(bag)
    advance = progress("validating", _tree_bytes(bag)) if progress else None
    report = validate_bag(bag, progress=advance)
    for warning in report.warnings:
        log.warning("bag %s: %s", bag, warning)
    problems = report.problems + _profile_problems(bag, report)
    if problems:
        raise InvalidBag(_invalid(bag, problems), problems)
    info = dict(report.info)
    if message is None:
        message = _from_bag_info(info, MESSAGE_ELEMENTS, "message", "--message")
    if creator is None:
        creator = _from_bag_info(info, CREATOR_ELEMENTS, "creator", "--creator")

    data = bag / "data"
    recorded = recorded_state(bag, report)
    tops = sorted(os.listdir(data))
    total = sum(scan(data / name) for name in tops)
    txn = open_transaction(archive, rid, message=message, creator=creator, label=label)
    try:
        if recorded is not None:
            txn.add_recorded(recorded, data)
        else:
            for name in tops:
                txn.add(data / name, path=name)
    except BaseException:
        txn.rollback()
        raise

    def verify(new_files: dict[str, NewFile]) -> None:
        problems = []
        for path, nf in sorted(new_files.items()):
            key = f"data/{path}"
            expected = report.payload.get(key)
            if expected is None:
                problems.append(Problem("extra-file", key, "in the payload but in none of the bag's manifests"))
                continue
            for alg in sorted(set(expected) & set(nf.digests or {})):
                if expected[alg] != nf.digests[alg]:
                    problems.append(Problem("checksum-mismatch", key,
                                            f"{alg} of the bytes copied is {nf.digests[alg][:16]}…, the manifest "
                                            f"says {expected[alg][:16]}… (did the file change during ingest?)"))
        if problems:
            raise InvalidBag(_invalid(bag, problems), problems)

    return txn.commit(progress=progress("ingesting", total) if progress else None, verify=verify)


RECORD = "instance.json"     # the tag file of a tinyfs export that records the exported state


def recorded_state(bag: Path, report) -> State | None:
    """The state a tinyfs export records (its `instance.json` tag file, type tinyfs-instance, listed in
    a tag manifest), once it is found to describe exactly the bag's payload; None for any other bag.
    A record that does not match its payload refuses the bag (InvalidBag, every mismatch listed)."""
    vouched = report.tags.get(RECORD)
    if vouched is None:
        if os.path.isfile(bag / RECORD):
            log.warning("bag %s: %s is in no tag manifest; the bag is ingested as a plain bag", bag, RECORD)
        return None
    try:
        raw = (bag / RECORD).read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None      # validation read and hashed it; a tag file of another kind that is not JSON
    if not isinstance(doc, dict) or doc.get("type") != "tinyfs-instance":
        return None
    problems = _record_problems(raw, vouched)
    if not problems:
        try:
            state = InstanceDoc.from_json_bytes(raw).state
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            problems = [Problem("bad-instance-json", RECORD, f"not a valid tinyfs instance document: {e!r}")]
        else:
            problems = state_problems(state) or _payload_problems(state, doc.get("digest"), report)
    if problems:
        n = len(problems)
        raise InvalidBag(f"bag {bag}: its {RECORD} does not describe its payload: {n} problem{'s' if n != 1 else ''}"
                         " (nothing was committed)", problems)
    return state


def _record_problems(raw: bytes, vouched: dict[str, str]) -> list[Problem]:
    """The bytes read must be those the tag manifest vouches for (they could change after validation)."""
    for alg, expected in sorted(vouched.items()):
        if hashlib.new(alg, raw).hexdigest() != expected:
            return [Problem("checksum-mismatch", RECORD, f"changed after the bag was validated ({alg})")]
    return []


def state_problems(state: State, record: str = RECORD) -> list[Problem]:
    """A record tinyfs could not have written: bad paths, entries without their directory, bad link groups.
    (`record` names the record in the findings: an OCFL object's are in logs/tinyfs/.)"""
    problems = []
    for path in sorted(state.entries()):
        try:
            check_logical_path(path)
        except TinyfsError as e:
            problems.append(Problem("bad-instance-json", record, f"{path!r}: {e}"))
            continue
        parent = parent_of(path)
        if parent and parent not in state.dirs:
            problems.append(Problem("bad-instance-json", record, f"{path!r}: its directory {parent!r} is not recorded"))
    problems += [Problem("bad-instance-json", record, f"{path!r}: {why}") for path, why in group_problems(state)]
    return problems


def _payload_problems(state: State, alg: str, report) -> list[Problem]:
    """Every recorded file is a payload file with the recorded digest and size, and nothing more is."""
    problems = []
    for path, entry in sorted(state.files.items()):
        key = f"data/{path}"
        listed = report.payload.get(key)
        if listed is None:
            problems.append(Problem("payload-mismatch", key, f"recorded in {RECORD} but not in the payload"))
        elif alg not in listed:
            problems.append(Problem("payload-mismatch", key, f"no {alg} manifest entry to compare with {RECORD}"))
        elif listed[alg] != entry.digest:
            problems.append(Problem("payload-mismatch", key, f"{RECORD} records {alg} {entry.digest[:16]}…, "
                                    f"the manifest says {listed[alg][:16]}…"))
        elif report.sizes.get(key) != entry.size:
            problems.append(Problem("payload-mismatch", key, f"{RECORD} records {entry.size} bytes, "
                                    f"the payload file has {report.sizes.get(key)}"))
    problems += [Problem("payload-mismatch", key, f"in the payload but not recorded in {RECORD}")
                 for key in sorted(report.payload) if key[len("data/"):] not in state.files]
    return problems


def _profile_problems(bag: Path, report) -> list[Problem]:
    """A bag that names the tinyfs BagIt profile (a tinyfs export, or an instance bag) must keep it: one
    that lost its instance.json, say, would be ingested as a plain bag, its symbolic links and modes gone."""
    if not profile.names_profile(report.info):
        return []
    return profile.bag_problems(bag, report.info, report.version)


def _check_bag_info_size(bag: Path) -> None:
    """A bag-info.txt past BAG_INFO_MAX is refused before it is read (a 50 MiB description was read
    whole, then copied into the message, instance.json and a line of the event log)."""
    for name in ("bag-info.txt", "package-info.txt"):
        try:
            size = os.stat(bag / name).st_size
        except OSError:
            continue            # missing or unreadable: validation says so
        check_bag_info_size(size, str(bag / name))


def _from_bag_info(info: dict[str, str], elements: tuple[str, ...], what: str, option: str) -> str:
    """The first of `elements` that bag-info.txt gives, as the instance's `what`, within its limit."""
    for element in elements:
        value = info.get(element)
        if value:
            try:
                return check_text(what, value)
            except TooLarge as e:
                raise TooLarge(f"bag-info.txt: {element}: {e}; give {option} to use another "
                               "(nothing was committed)") from None
    return ""


def open_transaction(archive: Archive, rid: str, *, message: str = "", creator: str = "",
                     label: str | None = None) -> Transaction:
    """A transaction on top of the resource's current state, or creating it."""
    kw = {"message": message or "", "creator": creator or "", "label": label}
    if rid not in archive:
        try:
            return archive.new(rid, **kw)
        except AlreadyExists:  # created meanwhile by another process
            pass
    return archive.get(rid, "a", **kw)


def scan(source: Path) -> int:
    """Refuse what cannot be archived before anything is staged; returns the bytes of regular files.

    FIFOs, sockets and device nodes: Forbidden (EPERM). A name that is not UTF-8: BadEncoding
    (EILSEQ). Either way the message names the offending path."""
    st = os.lstat(source)
    _check_kind(source, st)
    _base_name(source)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0

    for dirpath, dirs, files in tree.walk(source):
        for name in dirs + files:
            full = Path(dirpath, name)
            _decoded(name, full)
            st = os.lstat(full)
            _check_kind(full, st)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _check_kind(path: Path, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device node" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "a special file")
    raise Forbidden(f"{_show(path)}: is {kind}; only regular files, directories and symbolic links can be "
                    "archived (nothing was committed)", path=str(path))


def _decoded(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadEncoding(f"{_show(where)}: name is not valid UTF-8 (nothing was committed)",
                          path=_show(where)) from None
    return name


def _base_name(source: Path) -> str:
    return _decoded(os.path.basename(os.path.normpath(os.path.abspath(source))), source)


def _show(path: Path) -> str:
    """A path for a message: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _tree_bytes(top: Path) -> int:
    total = 0
    for dirpath, _dirs, files in tree.walk(top, onerror=lambda e: None):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _invalid(bag: Path, problems: list) -> str:
    n = len(problems)
    return f"invalid bag {bag}: {n} problem{'s' if n != 1 else ''}"
