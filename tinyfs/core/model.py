"""The state of a resource at one instance, and the instance.json document (SPEC section 4).

Entries are small frozen dataclasses so that two states compare path by path
with `==`: a change is any difference in digest, size, mode, mtime or xattrs.
Hard links are recorded beside the entries, as link groups: the file paths that
were one inode (each path keeps its own, identical, entry).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

NO_XATTRS: dict[str, str] = MappingProxyType({})  # shared by the many files without xattrs (memory)
_ENCODE = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring       # the C function behind ensure_ascii=False, for one string
_NEXT = ",\n"                                  # between two entries of instance.json


@dataclass(frozen=True, slots=True)
class FileEntry:
    digest: str
    size: int
    mode: int
    mtime_ns: int
    xattrs: dict[str, str] = field(default_factory=dict, compare=True, hash=False)  # name -> base64 value

    def to_json(self) -> dict:
        doc = {"digest": self.digest, "size": self.size, "mode": self.mode, "mtime_ns": self.mtime_ns}
        if self.xattrs:
            doc["xattrs"] = dict(sorted(self.xattrs.items()))
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> FileEntry:
        xattrs = doc.get("xattrs")
        return cls(doc["digest"], int(doc["size"]), int(doc["mode"]), int(doc["mtime_ns"]),
                   dict(xattrs) if xattrs else NO_XATTRS)


@dataclass(frozen=True, slots=True)
class LinkEntry:
    target: str
    mtime_ns: int

    def to_json(self) -> dict:
        return {"target": self.target, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, doc: dict) -> LinkEntry:
        return cls(doc["target"], int(doc["mtime_ns"]))


@dataclass(frozen=True, slots=True)
class DirEntry:
    mode: int
    mtime_ns: int

    def to_json(self) -> dict:
        return {"mode": self.mode, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, doc: dict) -> DirEntry:
        return cls(int(doc["mode"]), int(doc["mtime_ns"]))


Entry = FileEntry | LinkEntry | DirEntry
Group = tuple[str, ...]          # the file paths of one inode (a link group), sorted


def link_groups(groups: Iterable[Iterable[str]]) -> tuple[Group, ...]:
    """Link groups in their one written form: each sorted, the list sorted, groups of one path dropped."""
    out = (tuple(sorted(set(group))) for group in groups)
    return tuple(sorted(group for group in out if len(group) >= 2))


def group_index(groups: Iterable[Group]) -> dict[str, Group]:
    """path -> its link group, for the paths that have one."""
    return {path: group for group in groups for path in group}


def group_problems(state: State) -> list[tuple[str, str]]:
    """(path, why) for every way the state's link groups break the rules of format.md: each group holds
    two paths or more, every one a file of the state with the same entry as the others, in no other group."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for group in state.hardlinks:
        if len(set(group)) < 2:
            problems.append((group[0] if group else "-", "a link group of fewer than two paths"))
        first = state.files.get(group[0]) if group else None
        for path in group:
            entry = state.files.get(path)
            if entry is None:
                problems.append((path, "in a link group but not a file of the state"))
            elif entry != first:
                problems.append((path, f"in a link group with {group[0]!r} but recorded differently"))
            if path in seen:
                problems.append((path, "in more than one link group"))
            seen.add(path)
    return problems


ROOT_PATH = ""      # the resource root's key in instance.json's `dirs`


