"""The view and the Operations adapter without a kernel: handlers called directly with a fake context."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest
import trio

from tinyfs import Archive
from tinyfs.core.errors import NotFound
from tinyfs.fs.ops import Operations

pytestmark = pytest.mark.adapter


class Ctx:
    def __init__(self, uid=0, gid=0, umask=0o022):
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


@pytest.fixture
def archive(tmp_path):
    a = Archive.init(tmp_path / "archive")
    (tmp_path / "f.txt").write_text("hello")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "g.txt").write_text("g")
    with a.new("r1", label="v1") as t:
        t.add(tmp_path / "f.txt")
        t.add(tmp_path / "d")
    return a


class Fields:
    """Stands in for pyfuse3.SetattrFields: the named fields are set, every other update_* is False."""

    def __init__(self, **set_):
        self.__dict__.update(set_)

    def __getattr__(self, name):
        return False


async def open_view_file(ops: Operations, ctx: Ctx, rid: bytes, name: bytes):
    """(resources/<rid>, its file <name>, an open FileInfo of it for reading)."""
    res = await ops.lookup(ops.top["resources"], rid, ctx)
    f = await ops.lookup(res.st_ino, name, ctx)
    return res, f, await ops.open(f.st_ino, os.O_RDONLY, ctx)


def run(fn, *args):
    return trio.run(fn, *args)


def test_trees_lookup_children_and_attrs(archive):
    ops = Operations(archive.root)
    root = ops.root
    resources = root.top["resources"]
    r1 = root.lookup(resources, "r1")
    assert r1.tree is root.states
    names = [n for n, _, _ in trio.run(root.states.children, r1)]
    assert names == ["d", "f.txt"]
    f = r1.tree.lookup(r1, "f.txt")
    a = f.tree.attrs(f)
    recorded = archive.get("r1").state().files["f.txt"].mode
    assert a.mode == stat.S_IFREG | recorded and a.mode & 0o200 and a.size == 5 and a.uid == os.getuid()
    assert f.tree.listxattr(f) == []                                     # the synthetic ones are not listed ...
    assert f.tree.getxattr(f, "user.tinyfs.digest").startswith(b"sha512:")    # ... but readable
    inst = root.lookup(root.top["instances"], "r1")
    kids = {name: node for name, node, _ in trio.run(inst.tree.children, inst)}
    assert "v1" in kids and kids["v1"].tree.readlink(kids["v1"]) == archive.root.head("r1")
    with pytest.raises(NotFound):
        root.lookup(resources, "nope")


def test_ops_read_only_refusals_and_reads(archive):
    ops = Operations(archive.root)
    ctx = Ctx()

    async def go():
        res, f, info = await open_view_file(ops, ctx, b"r1", b"f.txt")
        assert await ops.read(info.fh, 0, 100) == b"hello"
        await ops.release(info.fh)
        for call in (lambda: ops.open(f.st_ino, os.O_WRONLY, ctx),
                     lambda: ops.unlink(res.st_ino, b"f.txt", ctx),
                     lambda: ops.mkdir(res.st_ino, b"x", 0o755, ctx)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call()
            assert e.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.mkdir(ops.top["transactions"], b"bad id", 0o755, ctx)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(f.st_ino, b"security.capability", ctx)
        assert e.value.errno == pyfuse3.ENOATTR
        st = await ops.statfs(ctx)
        assert st.f_namemax == 255
    run(go)


def test_ops_view_files_open_lazily_and_missing_bytes_read_as_eio(archive):
    """A view file's stored bytes are opened at the first read (a warm read costs one round trip);
    bytes that vanished from a damaged archive give EIO at that read, never a wrong answer."""
    ops = Operations(archive.root)
    ctx = Ctx()

    async def go():
        res, f, info = await open_view_file(ops, ctx, b"r1", b"f.txt")
        assert ops.handles[info.fh].fd == -1                  # nothing opened yet
        assert await ops.read(info.fh, 1, 3) == b"ell"
        assert ops.handles[info.fh].fd >= 0
        await ops.release(info.fh)
        path = ops.root.states.file_path(ops.inodes.nodes[f.st_ino])
        os.chmod(path, 0o644)
        os.rename(path, path + ".away")
        try:
            info = await ops.open(f.st_ino, os.O_RDONLY, ctx)
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.read(info.fh, 0, 10)
            assert e.value.errno == errno.EIO
            await ops.release(info.fh)
        finally:
            os.rename(path + ".away", path)
    run(go)


def test_ops_dynamic_mode_opens_at_once(tmp_path):
    """In dynamic mode a commit deletes the replaced instance: an open handle must hold its bytes."""
    a = Archive.init(tmp_path / "dyn", mode="dynamic")
    (tmp_path / "f.txt").write_text("old")
    with a.new("r1") as t:
        t.add(tmp_path / "f.txt")
    ops = Operations(a.root)
    ctx = Ctx()

    async def go():
        res, f, info = await open_view_file(ops, ctx, b"r1", b"f.txt")
        (tmp_path / "f.txt").write_text("new")
        with a.get("r1", "a") as t:
            t.add(tmp_path / "f.txt")
        assert await ops.read(info.fh, 0, 10) == b"old"
        await ops.release(info.fh)
    run(go)


def test_ops_truncate_while_hashing_lags_keeps_digests_right(archive):
    """Buffers still queued for the hasher when a file is truncated to 0 belong to the old bytes: they must
    not reach the hasher of the new bytes (else the manifest would get a digest of bytes never stored)."""
    import hashlib

    ops = Operations(archive.root)
    ctx = Ctx()

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            t = await ops.mkdir(ops.top["transactions"], b"r1", 0o755, ctx)
            info, new = await ops.create(t.st_ino, b"re.bin", 0o644, os.O_WRONLY, ctx)
            for i in range(3):                      # queued for the hasher (no await ran the feeder yet)
                await ops.write(info.fh, i * 100_000, b"o" * 100_000)
            attr = pyfuse3.EntryAttributes()
            attr.st_size = 0
            fields = Fields(update_size=True)        # pyfuse3's SetattrFields cannot be built from Python
            await ops.setattr(new.st_ino, attr, fields, info.fh, ctx)
            await ops.write(info.fh, 0, b"n" * 100_000)
            await ops.release(info.fh)
            await ops.rename(ops.top["transactions"], b"r1", ops.top["commit"], b"r1", 0, ctx)
    run(go)
    res = archive.get("r1")
    assert res.read("re.bin") == b"n" * 100_000
    assert res.state().files["re.bin"].digest == hashlib.sha512(b"n" * 100_000).hexdigest()


def test_ops_transaction_write_and_commit(archive, tmp_path):
    ops = Operations(archive.root)
    ctx = Ctx(uid=1234, gid=1234)

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            t = await ops.mkdir(ops.top["transactions"], b"r1", 0o755, ctx)
            assert t.st_uid == 1234 and stat.S_IMODE(t.st_mode) == 0o755
            base = await ops.lookup(t.st_ino, b"f.txt", ctx)
            assert base.st_uid == 1234
            info, new = await ops.create(t.st_ino, b"new.bin", 0o644, os.O_WRONLY, ctx)
            await ops.write(info.fh, 0, b"x" * 200_000)
            await ops.write(info.fh, 200_000, b"y" * 10)
            await ops.release(info.fh)
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.create(t.st_ino, b"\xff", 0o644, os.O_WRONLY, ctx)
            assert e.value.errno == errno.EILSEQ
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.create(t.st_ino, b"n" * 256, 0o644, os.O_WRONLY, ctx)
            assert e.value.errno == errno.ENAMETOOLONG
            await ops.unlink(t.st_ino, b"f.txt", ctx)
            await ops.rename(ops.top["transactions"], b"r1", ops.top["commit"], b"r1", 0, ctx)
    run(go)
    res = archive.get("r1")
    assert res.read("new.bin") == b"x" * 200_000 + b"y" * 10
    assert "f.txt" not in res.state().files
    assert len(res.instances) == 2
