"""aip/<rid>: the resource's directory in the archive, as stored (core.bags), read-only."""

from __future__ import annotations

import stat

import trio

from ..core.bags import bags_of
from ..core.errors import NotFound
from .files import FileHandle
from .tree import LONG, SHORT, Attr, Listing, Node
from .verify import expected_of_aip
from .view import ReadOnlyTree


class AipTree(ReadOnlyTree):
    """aip/<rid>: the resource's directory in the archive, as stored."""

    def __init__(self, services):
        super().__init__(services)
        self.bags = bags_of(self.archive)

    def node(self, rid: str, path: str = "") -> Node:
        return Node(self, ("aip", rid, path), rid=rid, path=path)

    def resource_root(self, rid: str) -> Node | None:
        return self.node(rid) if self.bags.present(rid) else None

    def resource_roots(self) -> list[tuple[str, Node]]:
        return [(rid, self.node(rid)) for rid in self.archive.resource_ids()]

    def attrs(self, node: Node) -> Attr:
        mode, size, mtime_ns, ctime_ns = self.bags.stat(node.rid, node.path)
        timeout = LONG if stat.S_ISREG(mode) else SHORT
        return self._attr(mode, size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns,
                          entry_timeout=timeout, attr_timeout=timeout)

    def lookup(self, parent: Node, name: str) -> Node:
        child = f"{parent.path}/{name}" if parent.path else name
        if not self.bags.exists(parent.rid, child):
            raise NotFound(name)
        return self.node(parent.rid, child)

    async def children(self, node: Node) -> Listing:
        def listing() -> Listing:
            out = []
            for name in self.bags.names(node.rid, node.path):
                child = self.node(node.rid, f"{node.path}/{name}" if node.path else name)
                out.append((name, child, None if self.archive.store.local else self.attrs(child)))
            return out

        return await trio.to_thread.run_sync(listing)

    def readlink(self, node: Node) -> str:
        return self.bags.readlink(node.rid, node.path)

    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        return self._open_stored(node, flags, lambda: self.bags.file(node.rid, node.path),
                                 lambda: expected_of_aip(self.archive, node.rid, node.path))

    def held_key(self, node: Node) -> tuple:
        return (self, node.rid)

    def held_root(self, key: tuple) -> tuple[int, str]:
        return self.services.top["aip"], key[1]