@dataclass
class State:
    """Every logical path of a resource at one instance.

    The resource root's mode and mtime are recorded in instance.json as `dirs[""]`; here they are `root`
    (None: not recorded, as in instances made before the root was kept, or by the CLI and the API), so
    that `dirs` and `entries()` hold logical paths only, and no walk over them meets an empty name."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    links: dict[str, LinkEntry] = field(default_factory=dict)
    dirs: dict[str, DirEntry] = field(default_factory=dict)
    hardlinks: tuple[Group, ...] = ()      # link groups (`link_groups` form when written by tinyfs)
    root: DirEntry | None = None
    _groups: dict[str, Group] | None = field(default=None, compare=False, repr=False)
    _children: dict[str, list] | None = field(default=None, init=False, compare=False, repr=False)

    def group_of(self, path: str) -> Group | None:
        """The link group of a path, if it has one (the index is built at the first question)."""
        if not self.hardlinks:
            return None
        if self._groups is None:
            self._groups = group_index(self.hardlinks)
        return self._groups.get(path)

    def entries(self) -> dict[str, Entry]:
        return {**self.dirs, **self.links, **self.files}

    def children(self, directory: str) -> list[tuple[str, str, Entry]]:
        """(name, path, entry) of the entries of a directory ("" for the root), sorted by name. The index
        of every directory is built at the first question: a state does not change once read."""
        if self._children is None:
            index: dict[str, list] = {}
            for path, entry in sorted(self.entries().items()):
                parent, _, name = path.rpartition("/")
                index.setdefault(parent, []).append((name, path, entry))
            self._children = index
        return self._children.get(directory, [])

    def get(self, path: str) -> Entry | None:
        return self.files.get(path) or self.links.get(path) or self.dirs.get(path)

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, as SPEC section 7 asks."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time (Z or offset; date alone means midnight UTC)."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


@dataclass
class InstanceDoc:
    id: str
    resource: str
    previous: str | None
    created: str
    message: str
    creator: str
    label: str | None
    digest: str
    state: State
    stored: dict[str, str]
    # Where a merged instance came from (tinyfs migrate --merge, docs/migrate.md): the instance of another
    # archive whose change it applies. None: made here.
    origin: dict | None = None
    # The encoded line of every entry, by section, once this document has been written (`to_json_bytes`):
    # the next instance of the resource re-encodes only the entries that are not the same objects.
    encoded: dict[str, dict] | None = field(default=None, compare=False, repr=False)
    _payload: dict[str, tuple[str, int, str]] | None = field(default=None, init=False, compare=False, repr=False)

    def payload(self) -> dict[str, tuple[str, int, str]]:
        """stored path -> (digest, size, a logical path) of the files this instance stores itself (its bag's
        data/), built at the first question: a document does not change once read."""
        if self._payload is None:
            own = f"instances/{self.id}/"
            index: dict[str, tuple[str, int, str]] = {}
            for path, entry in self.state.entries().items():
                if isinstance(entry, FileEntry) and self.stored[entry.digest].startswith(own):
                    index.setdefault(self.stored[entry.digest], (entry.digest, entry.size, path))
            self._payload = index
        return self._payload

    def to_json_bytes(self, previous: InstanceDoc | None = None) -> bytes:
        """Sorted keys (SPEC 4), one line per entry: `diff` of two instances shows what changed, and
        it is written with the C encoder (json's indent= falls back to pure Python: 0.2 s per 10k files).
        The pieces are joined once: each copy of a 10,000-file document costs about a millisecond.

        With `previous` (the instance this one follows, written by this process), the lines of entries
        it holds unchanged (the very same entry objects: entries are frozen) are taken from it: a commit
        of a few changes to a 10,000-file resource encoded 20,000 lines, 20-40 ms here. The encoded
        lines move to this document (the head is the only one a next commit follows)."""
        before = (previous.encoded if previous is not None else None) or {}
        if previous is not None:
            previous.encoded = None
        top = {
            "type": "tinyfs-instance", "format": 1,
            "id": self.id, "resource": self.resource, "previous": self.previous, "created": self.created,
            "message": self.message, "creator": self.creator, "label": self.label, "digest": self.digest,
        }
        encoded = {
            "state": _encoded(self.state.files, _file_json, before.get("state")),
            "links": _encoded(self.state.links, _link_json, before.get("links")),
            "dirs": _encoded(self.state.dirs if self.state.root is None else
                             {ROOT_PATH: self.state.root, **self.state.dirs}, _dir_json, before.get("dirs")),
            "stored": _encoded(self.stored, _STRING, before.get("stored")),
        }
        sections = {key: _lines(lines) for key, lines in encoded.items()}
        if self.state.hardlinks:        # left out when there are none (older readers never saw the key)
            sections["hardlinks"] = _group_lines(self.state.hardlinks)
        if self.origin:                 # likewise: only merged instances have it
            sections["origin"] = [_ENCODE(self.origin)]
        self.encoded = encoded
        out = ["{\n"]
        for n, key in enumerate(sorted([*top, *sections])):
            out.append(f"{_NEXT if n else ''} {_STRING(key)}: ")
            if key in sections:
                out += sections[key]
            else:
                out.append(_ENCODE(top[key]))
        out.append("\n}\n")
        return "".join(out).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> InstanceDoc:
        doc = json.loads(raw)
        if doc.get("type") != "tinyfs-instance" or doc.get("format") != 1:
            raise ValueError("not a tinyfs-instance document of format 1")
        dirs = {p: DirEntry.from_json(e) for p, e in doc.get("dirs", {}).items()}
        state = State(
            files={p: FileEntry.from_json(e) for p, e in doc["state"].items()},
            links={p: LinkEntry.from_json(e) for p, e in doc.get("links", {}).items()},
            dirs=dirs,
            root=dirs.pop(ROOT_PATH, None),
            hardlinks=_read_groups(doc.get("hardlinks", [])),
        )
        return cls(doc["id"], doc["resource"], doc["previous"], doc["created"], doc.get("message", ""),
                   doc.get("creator", ""), doc.get("label"), doc["digest"], state, dict(doc["stored"]),
                   _read_origin(doc.get("origin")))


UNKNOWN = object()                 # peek_root could not tell
_DIRS = b'\n "dirs": {'             # the `dirs` key as to_json_bytes writes it (a newline cannot be in a string)
_ROOT_LINE = b'\n  "": '


def peek_root(head: bytes) -> DirEntry | None | object:
    """The root entry from the first bytes of an instance.json that `to_json_bytes` wrote, without parsing
    the document: sorted keys put `dirs` third (after `created` and `creator`) and the root's key `""`
    first in it. None: no root recorded; UNKNOWN: not found in `head` (read the whole document)."""
    at = head.find(_DIRS)
    if at < 0:
        return UNKNOWN
    rest = head[at + len(_DIRS):]
    if rest.startswith(b"}"):
        return None
    if not rest.startswith(_ROOT_LINE):
        return None if rest.startswith(b'\n  "') else UNKNOWN
    end = rest.find(b"\n", 1)
    if end < 0:
        return UNKNOWN
    try:
        return DirEntry.from_json(json.loads(rest[len(_ROOT_LINE):end].rstrip(b",")))
    except (ValueError, KeyError, TypeError):
        return UNKNOWN


def _encoded(entries: dict, encode, before: dict | None) -> dict:
    """key -> (entry, its line in the JSON object), reusing the lines of `before` whose entry is the
    same object (an identity test per entry instead of two encodings)."""
    def line(k, v) -> tuple:
        return v, f"  {_STRING(k)}: {encode(v)}"
    if not before:
        return {k: line(k, v) for k, v in entries.items()}
    out = {}
    for k, v in entries.items():
        old = before.get(k)
        out[k] = old if old is not None and old[0] is v else line(k, v)
    return out


def _lines(encoded: dict) -> list[str]:
    """A JSON object with one sorted entry per line, as pieces to join. Sorting the keys, not the items:
    a state is its head's (sorted) entries with the changes at the end; comparing keys alone is 10x faster."""
    if not encoded:
        return ["{}"]
    return ["{\n", _NEXT.join([encoded[k][1] for k in sorted(encoded)]), "\n }"]


def _group_lines(groups: tuple[Group, ...]) -> list[str]:
    """The link groups as a JSON array, one group per line."""
    return ["[\n", _NEXT.join(f"  {_ENCODE(list(group))}" for group in groups), "\n ]"]


def _read_origin(doc) -> dict | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("instance"), str):
        raise ValueError("origin is not a record naming an instance")
    return doc


def _read_groups(doc) -> tuple[Group, ...]:
    """The `hardlinks` array as written (fsck judges its content); its shape must be lists of strings."""
    if not isinstance(doc, list) or not all(isinstance(g, list) and all(isinstance(p, str) for p in g)
                                            for g in doc):
        raise ValueError("hardlinks is not a list of lists of paths")
    return tuple(tuple(group) for group in doc)


def _link_json(e: LinkEntry) -> str:
    return f'{{"mtime_ns":{e.mtime_ns},"target":{_STRING(e.target)}}}'


def _dir_json(e: DirEntry) -> str:
    return f'{{"mode":{e.mode},"mtime_ns":{e.mtime_ns}}}'


def _file_json(e: FileEntry) -> str:
    if e.xattrs:
        return _ENCODE(e.to_json())
    # the common case by hand (keys in sorted order; a digest is hex, the rest are integers)
    return f'{{"digest":"{e.digest}","mode":{e.mode},"mtime_ns":{e.mtime_ns},"size":{e.size}}}'
