"""The archive's cache of parsed instance documents (core/layout.py)."""

from __future__ import annotations

from tinyfs import Archive
from tinyfs.core import layout
from tinyfs.core.layout import ArchiveRoot


def make_resource(archive: Archive, rid: str, files: int) -> None:
    with archive.new(rid) as txn:
        for i in range(files):
            txn.add_bytes(f"f{i}.txt", b"%d\n" % i)


def test_alternating_between_large_documents_does_not_reread_them(tmp_path, monkeypatch):
    """diff -r of two large instances alternates between their documents: both must stay cached even
    when together they exceed the entry bound (re-reading one per file cost 0.4 s at 100,000 files)."""
    archive = Archive.init(tmp_path / "archive")
    for rid in ("a", "b", "c", "d"):
        make_resource(archive, rid, 20)
    monkeypatch.setattr(layout, "DOC_CACHE_ENTRIES", 30)     # every document alone is near the bound
    root = ArchiveRoot(tmp_path / "archive")
    first = {rid: root.instance(rid, root.head(rid)) for rid in ("a", "b")}
    for _ in range(3):
        for rid in ("a", "b"):
            assert root.instance(rid, root.head(rid)) is first[rid]      # the cached object, not a new parse
    for rid in ("c", "d"):                                      # four documents: the least recent one goes
        root.instance(rid, root.head(rid))
    assert root.instance("b", root.head("b")) is first["b"]
    assert root.instance("a", root.head("a")) is not first["a"]
