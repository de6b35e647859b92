"""How a tinyfs resource and an OCFL 1.1 object map onto each other (docs/ocfl.md), for `ocflexport`
and `ocflingest`: names, the object id, the version user, and the one validator both trust (ocfl-py's).

An OCFL version records file content under logical paths and nothing more; the rest of a tinyfs state
(modes, mtimes, user xattrs, symbolic links, directories, link groups, the label) travels in the
object's `logs/` directory, one record per version: the instance's own instance.json, byte for byte,
with a sha512 sidecar. `logs/` is the one place of an object root that OCFL leaves to the
implementation ("information about the content that is not part of the content itself", spec 3.8) and
that validators neither check nor warn about; a record in the logical state would be a file every OCFL
tool shows, and one in `extensions/` an unregistered extension (warning W013).

ocfl-py is imported only when a function here needs it (the `ocfl` extra; its import takes 0.3 s).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from urllib.parse import quote

from .errors import InvalidOcfl

SPEC_VERSION = "1.1"
DECLARATION = "0=ocfl_object_1.1"                 # the object's NAMASTE file
DECLARATION_TEXT = b"ocfl_object_1.1\n"
INVENTORY_TYPE = "https://ocfl.io/1.1/spec/#inventory"
INVENTORY = "inventory.json"
CONTENT = "content"                               # the default content directory, which exports use
# The content digest of an export. Always sha512, also from an archive keyed by sha256: ocfl-py warns
# about sha256 (W004, "SHOULD use sha512"), and an export must validate without warnings; the sha256
# digests then travel in the fixity block, checked on the way like the others.
CONTENT_DIGEST = "sha512"
# tinyfs digests that OCFL has fixity names for (spec 3.5.1 and community extension 0009); sha384 and
# sha224 have none, and an unknown fixity algorithm makes an object invalid (E056).
FIXITY_NAMES = ("md5", "sha1", "sha256", "sha512")
RECORDS = "logs/tinyfs"                           # the per-version records, relative to the object root
RECORDS_README = b"""\
These files were written by tinyfs (`tinyfs export --ocfl`). For each version vN of this
object, vN.instance.json is the instance.json of the tinyfs instance it was exported from,
byte for byte, and vN.instance.json.sha512 its sha512 digest. It records what OCFL does not
carry: file modes, modification times to the nanosecond and user xattrs, directories (empty
ones too), symbolic links, hard-link groups, and the instance's label. `tinyfs ingest --ocfl`
restores them, after checking that each record describes exactly its version's logical state.
"""
ID_PREFIX = "urn:tinyfs:"                         # object id = ID_PREFIX + resource id
MADE_UP_ADDRESS = "urn:tinyfs:creator:"           # a version user's address when the creator gives none


def object_id(rid: str) -> str:
    """The object's id: a URI (ocfl-py warns about any other id, W005) naming the resource. A resource
    id is made of URI-safe characters only, so nothing needs escaping."""
    return ID_PREFIX + rid


def record_name(version: str) -> str:
    """The record of version `version` ("v3"), relative to the object root."""
    return f"{RECORDS}/{version}.instance.json"


def sidecar_line(data: bytes, name: str) -> bytes:
    """`<sha512> <name>`: the digest file OCFL uses for inventories, used for the records too."""
    return f"{hashlib.sha512(data).hexdigest()} {name}\n".encode()


# -- the version's user ---------------------------------------------------------------------------

_NAMED_ADDRESS = re.compile(r"(?s)(?P<name>.*\S) <(?P<address>[^<>\s]+)>")
_EMAIL = re.compile(r"[^<>\s@:]+@[^<>\s@]+")
_OCFL_ADDRESS = re.compile(r"\w{3,6}:\S*")      # what ocfl-py takes for a URI address (else W009)


def user_block(creator: str) -> dict[str, str]:
    """The OCFL `user` of a version made by `creator`. OCFL asks for a name and an address, a URI
    (ocfl-py warns without one: W008, W009): `Name <x@y>` gives a mailto: address, `Name <URI>` that
    URI, a bare e-mail address a mailto: one too; any other creator (a login name, a uid, nothing) gets
    `urn:tinyfs:creator:<the creator, percent-encoded>`, which names it without claiming an address."""
    named = _NAMED_ADDRESS.fullmatch(creator)
    if named:
        address = _address(named["address"])
        if address:
            return {"name": named["name"], "address": address}
    if _EMAIL.fullmatch(creator):
        return {"name": creator, "address": "mailto:" + creator}
    return {"name": creator, "address": MADE_UP_ADDRESS + quote(creator, safe="")}


def _address(text: str) -> str | None:
    if _EMAIL.fullmatch(text):
        return "mailto:" + text
    return text if _OCFL_ADDRESS.fullmatch(text) else None


def creator_of(user) -> str:
    """A version's user as a tinyfs creator: the reverse of `user_block` (`Name <x@y>` for a mailto:
    address, `Name <URI>` for another, the name alone for an address user_block made up)."""
    if not isinstance(user, dict):
        return ""
    name = user.get("name") if isinstance(user.get("name"), str) else ""
    address = user.get("address") if isinstance(user.get("address"), str) else ""
    if not address or address.startswith(MADE_UP_ADDRESS):
        return name
    shown = address[len("mailto:"):] if address.startswith("mailto:") else address
    if not name or name == shown:
        return shown
    return f"{name} <{shown}>"


# -- versions -------------------------------------------------------------------------------------

def version_dirs(inventory: dict) -> list[str]:
    """The version directories of a (valid) inventory in order: v1, v2, ... (v001, ... when padded)."""
    return sorted(inventory["versions"], key=lambda v: int(v[1:]))


# -- validation -----------------------------------------------------------------------------------

def _ocfl_py():
    """ocfl-py's validator and the local file system it reads through. Importing ocfl-py imports
    pairtree, which calls logging.basicConfig(level=INFO) at import time: the root logger's handlers and
    level are put back as they were, so that a program using tinyfs does not start logging at INFO."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from ocfl.fsw import DirFileSystem, LocalFileSystem
        from ocfl.validator import Validator
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return DirFileSystem, LocalFileSystem, Validator


