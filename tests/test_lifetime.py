"""A long-running mount stays bounded: forgotten nodes are freed with every map entry for them, the
read-only trees the kernel holds are let go when there are too many nodes, and nothing of a
transaction stays after it ended. Operations called without a kernel (see test_view.py); the real
mount under load is tests/test_soak.py."""

from __future__ import annotations

import os

import pyfuse3
import pytest
import trio

from tinyfs import Archive
from tinyfs.fs import ops as ops_module
from tinyfs.fs.held import HeldTrees
from tinyfs.fs.inodes import KEYED_INOS
from tinyfs.fs.kernel import Kernel
from tinyfs.fs.ops import NODE_BYTES, Operations

pytestmark = pytest.mark.adapter


class Ctx:
    def __init__(self, uid=0, gid=0, umask=0o022):
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def asked(monkeypatch) -> list[tuple[int, bytes]]:
    """The entries the daemon asks the kernel to invalidate (there is no kernel here)."""
    calls = []
    monkeypatch.setattr(Kernel, "forget_entry_later",
                        staticmethod(lambda parent, name, deleted=0: calls.append((parent, os.fsencode(name)))))
    return calls


def make_instances(tmp_path, rid: str, count: int, files: int) -> Archive:
    archive = Archive.init(tmp_path / "archive")
    for n in range(count):
        with archive.new(rid) if n == 0 else archive.get(rid, "a") as txn:
            for i in range(files):
                txn.add_bytes(f"d/f{i}.txt", b"%d %d\n" % (n, i))
    return archive


async def look_through(ops: Operations, parent: int, names: list[str]) -> list[int]:
    """Look up a path name by name (as the kernel does), returning each inode."""
    inos = []
    for name in names:
        parent = (await ops.lookup(parent, name.encode(), Ctx())).st_ino
        inos.append(parent)
    return inos


async def read_instance(ops: Operations, rid: str, iid: str, files: int) -> list[int]:
    """Every inode the kernel would hold after reading instances/<rid>/<iid> through."""
    inos = await look_through(ops, ops.top["instances"], [rid, iid, "d"])
    for i in range(files):
        inos += await look_through(ops, inos[2], [f"f{i}.txt"])
    return inos


def test_trees_let_go_of_the_least_recently_used_after_a_grace():
    clock = Clock()
    trees = HeldTrees(limit=100, grace=10, clock=clock)
    a, b, c, d = (trees.enter(k) for k in "abcd")
    for _ in range(29):
        for k in "abcd":
            trees.enter(k)
    assert [t.nodes for t in (a, b, c, d)] == [30] * 4 and trees.low == 75
    assert trees.to_let_go(100) == []                   # at the limit: nothing
    assert trees.to_let_go(120) == []                   # over it, but every tree was used just now
    clock.now += 5
    trees.touch(a)                                      # a is now the most recently used
    clock.now += 6
    assert trees.to_let_go(120) == [b, c]               # oldest first, until 120 - 60 <= 75
    clock.now += 1
    assert trees.to_let_go(120) == [d]                  # b and c were asked already; a was used 7 s ago
    clock.now += 10
    assert trees.to_let_go(120) == [b, c]               # still there after the grace: asked again
    assert trees.to_let_go(120) == []                   # at most one round a second
    for _ in range(30):
        trees.leave(b)
    assert len(trees) == 3 and trees.enter("b") is not b


def test_reading_many_instances_keeps_the_node_table_near_its_limit(tmp_path, asked):
    """Readers walking one instance after another: the kernel would keep every node (long timeouts,
    no memory pressure), so the daemon asks it to let go of the trees read longest ago."""
    archive = make_instances(tmp_path, "r", count=8, files=30)
    iids = archive.root.instance_ids("r")
    ops = Operations(archive.root, cache_bytes=2 * 80 * NODE_BYTES)      # nodes: 80
    assert ops.inodes.held.limit == 80
    clock = Clock()
    ops.inodes.held.clock = clock
    of_r = None
    held: dict[int, int] = {}

    async def kernel_lets_go() -> None:
        """What the kernel does when asked: forget the whole tree under each invalidated name."""
        while asked:
            parent, name = asked.pop(0)
            assert parent == of_r
            let_go.append(name.decode())
            tree = ops.inodes.nodes[ops.inodes.by_key[("state", "r", name.decode(), "")]].held
            await ops.forget([(ino, held.pop(ino)) for ino, node in list(ops.inodes.nodes.items()) if node.held is tree])

    async def go():
        nonlocal of_r
        for iid in iids:
            for ino in await read_instance(ops, "r", iid, files=30):
                held[ino] = held.get(ino, 0) + 1
            of_r = ops.inodes.by_key[("instances_of", "r")]
            await kernel_lets_go()
            assert len(ops.inodes.nodes) <= ops.inodes.held.limit + 32     # + the tree being read (32 nodes)
            clock.now += 11

    let_go: list[str] = []
    trio.run(go)
    assert let_go == iids[:len(let_go)] and len(let_go) >= len(iids) - 3     # least recently read first
    assert not any(("state", "r", iid, "") in ops.inodes.by_key for iid in let_go)
    assert len(ops.inodes.held) == len(iids) - len(let_go)


