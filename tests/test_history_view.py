"""history/<rid>/... through the Operations adapter, without a kernel (fs/history.py): the layout, the
versions' bytes and attributes, `.deleted` entries, label links, walking past directories, verified reads,
every change refused, and a commit shown at once. The handlers are driven as in test_adapter.py."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
from test_adapter import Client, Ctx, Fields, errno_of, replies  # noqa: F401  (replies: autouse fixture)

from tinyfs import Archive
from tinyfs.fs.ops import Operations

pytestmark = pytest.mark.adapter

OLD_NS = 1_600_000_000_123_456_789
ORIGIN = b"scanner-3"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Resource r1 in three instances:
    1 (v1)  f.txt ("hello\\n", 0640, an old mtime), d/g.txt (user.origin), the empty directory d/e, the
            link ln -> f.txt, x.sh
    2 (v2)  f.txt changed ("hello, again\\n")
    3 (v3)  f.txt and ln removed; the directory d/e replaced by a file (0600), the file x.sh by a
            directory holding inner"""
    base = tmp_path_factory.mktemp("history")
    src = base / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "f.txt").write_bytes(b"hello\n")
    os.chmod(src / "f.txt", 0o640)
    os.utime(src / "f.txt", ns=(OLD_NS, OLD_NS))
    (src / "d" / "g.txt").write_bytes(b"g\n")
    os.setxattr(src / "d" / "g.txt", "user.origin", ORIGIN)
    os.symlink("f.txt", src / "ln")
    (src / "x.sh").write_bytes(b"#!/bin/sh\n")
    a = Archive.init(base / "archive")
    with a.new("r1", label="v1", message="first") as t:
        for name in ("f.txt", "d", "ln", "x.sh"):
            t.add(src / name)
    with a.get("r1", "a", label="v2") as t:
        t.add_bytes("f.txt", b"hello, again\n")
    with a.get("r1", "a", label="v3", message="third") as t:
        t.remove("f.txt")
        t.remove("ln")
        t.remove("d/e")
        t.add_bytes("d/e", b"a file now\n", mode=0o600)
        t.remove("x.sh")
        t.add_bytes("x.sh/inner", b"inner\n")
    return a.root.root


@pytest.fixture
def archive(template, tmp_path) -> Archive:
    shutil.copytree(template, tmp_path / "archive", symlinks=True)
    return Archive(tmp_path / "archive")


@pytest.fixture
def third(archive: Archive) -> list[str]:
    """The three instance ids of r1."""
    return archive.root.instance_ids("r1")


@pytest.fixture
def drive(archive) -> Callable:
    """drive(body): run `async body(client)` against a new Operations of the archive, in a nursery."""
    def go(body: Callable[[Client], Awaitable[None]]) -> None:
        ops = Operations(archive.root)

        async def main():
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                await body(Client(ops, Ctx()))
        trio.run(main)
    return go


