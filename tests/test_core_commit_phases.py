"""The phases of a commit (core/commit.py), each called alone on a real archive.

`commit()` runs them in order under the resource lock; here a test holds the stage itself and looks
between the phases: what each one reads, writes and leaves invisible until `publish`.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import bagit
import pytest
from conftest import check_archive_ok

from tinyfs import Archive
from tinyfs.core.commit import (
    COMMIT_PREFIX,
    CommitRequest,
    NewFile,
    flush,
    hash_new_files,
    merge_request,
    place_payload,
    plan_bag,
    publish,
    read_base_and_head,
    record,
    verify_writes,
    write_tags,
)
from tinyfs.core.errors import Inconsistent, Stale, WriteNotVerified
from tinyfs.core.ids import new_instance_id
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.model import DirEntry, FileEntry, State

pytestmark = pytest.mark.core


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def user_file(tmp_path: Path, name: str, data: bytes) -> NewFile:
    path = tmp_path / name
    path.write_bytes(data)
    return NewFile(path, len(data), 0o644, 1_000_000_000, linkable=False)


class Stage:
    """What `commit()` sets up before the phases: the head, a new instance id, the stage directory."""

    def __init__(self, root: ArchiveRoot, rid: str):
        self.root, self.rid = root, rid
        self.head = root.head(rid) if rid in root.resource_ids() else None
        self.iid = new_instance_id(after=self.head)
        self.path = root.transactions / f"{COMMIT_PREFIX}{rid}-{self.iid}"
        self.path.mkdir()
        (self.path / "pending").mkdir()

    def merged(self, req: CommitRequest):
        """The phases before the plan: base and head read, new files hashed, the request merged."""
        base_state, head_doc = read_base_and_head(self.root, req, self.head)
        head_state = head_doc.state if head_doc else State()
        new_files = hash_new_files(req.changes, self.root.config.digests, self.path / "pending", None)
        merged, delta = merge_request(req, base_state, head_state, self.head, self.root.config.primary)
        return head_doc, head_state, new_files, merged, delta


@pytest.fixture
def archive(tmp_path) -> ArchiveRoot:
    """Resource r: a.txt "A" (stored by the first instance), then a.txt removed and b.txt "B" added."""
    api = Archive.init(tmp_path / "archive")
    with api.new("r") as txn:
        txn.add_bytes("a.txt", b"A")
    with api.get("r", "a") as txn:
        txn.remove("a.txt")
        txn.add_bytes("b.txt", b"B")
    return ArchiveRoot(tmp_path / "archive")


def test_plan_reuses_bytes_any_instance_stores_and_writes_nothing(archive, tmp_path):
    first = archive.instance_ids("r")[0]
    stage = Stage(archive, "r")
    req = CommitRequest("r", stage.head, {"again.txt": user_file(tmp_path, "again", b"A"),
                                          "new.txt": user_file(tmp_path, "new", b"new bytes")})
    head_doc, _head_state, new_files, merged, _delta = stage.merged(req)
    plan = plan_bag(archive, "r", stage.head, head_doc, merged, new_files, stage.path, stage.iid)

    assert plan.to_store == [sha512(b"new bytes")]          # "A" is stored by the first instance: once
    assert plan.stored[sha512(b"A")] == f"instances/{first}/data/a.txt"
    assert plan.stored[sha512(b"B")] == head_doc.stored[sha512(b"B")]
    assert plan.stored[sha512(b"new bytes")] == f"instances/{stage.iid}/data/new.txt"
    assert list(plan.payload) == ["data/new.txt"] and plan.total == len(b"new bytes")
    [(op, source, dest)] = plan.placements
    assert op is os.rename and Path(source).parent == stage.path / "pending"   # the copy made while hashing
    assert dest == f"{stage.path}/instances/{stage.iid}/data/new.txt"
    assert sorted(os.listdir(stage.path)) == ["pending"]     # planning wrote nothing


def test_place_write_tags_and_flush_make_a_whole_bag_nobody_sees_until_publish(archive, tmp_path):
    stage = Stage(archive, "r")
    told, phases = [], []
    req = CommitRequest("r", stage.head, {"new.txt": user_file(tmp_path, "new", b"new bytes"), "b.txt": None},
                        message="phases", before_publish=told.append, on_phase=phases.append)
    head_doc, head_state, new_files, merged, delta = stage.merged(req)
    plan = plan_bag(archive, "r", stage.head, head_doc, merged, new_files, stage.path, stage.iid)
    place_payload(plan)
    assert (plan.bag / "data" / "new.txt").read_bytes() == b"new bytes"
    doc = write_tags(archive, req, stage.head, head_doc, merged, plan)
    flush(archive, req, stage.path, doc, new_resource=False)
    verify_writes(archive, req, plan)
    assert phases == ["verifying"]
    req.before_publish(doc.id)                               # (_commit_locked: after the verification)

    assert told == [stage.iid]
    bagit.Bag(str(plan.bag)).validate()                      # a complete bag, still in the stage
    assert archive.instance_ids("r")[-1] == stage.head       # ... which nobody sees yet
    publish(archive, "r", stage.iid, stage.path, previous=stage.head)
    assert not stage.path.exists()
    assert ArchiveRoot(archive.root).head("r") == stage.iid
    result = record(archive, req, head_state, delta, plan, doc)
    assert (result.instance, result.added, result.removed, result.files_stored) == (stage.iid, 1, 1, 1)
    assert sorted(archive.state("r").files) == ["new.txt"]
    check_archive_ok(archive.root)


def flushed_then_damaged(archive: ArchiveRoot, tmp_path: Path, damaged: str) -> tuple[CommitRequest, object]:
    """A new bag of resource r made durable, then a byte of `damaged` changed on the disk: what a disk
    that acknowledged a write it did not make leaves (the read-back drops the file's pages first, so it
    reads what the device holds)."""
    stage = Stage(archive, "r")
    req = CommitRequest("r", stage.head, {"new.txt": user_file(tmp_path, "new", b"new bytes")})
    head_doc, _head_state, new_files, merged, _delta = stage.merged(req)
    plan = plan_bag(archive, "r", stage.head, head_doc, merged, new_files, stage.path, stage.iid)
    place_payload(plan)
    doc = write_tags(archive, req, stage.head, head_doc, merged, plan)
    flush(archive, req, stage.path, doc, new_resource=False)
    with open(plan.bag / damaged, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
        os.fsync(f.fileno())
    return req, plan


@pytest.mark.parametrize("damaged", ["data/new.txt", "instance.json"])
def test_a_file_that_reads_back_wrong_after_the_flush_fails_the_commit_with_eio(archive, tmp_path, damaged):
    req, plan = flushed_then_damaged(archive, tmp_path, damaged)
    with pytest.raises(WriteNotVerified) as e:
        verify_writes(archive, req, plan)
    assert e.value.errno == errno.EIO and e.value.path == damaged
    assert damaged in str(e.value) and "nothing was committed" in str(e.value)


def test_no_verify_writes_skips_the_read_back(tmp_path):
    api = Archive.init(tmp_path / "archive", verify_writes=False)
    with api.new("r") as txn:
        txn.add_bytes("a.txt", b"A")
    assert '"verify_writes": false' in (tmp_path / "archive" / "tinyfs.json").read_text()
    root = ArchiveRoot(api.root.root)
    req, plan = flushed_then_damaged(root, tmp_path, "data/new.txt")
    verify_writes(root, req, plan)                            # not read back: not noticed
    assert ArchiveRoot(Archive.init(tmp_path / "other").root.root).config.verify_writes is True


def test_a_new_resource_is_published_by_renaming_the_whole_stage(tmp_path):
    root = ArchiveRoot(Archive.init(tmp_path / "archive").root.root)
    stage = Stage(root, "fresh")
    req = CommitRequest("fresh", None, {"f.txt": user_file(tmp_path, "f", b"f")})
    head_doc, head_state, new_files, merged, delta = stage.merged(req)
    plan = plan_bag(root, "fresh", None, head_doc, merged, new_files, stage.path, stage.iid)
    place_payload(plan)
    doc = write_tags(root, req, None, head_doc, merged, plan)
    flush(root, req, stage.path, doc, new_resource=True)
    assert (stage.path / "resource.json").exists() and "fresh" not in root.resource_ids()
    publish(root, "fresh", stage.iid, stage.path, previous=None)
    assert not stage.path.exists() and root.instance_ids("fresh") == [stage.iid]
    record(root, req, head_state, delta, plan, doc)
    check_archive_ok(root.root)


def test_merge_alone_applies_a_delta_on_a_moved_head_and_refuses_a_clash():
    entry = {n: FileEntry(sha512(n.encode()), 1, 0o644, 1) for n in ("a", "b", "c", "x")}
    base = State(files={"a": entry["a"]})
    head = State(files={"a": entry["a"], "b": entry["b"]})            # someone added b meanwhile
    ours = CommitRequest("r", "base", {"c": entry["c"]})
    merged, delta = merge_request(ours, base, head, "head", "sha512")
    assert sorted(merged.files) == ["a", "b", "c"] and delta == {"c": entry["c"]}

    theirs = State(files={"a": entry["x"]}, dirs={"d": DirEntry(0o755, 1)})   # a rewritten meanwhile
    with pytest.raises(Stale) as e:
        merge_request(CommitRequest("r", "base", {"a": entry["b"]}), base, theirs, "head", "sha512")
    assert e.value.errno == errno.ESTALE and e.value.path == "a"


def test_hashing_a_staged_file_whose_size_changed_is_inconsistent_eio(archive, tmp_path):
    """A staged blob whose size is not the one recorded (written to during the commit) is refused."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"longer than recorded")
    stage = Stage(archive, "r")
    changes = {"f": NewFile(os.fspath(blob), 3, 0o644, 1, linkable=True)}
    with pytest.raises(Inconsistent) as e:
        hash_new_files(changes, archive.config.digests, stage.path / "pending", None)
    assert e.value.errno == errno.EIO and e.value.path == "f"
