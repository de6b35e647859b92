"""Per-path history (core/history.py): the index in ROOT/index/history.db, built at commit, caught up when it
is missing or behind, rebuilt by recover; Resource.history and Resource.log; `tinyfs log`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs

from tinyfs import Archive
from tinyfs.core.errors import NotFound
from tinyfs.core.history import BUSY_SECONDS, NOTE_WAIT, Version
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.model import DirEntry, FileEntry, LinkEntry
from tinyfs.core.recover import recover

pytestmark = pytest.mark.core


def index_file(archive: Archive) -> Path:
    return archive.root.root / "index" / "history.db"


def covered(archive: Archive, rid: str) -> str | None:
    """The last instance the index file covers for `rid`, read with sqlite3 (the schema is the format's)."""
    with sqlite3.connect(index_file(archive)) as db:
        row = db.execute("SELECT last_iid FROM resources WHERE rid = ?", (rid,)).fetchone()
    return row[0] if row else None


def kinds(versions: list[Version]) -> list[tuple[str, str]]:
    return [(v.iid, v.kind) for v in versions]


@pytest.fixture
def story(archive: Archive, tmp_path: Path) -> tuple[Archive, list[str]]:
    """Resource r through eight instances; (archive, their ids):
    1 (v1)  a.txt "one", d/x "x", keep "k"
    2       a.txt changed to "two"
    3 (v2)  a.txt removed
    4       a.txt added again ("three")
    5       a.txt renamed b.txt (removed, and b.txt added with its bytes)
    6       ln, a symbolic link to b.txt
    7       d, a directory, replaced by a file d
    8       b.txt replaced by a directory b.txt holding inner"""
    os.symlink("b.txt", tmp_path / "ln")
    with archive.new("r", label="v1", message="first", creator="ada") as t:
        t.add_bytes("a.txt", b"one")
        t.add_bytes("d/x", b"x")
        t.add_bytes("keep", b"k")
    with archive.get("r", "a", message="second") as t:
        t.add_bytes("a.txt", b"two", mode=0o600)
    with archive.get("r", "a", label="v2") as t:
        t.remove("a.txt")
    with archive.get("r", "a") as t:
        t.add_bytes("a.txt", b"three")
    with archive.get("r", "a") as t:
        t.remove("a.txt")
        t.add_bytes("b.txt", b"three")
    with archive.get("r", "a") as t:
        t.add(tmp_path / "ln")
    with archive.get("r", "a") as t:
        t.remove("d")
        t.add_bytes("d", b"now a file")
    with archive.get("r", "a", label="v3") as t:
        t.remove("b.txt")
        t.add_bytes("b.txt/inner", b"inner")
    return archive, archive.root.instance_ids("r")


def test_every_kind_of_change_is_a_version_of_its_path(story):
    archive, iids = story
    r = archive.get("r")
    a = r.history("a.txt")
    assert kinds(a) == [(iids[0], "file"), (iids[1], "file"), (iids[2], "deleted"), (iids[3], "file"),
                        (iids[4], "deleted")]
    states = [r.state(iid) for iid in iids]
    assert [v.entry for v in a] == [states[0].files["a.txt"], states[1].files["a.txt"], None,
                                    states[3].files["a.txt"], None]
    assert a[1].entry.mode == 0o600 and a[1].entry.size == 3
    assert (a[0].label, a[0].message, a[0].creator, a[0].created) == ("v1", "first", "ada", r.instances[0].created)
    assert a[2].label == "v2" and a[1].label is None
    for v in (a[0], a[1], a[3]):          # each file version names the stored file holding its bytes
        assert archive.root.stored_path("r", v.stored).read_bytes() == r.read("a.txt", v.iid)
    assert kinds(r.history("b.txt")) == [(iids[4], "file"), (iids[7], "dir")]
    assert r.history("b.txt")[0].entry.digest == a[3].entry.digest           # the rename kept the bytes
    assert kinds(r.history("b.txt/inner")) == [(iids[7], "file")]
    (ln,) = r.history("ln")
    assert (ln.iid, ln.kind, ln.entry) == (iids[5], "link", LinkEntry("b.txt", states[5].links["ln"].mtime_ns))
    d = r.history("d")
    assert kinds(d) == [(iids[0], "dir"), (iids[6], "file")]
    assert isinstance(d[0].entry, DirEntry) and isinstance(d[1].entry, FileEntry)
    assert kinds(r.history("d/x")) == [(iids[0], "file"), (iids[6], "deleted")]
    assert kinds(r.history("keep")) == [(iids[0], "file")]                  # never changed: one version


def test_unknown_resources_and_paths_are_not_found(story):
    archive, _ = story
    with pytest.raises(NotFound):
        archive.get("r").history("never.txt")
    with pytest.raises(NotFound):
        archive.root.history.versions("nope", "a.txt")
    assert archive.root.history.children("r", "") == ["a.txt", "b.txt", "d", "keep", "ln"]
    assert archive.root.history.children("r", "b.txt") == ["inner"]


def test_the_log_counts_what_each_instance_did(story):
    archive, iids = story
    log = archive.get("r").log(changes=True)
    assert [e.iid for e in log] == iids
    assert [(e.added, e.changed, e.removed) for e in log] == [
        (4, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 0, 0), (0, 1, 1), (1, 1, 0)]
    assert [(c.path, c.change, c.kind) for c in log[6].changes] == [("d", "changed", "file"),
                                                                    ("d/x", "removed", "deleted")]
    assert [e.label for e in log] == ["v1", None, "v2", None, None, None, None, "v3"]
    assert archive.get("r").log()[0].changes is None


def test_the_index_is_written_by_each_commit(archive):
    with archive.new("r") as t:
        t.add_bytes("f", b"1")
    assert covered(archive, "r") == archive.root.head("r")       # nothing has read the history yet
    other = Archive(archive.root.root)                            # another process, as far as the index goes
    with other.get("r", "a") as t:
        t.add_bytes("f", b"2")
    assert covered(archive, "r") == archive.root.head("r")
    assert len(archive.get("r").history("f")) == 2
    check_archive_ok(archive.root.root)                           # fsck knows nothing of ROOT/index


def everything(archive: Archive, rid: str) -> tuple:
    """The whole history of a resource as the index answers it: the log with every change, and every
    version of every path ever seen."""
    index = archive.root.history
    paths, todo = [], [""]
    while todo:
        directory = todo.pop()
        for name in index.children(rid, directory):
            paths.append(f"{directory}/{name}" if directory else name)
            todo.append(paths[-1])
    return index.log(rid, changes=True), {path: index.versions(rid, path) for path in sorted(paths)}


def test_the_rows_a_commit_writes_are_the_rows_a_rebuild_finds(story, tmp_path):
    """Commits write what they changed (the request's changes when nobody committed since its base; a
    diff against the head after a merge: a path both sides changed alike is no change of the second);
    a rebuild diffs every instance with the one before."""
    archive, _ = story
    same = tmp_path / "same.txt"
    same.write_bytes(b"both")
    first, second = archive.get("r", "a"), archive.get("r", "a")     # two on one base: the second merges
    first.add_bytes("keep", b"k2")
    first.add(same)
    first.commit()
    second.add_bytes("other", b"o")
    second.add(same)
    second.remove("ln")
    second.commit()
    written = everything(archive, "r")
    assert [v.entry.size for v in written[1]["keep"]] == [1, 2] and written[1]["ln"][-1].kind == "deleted"
    assert len(written[1]["same.txt"]) == 1 and [e.changed for e in written[0][-2:]] == [1, 0]
    shutil.rmtree(archive.root.root / "index")
    assert everything(Archive(archive.root.root), "r") == written


def test_a_missing_index_is_built_again_from_the_instances(story):
    archive, iids = story
    before = archive.get("r").history("a.txt")
    shutil.rmtree(archive.root.root / "index")
    again = Archive(archive.root.root)
    assert again.get("r").history("a.txt") == before
    assert covered(again, "r") == iids[-1]


@pytest.mark.parametrize("behind", [2, 6])       # a few instances read through the cache; more, as JSON
def test_an_index_behind_the_head_catches_up(archive, tmp_path, behind):
    """As after a crash between the publish and the index update, or a commit made by a tinyfs without
    the index: the index file of an earlier instance, put back after the commit."""
    with archive.new("r") as t:
        t.add_bytes("f", b"1")
    saved = tmp_path / "saved.db"
    with sqlite3.connect(index_file(archive)) as db, sqlite3.connect(saved) as copy:
        db.backup(copy)                   # (the rows are in the WAL: a copy of the file would miss them)
    with archive.get("r", "a") as t:
        t.add_bytes("f", b"2")
    for n in range(behind - 1):
        with archive.get("r", "a") as t:
            t.add_bytes("g", b"g%d" % n)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index_file(archive)}{suffix}").unlink(missing_ok=True)
    shutil.copy(saved, index_file(archive))
    fresh = Archive(archive.root.root)
    assert covered(fresh, "r") == archive.root.instance_ids("r")[0]
    with fresh.get("r", "a") as t:        # a commit on an index that is behind leaves it to the readers
        t.add_bytes("f", b"3")
    chain = archive.root.instance_ids("r")
    assert [v.entry.size for v in fresh.get("r").history("f")] == [1, 1, 1]
    assert [v.iid for v in fresh.get("r").history("f")] == [chain[0], chain[1], chain[-1]]
    assert [v.iid for v in fresh.get("r").history("g")] == chain[2:-1]
    assert [e.iid for e in fresh.get("r").log()] == chain
    assert covered(fresh, "r") == fresh.root.head("r")