def test_forgotten_nodes_leave_no_entry_in_any_map(tmp_path, asked):
    archive = make_instances(tmp_path, "r", count=2, files=3)
    ops = Operations(archive.root)
    permanent = dict(ops.inodes.nodes)

    async def go():
        held = await look_through(ops, ops.top["resources"], ["r", "d", "f1.txt"])
        held += await read_instance(ops, "r", archive.root.instance_ids("r")[0], files=3)
        held += await look_through(ops, ops.top["aip"], ["r", "resource.json"])
        assert ops.root.states.heads and len(ops.inodes.held) == 3
        await ops.forget([(ino, 1) for ino in reversed(held)])

    trio.run(go)
    assert ops.inodes.nodes == permanent
    assert set(ops.inodes.by_key.values()) == set(permanent) and not ops.inodes.lookups
    assert not ops.root.states.heads and len(ops.inodes.held) == 0


def test_a_closed_transaction_keeps_nothing_but_its_shell(tmp_path, asked):
    """After a commit or a rollback the kernel may hold the transaction's nodes for a while (a shell in
    the directory, an open file): they must not keep its base tree, caches or database alive."""
    archive = make_instances(tmp_path, "r", count=1, files=50)
    ops = Operations(archive.root)

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            txn_dir = await ops.mkdir(ops.top["transactions"], b"r", 0o755, Ctx())
            d = await ops.lookup(txn_dir.st_ino, b"d", Ctx())
            f = await ops.lookup(d.st_ino, b"f3.txt", Ctx())
            info = await ops.open(f.st_ino, os.O_WRONLY | os.O_TRUNC, Ctx())
            await ops.write(info.fh, 4, b"bytes\n")     # out of order: hashed in the background at release
            await ops.write(info.fh, 0, b"new ")
            await ops.release(info.fh)
            tree = ops.inodes.nodes[f.st_ino].tree
            assert tree.jobs.running == 1                                  # the hash after the close
            txn = tree.txn
            assert txn.staging._tree is not None and txn.generations
            await ops.rename(ops.top["transactions"], b"r", ops.top["commit"], b"r", 0, Ctx())
            assert txn.closed and ops.inodes.nodes[f.st_ino].tree.txn is txn          # the kernel still holds it
            assert txn.staging._tree is None and not txn.staging._nodes
            assert not txn.generations and txn._base_stored is None and not txn.files
            assert tree.jobs.running == 0
            with pytest.raises(pyfuse3.FUSEError):
                await ops.getattr(f.st_ino, Ctx())
    trio.run(go)
    assert archive.get("r").read("d/f3.txt") == b"new bytes\n"


def test_the_cache_option_splits_between_documents_and_nodes(tmp_path):
    archive = make_instances(tmp_path, "r", count=1, files=1)
    ops = Operations(archive.root, cache_bytes=64 << 20)
    assert archive.root.doc_cache_bytes == 32 << 20
    assert ops.inodes.held.limit == (32 << 20) // NODE_BYTES
    assert Operations(archive.root).inodes.held.limit == (ops_module.CACHE_BYTES // 2) // NODE_BYTES


def test_a_node_forgotten_and_looked_up_again_keeps_its_inode_number(tmp_path, asked):
    """GNU tar checks after extracting into a directory that its inode number is still the one it saw at
    mkdir; under memory pressure (or drop_caches, or a tree let go) the kernel may forget the directory's
    node meanwhile, and its next lookup must show the same number."""
    archive = make_instances(tmp_path, "r", count=1, files=2)
    ops = Operations(archive.root)

    async def go():
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            txn = await ops.mkdir(ops.top["transactions"], b"r", 0o755, Ctx())
            made = await ops.mkdir(txn.st_ino, b"extracted", 0o755, Ctx())
            view = await look_through(ops, ops.top["instances"], ["r", archive.root.head("r"), "d", "f1.txt"])
            await ops.forget([(made.st_ino, 1), *((ino, 1) for ino in reversed(view))])
            assert made.st_ino not in ops.inodes.nodes and view[-1] not in ops.inodes.nodes
            assert (await ops.lookup(txn.st_ino, b"extracted", Ctx())).st_ino == made.st_ino
            again = await look_through(ops, ops.top["instances"], ["r", archive.root.head("r"), "d", "f1.txt"])
            assert again == view
            # a number that a live node of another key holds is never given twice
            key = ("txn", "r", "another transaction", 5)
            taken = ops.inodes._new_ino(key)
            ops.inodes.nodes[taken] = ops.inodes.nodes[made.st_ino]
            assert ops.inodes._new_ino(key) < KEYED_INOS
            del ops.inodes.nodes[taken]
    trio.run(go)
