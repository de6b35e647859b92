"""The read-only trees whose nodes the kernel holds, least recently used first, and which to let go.

The kernel keeps an inode it has looked up until it forgets it, and it forgets only under memory
pressure or `drop_caches`: committed trees have long entry timeouts, so on a machine with free
memory a mount that is read through keeps a node for every entry of every instance ever read (a
soak of readers walking instances grew the daemon by tens of MiB a minute). The daemon cannot free a
node the kernel still holds, but it can ask the kernel to let go: invalidating the entry of a tree's
root (`instances/<rid>/<iid>`, `resources/<rid>`, `aip/<rid>`) makes the kernel drop the dentries
below it, and FUSE evicts, and forgets, an inode as soon as its last dentry goes. Entries in use (an
open file, a working directory) stay until they are no longer used.

So the nodes of read-only trees are counted per tree, and when the mount holds more nodes than its
limit, the trees nobody looked into for `grace` seconds are let go, least recently used first, until
the count would be back under three quarters of the limit. A tree let go is only read again from the
archive when it is next looked at; nothing is lost. Transactions are never let go.

Pure Python, no pyfuse3: inodes.py asks the kernel.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

GRACE = 10.0          # seconds a tree stays after it was last looked into (or asked to go)
ROUND = 1.0           # seconds between two rounds of letting go


class HeldTree:
    """One read-only tree the kernel holds nodes of."""

    __slots__ = ("key", "nodes", "used", "asked")

    def __init__(self, key: Hashable, now: float):
        self.key = key
        self.nodes = 0
        self.used = now
        self.asked = 0.0           # when the kernel was last asked to let it go


class HeldTrees:
    def __init__(self, limit: int, grace: float = GRACE, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.low = limit * 3 // 4
        self.grace = grace
        self.clock = clock
        self._lru: OrderedDict[Hashable, HeldTree] = OrderedDict()
        self._last_round = -ROUND

    def __len__(self) -> int:
        return len(self._lru)

    def enter(self, key: Hashable) -> HeldTree:
        """A node of tree `key` was registered."""
        tree = self._lru.get(key)
        if tree is None:
            tree = self._lru[key] = HeldTree(key, self.clock())
        tree.nodes += 1
        return tree

    def touch(self, tree: HeldTree) -> None:
        """The kernel looked into the tree (a lookup, a listing)."""
        if tree.nodes:
            tree.used = self.clock()
            self._lru.move_to_end(tree.key)

    def leave(self, tree: HeldTree) -> None:
        """One of its nodes was forgotten (or never given to the kernel)."""
        tree.nodes -= 1
        if tree.nodes <= 0 and self._lru.get(tree.key) is tree:
            del self._lru[tree.key]

    def to_let_go(self, total: int) -> list[HeldTree]:
        """With `total` nodes in the mount: the trees to ask the kernel to forget now (at most one round
        a second; empty while under the limit)."""
        now = self.clock()
        if total <= self.limit or now - self._last_round < ROUND:
            return []
        self._last_round = now
        out = []
        for tree in self._lru.values():            # least recently used first
            if total <= self.low or now - tree.used < self.grace:
                break                              # (every later tree was used more recently)
            if now - tree.asked >= self.grace:
                tree.asked = now
                out.append(tree)
                total -= tree.nodes
        return out
