"""instance.json as written: plain sorted JSON, one entry per line, and a faithful round trip."""

from __future__ import annotations

import json

from tinyfs.core.model import DirEntry, FileEntry, InstanceDoc, LinkEntry, State

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
