"""Hard links in the core: link groups in instance.json, from ingest and the API, kept consistent by a
commit merged over another one, checked by fsck; a tinyfs export whose instance.json does not describe
its payload is refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from tinyfs import Archive
from tinyfs.core.commit import CommitRequest, commit
from tinyfs.core.errors import InvalidBag, Stale
from tinyfs.core.export import export
from tinyfs.core.fsck import fsck
from tinyfs.core.ingest import ingest_bag, ingest_paths
from tinyfs.core.model import InstanceDoc

pytestmark = pytest.mark.core

NS = 1_500_000_000_000_000_001


def groups(archive: Archive, rid: str) -> list[list[str]]:
    return [list(g) for g in archive.root.state(rid).hardlinks]


def linked_tree(base: Path) -> Path:
    """a, b and sub/c are one inode; d is another file with the same bytes and times, not linked."""
    (base / "sub").mkdir(parents=True)
    (base / "a").write_text("shared\n")
    os.link(base / "a", base / "b")
    os.link(base / "a", base / "sub" / "c")
    (base / "d").write_text("shared\n")
    for p in ("a", "d"):
        os.utime(base / p, ns=(NS, NS))
    return base


def test_ingest_records_link_groups_and_instance_json_lists_them(archive, tmp_path, archive_ok):
    src = linked_tree(tmp_path / "src")
    ingest_paths(archive, "r", [src / "a", src / "b", src / "d", src / "sub"])
    assert groups(archive, "r") == [["a", "b", "sub/c"]]
    state = archive.root.state("r")
    assert state.files["a"] == state.files["b"] == state.files["sub/c"]
    raw = (archive.root.instance_dir("r", archive.root.head("r")) / "instance.json").read_bytes()
    assert b'\n "hardlinks": [\n  ["a","b","sub/c"]\n ],\n' in raw        # one group per line
    stored = [p for p in archive.root.instance_dir("r", archive.root.head("r")).rglob("data/**/*") if p.is_file()]
    assert len(stored) == 1                  # the group's bytes (and d's, the same) are stored once
    archive_ok(archive.root.root)


def test_without_hard_links_instance_json_has_no_hardlinks_key(archive, tmp_path):
    (tmp_path / "f").write_text("x")
    ingest_paths(archive, "r", [tmp_path / "f"])
    raw = (archive.root.instance_dir("r", archive.root.head("r")) / "instance.json").read_bytes()
    assert b"hardlinks" not in raw
    assert InstanceDoc.from_json_bytes(raw).state.hardlinks == ()


def test_linking_two_equal_files_is_a_change(archive, tmp_path):
    src = linked_tree(tmp_path / "src")
    ingest_paths(archive, "r", [src])
    first = archive.root.head("r")
    os.unlink(src / "d")
    os.link(src / "a", src / "d")            # the same bytes, mode and time: only the grouping differs
    result = ingest_paths(archive, "r", [src])
    assert result.instance is not None and result.instance != first
    assert result.changed == 4 and result.added == result.removed == 0    # each path's group changed
    assert groups(archive, "r") == [["src/a", "src/b", "src/d", "src/sub/c"]]
    assert ingest_paths(archive, "r", [src]).instance is None      # and the same again is no change


def test_replacing_or_removing_a_member_leaves_the_rest_of_its_group(archive, tmp_path, archive_ok):
    src = linked_tree(tmp_path / "src")
    ingest_paths(archive, "r", [src])
    with archive.get("r", "a") as txn:
        txn.add_bytes("src/b", b"other bytes\n")
    assert groups(archive, "r") == [["src/a", "src/sub/c"]]
    with archive.get("r", "a") as txn:
        txn.remove("src/sub")
    assert groups(archive, "r") == []
    archive_ok(archive.root.root)


def base_with_group(archive: Archive, tmp_path: Path) -> None:
    src = tmp_path / "base"
    src.mkdir()
    (src / "a").write_text("one inode\n")
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "c")
    (src / "other").write_text("other\n")
    ingest_paths(archive, "r", sorted(src.iterdir()))


def pair(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "x").write_text(f"{name}\n")
    os.link(d / "x", d / "y")
    return d


def test_merge_keeps_both_sides_groups(archive, tmp_path, archive_ok):
    base_with_group(archive, tmp_path)
    ours, theirs = archive.get("r", "a"), archive.get("r", "a")
    theirs.add(pair(tmp_path, "theirs"))
    theirs.commit()
    ours.add(pair(tmp_path, "ours"))
    ours.commit()                            # merged over theirs
    assert groups(archive, "r") == [["a", "b", "c"], ["ours/x", "ours/y"], ["theirs/x", "theirs/y"]]
    archive_ok(archive.root.root)


@pytest.mark.parametrize("theirs_do, ours_do, want", [
    ("remove b", "remove c", []),                        # each side removed one name: none left linked
    ("remove b", "add other2", [["a", "c"]]),            # their removal, our unrelated change
    ("rewrite b", "remove other", [["a", "c"]]),         # a rewritten name leaves the group
    ("add other2", "rewrite a", [["b", "c"]]),
])
def test_merge_splits_groups_sanely(archive, tmp_path, archive_ok, theirs_do, ours_do, want):
    base_with_group(archive, tmp_path)
    ours, theirs = archive.get("r", "a"), archive.get("r", "a")
    for txn, do in ((theirs, theirs_do), (ours, ours_do)):
        verb, path = do.split()
        if verb == "remove":
            txn.remove(path)
        elif verb == "rewrite":
            txn.add_bytes(path, b"rewritten\n")
        else:
            txn.add_bytes(path, b"new\n")
        txn.commit()
    assert groups(archive, "r") == want
    state = archive.root.state("r")
    assert all(p in state.files for g in want for p in g)
    archive_ok(archive.root.root)


def test_merge_of_two_changes_to_one_group_is_stale(archive, tmp_path):
    """Ours links d to the inode of a, b, c (as `ln a d` in a mount transaction); theirs rewrote b
    meanwhile: b ends linked on one side, other bytes on the other."""
    base_with_group(archive, tmp_path)
    base = archive.root.head("r")
    theirs = archive.get("r", "a")
    theirs.add_bytes("b", b"rewritten\n")
    theirs.commit()
    a = archive.root.state("r", base).files["a"]
    ours = CommitRequest("r", base, {"d": a}, hardlinks=(("a", "b", "c", "d"),))
    with pytest.raises(Stale, match="'b' changed on both sides"):
        commit(archive.root, ours)
    assert groups(archive, "r") == [["a", "c"]] and "d" not in archive.root.state("r").files
    head = archive.root.head("r")            # made again on their instance, it commits
    again = CommitRequest("r", head, {"d": archive.root.state("r").files["a"]}, hardlinks=(("a", "c", "d"),))
    commit(archive.root, again)
    assert groups(archive, "r") == [["a", "c", "d"]]


def test_fsck_finds_bad_link_groups(archive, tmp_path):
    base_with_group(archive, tmp_path)
    inst = archive.root.instance_dir("r", archive.root.head("r"))
    doc = json.loads((inst / "instance.json").read_bytes())
    doc["hardlinks"] = [["a", "b", "gone"], ["a", "other"], ["c"]]
    raw = json.dumps(doc, sort_keys=True).encode()
    rewrite_tag_file(inst, "instance.json", raw)
    codes = {(f.path, f.code) for f in fsck(archive.root.__class__(archive.root.root)).findings}
    assert {("gone", "bad-hardlinks"), ("other", "bad-hardlinks"), ("a", "bad-hardlinks"),
            ("c", "bad-hardlinks")} <= codes


def rewrite_tag_file(bag: Path, name: str, raw: bytes) -> None:
    """Replace a tag file and make every tag manifest vouch for the new bytes (a consistent forgery)."""
    os.chmod(bag / name, 0o644)
    (bag / name).write_bytes(raw)
    for manifest in bag.glob("tagmanifest-*.txt"):
        alg = re.fullmatch(r"tagmanifest-(.+)\.txt", manifest.name).group(1)
        digest = hashlib.new(alg, raw).hexdigest()
        lines = [f"{digest}  {name}" if line.endswith(f"  {name}") else line
                 for line in manifest.read_text().splitlines()]
        manifest.write_text("\n".join(lines) + "\n")


@pytest.fixture
def exported(archive, tmp_path):
    src = linked_tree(tmp_path / "src")
    os.symlink("a", src / "to-a")
    ingest_paths(archive, "r", sorted(src.iterdir()))
    bag = tmp_path / "bag"
    export(archive.root, "r", bag)
    return bag


def edit_record(bag: Path, change) -> None:
    doc = json.loads((bag / "instance.json").read_bytes())
    change(doc)
    rewrite_tag_file(bag, "instance.json", json.dumps(doc, sort_keys=True).encode())


@pytest.mark.parametrize("change, code, where", [
    (lambda d: d["state"].pop("d"), "payload-mismatch", "data/d"),                       # a file not recorded
    (lambda d: d["state"].update({"e": d["state"]["d"]}), "payload-mismatch", "data/e"),  # recorded, absent
    (lambda d: d["state"]["d"].update({"digest": "0" * 128}), "payload-mismatch", "data/d"),
    (lambda d: d["state"]["d"].update({"size": 99}), "payload-mismatch", "data/d"),
    (lambda d: d.update({"hardlinks": [["a", "nowhere"]]}), "bad-instance-json", "instance.json"),
    (lambda d: d["links"].update({"no/dir/link": {"target": "x", "mtime_ns": 1}}), "bad-instance-json",
     "instance.json"),
])
def test_a_tinyfs_bag_whose_record_does_not_match_its_payload_is_refused(archive, exported, change, code, where):
    edit_record(exported, change)
    with pytest.raises(InvalidBag, match="instance.json does not describe its payload") as e:
        ingest_bag(archive, "copy", exported)
    assert (code, where) in {(p.code, p.path) for p in e.value.problems}
    assert "copy" not in archive


def test_an_instance_json_no_tag_manifest_vouches_for_is_a_plain_bag(archive, exported, archive_ok):
    for manifest in exported.glob("tagmanifest-*.txt"):
        manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()
                                    if not line.endswith("  instance.json")))
    ingest_bag(archive, "plain", exported)
    state = archive.root.state("plain")
    assert state.links == {} and sorted(state.files) == ["a", "b", "d", "sub/c"]
    assert state.hardlinks == (("a", "b", "sub/c"),)     # the payload's own hard links
    archive_ok(archive.root.root)


def test_a_tinyfs_bag_goes_on_top_of_the_current_state(archive, exported, tmp_path, archive_ok):
    (tmp_path / "keep").write_text("kept\n")
    (tmp_path / "a").write_text("replaced\n")
    ingest_paths(archive, "r2", [tmp_path / "keep", tmp_path / "a"])
    ingest_bag(archive, "r2", exported)
    state, exported_state = archive.root.state("r2"), archive.root.state("r")
    assert state.files["keep"].size == 5
    assert {p: state.get(p) for p in exported_state.entries()} == exported_state.entries()
    assert state.hardlinks == exported_state.hardlinks
    archive_ok(archive.root.root)
