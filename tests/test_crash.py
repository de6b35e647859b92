"""Crash safety (SPEC section 6): a commit interrupted anywhere leaves the old state or the new one,
`recover` cleans up, and fsck is clean."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import check_archive_ok, run_tinyfs
from mounting import tinyfs_argv

import tinyfs.core.localstore as localstore_module
from tinyfs import Archive
from tinyfs.core import bagwrite
from tinyfs.core.events import EventLog
from tinyfs.core.fsck import fsck
from tinyfs.core.layout import LOCKS, ArchiveRoot
from tinyfs.core.recover import recover

pytestmark = pytest.mark.core


class Boom(Exception):
    """The injected failure."""


TARGETS = {
    "os.link": (os, "link"),
    "os.rename": (os, "rename"),
    "write_tag_files": (bagwrite, "write_tag_files"),
    "syncfs": (bagwrite, "syncfs"),
    "fsync_dir": (localstore_module, "fsync_dir"),      # the publish's (LocalStore.publish)
    "events.append": (EventLog, "append"),
}


def snapshot(root: Path, rid: str = "r"):
    """The resource's current state, exactly: file bytes, links, directories (None when it does not exist)."""
    archive = Archive(root)
    if rid not in archive:
        return None
    res = archive.get(rid)
    state = res.state()
    return ({p: res.read(p) for p in state.files}, {p: e.target for p, e in state.links.items()},
            sorted(state.dirs))


def make_source(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(os.urandom(200_000))
    (src / "sub" / "two.txt").write_text("two\n")
    (src / "sub" / "dup.txt").write_text("two\n")
    os.symlink("sub/two.txt", src / "link")
    return src


def first_commit(archive: Archive, src: Path) -> None:
    with archive.new("r", message="old") as txn:
        txn.add(src / "sub")
        txn.add_bytes("memo.txt", b"old memo")


def second_commit(archive: Archive, src: Path) -> None:
    """New files from disk and from memory (linked), a duplicate, a removal, a symlink."""
    existing = "r" in archive
    txn = archive.get("r", "a", message="new", label="v2") if existing else archive.new("r", label="v2")
    txn.add(src / "one.bin")
    txn.add(src / "link")
    txn.add(src / "sub", path="copy")
    txn.add_bytes("memo.txt", b"new memo")
    txn.add_bytes("again.txt", b"old memo")
    if existing:
        txn.remove("sub/dup.txt")
    txn.commit()


@pytest.mark.parametrize("existing", [True, False], ids=["existing-resource", "new-resource"])
@pytest.mark.parametrize("mode", ["preservation", "worm", "dynamic"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_exception_at_every_step_of_a_commit(tmp_path, monkeypatch, target, mode, existing):
    src = make_source(tmp_path)
    reference = Archive.init(tmp_path / "reference", mode=mode)
    if existing:
        first_commit(reference, src)
    old = snapshot(reference.root.root)
    second_commit(reference, src)
    new = snapshot(reference.root.root)
    assert new != old

    obj, attr = TARGETS[target]
    real = getattr(obj, attr)
    n = 0
    while True:
        n += 1
        root = tmp_path / f"a{n}"
        archive = Archive.init(root, mode=mode)
        if existing:
            first_commit(archive, src)
        calls = 0

        def failing(*args, _n=n, **kw):
            nonlocal calls
            calls += 1
            if calls == _n:
                raise Boom(f"{target} call {_n}")
            return real(*args, **kw)

        with monkeypatch.context() as m:
            m.setattr(obj, attr, failing)
            try:
                second_commit(archive, src)
                failed = False
            except Boom:
                failed = True
        recover(ArchiveRoot(root))
        assert snapshot(root) in (old, new), f"{target} call {n}"
        assert not [x for x in os.listdir(root / "transactions") if x != LOCKS]
        check_archive_ok(root)
        if not failed:
            break
        assert n < 50
    assert n >= 2        # the commit did call the target, and failed there at least once


def _round_source(src: Path, rng: random.Random, i: int) -> dict[str, str]:
    """Change some files of the source; return the expected state (logical path -> sha512)."""
    for k in rng.sample(range(6), 3):
        (src / f"f{k}.bin").write_bytes(rng.randbytes(4 * 1024 * 1024))
    (src / "round.txt").write_text(f"round {i}\n")
    return {f"src/{p.name}": hashlib.sha512(p.read_bytes()).hexdigest() for p in src.iterdir()}


def _digests(root: Path):
    archive = ArchiveRoot(root)
    if not archive.exists("r"):
        return None
    return {p: f.digest for p, f in archive.state("r").files.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode,rounds", [("preservation", 14), ("dynamic", 8)])
def test_kill_9_during_ingest(tmp_path, mode, rounds):
    rng = random.Random(f"tinyfs-{mode}")
    root = tmp_path / "archive"
    run_tinyfs("init", root, "--mode", mode)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        (src / f"f{k}.bin").write_bytes(rng.randbytes(4 * 1024 * 1024))
    expected = _round_source(src, rng, 0)
    t0 = time.monotonic()
    run_tinyfs("ingest", root, "r", src)
    duration = time.monotonic() - t0
    assert _digests(root) == expected
    outcomes = {"old": 0, "new": 0}
    for i in range(1, rounds + 1):
        old = _digests(root)
        new = _round_source(src, rng, i)
        proc = subprocess.Popen([*tinyfs_argv(), "ingest", str(root), "r", str(src)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, 1.1) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        actions = run_tinyfs("recover", root).stdout
        print(f"round {i}: {actions.strip() or 'nothing to recover'}")
        now = _digests(root)
        assert now in (old, new), f"round {i}"
        outcomes["old" if now == old else "new"] += 1
        assert not [x for x in os.listdir(root / "transactions") if x != LOCKS]
        report = fsck(ArchiveRoot(root))
        assert report.clean, "\n".join(map(str, report.findings))
        if mode == "dynamic":
            assert len(ArchiveRoot(root).instance_ids("r")) == 1
    check_archive_ok(root)
    print(outcomes)
    assert sum(outcomes.values()) == rounds