def test_recover_builds_a_missing_index(story):
    archive, iids = story
    shutil.rmtree(archive.root.root / "index")
    actions = recover(ArchiveRoot(archive.root.root))
    assert any("history index" in line for line in actions), actions
    assert covered(archive, "r") == iids[-1]
    assert not any("history index" in line for line in recover(ArchiveRoot(archive.root.root)))   # nothing to do


def test_a_damaged_index_is_built_again(story, caplog):
    archive, _ = story
    before = archive.get("r").history("a.txt")
    for suffix in ("-wal", "-shm"):
        Path(f"{index_file(archive)}{suffix}").unlink(missing_ok=True)
    index_file(archive).write_bytes(b"not a database at all" * 100)
    with caplog.at_level(logging.WARNING):
        assert Archive(archive.root.root).get("r").history("a.txt") == before
    assert "damaged" in caplog.text


def test_an_index_that_cannot_be_kept_in_root_is_kept_in_memory(story, caplog):
    """ROOT/index cannot be made (here a file is in the way; a read-only archive alike): the answers
    stay right, built from the instances by this process."""
    archive, iids = story
    before = archive.get("r").history("a.txt")
    shutil.rmtree(archive.root.root / "index")
    (archive.root.root / "index").write_bytes(b"in the way")
    with caplog.at_level(logging.WARNING):
        again = Archive(archive.root.root)
        assert again.get("r").history("a.txt") == before
        with again.get("r", "a") as t:
            t.add_bytes("a.txt", b"four")
        assert again.get("r").history("a.txt")[-1].iid == again.root.head("r")
    assert "kept in memory" in caplog.text
    assert (archive.root.root / "index").read_bytes() == b"in the way"


