"""The event log as PREMIS 3 XML (`tinyfs events ROOT --premis`).

One <premis> document (namespace http://www.loc.gov/premis/v3, version 3.0) with, in the order the
schema wants them:

- objects: the archive itself and each resource an event names, as intellectual entities
  (identifier types `tinyfs-archive`: its root or s3:// address, and `tinyfs-rid`); each instance an
  event names, as a representation (`tinyfs-iid`) that represents its resource;
- events: one per line of events.jsonl, identified by the sha256 of that line (`tinyfs-event-sha256`;
  the log gives events no ids), typed with the Library of Congress event type vocabulary where a term
  fits (EVENT_TYPES) and by their tinyfs name where none does, with the tinyfs name and detail as
  eventDetail, an outcome where the event has one, and links to their agents and objects;
- agents: tinyfs (software) and every person an event names: the uid that opened a mount transaction
  (`tinyfs-uid`), a `tinyfs serve` user (`tinyfs-user`), the creator of a committed instance as its
  bag-info.txt records it (`tinyfs-creator`).

The log is streamed, never held whole: a first pass finds the objects (they come first in the
document), a second writes the events, and the agents they named follow. The second pass stops after
as many events as the first counted, so that events appended meanwhile cannot name objects the
document lacks. Torn lines are skipped, as `tinyfs events` skips them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO
from xml.sax.saxutils import XMLGenerator
from xml.sax.xmlreader import AttributesImpl

from .errors import NotFound
from .layout import ArchiveRoot

NAMESPACE = "http://www.loc.gov/premis/v3"
SCHEMA = "https://www.loc.gov/standards/premis/v3/premis-v3-0.xsd"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
LOC_EVENT_TYPES = "http://id.loc.gov/vocabulary/preservation/eventType"

# tinyfs event -> the Library of Congress preservation event type it is one of. The others (a transaction
# opened, rolled back or unchanged, a store added, a directory attached to an S3 archive) are no
# preservation action on an object; they keep their tinyfs name as a local event type.
EVENT_TYPES = {
    "archive.created": "creation",
    "transaction.committed": "ingestion",       # a new instance: a new version of the resource's AIP
    "commit.failed": "ingestion",               # an ingestion that failed
    "migrate.merged": "ingestion",              # another archive's instance committed here
    "fixity.checked": "fixity check",           # ("validation" for fsck --fast, which hashes nothing)
    "fixity.failed": "fixity check",
    "stored.repaired": "replication",           # a damaged stored file replaced by a bit-identical copy
    "instance.copied": "replication",
    "replica.behind": "replication",            # a replica that did not take an instance
    "replicate.finished": "replication",
    "migrate.finished": "replication",          # instances copied, bags unchanged, to another archive
    "resource.purged": "deletion",
    "formats.identified": "format identification",   # FIDO, after a commit (core/formats.py)
}
ALWAYS_FAILED = ("commit.failed", "fixity.failed", "replica.behind")
ALWAYS_SUCCEEDED = ("archive.created", "transaction.committed", "migrate.merged", "stored.repaired",
                    "instance.copied", "migrate.finished", "resource.purged", "formats.identified")
# events whose instance is the base the transaction started from, not what the event is about
INSTANCE_IS_BASE = ("transaction.opened", "transaction.rolled_back", "transaction.unchanged")

SOFTWARE = ("tinyfs-software", "tinyfs")


def write_premis(archive: ArchiveRoot, out: BinaryIO, since: str | None = None) -> int:
    """Write the events at or after `since` (all: None) as one PREMIS document to `out`; returns how
    many events it holds."""
    from .. import __version__
    from .migrate import address

    count, resources, instances = _objects(archive, since)
    where = address(archive)
    xml = _Writer(out)
    xml.start_document()
    with xml.element("premis", {"xmlns": NAMESPACE, "xmlns:xsi": XSI, "xsi:schemaLocation": f"{NAMESPACE} {SCHEMA}",
                                "version": "3.0"}):
        _write_entity(xml, "tinyfs-archive", where)
        for rid in resources:
            _write_entity(xml, "tinyfs-rid", rid)
        for iid, rid in instances.items():
            _write_representation(xml, iid, rid)
        agents: dict[tuple[str, str], str] = {}      # the people named, in order of first mention
        for record in itertools.islice(_records(archive, since), count):
            _write_event(xml, archive, where, record, agents)
        _write_software(xml, __version__)
        for (kind, value), name in agents.items():
            _write_person(xml, kind, value, name)
    xml.end_document()
    return count


def _objects(archive: ArchiveRoot, since: str | None) -> tuple[int, dict[str, None], dict[str, str]]:
    """The first pass: how many events, the resources they name and the instances they are about
    (iid -> rid), in order of first mention (dicts as ordered sets: a set per resource, not per event)."""
    count = 0
    resources: dict[str, None] = {}
    instances: dict[str, str] = {}
    for record in _records(archive, since):
        count += 1
        rid, iid = record.get("resource"), _subject_instance(record)
        if rid:
            resources[rid] = None
            if iid:
                instances.setdefault(iid, rid)
    return count, resources, instances


def _records(archive: ArchiveRoot, since: str | None) -> Iterator[dict]:
    """The log's events; a line that is JSON but no object (no tinyfs wrote it) is passed over, in both
    passes alike."""
    return (record for record in archive.events.read(since) if isinstance(record, dict))


def _subject_instance(record: dict) -> str | None:
    return None if record.get("event") in INSTANCE_IS_BASE else record.get("instance")


# -- objects --------------------------------------------------------------------------

def _write_entity(xml: _Writer, kind: str, value: str) -> None:
    with xml.element("object", {"xsi:type": "intellectualEntity"}):
        _identifier(xml, "objectIdentifier", kind, value)


def _write_representation(xml: _Writer, iid: str, rid: str) -> None:
    with xml.element("object", {"xsi:type": "representation"}):
        _identifier(xml, "objectIdentifier", "tinyfs-iid", iid)
        with xml.element("relationship"):
            xml.text_element("relationshipType", "structural")
            xml.text_element("relationshipSubType", "represents")
            _identifier(xml, "relatedObjectIdentifier", "tinyfs-rid", rid)


def _identifier(xml: _Writer, element: str, kind: str, value: str, role: str | None = None) -> None:
    """objectIdentifier, eventIdentifier, linkingAgentIdentifier, ...: <X><XType/><XValue/>[<role/>]."""
    stem = element.removesuffix("Identifier")
    with xml.element(element):
        xml.text_element(f"{element}Type", kind)
        xml.text_element(f"{element}Value", value)
        if role:
            xml.text_element(f"{stem}Role", role)


# -- events ---------------------------------------------------------------------------

def _write_event(xml: _Writer, archive: ArchiveRoot, where: str, record: dict, agents: dict) -> None:
    name = str(record.get("event"))
    detail = record.get("detail") if isinstance(record.get("detail"), dict) else {}
    with xml.element("event"):
        _identifier(xml, "eventIdentifier", "tinyfs-event-sha256", _line_digest(record))
        kind = _event_type(name, detail)
        xml.text_element("eventType", kind, {"authority": "eventType", "authorityURI": LOC_EVENT_TYPES}
                         if kind in EVENT_TYPES.values() or kind == "validation" else None)
        xml.text_element("eventDateTime", str(record.get("time")))
        with xml.element("eventDetailInformation"):
            xml.text_element("eventDetail", _describe(name, record, detail))
        outcome = _outcome(name, detail)
        if outcome is not None:
            with xml.element("eventOutcomeInformation"):
                xml.text_element("eventOutcome", outcome)
                for note in _outcome_notes(name, detail):
                    with xml.element("eventOutcomeDetail"):
                        xml.text_element("eventOutcomeDetailNote", note)
        _identifier(xml, "linkingAgentIdentifier", *SOFTWARE, role="executing program")
        for person in _people(archive, record, detail):
            agents.setdefault(person[:2], person[2])
            _identifier(xml, "linkingAgentIdentifier", *person[:2], role="implementer")
        for kind, value in _linked_objects(where, record):
            _identifier(xml, "linkingObjectIdentifier", kind, value)


def _line_digest(record: dict) -> str:
    """sha256 of the event's line in events.jsonl, which tinyfs writes as exactly this JSON."""
    line = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(line.encode("utf-8", "surrogatepass")).hexdigest()


