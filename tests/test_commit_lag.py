"""No view lags a commit (SPEC 5): when the rename into commit/ returns, transactions/<rid> is gone from
every listing and resources/<rid> is listed and resolves, showing the new state -- also for the listings
of other processes that overlap the commit (a file manager, `watch ls`, another user's shell).

The first tests call the Operations adapter directly, to put a listing exactly where a commit's race
was; the last one makes real deposits of real files through real mounts (tests/commitlag.py, shared with
scripts/commit-lag, which runs the long version by hand).
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pyfuse3
import pytest
import trio
from commitlag import Depositor, Lister, make_source
from conftest import check_archive_ok, run_tinyfs
from mounting import Mounted

from tinyfs import Archive
from tinyfs.core.staging import Staging
from tinyfs.fs.ops import Operations
from tinyfs.fs.view import shown_iid


class Ctx:
    def __init__(self, uid=0, gid=0, umask=0o022):
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


@pytest.fixture
def listed(monkeypatch):
    """readdir's replies land in the token (a list of (name, attributes)) instead of a kernel buffer."""
    def reply(token, name, attrs, next_id):
        token.append((os.fsdecode(name), attrs))
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


async def read_listing(ops: Operations, fh: int) -> dict:
    token: list = []
    await ops.readdir(fh, 0, token)
    return dict(token)


async def new_transaction(ops: Operations, rid: bytes, ctx: Ctx, files: int = 3) -> int:
    """mkdir transactions/<rid>, and `files` new files in it."""
    t = await ops.mkdir(ops.top["transactions"], rid, 0o755, ctx)
    for i in range(files):
        name = f"f{time.monotonic_ns()}-{i}.txt".encode()
        info, _ = await ops.create(t.st_ino, name, 0o644, os.O_WRONLY, ctx)
        await ops.write(info.fh, 0, f"{rid!r} {i}\n".encode())
        await ops.release(info.fh)
    return t.st_ino


async def commit(ops: Operations, rid: bytes, ctx: Ctx) -> None:
    await ops.rename(ops.top["transactions"], rid, ops.top["commit"], rid, 0, ctx)


@pytest.mark.adapter
def test_a_listing_opened_before_a_commit_and_read_after_it_shows_the_commit(tmp_path, listed):
    """opendir is not held back by a commit's rename, only readdir is: `ls transactions/ resources/` started
    while a commit runs reads both after it. It showed transactions/ empty (the committed transaction
    failed with ENOENT, which glibc's readdir reports as the end of an empty directory, and took the
    other open transaction with it) and resources/ without the new resource."""
    archive = Archive.init(tmp_path / "archive")
    ops, ctx = Operations(archive.root), Ctx()

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            await new_transaction(ops, b"other", ctx)          # stays open throughout
            await new_transaction(ops, b"new", ctx)
            in_txns = await ops.opendir(ops.top["transactions"], ctx)
            in_resources = await ops.opendir(ops.top["resources"], ctx)
            await commit(ops, b"new", ctx)
            assert list(await read_listing(ops, in_txns)) == ["other"]
            assert list(await read_listing(ops, in_resources)) == ["new"]
            await commit(ops, b"other", ctx)
            # a rewinddir (readdir at offset 0 again) shows what is there now
            assert list(await read_listing(ops, in_txns)) == []
            assert list(await read_listing(ops, in_resources)) == ["new", "other"]
    trio.run(go)
    check_archive_ok(archive.root.root)


@pytest.mark.adapter
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_transaction_listed_while_it_leaves_transactions_is_not_opened_again(tmp_path, listed, monkeypatch, end):
    """A listing of transactions/ in the instant between the transaction's closing and the rename of its
    directory out of transactions/ (a worker thread) found its directory still there and opened it
    again: it stayed open in the daemon for good, and `mkdir transactions/<rid>` failed with EEXIST."""
    archive = Archive.init(tmp_path / "archive")
    ops, ctx = Operations(archive.root), Ctx()
    moving, seen = threading.Event(), threading.Event()
    detach = Staging.detach

    def slow_detach(path):
        moving.set()             # the directory is about to leave transactions/ ...
        seen.wait(30)            # ... once a listing has looked at it
        return detach(path)
    monkeypatch.setattr(Staging, "detach", staticmethod(slow_detach))

    async def lister():
        await trio.to_thread.run_sync(moving.wait)
        try:
            fh = await ops.opendir(ops.top["transactions"], ctx)
            await read_listing(ops, fh)
            await ops.releasedir(fh)
        finally:
            seen.set()

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            await new_transaction(ops, b"r", ctx, files=0 if end == "rollback" else 3)
            nursery.start_soon(lister)
            if end == "commit":
                await commit(ops, b"r", ctx)
            else:
                await ops.rmdir(ops.top["transactions"], b"r", ctx)
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.lookup(ops.top["transactions"], b"r", ctx)
            assert e.value.errno == errno.ENOENT
            await new_transaction(ops, b"r", ctx)        # EEXIST before
            await commit(ops, b"r", ctx)
    trio.run(go)
    assert [n for n in os.listdir(archive.root.transactions) if not n.startswith(".")] == []
    check_archive_ok(archive.root.root)


