"""Every tree of the mount through the Operations adapter, without a kernel (SPEC 5).

Each handler is called as pyfuse3 calls it -- a fake request context, inode numbers found by lookups from
the root inode, a nursery for background work -- and its answer or its errno is checked against what SPEC
section 5 promises. Only the handler API and `Operations(archive_root)` are used, never the adapter's
internals, so that these tests hold for any arrangement of the trees behind it. Trees: the root
(resources/, instances/, aip/, transactions/, commit/, events.jsonl), the read-only views (resources/<rid>,
instances/<rid>/<iid> and its label links, aip/<rid>) and an open transaction (transactions/<rid>).

Listings: pyfuse3.readdir_reply writes into a kernel buffer, and its token cannot be made from Python, so
the `replies` fixture stands in for it and collects the entries instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import shutil
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import check_archive_ok

from tinyfs import Archive
from tinyfs.fs.ops import Operations

pytestmark = pytest.mark.adapter

ROOT = pyfuse3.ROOT_INODE
TOP = ["resources", "instances", "aip", "history", "transactions", "commit", "events.jsonl"]
OLD_NS = 1_600_000_000_123_456_789       # a client-set time with nanoseconds
ORIGIN = b"scanner-3"                    # the user xattr recorded on d/g.txt


class Ctx:
    """Stands in for pyfuse3.RequestContext."""

    def __init__(self, uid: int = 0, gid: int = 0, umask: int = 0o022):
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


class Fields:
    """Stands in for pyfuse3.SetattrFields (which cannot be built from Python): the named fields are set."""

    def __init__(self, **set_):
        self.__dict__.update(set_)

    def __getattr__(self, name):
        return False


class Token:
    """A readdir token: the (name, attributes, next offset) replied, until `room` entries fill it."""

    def __init__(self, room: int | None = None):
        self.entries: list[tuple[str, pyfuse3.EntryAttributes, int]] = []
        self.room = room


@pytest.fixture(autouse=True)
def replies(monkeypatch):
    def reply(token: Token, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if token.room is not None and len(token.entries) >= token.room:
            return False
        token.entries.append((os.fsdecode(name), attrs, next_id))
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


class Client:
    """Path-level steps made of handler calls, the way the kernel makes them (a lookup per component)."""

    def __init__(self, ops: Operations, ctx: Ctx):
        self.ops, self.ctx = ops, ctx

    async def attr(self, path: str) -> pyfuse3.EntryAttributes:
        """The lookup answer for `path` ("" is the root)."""
        attrs = await self.ops.getattr(ROOT, self.ctx)
        for name in filter(None, path.split("/")):
            attrs = await self.ops.lookup(attrs.st_ino, os.fsencode(name), self.ctx)
        return attrs

    async def ino(self, path: str) -> int:
        return (await self.attr(path)).st_ino

    async def listing(self, path: str) -> dict[str, pyfuse3.EntryAttributes]:
        fh = await self.ops.opendir(await self.ino(path), self.ctx)
        token = Token()
        await self.ops.readdir(fh, 0, token)
        await self.ops.releasedir(fh)
        return {name: attrs for name, attrs, _ in token.entries}

    async def names(self, path: str) -> list[str]:
        return list(await self.listing(path))

    async def read(self, path: str) -> bytes:
        info = await self.ops.open(await self.ino(path), os.O_RDONLY, self.ctx)
        try:
            return await self.read_fh(info.fh)
        finally:
            await self.ops.release(info.fh)

    async def read_fh(self, fh: int) -> bytes:
        data, off = b"", 0
        while chunk := await self.ops.read(fh, off, 128 * 1024):
            data, off = data + chunk, off + len(chunk)
        return data

    async def create(self, path: str, data: bytes = b"", mode: int = 0o644) -> pyfuse3.EntryAttributes:
        parent, _, name = path.rpartition("/")
        info, attrs = await self.ops.create(await self.ino(parent), os.fsencode(name), mode, os.O_WRONLY, self.ctx)
        await self.ops.write(info.fh, 0, data)
        await self.ops.release(info.fh)
        return attrs

    async def overwrite(self, path: str, data: bytes) -> None:
        info = await self.ops.open(await self.ino(path), os.O_WRONLY | os.O_TRUNC, self.ctx)
        await self.ops.write(info.fh, 0, data)
        await self.ops.release(info.fh)

    async def commit(self, rid: str) -> None:
        await self.ops.rename(await self.ino("transactions"), rid.encode(), await self.ino("commit"),
                              rid.encode(), 0, self.ctx)

    async def xattr(self, path: str, name: bytes) -> bytes:
        return await self.ops.getxattr(await self.ino(path), name, self.ctx)

    async def xattr_names(self, path: str) -> list[bytes]:
        return sorted(await self.ops.listxattr(await self.ino(path), self.ctx))


async def errno_of(call: Awaitable) -> int:
    """The errno a handler call fails with, or 0."""
    try:
        await call
    except pyfuse3.FUSEError as e:
        return e.errno
    return 0


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Resource r1 with two instances. The first (label v1) holds f.txt ("hello\\n", 0640, an old mtime),
    d/g.txt (user.origin set), the empty directory d/e, the link ln -> f.txt and x.sh (0755); the second
    (label v2) changes f.txt to "hello, again\\n" and keeps the rest, whose bytes stay in the first.
    Made once (two commits, each with a syncfs) and copied for each test."""
    tmp_path = tmp_path_factory.mktemp("template")
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "f.txt").write_bytes(b"hello\n")
    os.chmod(src / "f.txt", 0o640)
    os.utime(src / "f.txt", ns=(OLD_NS, OLD_NS))
    (src / "d" / "g.txt").write_bytes(b"g\n")
    os.setxattr(src / "d" / "g.txt", "user.origin", ORIGIN)
    os.symlink("f.txt", src / "ln")
    (src / "x.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "x.sh", 0o755)
    a = Archive.init(tmp_path / "archive")
    with a.new("r1", label="v1", message="first") as t:
        for name in ("f.txt", "d", "ln", "x.sh"):
            t.add(src / name)
    with a.get("r1", "a", label="v2") as t:
        t.add_bytes("f.txt", b"hello, again\n")
    return a.root.root


@pytest.fixture
def archive(template, tmp_path) -> Archive:
    """A copy of the template archive of its own."""
    shutil.copytree(template, tmp_path / "archive", symlinks=True)
    return Archive(tmp_path / "archive")


@pytest.fixture
def drive(archive) -> Callable:
    """drive(body, ctx=None): run `async body(client)` against a new Operations of the archive, inside a
    nursery the adapter uses for background work (as mount.py gives it one); returns the Operations."""
    def go(body: Callable[[Client], Awaitable[None]], ctx: Ctx | None = None) -> Operations:
        ops = Operations(archive.root)

        async def main():
            async with trio.open_nursery() as nursery:
                ops.nursery = nursery
                await body(Client(ops, ctx or Ctx()))
        trio.run(main)
        return ops
    return go


def iids(archive: Archive, rid: str = "r1") -> list[str]:
    return [doc.id for doc in archive.get(rid).instances]


def events(archive: Archive, name: str) -> list[dict]:
    return [e for e in archive.events() if e["event"] == name]


# -- the root ----------------------------------------------------------------------------------------

def test_the_root_lists_the_seven_top_names_with_their_modes(drive):
    async def body(c: Client):
        root = await c.attr("")
        assert root.st_ino == ROOT and stat.S_ISDIR(root.st_mode)
        listed = await c.listing("")
        assert list(listed) == TOP
        modes = {name: (stat.S_IFMT(a.st_mode), stat.S_IMODE(a.st_mode)) for name, a in listed.items()}
        assert modes == {"resources": (stat.S_IFDIR, 0o555), "instances": (stat.S_IFDIR, 0o555),
                         "aip": (stat.S_IFDIR, 0o555), "history": (stat.S_IFDIR, 0o555),
                         "transactions": (stat.S_IFDIR, 0o1777),
                         "commit": (stat.S_IFDIR, 0o1777), "events.jsonl": (stat.S_IFREG, 0o444)}
        for name in TOP:                                           # a listing and a lookup agree
            assert (await c.attr(name)).st_ino == listed[name].st_ino
        assert (await c.ops.lookup(ROOT, b".", c.ctx)).st_ino == ROOT
        assert await errno_of(c.ops.lookup(ROOT, b"nope", c.ctx)) == errno.ENOENT
        assert await errno_of(c.ops.lookup(ROOT, b"n" * 256, c.ctx)) == errno.ENAMETOOLONG
    drive(body)


def test_the_root_and_the_read_only_tops_refuse_every_change_with_erofs(drive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        for parent in ("", "resources", "instances", "aip", "history"):
            ino = await c.ino(parent)
            assert await errno_of(ops.mkdir(ino, b"x", 0o755, ctx)) == errno.EROFS, parent
            assert await errno_of(ops.create(ino, b"x", 0o644, os.O_WRONLY, ctx)) == errno.EROFS, parent
            assert await errno_of(ops.mknod(ino, b"x", stat.S_IFREG | 0o644, 0, ctx)) == errno.EROFS, parent
            assert await errno_of(ops.symlink(ino, b"x", b"y", ctx)) == errno.EROFS, parent
        assert await errno_of(ops.rmdir(ROOT, b"resources", ctx)) == errno.EROFS
        assert await errno_of(ops.unlink(ROOT, b"events.jsonl", ctx)) == errno.EROFS
        assert await errno_of(ops.unlink(await c.ino("resources"), b"r1", ctx)) == errno.EROFS
        assert await errno_of(ops.rename(ROOT, b"aip", ROOT, b"aip2", 0, ctx)) == errno.EROFS
        chmod = pyfuse3.EntryAttributes()
        chmod.st_mode = stat.S_IFDIR | 0o777
        for path in ("", "resources", "events.jsonl"):
            assert await errno_of(ops.setattr(await c.ino(path), chmod, Fields(update_mode=True), None, ctx)) \
                == errno.EROFS, path
            assert await errno_of(ops.setxattr(await c.ino(path), b"user.x", b"1", ctx)) == errno.EROFS, path
    drive(body)


def test_events_jsonl_reads_the_log_as_it_grows_and_is_read_only(drive, archive):
    async def body(c: Client):
        before = await c.read("events.jsonl")
        lines = [json.loads(line) for line in before.splitlines()]
        assert [e["event"] for e in lines][:2] == ["archive.created", "transaction.opened"]
        assert (await c.attr("events.jsonl")).st_size == len(before)
        info = await c.ops.open(await c.ino("events.jsonl"), os.O_RDONLY, c.ctx)
        assert not info.keep_cache                                  # it grows: never served from the cache
        await c.ops.release(info.fh)
        await c.ops.mkdir(await c.ino("transactions"), b"r2", 0o755, c.ctx)    # appends transaction.opened
        after = await c.read("events.jsonl")
        assert after.startswith(before) and json.loads(after[len(before):])["resource"] == "r2"
        assert (await c.attr("events.jsonl")).st_size == len(after)
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            assert await errno_of(c.ops.open(await c.ino("events.jsonl"), flags, c.ctx)) == errno.EROFS
    drive(body)


def test_statfs_answers_with_the_archives_file_system(drive, archive):
    async def body(c: Client):
        st = await c.ops.statfs(c.ctx)
        disk = os.statvfs(archive.root.root)
        assert st.f_namemax == 255
        assert (st.f_bsize, st.f_frsize, st.f_blocks) == (disk.f_bsize, disk.f_frsize, disk.f_blocks)
        assert 0 < st.f_bavail <= st.f_blocks
    drive(body)


def test_nothing_can_be_made_in_commit_which_stays_empty(drive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        commit = await c.ino("commit")
        assert await errno_of(ops.mkdir(commit, b"r1", 0o755, ctx)) == errno.EPERM
        assert await errno_of(ops.create(commit, b"x", 0o644, os.O_WRONLY, ctx)) == errno.EPERM
        assert await errno_of(ops.mknod(commit, b"x", stat.S_IFREG | 0o644, 0, ctx)) == errno.EPERM
        assert await errno_of(ops.symlink(commit, b"x", b"y", ctx)) == errno.EPERM
        t = await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)
        f = await c.attr("transactions/r1/f.txt")
        assert await errno_of(ops.link(f.st_ino, commit, b"x", ctx)) == errno.EPERM
        assert await errno_of(ops.rename(t.st_ino, b"f.txt", commit, b"f.txt", 0, ctx)) == errno.EPERM
        assert await errno_of(ops.lookup(commit, b"r1", ctx)) == errno.ENOENT
        assert await c.names("commit") == []
        assert await c.names("transactions/r1") == ["d", "f.txt", "ln", "x.sh"]      # nothing moved
    drive(body)


# -- the read-only views -----------------------------------------------------------------------------

def test_resources_shows_the_current_state_exactly_as_recorded(drive, archive):
    recorded = archive.get("r1").state().files

    async def body(c: Client):
        assert await c.names("resources") == ["r1"]
        listed = await c.listing("resources/r1")
        assert list(listed) == ["d", "f.txt", "ln", "x.sh"]
        f = listed["f.txt"]
        assert f.st_mode == stat.S_IFREG | recorded["f.txt"].mode and f.st_size == len(b"hello, again\n")
        assert f.st_mtime_ns == recorded["f.txt"].mtime_ns
        assert (f.st_uid, f.st_gid) == (os.getuid(), os.getgid())            # the mounting user's
        assert stat.S_IMODE(listed["x.sh"].st_mode) == 0o755                   # write bits as recorded
        assert stat.S_ISLNK(listed["ln"].st_mode) and stat.S_ISDIR(listed["d"].st_mode)
        assert await c.names("resources/r1/d") == ["e", "g.txt"]
        assert await c.names("resources/r1/d/e") == []
        assert await c.read("resources/r1/f.txt") == b"hello, again\n"
        assert await c.read("resources/r1/d/g.txt") == b"g\n"
        assert (await c.attr("resources/r1/f.txt")).st_ino == f.st_ino       # a listing and a lookup agree
    drive(body)


def test_instances_show_every_instance_and_labels_as_symlinks(drive, archive):
    first, second = iids(archive)

    async def body(c: Client):
        assert await c.names("instances") == ["r1"]
        assert await c.names("instances/r1") == [first, second, "v1", "v2"]
        for label, iid in (("v1", first), ("v2", second)):
            link = await c.attr(f"instances/r1/{label}")
            assert stat.S_ISLNK(link.st_mode) and link.st_size == len(iid)
            assert await c.ops.readlink(link.st_ino, c.ctx) == iid.encode()
        old = await c.attr(f"instances/r1/{first}/f.txt")
        assert stat.S_IMODE(old.st_mode) == 0o640 and old.st_mtime_ns == OLD_NS
        assert await c.read(f"instances/r1/{first}/f.txt") == b"hello\n"
        assert await c.read(f"instances/r1/{second}/f.txt") == b"hello, again\n"
        assert old.st_ino != (await c.attr("resources/r1/f.txt")).st_ino        # the trees share no inodes
        assert await errno_of(c.attr(f"instances/r1/{first}/nope")) == errno.ENOENT
        assert await errno_of(c.attr("instances/r1/v9")) == errno.ENOENT
        assert await errno_of(c.attr("instances/nope")) == errno.ENOENT
    drive(body)


def test_symbolic_links_in_a_view_read_their_target(drive, archive):
    first = iids(archive)[0]

    async def body(c: Client):
        for tree in ("resources/r1", f"instances/r1/{first}"):
            ln = await c.attr(f"{tree}/ln")
            assert stat.S_ISLNK(ln.st_mode) and ln.st_size == len("f.txt")
            assert await c.ops.readlink(ln.st_ino, c.ctx) == b"f.txt"
            assert await errno_of(c.ops.readlink(await c.ino(f"{tree}/f.txt"), c.ctx)) == errno.EINVAL
    drive(body)


def test_view_files_list_recorded_xattrs_and_answer_virtual_ones_by_name(drive, archive):
    first, second = iids(archive)

    async def body(c: Client):
        g = "resources/r1/d/g.txt"
        assert await c.xattr_names(g) == [b"user.origin"]                    # never the virtual ones
        assert await c.xattr(g, b"user.origin") == ORIGIN
        assert await c.xattr(g, b"user.tinyfs.digest") == b"sha512:" + hashlib.sha512(b"g\n").hexdigest().encode()
        assert await c.xattr(g, b"user.tinyfs.instance") == first.encode()   # stored once, by the first
        assert await c.xattr("resources/r1/f.txt", b"user.tinyfs.instance") == second.encode()
        assert await c.xattr(f"instances/r1/{first}/f.txt", b"user.tinyfs.instance") == first.encode()
        for name in (b"user.nope", b"security.capability", b"user.tinyfs.state"):
            assert await errno_of(c.xattr(g, name)) == pyfuse3.ENOATTR, name
        assert await c.xattr_names("resources/r1/d") == []
    drive(body)


@pytest.mark.parametrize("tree", ["resources", "instances", "aip"])
def test_every_change_in_a_view_is_erofs(drive, archive, tree):
    first = iids(archive)[0]
    top = {"resources": "resources/r1", "instances": f"instances/r1/{first}",
           "aip": f"aip/r1/instances/{first}/data"}[tree]

    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        d, f = await c.ino(top), await c.ino(f"{top}/f.txt")
        calls = {
            "open for writing": ops.open(f, os.O_WRONLY, ctx),
            "open read-write": ops.open(f, os.O_RDWR, ctx),
            "open with O_TRUNC": ops.open(f, os.O_RDONLY | os.O_TRUNC, ctx),
            "create": ops.create(d, b"new", 0o644, os.O_WRONLY, ctx),
            "mkdir": ops.mkdir(d, b"new", 0o755, ctx),
            "mknod": ops.mknod(d, b"new", stat.S_IFREG | 0o644, 0, ctx),
            "symlink": ops.symlink(d, b"new", b"f.txt", ctx),
            "link": ops.link(f, d, b"new", ctx),
            "unlink": ops.unlink(d, b"f.txt", ctx),
            "rmdir": ops.rmdir(d, b"d", ctx),
            "rename": ops.rename(d, b"f.txt", d, b"moved", 0, ctx),
            "setattr": ops.setattr(f, pyfuse3.EntryAttributes(), Fields(update_size=True), None, ctx),
            "setxattr": ops.setxattr(f, b"user.x", b"1", ctx),
            "removexattr": ops.removexattr(f, b"user.origin", ctx),
        }
        answers = {what: await errno_of(call) for what, call in calls.items()}
        assert answers == dict.fromkeys(calls, errno.EROFS)
        assert await c.read(f"{top}/f.txt") == (b"hello, again\n" if tree == "resources" else b"hello\n")
    drive(body)


def test_aip_shows_the_resource_directory_exactly_as_stored(drive, archive):
    stored = archive.root.resource_dir("r1")
    first = iids(archive)[0]

    async def body(c: Client):
        assert await c.names("aip") == ["r1"]
        assert await c.names("aip/r1") == sorted(os.listdir(stored))
        bag = f"aip/r1/instances/{first}"
        assert await c.names(bag) == sorted(os.listdir(stored / "instances" / first))
        for name in ("bagit.txt", "instance.json", "manifest-sha512.txt"):
            on_disk = (stored / "instances" / first / name).read_bytes()
            assert await c.read(f"{bag}/{name}") == on_disk
            st = os.lstat(stored / "instances" / first / name)
            a = await c.attr(f"{bag}/{name}")
            assert (a.st_mode, a.st_size, a.st_mtime_ns) == (st.st_mode, st.st_size, st.st_mtime_ns)
        assert await c.read(f"{bag}/data/d/g.txt") == b"g\n"
        assert await errno_of(c.attr("aip/r1/nope")) == errno.ENOENT
        assert await errno_of(c.attr("aip/nope")) == errno.ENOENT
    drive(body)


def test_names_that_cannot_exist_are_not_found_in_every_tree(drive, archive):
    first = iids(archive)[0]

    async def body(c: Client):
        for parent in ("resources", "instances", "aip", "transactions", "resources/r1",
                       f"instances/r1/{first}", "aip/r1"):
            ino = await c.ino(parent)
            assert await errno_of(c.ops.lookup(ino, b"nope", c.ctx)) == errno.ENOENT, parent
            assert await errno_of(c.ops.lookup(ino, b"\xff\xfe", c.ctx)) == errno.ENOENT, parent
            assert await errno_of(c.ops.lookup(ino, b"n" * 256, c.ctx)) == errno.ENAMETOOLONG, parent
        assert await errno_of(c.attr("resources/bad id")) == errno.ENOENT
    drive(body)


def test_a_listing_continues_where_a_full_reply_buffer_stopped(drive):
    """The kernel reads a directory in buffers; each readdir starts at the offset the last entry gave."""
    async def body(c: Client):
        t = await c.ops.mkdir(await c.ino("transactions"), b"big", 0o755, c.ctx)
        names = [f"n{i:02d}" for i in range(25)]
        for name in names:
            await c.create(f"transactions/big/{name}")
        fh = await c.ops.opendir(t.st_ino, c.ctx)
        seen, offset = [], 0
        while True:
            token = Token(room=7)
            await c.ops.readdir(fh, offset, token)
            if not token.entries:
                break
            seen += [name for name, _, _ in token.entries]
            offset = token.entries[-1][2]
        await c.ops.releasedir(fh)
        assert seen == names
    drive(body)


def test_a_sequential_read_of_damaged_bytes_fails_with_eio_and_an_event(drive, archive):
    """SPEC 5, verified reads: the read that delivers the last bytes fails, and fixity.failed names it."""
    first = iids(archive)[0]
    stored = next(archive.root.resource_dir("r1").glob(f"instances/{first}/data/d/g.txt"))
    os.chmod(stored, 0o644)
    stored.write_bytes(b"G\n")                        # same size, other bytes

    async def body(c: Client):
        for path in ("resources/r1/d/g.txt", f"instances/r1/{first}/d/g.txt"):
            info = await c.ops.open(await c.ino(path), os.O_RDONLY, c.ctx)
            assert await errno_of(c.ops.read(info.fh, 0, 4096)) == errno.EIO, path
            await c.ops.release(info.fh)
        assert await c.read("resources/r1/f.txt") == b"hello, again\n"       # intact bytes are served
    drive(body)
    failed = events(archive, "fixity.failed")
    assert len(failed) == 1 and failed[0]["resource"] == "r1" and failed[0]["detail"]["path"] == "d/g.txt"


# -- transactions ------------------------------------------------------------------------------------

def test_mkdir_opens_a_transaction_showing_the_current_state_owned_by_its_maker(drive):
    async def body(c: Client):
        t = await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o700, c.ctx)
        assert t.st_mode == stat.S_IFDIR | 0o755 and (t.st_uid, t.st_gid) == (1234, 4321)
        assert await c.names("transactions") == ["r1"]
        assert await c.names("transactions/r1") == await c.names("resources/r1")
        f = await c.attr("transactions/r1/f.txt")
        view = await c.attr("resources/r1/f.txt")
        assert (f.st_uid, f.st_gid) == (1234, 4321)                          # base files: the owner's
        assert (f.st_mode, f.st_size, f.st_mtime_ns) == (view.st_mode, view.st_size, view.st_mtime_ns)
        assert await c.read("transactions/r1/f.txt") == b"hello, again\n"
        assert await c.read("transactions/r1/d/g.txt") == b"g\n"
        assert await c.ops.readlink(await c.ino("transactions/r1/ln"), c.ctx) == b"f.txt"
        assert await c.xattr("transactions/r1", b"user.tinyfs.state") == b"open"
        assert await errno_of(c.xattr("transactions/r1", b"user.tinyfs.error")) == pyfuse3.ENOATTR
        assert await c.xattr_names("transactions/r1") == []                 # state is never listed
    drive(body, Ctx(uid=1234, gid=4321))


def test_mkdir_in_transactions_refuses_bad_ids_and_a_second_transaction(drive, archive):
    async def body(c: Client):
        txns = await c.ino("transactions")
        for bad in (b"bad id", b".hidden", b"-x", "é".encode(), b"x" * 201):
            assert await errno_of(c.ops.mkdir(txns, bad, 0o755, c.ctx)) == errno.EINVAL, bad
        await c.ops.mkdir(txns, b"r1", 0o755, c.ctx)
        assert await errno_of(c.ops.mkdir(txns, b"r1", 0o755, c.ctx)) == errno.EEXIST
        new = await c.ops.mkdir(txns, b"r2", 0o755, c.ctx)                    # a new resource: empty
        assert await c.names("transactions/r2") == [] and stat.S_ISDIR(new.st_mode)
        assert await c.names("transactions") == ["r1", "r2"]
        assert await errno_of(c.attr("transactions/r3")) == errno.ENOENT
        assert await c.names("resources") == ["r1"]                           # nothing made yet
    drive(body)
    assert [e["resource"] for e in events(archive, "transaction.opened")][-2:] == ["r1", "r2"]


def test_files_are_created_written_read_and_named_as_on_a_local_disk(drive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)
        info, new = await ops.create(t.st_ino, b"new.bin", 0o666, os.O_WRONLY, ctx)
        assert new.st_mode == stat.S_IFREG | 0o644 and (new.st_uid, new.st_gid) == (1000, 1000)   # umask
        assert await ops.write(info.fh, 0, b"x" * 100_000) == 100_000
        assert await ops.write(info.fh, 200_000, b"y") == 1                     # sparse
        await ops.release(info.fh)
        assert (await c.attr("transactions/r1/new.bin")).st_size == 200_001
        data = await c.read("transactions/r1/new.bin")
        assert data == b"x" * 100_000 + bytes(100_000) + b"y"
        info = await ops.open(new.st_ino, os.O_RDWR, ctx)                       # random access
        await ops.write(info.fh, 5, b"ZZ")
        assert await ops.read(info.fh, 3, 6) == b"xxZZxx"
        await ops.release(info.fh)
        for name, code in ((b"new.bin", errno.EEXIST), (b"\xff", errno.EILSEQ), (b"n" * 256, errno.ENAMETOOLONG)):
            assert await errno_of(ops.create(t.st_ino, name, 0o644, os.O_WRONLY, ctx)) == code, name
            assert await errno_of(ops.mkdir(t.st_ino, name, 0o755, ctx)) == code, name
        assert await errno_of(ops.open(await c.ino("transactions/r1/d"), os.O_RDONLY, ctx)) == errno.EISDIR
    drive(body, Ctx(uid=1000, gid=1000))


def test_a_base_file_is_copied_on_its_first_write_and_the_view_keeps_its_bytes(drive, archive):
    async def body(c: Client):
        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        info = await c.ops.open(await c.ino("transactions/r1/f.txt"), os.O_RDWR, c.ctx)   # no copy yet
        assert await c.ops.read(info.fh, 0, 5) == b"hello"
        await c.ops.write(info.fh, 0, b"HELLO")
        await c.ops.release(info.fh)
        assert await c.read("transactions/r1/f.txt") == b"HELLO, again\n"
        assert await c.read("resources/r1/f.txt") == b"hello, again\n"
        await c.overwrite("transactions/r1/x.sh", b"#!/bin/bash\n")
        await c.commit("r1")
        assert await c.read("resources/r1/f.txt") == b"HELLO, again\n"
        assert await c.read("resources/r1/x.sh") == b"#!/bin/bash\n"
        assert stat.S_IMODE((await c.attr("resources/r1/x.sh")).st_mode) == 0o755          # mode kept
    drive(body)
    state = archive.get("r1").state().files
    assert state["f.txt"].digest == hashlib.sha512(b"HELLO, again\n").hexdigest()
    check_archive_ok(archive.root.root)


def test_directories_are_made_and_removed_with_the_errnos_of_a_local_disk(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        sub = await ops.mkdir(t, b"sub", 0o777, ctx)
        assert sub.st_mode == stat.S_IFDIR | 0o755
        await c.create("transactions/r1/sub/x", b"x")
        assert await errno_of(ops.rmdir(t, b"sub", ctx)) == errno.ENOTEMPTY
        assert await errno_of(ops.unlink(t, b"sub", ctx)) == errno.EISDIR
        assert await errno_of(ops.rmdir(t, b"f.txt", ctx)) == errno.ENOTDIR
        assert await errno_of(ops.unlink(t, b"nope", ctx)) == errno.ENOENT
        assert await errno_of(ops.rmdir(t, b"nope", ctx)) == errno.ENOENT
        assert await errno_of(ops.mkdir(t, b"f.txt", 0o755, ctx)) == errno.EEXIST
        await ops.unlink(sub.st_ino, b"x", ctx)
        await ops.rmdir(t, b"sub", ctx)
        d = await c.ino("transactions/r1/d")                     # a base directory, emptied and removed
        await ops.unlink(d, b"g.txt", ctx)
        await ops.rmdir(d, b"e", ctx)
        await ops.rmdir(t, b"d", ctx)
        await ops.unlink(t, b"ln", ctx)
        assert await c.names("transactions/r1") == ["f.txt", "x.sh"]
        assert await errno_of(c.attr("transactions/r1/d")) == errno.ENOENT
        assert await c.names("resources/r1") == ["d", "f.txt", "ln", "x.sh"]     # until the commit
        await c.commit("r1")
        assert await c.names("resources/r1") == ["f.txt", "x.sh"]
    drive(body)
    check_archive_ok(archive.root.root)


def test_symbolic_links_in_a_transaction(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        s = await ops.symlink(t, b"to-g", b"d/g.txt", ctx)
        assert stat.S_ISLNK(s.st_mode) and s.st_size == len(b"d/g.txt")
        assert await ops.readlink(s.st_ino, ctx) == b"d/g.txt"
        await ops.symlink(t, b"dangling", b"../nowhere", ctx)
        assert await errno_of(ops.symlink(t, b"ln", b"x", ctx)) == errno.EEXIST
        assert await errno_of(ops.symlink(t, b"bad", b"\xff", ctx)) == errno.EILSEQ
        assert await errno_of(ops.readlink(await c.ino("transactions/r1/f.txt"), ctx)) == errno.EINVAL
        await c.commit("r1")
        assert await ops.readlink(await c.ino("resources/r1/dangling"), ctx) == b"../nowhere"
        assert await ops.readlink(await c.ino("resources/r1/to-g"), ctx) == b"d/g.txt"
    drive(body)
    check_archive_ok(archive.root.root)


def test_hard_links_within_a_transaction_only(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        txns = await c.ino("transactions")
        t = (await ops.mkdir(txns, b"r1", 0o755, ctx)).st_ino
        other = (await ops.mkdir(txns, b"r2", 0o755, ctx)).st_ino
        f = await c.ino("transactions/r1/f.txt")
        linked = await ops.link(f, t, b"f2", ctx)
        assert linked.st_ino == f and linked.st_nlink == 2
        assert (await ops.getattr(f, ctx)).st_nlink == 2
        assert await c.read("transactions/r1/f2") == b"hello, again\n"
        assert await errno_of(ops.link(f, t, b"x.sh", ctx)) == errno.EEXIST
        assert await errno_of(ops.link(await c.ino("transactions/r1/d"), t, b"d2", ctx)) == errno.EPERM
        assert await errno_of(ops.link(f, other, b"f", ctx)) == errno.EXDEV
        assert await errno_of(ops.link(await c.ino("resources/r1/f.txt"), t, b"v", ctx)) == errno.EROFS
        await c.commit("r1")
        assert (await c.attr("resources/r1/f2")).st_ino == (await c.attr("resources/r1/f.txt")).st_ino
        assert (await c.attr("resources/r1/f2")).st_nlink == 2
    drive(body)
    assert archive.get("r1").state().hardlinks == (("f.txt", "f2"),)
    check_archive_ok(archive.root.root)


def test_mknod_makes_regular_files_only(drive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        for kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            assert await errno_of(ops.mknod(t, b"special", kind | 0o644, 0, ctx)) == errno.EPERM, kind
        made = await ops.mknod(t, b"plain", stat.S_IFREG | 0o640, 0, ctx)      # as GNU tar --xattrs does
        assert made.st_mode == stat.S_IFREG | 0o640 and made.st_size == 0
        assert await c.names("transactions/r1") == ["d", "f.txt", "ln", "plain", "x.sh"]
    drive(body)


def test_renames_within_a_transaction_and_their_errnos(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        txns = await c.ino("transactions")
        t = (await ops.mkdir(txns, b"r1", 0o755, ctx)).st_ino
        other = (await ops.mkdir(txns, b"r2", 0o755, ctx)).st_ino
        await c.create("transactions/r1/a", b"a")
        await c.create("transactions/r1/b", b"b")
        full = (await ops.mkdir(t, b"full", 0o755, ctx)).st_ino
        await c.create("transactions/r1/full/inner", b"i")
        await ops.mkdir(t, b"empty", 0o755, ctx)
        await ops.mkdir(t, b"empty2", 0o755, ctx)

        async def rename(old: bytes, new: bytes, flags: int = 0, old_dir: int = t, new_dir: int = t) -> int:
            return await errno_of(ops.rename(old_dir, old, new_dir, new, flags, ctx))

        assert await rename(b"a", b"b", pyfuse3.RENAME_NOREPLACE) == errno.EEXIST     # coreutils mv asks first
        assert await rename(b"a", b"b", pyfuse3.RENAME_EXCHANGE) == errno.EINVAL
        assert await rename(b"full", b"b") == errno.ENOTDIR
        assert await rename(b"b", b"empty") == errno.EISDIR
        assert await rename(b"empty", b"full") == errno.ENOTEMPTY
        assert await rename(b"full", b"deeper", new_dir=full) == errno.EINVAL        # into itself
        assert await rename(b"nope", b"x") == errno.ENOENT
        assert await rename(b"a", b"a", new_dir=other) == errno.EXDEV
        assert await rename(b"a", b"a", new_dir=await c.ino("resources/r1")) == errno.EROFS
        assert await rename(b"f.txt", b"f.txt", old_dir=await c.ino("resources/r1")) == errno.EROFS
        assert await rename(b"a", b"a") == 0                                         # onto itself
        assert await rename(b"a", b"b") == 0                                         # replaces b
        assert await c.read("transactions/r1/b") == b"a"
        assert await rename(b"empty", b"empty2") == 0                                # over an empty directory
        assert await rename(b"d", b"moved-d") == 0                                   # a base directory
        assert await rename(b"inner", b"f.txt", old_dir=full) == 0                   # over a base file
        assert await c.names("transactions/r1") == ["b", "empty2", "f.txt", "full", "ln", "moved-d", "x.sh"]
        assert await c.read("transactions/r1/moved-d/g.txt") == b"g\n"
        assert await c.xattr("transactions/r1/moved-d/g.txt", b"user.origin") == ORIGIN
        await ops.rmdir(await c.ino("transactions"), b"r2", ctx)
        await c.commit("r1")
    drive(body)
    files = archive.get("r1").state().files
    assert sorted(files) == ["b", "f.txt", "moved-d/g.txt", "x.sh"] and archive.get("r1").read("f.txt") == b"i"
    check_archive_ok(archive.root.root)


def test_transactions_and_commit_accept_only_the_commit_rename(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        txns, commit = await c.ino("transactions"), await c.ino("commit")
        await ops.mkdir(txns, b"r1", 0o755, ctx)
        await c.create("transactions/r1/new.txt", b"n")
        assert await errno_of(ops.rename(txns, b"r1", txns, b"r9", 0, ctx)) == errno.EPERM
        assert await errno_of(ops.rename(txns, b"r1", await c.ino("resources"), b"r1", 0, ctx)) == errno.EPERM
        assert await errno_of(ops.rename(txns, b"r1", commit, b"r9", 0, ctx)) == errno.EPERM
        assert b"commit/r1" in await c.xattr("transactions/r1", b"user.tinyfs.error")
        assert await errno_of(ops.rename(txns, b"nope", commit, b"nope", 0, ctx)) == errno.ENOENT
        assert await c.names("transactions/r1") == ["d", "f.txt", "ln", "new.txt", "x.sh"]   # intact
        assert len(iids(archive)) == 2
    drive(body)


def test_setattr_in_a_transaction_keeps_modes_owners_times_and_sizes(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)
        f = await c.ino("transactions/r1/f.txt")
        attr = pyfuse3.EntryAttributes()
        attr.st_mode, attr.st_uid, attr.st_gid = stat.S_IFREG | 0o600, 77, 88
        attr.st_mtime_ns, attr.st_atime_ns, attr.st_size = OLD_NS, OLD_NS + 1, 5
        got = await ops.setattr(f, attr, Fields(update_mode=True, update_uid=True, update_gid=True,
                                                update_mtime=True, update_atime=True, update_size=True), None, ctx)
        assert (got.st_mode, got.st_uid, got.st_gid, got.st_size) == (stat.S_IFREG | 0o600, 77, 88, 5)
        got = await ops.getattr(f, ctx)
        assert (got.st_mtime_ns, got.st_atime_ns) == (OLD_NS, OLD_NS + 1)             # to the nanosecond
        assert await c.read("transactions/r1/f.txt") == b"hello"
        d = await c.ino("transactions/r1/d")
        assert await errno_of(ops.setattr(d, attr, Fields(update_size=True), None, ctx)) == errno.EISDIR
        await c.commit("r1")
        view = await c.attr("resources/r1/f.txt")
        assert (view.st_mode, view.st_size, view.st_mtime_ns) == (stat.S_IFREG | 0o600, 5, OLD_NS)
        assert view.st_uid == os.getuid()                                              # owners: not recorded
    drive(body)
    check_archive_ok(archive.root.root)


def test_the_transaction_directory_keeps_a_set_mode_and_time_for_the_root_but_stays_usable(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        attr = pyfuse3.EntryAttributes()
        attr.st_mode, attr.st_uid, attr.st_mtime_ns = stat.S_IFDIR | 0o555, 77, OLD_NS
        got = await ops.setattr(t, attr, Fields(update_mode=True, update_uid=True, update_mtime=True), None, ctx)
        assert got.st_mode == stat.S_IFDIR | 0o755 and got.st_uid == 1000              # owner rwx, owner kept
        assert await errno_of(ops.setattr(t, attr, Fields(update_size=True), None, ctx)) == errno.EISDIR
        await c.commit("r1")
        root = await c.attr("resources/r1")
        assert root.st_mode == stat.S_IFDIR | 0o555 and root.st_mtime_ns == OLD_NS
    drive(body, Ctx(uid=1000, gid=1000))
    check_archive_ok(archive.root.root)


def test_user_xattrs_in_a_transaction_other_namespaces_are_enotsup(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)
        g = "transactions/r1/d/g.txt"
        assert await c.xattr(g, b"user.origin") == ORIGIN and await c.xattr_names(g) == [b"user.origin"]
        ino = await c.ino(g)
        await ops.setxattr(ino, b"user.checked", b"yes", ctx)
        await ops.setxattr(ino, b"user.tinyfs.digest", b"sha512:00", ctx)     # from `cp -a` out of a view: ignored
        assert await c.xattr_names(g) == [b"user.checked", b"user.origin"]
        assert await errno_of(c.xattr(g, b"user.tinyfs.digest")) == pyfuse3.ENOATTR
        await ops.removexattr(ino, b"user.origin", ctx)
        assert await errno_of(ops.removexattr(ino, b"user.origin", ctx)) == pyfuse3.ENOATTR
        for name in (b"security.selinux", b"trusted.x", b"system.posix_acl_access"):
            assert await errno_of(ops.setxattr(ino, name, b"1", ctx)) == errno.ENOTSUP, name
            assert await errno_of(ops.removexattr(ino, name, ctx)) == errno.ENOTSUP, name
        await c.commit("r1")
        assert await c.xattr_names("resources/r1/d/g.txt") == [b"user.checked"]
        assert await c.xattr("resources/r1/d/g.txt", b"user.checked") == b"yes"
    drive(body)
    check_archive_ok(archive.root.root)


def test_transaction_metadata_is_set_listed_removed_and_committed(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        await ops.setxattr(t, b"user.tinyfs.message", "third deposit ü".encode(), ctx)
        await ops.setxattr(t, b"user.tinyfs.creator", b"walrus", ctx)
        await ops.setxattr(t, b"user.tinyfs.label", b"v3", ctx)
        assert await c.xattr_names("transactions/r1") == [b"user.tinyfs.creator", b"user.tinyfs.label",
                                                          b"user.tinyfs.message"]
        assert await c.xattr("transactions/r1", b"user.tinyfs.message") == "third deposit ü".encode()
        bad = {b"user.tinyfs.label": [(b"v1", errno.EEXIST), (b"bad label", errno.EINVAL),
                                      (b"0190c1f2-6a3b-7c4d-8e5f-0123456789ab", errno.EINVAL)],
               b"user.tinyfs.message": [(b"m" * (64 * 1024 + 1), errno.E2BIG), (b"\xff", errno.EILSEQ)],
               b"user.tinyfs.state": [(b"committing", errno.EPERM)],
               b"user.tinyfs.error": [(b"none", errno.EPERM)]}
        for name, cases in bad.items():
            for value, code in cases:
                assert await errno_of(ops.setxattr(t, name, value, ctx)) == code, (name, value[:20])
        assert await errno_of(ops.removexattr(t, b"user.tinyfs.state", ctx)) == errno.EPERM
        await ops.removexattr(t, b"user.tinyfs.creator", ctx)
        assert await errno_of(ops.removexattr(t, b"user.tinyfs.creator", ctx)) == pyfuse3.ENOATTR
        assert await c.xattr("transactions/r1", b"user.tinyfs.label") == b"v3"       # unchanged by the refusals
        await c.create("transactions/r1/new.txt", b"n")
        await c.commit("r1")
        assert await c.ops.readlink(await c.ino("instances/r1/v3"), ctx) == iids(archive)[-1].encode()
    drive(body, Ctx(uid=os.getuid()))
    doc = archive.get("r1").instances[-1]
    assert (doc.message, doc.label) == ("third deposit ü", "v3")
    assert doc.creator == pwd.getpwuid(os.getuid()).pw_name       # the creator set was removed: who committed


def test_a_commit_makes_the_new_state_visible_before_it_returns(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        await c.names("resources/r1")                              # a browsed tree, cached by the adapter
        before = await c.attr("resources/r1/d/g.txt")
        await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)
        await c.create("transactions/r1/new.txt", b"new\n")
        await c.overwrite("transactions/r1/f.txt", b"changed\n")
        await ops.unlink(await c.ino("transactions/r1"), b"x.sh", ctx)
        await c.ops.mkdir(await c.ino("transactions"), b"r2", 0o755, ctx)
        await c.create("transactions/r2/only.txt", b"r2\n")
        await c.commit("r1")
        assert await c.names("transactions") == ["r2"]
        assert await errno_of(c.attr("transactions/r1")) == errno.ENOENT
        assert await errno_of(c.attr("commit/r1")) == errno.ENOENT
        assert await c.names("resources/r1") == ["d", "f.txt", "ln", "new.txt"]
        assert await c.read("resources/r1/f.txt") == b"changed\n"
        assert await c.read("resources/r1/new.txt") == b"new\n"
        after = await c.attr("resources/r1/d/g.txt")
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)    # unchanged: the same node
        assert len(await c.names("instances/r1")) == 3 + 2
        await c.commit("r2")                                        # a new resource
        assert await c.names("resources") == ["r1", "r2"] and await c.names("transactions") == []
        assert await c.read("resources/r2/only.txt") == b"r2\n"
    drive(body)
    committed = events(archive, "transaction.committed")
    assert [e["resource"] for e in committed][-2:] == ["r1", "r2"]
    check_archive_ok(archive.root.root)


def test_a_transaction_without_changes_commits_nothing_and_succeeds(drive, archive):
    async def body(c: Client):
        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        await c.commit("r1")
        assert await c.names("transactions") == []
    drive(body)
    assert len(iids(archive)) == 2 and len(events(archive, "transaction.unchanged")) == 1


def test_a_file_still_open_for_writing_makes_the_commit_ebusy_and_keeps_the_transaction(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        t = (await ops.mkdir(await c.ino("transactions"), b"r1", 0o755, ctx)).st_ino
        info, _ = await ops.create(t, b"open.bin", 0o644, os.O_WRONLY, ctx)
        await ops.write(info.fh, 0, b"half")
        assert await errno_of(c.commit("r1")) == errno.EBUSY
        assert await c.xattr("transactions/r1", b"user.tinyfs.state") == b"failed"
        assert b"open.bin" in await c.xattr("transactions/r1", b"user.tinyfs.error")
        await ops.write(info.fh, 4, b" and the rest")                   # still writable
        await ops.release(info.fh)
        await c.commit("r1")
        assert await c.read("resources/r1/open.bin") == b"half and the rest"
    drive(body)
    assert len(events(archive, "commit.failed")) == 1
    check_archive_ok(archive.root.root)


def test_a_commit_over_a_newer_head_merges_or_fails_with_estale(drive, archive):
    """SPEC 5: changes are applied on top of a head another process made, unless a path changed on both
    sides (ESTALE; the transaction stays as it was)."""
    async def body(c: Client):
        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        await c.overwrite("transactions/r1/f.txt", b"ours\n")
        await c.create("transactions/r1/ours.txt", b"o")
        with archive.get("r1", "a") as t:                            # another process: another path
            t.add_bytes("theirs.txt", b"t")
        await c.commit("r1")
        assert await c.names("resources/r1") == ["d", "f.txt", "ln", "ours.txt", "theirs.txt", "x.sh"]

        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        await c.overwrite("transactions/r1/f.txt", b"ours again\n")
        with archive.get("r1", "a") as t:                            # another process: the same path
            t.add_bytes("f.txt", b"theirs\n")
        assert await errno_of(c.commit("r1")) == errno.ESTALE
        assert await c.xattr("transactions/r1", b"user.tinyfs.state") == b"failed"
        assert await c.read("transactions/r1/f.txt") == b"ours again\n"
        assert await c.read("resources/r1/f.txt") == b"theirs\n"
    drive(body)
    check_archive_ok(archive.root.root)


def test_a_label_taken_meanwhile_fails_the_commit_with_eexist(drive, archive):
    async def body(c: Client):
        t = (await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)).st_ino
        await c.ops.setxattr(t, b"user.tinyfs.label", b"v3", c.ctx)
        await c.create("transactions/r1/new.txt", b"n")
        with archive.get("r1", "a", label="v3") as other:
            other.add_bytes("other.txt", b"o")
        assert await errno_of(c.commit("r1")) == errno.EEXIST
        assert b"v3" in await c.xattr("transactions/r1", b"user.tinyfs.error")
        await c.ops.setxattr(t, b"user.tinyfs.label", b"v4", c.ctx)
        await c.commit("r1")
    drive(body)
    assert [doc.label for doc in archive.get("r1").instances] == ["v1", "v2", "v3", "v4"]


def test_rollback_removes_an_emptied_transaction_and_nothing_else(drive, archive):
    async def body(c: Client):
        ops, ctx = c.ops, c.ctx
        txns = await c.ino("transactions")
        await ops.mkdir(txns, b"r2", 0o755, ctx)
        await c.create("transactions/r2/x", b"x")
        assert await errno_of(ops.rmdir(txns, b"r2", ctx)) == errno.ENOTEMPTY       # rm -rf empties it first
        await ops.unlink(await c.ino("transactions/r2"), b"x", ctx)
        await ops.rmdir(txns, b"r2", ctx)
        assert await errno_of(c.attr("transactions/r2")) == errno.ENOENT
        assert await errno_of(ops.rmdir(txns, b"nope", ctx)) == errno.ENOENT
        assert await c.names("resources") == ["r1"]
        await ops.mkdir(txns, b"r2", 0o755, ctx)                                     # may be opened again
        assert await c.names("transactions/r2") == []
    drive(body)
    assert [e["resource"] for e in events(archive, "transaction.rolled_back")] == ["r2"]
    assert "r2" not in archive


def test_a_transaction_outlives_the_adapter_that_served_it(drive, archive):
    """SPEC 5: a transaction survives an unmount or a daemon crash with every operation that had returned."""
    async def first(c: Client):
        t = (await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)).st_ino
        await c.ops.setxattr(t, b"user.tinyfs.message", b"kept", c.ctx)
        await c.create("transactions/r1/new.txt", b"written before")
        info, _ = await c.ops.create(t, b"synced.bin", 0o644, os.O_WRONLY, c.ctx)
        await c.ops.write(info.fh, 0, b"s" * 1000)
        await c.ops.fsync(info.fh, False)                      # never released: the daemon dies
        await c.ops.unlink(t, b"x.sh", c.ctx)

    async def second(c: Client):
        assert await c.names("transactions/r1") == ["d", "f.txt", "ln", "new.txt", "synced.bin"]
        assert await c.read("transactions/r1/new.txt") == b"written before"
        assert await c.read("transactions/r1/synced.bin") == b"s" * 1000
        assert await c.xattr("transactions/r1", b"user.tinyfs.message") == b"kept"
        await c.commit("r1")
    drive(first)
    drive(second)
    assert sorted(archive.get("r1").state().files) == ["d/g.txt", "f.txt", "new.txt", "synced.bin"]
    check_archive_ok(archive.root.root)


def test_a_damaged_base_file_read_in_a_transaction_fails_with_eio(drive, archive):
    first = iids(archive)[0]
    stored = next(archive.root.resource_dir("r1").glob(f"instances/{first}/data/d/g.txt"))
    os.chmod(stored, 0o644)
    stored.write_bytes(b"G\n")

    async def body(c: Client):
        await c.ops.mkdir(await c.ino("transactions"), b"r1", 0o755, c.ctx)
        assert await errno_of(c.read("transactions/r1/d/g.txt")) == errno.EIO
        info = await c.ops.open(await c.ino("transactions/r1/d/g.txt"), os.O_WRONLY, c.ctx)
        assert await errno_of(c.ops.write(info.fh, 0, b"x")) == errno.EIO        # the copy is verified too
        await c.ops.release(info.fh)
    drive(body)
    assert events(archive, "fixity.failed")