def test_a_busy_index_never_fails_a_commit(archive, caplog):
    """Another process holds the index's write lock past NOTE_WAIT: the commit is made, says so in the
    log, and the next reader adds the instance."""
    with archive.new("r") as t:
        t.add_bytes("f", b"1")
    holder = sqlite3.connect(index_file(archive), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING), archive.get("r", "a") as t:
            t.add_bytes("f", b"22")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert t.result.instance == archive.root.head("r")
    assert "could not add instance" in caplog.text
    assert covered(archive, "r") == archive.root.instance_ids("r")[0]
    assert [v.entry.size for v in archive.get("r").history("f")] == [1, 2]
    assert NOTE_WAIT < BUSY_SECONDS


def test_dynamic_mode_shows_what_still_exists(tmp_path):
    archive = Archive.init(tmp_path / "dyn", mode="dynamic")
    with archive.new("r") as t:
        t.add_bytes("f", b"1")
        t.add_bytes("gone", b"g")
    with archive.get("r", "a") as t:
        t.add_bytes("f", b"22")
        t.remove("gone")
    (head,) = archive.root.instance_ids("r")
    (version,) = archive.get("r").history("f")
    assert (version.iid, version.entry.size) == (head, 2)
    assert archive.root.stored_path("r", version.stored).read_bytes() == b"22"
    with pytest.raises(NotFound):
        archive.get("r").history("gone")             # its instances are gone: so is its history
    archive.purge("r")
    with archive.new("r") as t:                       # made again: a new history
        t.add_bytes("other", b"o")
    assert archive.root.history.children("r") == ["other"]