class OcflReport:
    """What ocfl-py's validator found in an object: `errors` and `warnings` as its messages
    (`[E040] OCFL Object root inventory ...`), `codes` every code it logged."""

    def __init__(self, valid: bool, errors: list[str], warnings: list[str], codes: list[str]):
        self.valid, self.errors, self.warnings, self.codes = valid, errors, warnings, codes

    def error_codes(self) -> list[str]:
        return [c for c in self.codes if c.startswith("E")]


_SEE_SPEC = re.compile(r" \(see https://ocfl\.io/[^)]*\)$")


def validate_object(path: str | Path, check_digests: bool = True) -> OcflReport:
    """Validate the OCFL object at `path` with ocfl-py (every content file hashed when `check_digests`).
    The object is opened as a local directory whatever its name holds (ocfl-py would take a path with
    `://` for a URL)."""
    DirFileSystem, LocalFileSystem, Validator = _ocfl_py()
    validator = Validator(log_warnings=True, check_digests=check_digests)
    try:
        valid = validator.validate_object(DirFileSystem(str(Path(path).absolute()), LocalFileSystem()))
    except Exception as e:  # ocfl-py met something it did not expect (an unreadable file, a directory
        # where a file belongs): the object cannot be shown valid, and that is the answer
        raise InvalidOcfl(f"invalid OCFL object {path}: the validator (ocfl-py) failed on it: "
                          f"{type(e).__name__}: {e} (nothing was committed)", []) from None
    log = validator.log
    messages = [_SEE_SPEC.sub("", m) for m in log.messages]
    errors = [m for m in messages if m.startswith("[E")]
    warnings = [m for m in messages if m.startswith("[W")]
    return OcflReport(valid, errors, warnings, sorted(log.codes))