@pytest.mark.adapter
def test_a_listing_of_resources_that_read_a_head_before_a_commit_shows_the_commit(tmp_path, listed):
    """A worker thread lists resources/ while the loop commits: the head it read just before the commit's
    rename made a Head for the previous instance once the commit had moved the tree on, and the listing
    handed resources/<rid> showing the previous state to the kernel after the rename had returned."""
    archive = Archive.init(tmp_path / "archive")
    (tmp_path / "a.txt").write_text("a")
    with archive.new("r") as t:
        t.add(tmp_path / "a.txt")
    first = archive.get("r").instances[0].id
    ops, ctx = Operations(archive.root), Ctx()
    arch = ops.archive
    read_first, committed = threading.Event(), threading.Event()
    real_heads = arch.heads

    def heads_of_the_listing(rids):   # the listing thread's look at r: before the commit, then it waits
        heads = real_heads(rids)
        if not read_first.is_set() and threading.current_thread() is not threading.main_thread():
            read_first.set()
            committed.wait(30)
        return heads

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            await new_transaction(ops, b"r", ctx)
            arch.heads = heads_of_the_listing
            listing: dict = {}

            async def list_resources():
                fh = await ops.opendir(ops.top["resources"], ctx)
                listing.update(await read_listing(ops, fh))
            nursery.start_soon(list_resources)
            assert await trio.to_thread.run_sync(read_first.wait, 30), "the listing never read the heads"
            await commit(ops, b"r", ctx)
            committed.set()
            while not listing:
                await trio.sleep(0.01)
            node = ops.inodes.nodes[listing["r"].st_ino]
            new = archive.get("r").instances[-1].id
            assert new != first and shown_iid(node) == new
            assert ops.root.states.heads["r"].iid == new
            res = await ops.lookup(ops.top["resources"], b"r", ctx)
            assert shown_iid(ops.inodes.nodes[res.st_ino]) == new
    trio.run(go)


@pytest.mark.mount
@pytest.mark.slow
def test_commit_rounds_of_real_files_never_lag(tmp_path):
    """30 rounds of real deposits (cp -a of 5,000 real files, first commits of new resources, then later
    commits to them), on a mount without and one with allow_other, while another process lists
    transactions/ and resources/ all along: right after each `mv` returns, neither listing nor a stat
    lags the commit, and no listing ever misses a transaction that stays open."""
    src = make_source(tmp_path / "src", 5000)
    started = time.monotonic()
    for options, rounds, first in ((None, 15, 2), ("allow_other", 15, 2)):
        work = tmp_path / (options or "plain")
        work.mkdir()
        root = work / "archive"
        run_tinyfs("init", root)
        (work / "mnt").mkdir()
        m = Mounted(root, work / "mnt", work / "mount.log", options=options).start()
        try:
            dep = Depositor(m.mnt, src)
            os.mkdir(m.mnt / "transactions" / "keep-open")
            with Lister(m.mnt, dep, keep_open="keep-open") as lister:
                failures = []
                for n in range(rounds):
                    problems, lag = dep.round(later=n >= first)
                    if problems:
                        failures.append(f"round {n + 1} ({dep.last_rid}): {'; '.join(problems)}, right after {lag:.2f} s")
            assert not failures, f"{options or 'no options'}: " + "\n".join(failures)
            assert not lister.problems, f"{options or 'no options'}: " + "\n".join(lister.problems[:10])
            assert lister.listings > rounds
            os.rmdir(m.mnt / "transactions" / "keep-open")
        finally:
            status = m.stop()
        assert status == 0 and not m.tracebacks(), m.log.read_text()[-3000:]
        check_archive_ok(root)
    print(f"30 rounds in {time.monotonic() - started:.0f} s")
