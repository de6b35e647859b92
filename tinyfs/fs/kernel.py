"""What the trees ask of the kernel: to forget names, attributes and cached bytes it holds.

Each call may find the kernel not knowing the inode (or no kernel at all: trees driven by tests), which
is fine: there was nothing to forget.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import pyfuse3

log = logging.getLogger(__name__)


_later: queue.SimpleQueue = queue.SimpleQueue()
_later_thread: threading.Thread | None = None
_later_lock = threading.Lock()


def _start_later() -> None:
    global _later_thread
    with _later_lock:
        if _later_thread is None:
            _later_thread = threading.Thread(target=_invalidate_later, name="tinyfs-invalidate", daemon=True)
            _later_thread.start()


def _invalidate_later() -> None:
    while (item := _later.get()) is not None:
        parent, name, deleted = item
        try:
            pyfuse3.invalidate_entry(parent, name, deleted)
        except OSError as e:      # the kernel did not know it, or has unmounted already: nothing to forget
            log.debug("invalidation of %r in %d not made: %s", name, parent, e)


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
        """Queue the invalidation of a name (made by a thread after the reply being made: safe on the loop)."""
        _later.put((parent, os.fsencode(name), deleted))
        _start_later()

    @staticmethod
    def finish() -> None:
        """(at unmount, before pyfuse3.close) Let the queued invalidations end: made, or refused by a kernel
        that has unmounted already. Not pyfuse3's invalidate_entry_async: its thread could still be making
        one while close() destroyed the session, and it logs every refusal but ENOENT as a traceback."""
        global _later_thread
        thread = _later_thread
        if thread is not None:
            _later.put(None)
            thread.join(timeout=10)
            _later_thread = None

    @staticmethod
    def drop_cached_bytes(ino: int) -> None:
        """(worker thread) Drop the kernel's cached pages of an inode. Not on the loop: the kernel waits for
        the pages of the read being answered, and the loop must send that answer first."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except Exception:
            pass  # the kernel no longer knows it
