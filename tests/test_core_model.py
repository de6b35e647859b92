"""instance.json as written: plain sorted JSON, one entry per line, and a faithful round trip."""

from __future__ import annotations

import json

import pytest

from tinyfs.core.model import DirEntry, FileEntry, InstanceDoc, LinkEntry, State

pytestmark = pytest.mark.core

ODD = 'a "quoted" name\\ with\nnewline, tab\t, ümlaut, \u2028 and emoji \U0001f600'


def sample() -> InstanceDoc:
    state = State(
        files={
            "plain.txt": FileEntry("ab" * 64, 3, 0o644, 1_700_000_000_000_000_001),
            f"dir/{ODD}": FileEntry("cd" * 64, 0, 0o600, 5, {"user.k": "dmFsdWU="}),
        },
        links={"dir/link": LinkEntry(f"../{ODD}", 7)},
        dirs={"dir": DirEntry(0o755, 9), "empty": DirEntry(0o700, 11)},
    )
    return InstanceDoc("01a20a57-a4f9-7b50-a44a-92a7bac9401b", "r1", None, "2026-11-23T21:37:26.960905Z",
                       "message\nwith two lines", "Ann", "v1", "sha512", state,
                       {"ab" * 64: "instances/01a20a57-a4f9-7b50-a44a-92a7bac9401b/data/plain.txt"})


def test_instance_json_round_trips_and_is_sorted_plain_json() -> None:
    doc = sample()
    raw = doc.to_json_bytes()
    assert InstanceDoc.from_json_bytes(raw) == doc
    parsed = json.loads(raw)
    assert list(parsed) == sorted(parsed)
    assert all(list(section) == sorted(section) for section in
               (parsed["state"], parsed["dirs"], parsed["links"], parsed["stored"]))
    assert parsed["state"]["plain.txt"] == {"digest": "ab" * 64, "mode": 0o644,
                                            "mtime_ns": 1_700_000_000_000_000_001, "size": 3}
    assert raw.endswith(b"}\n") and ODD.encode() not in raw   # the newline in the name is escaped


def test_one_line_per_entry_so_that_diff_shows_changed_paths() -> None:
    lines = sample().to_json_bytes().decode().split("\n")   # not splitlines(): U+2028 is no line end for diff
    state_lines = [line for line in lines if line.startswith('  "') and '"digest"' in line]
    assert len(state_lines) == 2
    assert any(line.startswith('  "plain.txt": {') for line in lines)
    assert any(line.startswith('  "empty": {"mode":448') for line in lines)
    assert json.loads(InstanceDoc("i", "r", None, "c", "", "", None, "sha512", State(), {}).to_json_bytes())["state"] == {}


def test_a_document_following_another_reuses_its_lines_and_reads_exactly_as_if_encoded_whole() -> None:
    """The next instance re-encodes only entries that are not the previous one's objects; the bytes
    must not tell: every kind of change (added, removed, replaced, same value as a new object)."""
    first = sample()
    first.to_json_bytes()
    assert first.encoded is not None
    s = first.state
    files = dict(s.files)
    files["plain.txt"] = FileEntry("ef" * 64, 4, 0o644, 12)               # replaced
    files["new file"] = FileEntry("ab" * 64, 3, 0o640, 13)                # added
    del files[f"dir/{ODD}"]                                              # removed
    dirs = {**s.dirs, "dir": DirEntry(0o755, 9)}                         # equal, but another object
    links = {"dir/link": LinkEntry("elsewhere", 7)}
    stored = {**first.stored, "ef" * 64: "instances/x/data/plain.txt"}
    second = InstanceDoc("01a20a57-a4f9-7b50-a44a-92a7bac9401c", "r1", first.id, "2026-11-23T21:38:00.000000Z",
                         "", "", None, "sha512", State(files, links, dirs), stored)
    reused = second.to_json_bytes(previous=first)
    assert first.encoded is None and second.encoded is not None          # the lines moved on
    whole = InstanceDoc(**{k: getattr(second, k) for k in
                           ("id", "resource", "previous", "created", "message", "creator", "label", "digest",
                            "state", "stored")}).to_json_bytes()
    assert reused == whole
    assert InstanceDoc.from_json_bytes(reused) == second
    third_state = State({}, {}, {})                                      # everything removed
    third = InstanceDoc("i3", "r1", second.id, "c", "", "", None, "sha512", third_state, {})
    assert json.loads(third.to_json_bytes(previous=second))["state"] == {}