def test_worm_archives_keep_an_index_and_check_clean(tmp_path):
    archive = Archive.init(tmp_path / "worm", mode="worm")
    for n in range(3):
        with (archive.new("r") if n == 0 else archive.get("r", "a")) as t:
            t.add_bytes("f", b"%d" % n)
    assert len(archive.get("r").history("f")) == 3
    assert covered(archive, "r") == archive.root.head("r")
    check_archive_ok(archive.root.root)


# -- tinyfs log -----------------------------------------------------------------------------------------

def test_log_of_a_path_prints_each_version(story, tmp_path):
    archive, iids = story
    root = archive.root.root
    versions = archive.get("r").history("a.txt")
    lines = run_tinyfs("log", root, "r", "a.txt").stdout.splitlines()
    assert [line.split("\t")[:4] for line in lines] == [[v.iid, v.created, v.label or "", v.kind] for v in versions]
    first = lines[0].split("\t")
    assert first[4:6] == ["3", "0644"]
    assert first[7] == f"sha512:{versions[0].entry.digest}" and first[8] == "first"
    assert first[6].endswith("Z") and len(first[6].split(".")[1]) == 10              # nanoseconds, UTC
    assert lines[2].split("\t")[3:8] == ["deleted", "", "", "", ""]
    (ln,) = run_tinyfs("log", root, "r", "ln").stdout.splitlines()
    assert ln.split("\t")[3] == "link" and ln.split("\t")[7] == "b.txt"
    listed = json.loads(run_tinyfs("log", root, "r", "a.txt", "--json").stdout)
    assert listed == [v.to_json() for v in versions]
    assert listed[0]["digest"] == versions[0].entry.digest and listed[0]["instance"] == iids[0]


def test_log_of_a_resource_prints_each_instance(story):
    archive, iids = story
    root = archive.root.root
    lines = run_tinyfs("log", root, "r").stdout.splitlines()
    assert [line.split("\t") for line in lines][0] == [iids[0], archive.get("r").instances[0].created, "v1",
                                                        "4", "0", "0", "first"]
    assert len(lines) == len(iids)
    verbose = run_tinyfs("log", root, "r", "-v").stdout.splitlines()
    at = verbose.index(next(line for line in verbose if line.startswith(iids[6])))
    assert verbose[at + 1:at + 3] == ["\tchanged\tfile\td", "\tremoved\tdeleted\td/x"]
    listed = json.loads(run_tinyfs("log", root, "r", "--json").stdout)
    assert [e["instance"] for e in listed] == iids and "changes" not in listed[0]
    assert listed[4]["added"] == 1 and listed[4]["removed"] == 1


def test_log_refuses_an_unknown_resource_or_path_in_one_line(story):
    archive, _ = story
    root = archive.root.root
    for args, word in ((("nope",), "nope"), (("nope", "a.txt"), "nope"), (("r", "never.txt"), "never.txt"),
                       (("r", "../x"), "")):
        r = run_tinyfs("log", root, *args, check=False)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("tinyfs: ") and word in r.stderr


def test_an_archive_in_a_bucket_keeps_an_index_per_working_directory(tinyfs, s3_env, bucket, tmp_path):
    """Each host's ROOT holds its own index, caught up from the store with what other hosts committed (a
    process that knows the head sees another host's commit once its knowledge is HEAD_FRESH old, as in
    resources/)."""
    import time

    from test_s3archive import init

    from tinyfs.core.s3store import HEAD_FRESH

    init(tinyfs, s3_env, tmp_path / "a", bucket)
    init(tinyfs, s3_env, tmp_path / "b", bucket)
    a, b = Archive(tmp_path / "a"), Archive(tmp_path / "b")
    with a.new("r", label="v1") as t:
        t.add_bytes("f", b"from a")
    with b.get("r", "a") as t:
        t.add_bytes("f", b"from b, longer")
    time.sleep(HEAD_FRESH)
    for host in (a, b):
        assert [(v.label, v.entry.size) for v in host.get("r").history("f")] == [("v1", 6), (None, 14)]
        assert (tmp_path / host.root.root.name / "index" / "history.db").exists()
    assert len(run_tinyfs("log", tmp_path / "a", "r", "f").stdout.splitlines()) == 2
