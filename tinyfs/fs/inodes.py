"""The inode table: node by inode number, inode by node key, the kernel's lookup counts, and the
read-only trees it holds (held.py), which it is asked to let go of past the memory limit.

No pyfuse3 here: `kernel` (kernel.py, or a stand-in without one) does the asking.
"""

from __future__ import annotations

import errno
import logging

from .held import HeldTrees
from .tree import Node, fail

log = logging.getLogger(__name__)

ROOT_INODE = 1
KEYED_INOS = 1 << 62           # inode numbers from here up are derived from node keys (see _new_ino)


class Inodes:
    def __init__(self, kernel, node_limit: int):
        self.kernel = kernel
        self.nodes: dict[int, Node] = {}
        self.by_key: dict[tuple, int] = {}
        self.lookups: dict[int, int] = {}
        self.held = HeldTrees(limit=node_limit)
        self.next_ino = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT)     # the kernel asks about an inode it was told is gone
        return node

    def ino_of(self, key: tuple) -> int | None:
        return self.by_key.get(key)

    def register(self, node: Node, ino: int | None = None) -> Node:
        """The registered node with this node's key (this one, given an inode, if none was); its tree of
        the held read-only trees counts as used."""
        existing = self.by_key.get(node.key)
        if existing is not None:
            known = self.nodes[existing]
            if known.held is not None:
                self.held.touch(known.held)
            return known
        node.ino = self._new_ino(node.key) if ino is None else ino
        self.nodes[node.ino] = node
        self.by_key[node.key] = node.ino
        key = node.tree.held_key(node)
        if key is not None:
            node.held = self.held.enter(key)
            if len(self.nodes) > self.held.limit:
                self._let_go_of_old_trees()
        return node

    def counted(self, node: Node) -> Node:
        """Register and count one lookup by the kernel (lookup, mkdir, create, readdirplus...)."""
        node = self.register(node)
        self.lookups[node.ino] = self.lookups.get(node.ino, 0) + 1
        return node

    def _new_ino(self, key: tuple) -> int:
        """An inode number derived from the node's key, so that a node the kernel forgot (memory pressure,
        drop_caches, a tree let go) and looks up again shows the same number: GNU tar compares a
        directory's inode number after extracting into it with the one it saw at mkdir ("Directory renamed
        before its status could be extracted"), and other tools cache (dev, ino). The rare number taken
        by a live node of another key comes from a counter below KEYED_INOS instead."""
        ino = KEYED_INOS | (hash(key) & (KEYED_INOS - 1))
        if ino in self.nodes:
            ino = self.next_ino
            self.next_ino += 1
        return ino

    def unregister(self, node: Node) -> None:
        """Drop a node the kernel has forgotten (or was never given), and every map's entry for it."""
        del self.nodes[node.ino]
        if self.by_key.get(node.key) == node.ino:
            del self.by_key[node.key]
        if node.held is not None:
            self.held.leave(node.held)
        node.tree.forgotten(node)

    def rekey(self, node: Node, key: tuple) -> None:
        """Give a registered node another key (a node detached from the tree it showed)."""
        del self.by_key[node.key]
        node.key = key
        self.by_key[key] = node.ino

    def forget(self, inode_list) -> None:
        # After a commit the kernel forgets the transaction's whole tree, 10,000 inodes and more in
        # batches: the maps are locals, each looked up once.
        lookups, nodes = self.lookups, self.nodes
        for ino, n in inode_list:
            left = lookups.pop(ino, 0) - n
            if left > 0:
                lookups[ino] = left
                continue
            node = nodes.get(ino)
            if node is not None and not node.tree.permanent:
                self.unregister(node)

    def not_given(self, node: Node) -> None:
        """A node registered for a reply the kernel did not take (a full readdir buffer)."""
        if not self.lookups.get(node.ino):
            self.unregister(node)

    def _let_go_of_old_trees(self) -> None:
        """Over the node limit: ask the kernel to forget the read-only trees least recently looked into."""
        for held in self.held.to_let_go(len(self.nodes)):
            owner = held.key[0]
            where = owner.held_root(held.key)
            if where is not None:
                self.kernel.forget_entry_later(*where)