def test_the_resource_root_is_recorded_as_dirs_empty_name_and_kept_out_of_the_paths() -> None:
    from tinyfs.core.model import UNKNOWN, peek_root

    doc = sample()
    doc.state.root = DirEntry(0o750, 1_600_000_000_123_456_789)
    raw = doc.to_json_bytes()
    assert json.loads(raw)["dirs"][""] == {"mode": 0o750, "mtime_ns": 1_600_000_000_123_456_789}
    back = InstanceDoc.from_json_bytes(raw)
    assert back == doc and back.state.root == doc.state.root
    assert "" not in back.state.dirs and "" not in back.state.entries()     # walks over paths never meet it
    # the root read from the first bytes alone, as a listing of resources/ does for every head
    assert peek_root(raw[:600]) == doc.state.root
    doc.state.root = None
    assert peek_root(doc.to_json_bytes()) is None                              # none recorded
    assert peek_root(InstanceDoc("i", "r", None, "c", "", "", None, "sha512", State(), {}).to_json_bytes()) is None
    doc.creator = "x" * 10_000                                                # pushed past the bytes read
    assert peek_root(doc.to_json_bytes()[:8192]) is UNKNOWN
    assert peek_root(json.dumps(json.loads(raw)).encode()) is UNKNOWN          # laid out by another writer


def test_root_entry_reads_a_head_without_parsing_it_and_falls_back_to_the_document(tmp_path) -> None:
    from tinyfs import Archive
    from tinyfs.core.commit import CommitRequest, NewFile, commit
    from tinyfs.core.layout import ArchiveRoot

    Archive.init(tmp_path / "a")
    (tmp_path / "f").write_text("f")
    root = DirEntry(0o700, 42)
    for rid in ("short", "long"):
        change = {"f": NewFile(tmp_path / "f", 1, 0o644, 1, linkable=False)}
        commit(ArchiveRoot(tmp_path / "a"), CommitRequest(rid, None, change, creator="Ann", root=root))
    # a document whose root lies past the first bytes (a creator longer than the limit, as an
    # instance written before the limit, or by another tool, may hold)
    archive = ArchiveRoot(tmp_path / "a")
    doc_path = archive.instance_dir("long", archive.head("long")) / "instance.json"
    doc = json.loads(doc_path.read_bytes())
    doc["creator"] = "c" * 20_000
    doc_path.write_text(json.dumps(doc, sort_keys=True, indent=1))
    archive = ArchiveRoot(tmp_path / "a")            # nothing cached
    assert archive.root_entry("short", archive.head("short")) == root
    assert not archive._docs                         # read from the first bytes: no document parsed
    assert archive.root_entry("long", archive.head("long")) == root     # a long creator: read whole
    assert archive.state("long").root == root


def test_a_commit_keeps_the_head_s_root_unless_it_changed_it_and_a_clash_is_estale(tmp_path) -> None:
    import pytest

    from tinyfs import Archive
    from tinyfs.core.commit import CommitRequest, NewFile, commit
    from tinyfs.core.errors import Stale
    from tinyfs.core.layout import ArchiveRoot

    Archive.init(tmp_path / "a")
    archive = ArchiveRoot(tmp_path / "a")
    (tmp_path / "f").write_text("f")

    def file():
        return NewFile(tmp_path / "f", 1, 0o644, 1, linkable=False)

    first = commit(archive, CommitRequest("r", None, {"a": file()}, root=DirEntry(0o750, 1))).instance
    # made against `first`: another commit (no root given: the CLI, the API) keeps the head's root
    second = commit(archive, CommitRequest("r", first, {"b": file()})).instance
    assert archive.state("r", second).root == DirEntry(0o750, 1)
    # a change of the root alone is a change; one equal to the base's is none
    assert commit(archive, CommitRequest("r", second, {}, root=DirEntry(0o750, 1))).instance is None
    third = commit(archive, CommitRequest("r", second, {}, root=DirEntry(0o700, 2))).instance
    assert third is not None and archive.state("r").root == DirEntry(0o700, 2)
    # made against `second` while `third` changed the root: the same change merges, another is ESTALE
    assert commit(archive, CommitRequest("r", second, {"c": file()}, root=DirEntry(0o700, 2))).instance
    with pytest.raises(Stale):
        commit(archive, CommitRequest("r", second, {"d": file()}, root=DirEntry(0o755, 3)))
    unchanged_root = commit(archive, CommitRequest("r", second, {"e": file()}, root=DirEntry(0o750, 1)))
    assert archive.state("r", unchanged_root.instance).root == DirEntry(0o700, 2)    # the head's stays
