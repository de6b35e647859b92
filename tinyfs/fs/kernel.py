"""What the trees ask of the kernel: to forget names, attributes and cached bytes it holds.

Each call may find the kernel not knowing the inode (or no kernel at all: trees driven by tests), which
is fine: there was nothing to forget.
"""

from __future__ import annotations

import logging
import os

import pyfuse3

log = logging.getLogger(__name__)


class Kernel:
    @staticmethod
    def forget_now(stale: list[tuple[int, str | None]]) -> None:
        """(worker thread, before a reply) (parent, name): drop that cached name; (inode, None): drop that
        inode's cached attributes. Synchronous: the kernel has forgotten them when this returns."""
        for ino, name in stale:
            try:
                if name is None:
                    pyfuse3.invalidate_inode(ino, attr_only=True)
                else:
                    pyfuse3.invalidate_entry(ino, os.fsencode(name))
            except Exception:
                pass  # the kernel did not know it

    @staticmethod
    def forget_entry_later(parent: int, name: str, deleted: int = 0) -> None:
        """Queue the invalidation of a name (answered after the reply being made: safe on the loop)."""
        try:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), deleted=deleted, ignore_enoent=True)
        except Exception:
            log.debug("could not queue invalidation of %s", name, exc_info=True)

    @staticmethod
    def drop_cached_bytes(ino: int) -> None:
        """(worker thread) Drop the kernel's cached pages of an inode. Not on the loop: the kernel waits for
        the pages of the read being answered, and the loop must send that answer first."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except Exception:
            pass  # the kernel no longer knows it