def _event_type(name: str, detail: dict) -> str:
    if name == "fixity.checked" and detail.get("fast"):
        return "validation"
    return EVENT_TYPES.get(name, name)


def _describe(name: str, record: dict, detail: dict) -> str:
    """The tinyfs event, as its log line has it: name, base instance where that is what it names, detail."""
    base = f" (base instance {record['instance']})" if name in INSTANCE_IS_BASE and record.get("instance") else ""
    return f"tinyfs {name}{base}: {json.dumps(detail, sort_keys=True, ensure_ascii=False)}"


def _outcome(name: str, detail: dict) -> str | None:
    if name in ALWAYS_FAILED:
        return "fail"
    if name == "fixity.checked":
        return "fail" if detail.get("problems") else "success"
    if name == "replicate.finished":
        return "fail" if any((detail.get("failed") or {}).values()) else "success"
    if name in ALWAYS_SUCCEEDED:
        return "success"
    return None


def _outcome_notes(name: str, detail: dict) -> list[str]:
    """What went wrong, one note per finding: fsck's findings, a reader's damaged file, an error."""
    if name == "fixity.failed" and isinstance(detail.get("findings"), list):
        return [f"{f.get('path')}: {f.get('code')}: {f.get('message')}" for f in detail["findings"]
                if isinstance(f, dict)]
    if name == "fixity.failed":
        found = detail.get("found") or "missing"
        return [f"{detail.get('path')}: {detail.get('algorithm')} expected {detail.get('expected')}, found "
                f"{found} (stored at {detail.get('stored')})"]
    if detail.get("error"):
        return [str(detail["error"])]
    return []


