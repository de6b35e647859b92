"""`tinyfs events ROOT --premis`: the event log as PREMIS 3 XML, valid against the official schema.

The schema is the Library of Congress PREMIS 3.0 XSD (https://www.loc.gov/standards/premis/v3/premis-v3-0.xsd;
the PREMIS Editorial Committee keeps the same file as docs/DataDictionary/v3/premis-v3-0.xsd in
github.com/PREMIS-EC/editorial-committee). Version 3.0 imports no other schema (xlink was dropped).
It is read from $TINYFS_PREMIS_XSD, tests/fixtures/premis/premis-v3-0.xsd, or shared/premis/premis-v3-0.xsd
beside the repository, the first that exists; without it, only the schema validation is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_tinyfs

from tinyfs import Archive, __version__
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.premis import write_premis, xml_text

pytestmark = pytest.mark.core

P = "{http://www.loc.gov/premis/v3}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
REPO = Path(__file__).resolve().parent.parent
SCHEMA_PLACES = (os.environ.get("TINYFS_PREMIS_XSD", ""), REPO / "tests" / "fixtures" / "premis" / "premis-v3-0.xsd",
                 REPO.parent / "shared" / "premis" / "premis-v3-0.xsd")


@functools.cache
def premis_schema():
    import xmlschema

    for place in SCHEMA_PLACES:
        if place and Path(place).is_file():
            return xmlschema.XMLSchema(str(place))
    return None


def valid_premis(xml: bytes) -> ET.Element:
    """The document, parsed, after the PREMIS 3 schema has validated it (where the schema is here: else
    test_the_schema_is_here says so, and what each test checks of the content is still checked)."""
    schema = premis_schema()
    if schema is not None:
        schema.validate(io.BytesIO(xml))
    return ET.fromstring(xml)


def test_the_schema_is_here():
    if premis_schema() is None:
        pytest.skip(f"the PREMIS 3.0 schema is not here (looked in {', '.join(map(str, SCHEMA_PLACES[1:]))}): "
                    "no document of these tests was validated against it")
    assert premis_schema().target_namespace == "http://www.loc.gov/premis/v3"


def premis_of(root: Path, *args) -> bytes:
    r = run_tinyfs("events", root, "--premis", *args, text=False)
    assert r.stderr == b""
    return r.stdout


def identifiers(parent: ET.Element, element: str) -> list[tuple[str, str]]:
    return [(i.findtext(f"{P}{element}Type"), i.findtext(f"{P}{element}Value")) for i in parent.findall(f"{P}{element}")]


def objects(doc: ET.Element) -> list[tuple[str, str, str]]:
    return [(o.get(XSI_TYPE), *identifiers(o, "objectIdentifier")[0]) for o in doc.findall(f"{P}object")]


def events(doc: ET.Element) -> list[dict]:
    return [{"type": e.findtext(f"{P}eventType"),
             "detail": e.findtext(f"{P}eventDetailInformation/{P}eventDetail"),
             "outcome": e.findtext(f"{P}eventOutcomeInformation/{P}eventOutcome"),
             "notes": [n.text for n in e.iterfind(f"{P}eventOutcomeInformation/{P}eventOutcomeDetail/"
                                                  f"{P}eventOutcomeDetailNote")],
             "agents": identifiers(e, "linkingAgentIdentifier"),
             "objects": identifiers(e, "linkingObjectIdentifier"),
             "id": identifiers(e, "eventIdentifier")[0]} for e in doc.findall(f"{P}event")]


def agents(doc: ET.Element) -> list[tuple[str, str, str, str | None]]:
    return [(*identifiers(a, "agentIdentifier")[0], a.findtext(f"{P}agentType"), a.findtext(f"{P}agentVersion"))
            for a in doc.findall(f"{P}agent")]


@pytest.fixture
def history(tmp_path):
    """Resource `book`: three commits by two creators (the last labelled), a byte flipped in a stored
    file and found by fsck; resource `notes`: one commit."""
    archive = Archive.init(tmp_path / "archive")
    with archive.new("book", message="scan", creator="Ada") as txn:
        txn.add_bytes("page1.txt", b"one\n")
    with archive.get("book", "a", message="more", creator="Grace") as txn:
        txn.add_bytes("page2.txt", b"two\n")
    with archive.get("book", "a", message="done", creator="Ada", label="v1") as txn:
        txn.add_bytes("page3.txt", b"three\n")
    with archive.new("notes") as txn:
        txn.add_bytes("n.txt", b"n\n")
    stored = next(archive.root.resource_dir("book").glob("instances/*/data/page1.txt"))
    data = bytearray(stored.read_bytes())
    data[0] ^= 1
    stored.write_bytes(bytes(data))
    assert run_tinyfs("fsck", archive.root.root, check=False).returncode == 1
    return archive


def test_an_archive_history_as_premis(history):
    root = history.root
    chain = sorted(os.listdir(root.resource_dir("book") / "instances"))
    notes = sorted(os.listdir(root.resource_dir("notes") / "instances"))
    doc = valid_premis(premis_of(root.root))
    assert doc.get("version") == "3.0"

    assert objects(doc) == [("intellectualEntity", "tinyfs-archive", str(root.root)),
                            ("intellectualEntity", "tinyfs-rid", "book"),
                            ("intellectualEntity", "tinyfs-rid", "notes"),
                            *[("representation", "tinyfs-iid", iid) for iid in chain],
                            ("representation", "tinyfs-iid", notes[0])]
    represents = doc.find(f"{P}object[@{XSI_TYPE}='representation']/{P}relationship")
    assert represents.findtext(f"{P}relationshipSubType") == "represents"
    assert identifiers(represents, "relatedObjectIdentifier") == [("tinyfs-rid", "book")]

    lines = root.events.path.read_bytes().splitlines()
    found = events(doc)
    assert [e["id"] for e in found] == [("tinyfs-event-sha256", hashlib.sha256(line).hexdigest()) for line in lines]
    kinds = [(e["type"], e["outcome"]) for e in found]
    assert kinds == [("creation", "success"),            # each commit: its files' formats identified after it
                     *[("transaction.opened", None), ("ingestion", "success"),
                       ("format identification", "success")] * 4,
                     *[("fixity check", "fail")] * 4]      # fsck: one per instance using the damaged file, one run
    assert all(e["agents"][0] == ("tinyfs-software", "tinyfs") for e in found)

    commits = [e for e in found if e["type"] == "ingestion"]
    assert [e["objects"] for e in commits] == [[("tinyfs-rid", "book"), ("tinyfs-iid", iid)] for iid in chain] + [
        [("tinyfs-rid", "notes"), ("tinyfs-iid", notes[0])]]
    assert [e["agents"][1:] for e in commits] == [[("tinyfs-creator", "Ada")], [("tinyfs-creator", "Grace")],
                                                  [("tinyfs-creator", "Ada")], []]
    assert '"label": "v1"' in commits[2]["detail"] and commits[2]["detail"].startswith("tinyfs transaction.committed: ")

    *damaged, run = found[-4:]
    assert [e["objects"] for e in damaged] == [[("tinyfs-rid", "book"), ("tinyfs-iid", iid)] for iid in chain]
    assert [e["notes"][0].split(":")[:2] for e in damaged] == [["data/page1.txt", " checksum-mismatch"],
                                                                 *[["page1.txt", " stored-damaged"]] * 2]
    assert run["objects"] == [("tinyfs-archive", str(root.root))] and '"problems": 3' in run["detail"]

    assert agents(doc) == [("tinyfs-software", "tinyfs", "software", __version__),
                           ("tinyfs-creator", "Ada", "person", None), ("tinyfs-creator", "Grace", "person", None)]


def test_since_keeps_the_events_from_then_and_only_the_objects_they_name(history):
    root = history.root
    committed = [e for e in root.events.read() if e["event"] == "transaction.committed"]
    doc = valid_premis(premis_of(root.root, "--since", committed[-1]["time"]))
    chain = sorted(os.listdir(root.resource_dir("book") / "instances"))
    assert objects(doc) == [("intellectualEntity", "tinyfs-archive", str(root.root)),
                            ("intellectualEntity", "tinyfs-rid", "notes"),
                            ("intellectualEntity", "tinyfs-rid", "book"),
                            ("representation", "tinyfs-iid", root.head("notes")),
                            *[("representation", "tinyfs-iid", iid) for iid in chain]]
    assert [e["type"] for e in events(doc)] == ["ingestion", "format identification", *["fixity check"] * 4]


def test_a_purged_resource_in_dynamic_mode(tmp_path):
    archive = Archive.init(tmp_path / "archive", mode="dynamic")
    with archive.new("tmp", creator="Ada") as txn:
        txn.add_bytes("a.txt", b"a\n")
    with archive.get("tmp", "a", creator="Grace") as txn:       # replaces the first instance
        txn.add_bytes("b.txt", b"b\n")
    run_tinyfs("purge", archive.root.root, "tmp")
    doc = valid_premis(premis_of(archive.root.root))
    found = events(doc)
    assert (found[-1]["type"], found[-1]["outcome"], found[-1]["objects"]) == (
        "deletion", "success", [("tinyfs-rid", "tmp")])
    # the bags are gone, and with them who made each instance: no creators, still a valid document
    assert agents(doc) == [("tinyfs-software", "tinyfs", "software", __version__)]


def test_a_torn_last_line_is_skipped_as_events_skips_it_and_a_line_of_no_event_too(history):
    log = history.root.events.path
    whole = len(log.read_bytes().splitlines())
    with open(log, "ab") as f:
        f.write(b'["JSON, but no event"]\n')     # passed over too
        f.write(b'{"time": "2030-01-01T00:00:00.000000Z", "event": "transaction.comm')
    r = run_tinyfs("events", history.root.root, "--premis", text=False)
    assert r.returncode == 0
    assert r.stderr.decode().splitlines() == [f"tinyfs: skipping a torn line in {log}"]
    assert len(events(valid_premis(r.stdout))) == whole


def test_names_that_xml_cannot_carry_are_escaped(tmp_path):
    archive = Archive.init(tmp_path / "archive")
    with archive.new("r", message="bell \x07 and \ufffe") as txn:
        txn.add_bytes("a.txt", b"a\n")
    out = io.BytesIO()
    assert write_premis(archive.root, out) == 4
    [committed] = [e for e in events(valid_premis(out.getvalue())) if e["type"] == "ingestion"]
    assert "bell \\u0007 and \\ufffe" in committed["detail"]
    assert xml_text("tab\tok, nul \x00, surrogate \udcff") == "tab\tok, nul \\u0000, surrogate \\udcff"


def test_an_archive_with_no_event_about_a_resource(tmp_path):
    Archive.init(tmp_path / "archive")
    doc = valid_premis(premis_of(tmp_path / "archive"))
    assert objects(doc) == [("intellectualEntity", "tinyfs-archive", str(ArchiveRoot(tmp_path / "archive").root))]
    assert [e["type"] for e in events(doc)] == ["creation"]


def test_a_bad_since_is_one_line(tmp_path):
    Archive.init(tmp_path / "archive")
    r = run_tinyfs("events", tmp_path / "archive", "--premis", "--since", "yesterday", check=False)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1 and "--since" in r.stderr


def test_the_python_api_writes_the_same_premis_as_the_cli(history):
    out = io.BytesIO()
    written = history.premis(out)
    assert written == len(list(history.events()))
    valid_premis(out.getvalue())
    assert out.getvalue() == premis_of(history.root.root)