def test_a_resource_has_a_directory_per_name_ever_seen(drive, third):
    async def body(c: Client):
        assert await c.names("history") == ["r1"]
        assert await c.names("history/r1") == ["d", "f.txt", "ln", "x.sh"]      # f.txt and ln are gone now
        for name, a in (await c.listing("history/r1")).items():
            assert stat.S_ISDIR(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o555, name
        assert await c.names("history/r1/d") == ["e", "g.txt"]        # a directory only: no versions of its own
        assert await errno_of(c.attr("history/nope")) == errno.ENOENT
        assert await errno_of(c.attr("history/r1/nope")) == errno.ENOENT
        assert await errno_of(c.attr("history/r1/f.txt/nope")) == errno.ENOENT
    drive(body)


def test_each_version_of_a_file_is_a_file_with_its_bytes_mode_and_mtime(drive, archive, third):
    first, second, gone = third
    r = archive.get("r1")

    async def body(c: Client):
        listed = await c.listing("history/r1/f.txt")
        assert list(listed) == [first, second, f"{gone}.deleted", "v1", "v2"]    # v3: f.txt was gone there
        one, two = listed[first], listed[second]
        assert (stat.S_IMODE(one.st_mode), one.st_size, one.st_mtime_ns) == (0o640, 6, OLD_NS)
        assert stat.S_ISREG(one.st_mode) and stat.S_ISREG(two.st_mode)
        recorded = r.state(second).files["f.txt"]
        assert (stat.S_IMODE(two.st_mode), two.st_size, two.st_mtime_ns) == (recorded.mode, 13, recorded.mtime_ns)
        assert await c.read(f"history/r1/f.txt/{first}") == b"hello\n"
        assert await c.read(f"history/r1/f.txt/{second}") == b"hello, again\n"
        assert (await c.attr(f"history/r1/f.txt/{first}")).st_ino == one.st_ino      # a lookup and a listing agree
        deleted = listed[f"{gone}.deleted"]
        assert stat.S_ISREG(deleted.st_mode) and stat.S_IMODE(deleted.st_mode) == 0o444 and deleted.st_size == 0
        assert await c.read(f"history/r1/f.txt/{gone}.deleted") == b""
        for label, target in (("v1", first), ("v2", second)):
            assert stat.S_ISLNK(listed[label].st_mode)
            assert await c.ops.readlink(listed[label].st_ino, c.ctx) == target.encode()
        g = f"history/r1/d/g.txt/{first}"
        assert await c.xattr_names(g) == [b"user.origin"]
        assert await c.xattr(g, b"user.origin") == ORIGIN
        assert await c.xattr(g, b"user.tinyfs.digest") == b"sha512:" + hashlib.sha512(b"g\n").hexdigest().encode()
        assert await c.xattr(g, b"user.tinyfs.instance") == first.encode()
    drive(body)


def test_links_directories_and_paths_that_were_both(drive, third):
    first, _second, third_iid = third

    async def body(c: Client):
        ln = await c.listing("history/r1/ln")
        assert list(ln) == [first, f"{third_iid}.deleted", "v1", "v2"]
        assert stat.S_ISLNK(ln[first].st_mode)
        assert await c.ops.readlink(ln[first].st_ino, c.ctx) == b"f.txt"
        # d/e: a directory (not shown), then a file; x.sh: a file, then a directory with a name in it
        e = await c.listing("history/r1/d/e")
        assert list(e) == [third_iid, "v3"]
        assert stat.S_IMODE(e[third_iid].st_mode) == 0o600 and await c.read(f"history/r1/d/e/{third_iid}") == \
            b"a file now\n"
        x = await c.listing("history/r1/x.sh")
        assert list(x) == [first, f"{third_iid}.deleted", "inner", "v1", "v2"]
        assert stat.S_ISDIR(x["inner"].st_mode)
        assert await c.names("history/r1/x.sh/inner") == [third_iid, "v3"]
        assert await c.read(f"history/r1/x.sh/inner/{third_iid}") == b"inner\n"
    drive(body)


def test_a_commit_through_the_mount_shows_at_once(drive, archive, third):
    async def body(c: Client):
        before = await c.names("history/r1/f.txt")
        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        await c.create("transactions/r1/f.txt", b"fourth words\n")
        await c.commit("r1")
        head = archive.root.head("r1")
        assert await c.names("history/r1/f.txt") == [*before[:3], head, *before[3:]]
        assert await c.read(f"history/r1/f.txt/{head}") == b"fourth words\n"
        await c.ops.mkdir(await c.ino("transactions"), b"r2", 0o755, c.ctx)
        await c.create("transactions/r2/new.txt", b"new\n")
        await c.commit("r2")
        assert await c.names("history") == ["r1", "r2"]
        assert await c.names("history/r2/new.txt") == [archive.root.head("r2")]
    drive(body)


def test_versions_are_verified_on_read(drive, archive, third):
    second = third[1]
    (version,) = [v for v in archive.get("r1").history("f.txt") if v.iid == second]
    os.chmod(archive.root.stored_path("r1", version.stored), 0o644)
    archive.root.stored_path("r1", version.stored).write_bytes(b"HELLO, again\n")    # same size, other bytes

    async def body(c: Client):
        assert await errno_of(c.read(f"history/r1/f.txt/{second}")) == errno.EIO
    drive(body)
    assert any(e["event"] == "fixity.failed" for e in archive.events())


def test_every_change_in_history_is_erofs(drive, archive, third):
    first = third[0]

    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        for where in ("history", "history/r1", "history/r1/f.txt"):
            d = await c.ino(where)
            calls = {
                "create": ops.create(d, b"new", 0o644, os.O_WRONLY, ctx),
                "mkdir": ops.mkdir(d, b"new", 0o755, ctx),
                "mknod": ops.mknod(d, b"new", stat.S_IFREG | 0o644, 0, ctx),
                "symlink": ops.symlink(d, b"new", b"x", ctx),
                "rmdir": ops.rmdir(d, b"d", ctx),
                "unlink": ops.unlink(d, b"v1", ctx),
                "rename": ops.rename(d, b"v1", d, b"v9", 0, ctx),
                "setattr": ops.setattr(d, pyfuse3.EntryAttributes(), Fields(update_mode=True), None, ctx),
                "setxattr": ops.setxattr(d, b"user.x", b"1", ctx),
            }
            answers = {what: await errno_of(call) for what, call in calls.items()}
            assert answers == dict.fromkeys(calls, errno.EROFS), where
        f = await c.ino(f"history/r1/f.txt/{first}")
        d = await c.ino("history/r1/f.txt")
        calls = {
            "open for writing": ops.open(f, os.O_WRONLY, ctx),
            "open read-write": ops.open(f, os.O_RDWR, ctx),
            "open with O_TRUNC": ops.open(f, os.O_RDONLY | os.O_TRUNC, ctx),
            "open a .deleted for writing": ops.open(await c.ino(f"history/r1/f.txt/{third[2]}.deleted"),
                                                    os.O_WRONLY, ctx),
            "link": ops.link(f, d, b"new", ctx),
            "unlink": ops.unlink(d, first.encode(), ctx),
            "setattr": ops.setattr(f, pyfuse3.EntryAttributes(), Fields(update_size=True), None, ctx),
            "setxattr": ops.setxattr(f, b"user.x", b"1", ctx),
            "removexattr": ops.removexattr(f, b"user.origin", ctx),
            "rename into a transaction": ops.rename(d, first.encode(), await c.ino("transactions"), b"x", 0, ctx),
        }
        answers = {what: await errno_of(call) for what, call in calls.items()}
        assert answers == dict.fromkeys(calls, errno.EROFS)
        assert await c.read(f"history/r1/f.txt/{first}") == b"hello\n"
    drive(body)
