"""The archive's cache of parsed instance documents (core/layout.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tinyfs import Archive
from tinyfs.core import layout
from tinyfs.core.errors import AlreadyExists
from tinyfs.core.layout import ArchiveRoot
from tinyfs.core.model import InstanceDoc

pytestmark = pytest.mark.core


def make_resource(archive: Archive, rid: str, files: int) -> None:
    with archive.new(rid) as txn:
        for i in range(files):
            txn.add_bytes(f"f{i}.txt", b"%d\n" % i)


def test_alternating_between_large_documents_does_not_reread_them(tmp_path):
    """diff -r of two large instances alternates between their documents: both must stay cached even
    when together they exceed the budget (re-reading one per file cost 0.4 s at 100,000 files)."""
    archive = Archive.init(tmp_path / "archive")
    for rid in ("a", "b", "c"):
        make_resource(archive, rid, 20)
    root = ArchiveRoot(tmp_path / "archive")
    root.doc_cache_bytes = 30 * layout.ENTRY_BYTES            # every document alone is near the budget
    first = {rid: root.instance(rid, root.head(rid)) for rid in ("a", "b")}
    for _ in range(3):
        for rid in ("a", "b"):
            assert root.instance(rid, root.head(rid)) is first[rid]      # the cached object, not a new parse
    root.instance("c", root.head("c"))                          # three documents: the least recent one goes
    assert root.instance("b", root.head("b")) is first["b"]
    assert root.instance("a", root.head("a")) is not first["a"]


def test_the_cache_keeps_to_its_budget_however_many_documents_are_read(tmp_path):
    """A long-running mount reads thousands of instances: the cache holds what fits in its budget of
    estimated bytes (beyond the two most recent documents), not one document per instance ever read."""
    archive = Archive.init(tmp_path / "archive")
    for n in range(12):
        make_resource(archive, f"r{n}", 10 + n)
    root = ArchiveRoot(tmp_path / "archive")
    root.doc_cache_bytes = 60 * layout.ENTRY_BYTES
    docs = {}
    for n in range(12):
        rid = f"r{n}"
        docs[rid] = root.instance(rid, root.head(rid))
        cached = [d for d, _ in root._docs.values()]
        sizes = sorted(layout.doc_bytes(d) for d in cached)
        assert sum(sizes) == root._docs_bytes
        assert sum(sizes[:-2]) <= root.doc_cache_bytes, (n, sizes)
    assert root.instance("r0", root.head("r0")) is not docs["r0"]            # read again: it had gone
    assert root.instance("r11", root.head("r11")) is docs["r11"]


def test_a_head_evicted_from_the_cache_commits_correctly(tmp_path):
    """The next commit re-encodes only the lines that changed while the head document it wrote is still
    cached; evicted, it reads the head again and encodes it whole. Either way instance.json is exactly
    the full encoding of the new state."""
    for evict in (False, True):
        archive = Archive.init(tmp_path / f"archive-{evict}")
        make_resource(archive, "r", 50)
        root = archive.root
        if evict:
            root.doc_cache_bytes = 0
            make_resource(archive, "other", 3)          # two newer documents push the head of r out
            make_resource(archive, "third", 3)
            assert ("r", root.head("r")) not in root._docs
        else:
            assert root._docs[("r", root.head("r"))][0].encoded is not None
        with archive.get("r", "a") as txn:
            txn.add_bytes("f7.txt", b"changed\n")
            txn.add_bytes("new.txt", b"new\n")
            txn.remove("f9.txt")
        raw = (root.instance_dir("r", root.head("r")) / "instance.json").read_bytes()
        assert InstanceDoc.from_json_bytes(raw).to_json_bytes() == raw
        state = json.loads(raw)["state"]
        assert set(state) == {f"f{i}.txt" for i in range(50) if i != 9} | {"new.txt"}
        assert state["f7.txt"]["digest"] == hashlib.sha512(b"changed\n").hexdigest()
        assert state["f8.txt"]["digest"] == hashlib.sha512(b"8\n").hexdigest()


def test_a_head_is_weighed_again_when_its_encoded_lines_move_on(tmp_path):
    """A document written by this process weighs its encoded lines too; the next commit moves them to the
    new head, and the old head then weighs what it holds (else it would push others out for nothing)."""
    archive = Archive.init(tmp_path / "archive")
    make_resource(archive, "r", 20)
    root = archive.root
    first = root.head("r")
    assert root._docs[("r", first)][1] == 21 * (layout.ENTRY_BYTES + layout.ENCODED_BYTES)
    with archive.get("r", "a") as txn:
        txn.add_bytes("f0.txt", b"changed\n")
    assert root._docs[("r", first)][1] == 21 * layout.ENTRY_BYTES
    assert root._docs[("r", root.head("r"))][1] == 21 * (layout.ENTRY_BYTES + layout.ENCODED_BYTES)
    assert root._docs_bytes == sum(w for _, w in root._docs.values())


def test_an_interrupted_init_leaves_nothing_and_a_second_init_works(tmp_path, monkeypatch):
    """init lays the archive out beside ROOT and renames it onto ROOT: a crash before the rename leaves
    ROOT as it was (here: an empty directory), so init (or a resumed migrate) can simply run again."""

    root = tmp_path / "arc"
    root.mkdir()
    real = layout._lay_out

    def dies(top, config):
        (top / "resources").mkdir()
        raise KeyboardInterrupt          # a kill, as far as ROOT can tell
    monkeypatch.setattr(layout, "_lay_out", dies)
    with pytest.raises(KeyboardInterrupt):
        layout.init_archive(root)
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["arc"]
    monkeypatch.setattr(layout, "_lay_out", real)
    layout.init_archive(root)
    assert (root / "tinyfs.json").exists() and (root / "transactions" / ".locks").is_dir()
    with pytest.raises(AlreadyExists):
        layout.init_archive(root)


def test_init_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tinyfs.core.layout import init_archive

    init_archive(".")
    assert (tmp_path / "tinyfs.json").exists() and os.path.samefile(".", tmp_path)