def _linked_objects(where: str, record: dict) -> list[tuple[str, str]]:
    """The resource and the instance the event is about; the archive (at `where`) when it names neither."""
    rid, iid = record.get("resource"), _subject_instance(record)
    if not rid:
        return [("tinyfs-archive", where)]
    return [("tinyfs-rid", rid)] + ([("tinyfs-iid", iid)] if iid else [])


# -- agents ---------------------------------------------------------------------------

def _people(archive: ArchiveRoot, record: dict, detail: dict) -> list[tuple[str, str, str]]:
    """(identifier type, value, name) of every person the event names."""
    people = []
    if detail.get("uid") is not None:
        people.append(("tinyfs-uid", str(detail["uid"]), f"uid {detail['uid']}"))
    if detail.get("user"):
        people.append(("tinyfs-user", str(detail["user"]), str(detail["user"])))
    if record.get("event") in ("transaction.committed", "migrate.merged") and record.get("instance"):
        creator = _creator(archive, record.get("resource"), record["instance"])
        if creator:
            people.append(("tinyfs-creator", creator, creator))
    return people


def _creator(archive: ArchiveRoot, rid: str | None, iid: str) -> str | None:
    """The instance's creator from its bag-info.txt (Contact-Name): a small file, where instance.json
    can be megabytes. None when the instance is gone (purged, replaced in dynamic mode) or has none."""
    try:
        text = archive.store.read_document(rid, f"instances/{iid}/bag-info.txt").decode("utf-8", "replace")
    except (NotFound, OSError, ValueError):
        return None
    value = None
    for line in text.splitlines():
        if value is not None and line[:1] in (" ", "\t"):
            value += "\n" + line.strip()        # a folded continuation line (core/bagwrite.fold)
        elif value is not None:
            break
        elif line.startswith("Contact-Name:"):
            value = line.partition(":")[2].strip()
    return value


def _write_software(xml: _Writer, version: str) -> None:
    with xml.element("agent"):
        _identifier(xml, "agentIdentifier", *SOFTWARE)
        xml.text_element("agentName", "tinyfs")
        xml.text_element("agentType", "software")
        xml.text_element("agentVersion", version)
        xml.text_element("agentNote", "the version that wrote this document; events.jsonl does not record "
                         "which version recorded each event")


def _write_person(xml: _Writer, kind: str, value: str, name: str) -> None:
    with xml.element("agent"):
        _identifier(xml, "agentIdentifier", kind, value)
        xml.text_element("agentName", name)
        xml.text_element("agentType", "person")


# -- the XML writer -------------------------------------------------------------------

class _Writer:
    """XMLGenerator with indentation, and text made safe for XML 1.0 (see `xml_text`)."""

    def __init__(self, out: BinaryIO):
        self._gen = XMLGenerator(out, encoding="utf-8", short_empty_elements=True)
        self._depth = 0
        self._started = False

    def start_document(self) -> None:
        self._gen.startDocument()

    def end_document(self) -> None:
        self._gen.characters("\n")
        self._gen.endDocument()

    @contextmanager
    def element(self, name: str, attrs: dict[str, str] | None = None) -> Iterator[None]:
        self._indent()
        self._gen.startElement(name, AttributesImpl({k: xml_text(v) for k, v in (attrs or {}).items()}))
        self._depth += 1
        yield
        self._depth -= 1
        self._indent()
        self._gen.endElement(name)

    def text_element(self, name: str, text: str, attrs: dict[str, str] | None = None) -> None:
        self._indent()
        self._gen.startElement(name, AttributesImpl(attrs or {}))
        self._gen.characters(xml_text(str(text)))
        self._gen.endElement(name)

    def _indent(self) -> None:
        """Each tag on its own line (startDocument ended the XML declaration's line)."""
        if self._started:
            self._gen.ignorableWhitespace("\n" + "  " * self._depth)
        self._started = True


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """`text` with every character XML 1.0 cannot carry (control characters, lone surrogates, U+FFFE/F:
    logical paths and messages may hold them) written as a visible \\uXXXX escape: the document must
    stay well-formed whatever a name holds."""
    return _NOT_XML.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
