"""The root of the mount: resources/, instances/, aip/, events.jsonl, and transactions/ and commit/,
where the life of a transaction happens: `mkdir transactions/<rid>` opens one, `rmdir` rolls it back,
`mv transactions/<rid> commit/` commits it (SPEC 5).

A commit answers its rename only once the instance is durable and the mount shows it: the browsed tree
of resources/<rid> is moved to the new head and the kernel has forgotten what it cached of the change
before the reply; the moved name commit/<rid> is forgotten right after it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import trio

from ..core.commit import commit
from ..core.errors import Forbidden, NotFound, TinyfsError
from ..core.failures import known_failure, record_failed_commit
from ..core.formats import after_commit
from ..core.ids import is_rid
from ..core.limits import EVENT_TEXT_MAX
from ..core.request import check_not_writing
from ..core.staging import Staging
from .aip import AipTree
from .files import FileHandle, PlainFile
from .history import HistoryTree
from .tree import LONG, SHORT, Attr, Listing, Node, Services, Tree, fail
from .txn import OpenTxn
from .txntree import Jobs, TxnTree
from .view import InstancesTree, Section, StateTree

log = logging.getLogger(__name__)

SECTIONS = ("resources", "instances", "aip", "history")     # a directory per resource, each shown by its tree
TOP = (*SECTIONS, "transactions", "commit", "events.jsonl")
WRITABLE = ("transactions", "commit")
# Errors a commit may meet that would mean something else to the client of a rename: answered as EIO
NEVER_FROM_COMMIT = (errno.EXDEV, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class RootTree(Tree):
    permanent = True

    def __init__(self, services: Services):
        self.services = services
        self.archive = services.archive
        self.states = StateTree(services)
        self.instances = InstancesTree(services, self.states)
        self.aip = AipTree(services)
        self.history = HistoryTree(services)
        # The read-only sections of the top level: each tree answers for the directory of a resource in
        # it (`resource_root`, `resource_roots`). A new section is a tree with those two calls, and a name
        # here and in SECTIONS.
        self.sections: dict[str, Section] = {"resources": self.states, "instances": self.instances,
                                             "aip": self.aip, "history": self.history}
        self.txns: dict[str, TxnTree] = {}
        self.commits = Jobs()                    # commits running (a shutdown lets them finish)
        self.root = Node(self, ("root",))
        self.top = {name: Node(self, ("top", name), path=name) for name in TOP}

    # -- names and attributes -----------------------------------------------------------------------
    def attrs(self, node: Node) -> Attr:
        s = self.services
        if node is self.root:
            return Attr(stat.S_IFDIR | 0o555, mtime_ns=s.root_mtime, ctime_ns=s.root_mtime, uid=s.uid, gid=s.gid,
                        nlink=2 + len(TOP) - 1)     # (every top name but events.jsonl is a directory)
        if node.path == "events.jsonl":
            st = os.stat(self.archive.events.last_view())
            return Attr(stat.S_IFREG | 0o444, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                        uid=s.uid, gid=s.gid, entry_timeout=LONG, attr_timeout=0)
        mode = 0o1777 if node.path in WRITABLE else 0o555
        return Attr(stat.S_IFDIR | mode, mtime_ns=s.root_mtime, ctime_ns=s.root_mtime, uid=s.uid, gid=s.gid,
                    nlink=2, entry_timeout=LONG, attr_timeout=SHORT)

    def lookup(self, parent: Node, name: str) -> Node:
        if parent is self.root:
            if name not in self.top:
                raise NotFound(name)
            return self.top[name]
        if not is_rid(name) or parent.path == "commit":
            raise NotFound(name)
        if parent.path == "transactions":
            txn = self._txn(name)
            if txn is None:
                raise NotFound(name)
            return txn.root()
        node = self.sections[parent.path].resource_root(name)
        if node is None:
            raise NotFound(name)
        return node

    def lookup_asks_store(self, parent: Node) -> bool:
        return parent.path in self.sections and not self.archive.store.local    # a head query

    async def children(self, node: Node) -> Listing:
        if node is self.root:
            return [(name, top, None) for name, top in self.top.items()]
        if node.path == "transactions":
            return self._transactions()
        if node.path == "commit":
            return []
        section = self.sections[node.path]
        return await trio.to_thread.run_sync(lambda: [(rid, root, None) for rid, root in section.resource_roots()])

    def _transactions(self) -> Listing:
        names = sorted(n for n in os.listdir(self.archive.transactions)
                       if is_rid(n) and (self.archive.transactions / n / "txn.db").exists())
        return [(n, txn.root(), None) for n in names if (txn := self._txn(n)) is not None]

    def read_only(self, node: Node) -> bool:
        return node.path not in WRITABLE

    def refusal(self, parent: Node) -> OSError:
        if parent.path == "commit":
            return fail(errno.EPERM, "nothing can be created in commit/")
        return fail(errno.EROFS)

    def accepts_commits(self, parent: Node) -> bool:
        return parent.path == "commit"

    async def open(self, node: Node, flags: int, ctx) -> FileHandle:
        if node.path != "events.jsonl":
            raise fail(errno.EISDIR)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise fail(errno.EROFS)
        # on a store, a merged copy of every host's events, made now: its size may differ from the last
        # getattr's, so direct_io (every read reaches this handle)
        path = await trio.to_thread.run_sync(self.archive.events.view)
        return PlainFile(str(path), direct_io=path != self.archive.events.path)

    # -- transactions: open, roll back, commit ---------------------------------------------------------
    async def make(self, parent: Node, name: str, kind: str, mode: int, ctx, target: str | None = None) -> Node:
        if parent.path != "transactions" or kind != "d":
            raise self.refusal(parent)
        return await self._open_transaction(name, ctx)

    async def remove(self, parent: Node, name: str, directory: bool) -> None:
        if parent.path != "transactions" or not directory:
            raise self.refusal(parent)
        await self._rollback(name)

    async def rename(self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int, ctx) -> None:
        if old_parent.path == "transactions":
            if new_parent.tree.accepts_commits(new_parent):
                return await self._commit(old, new, ctx)
            raise fail(errno.EPERM, "a transaction is committed by moving it into commit/")
        if new_parent.tree.accepts_commits(new_parent):
            raise fail(errno.EPERM, "only a transaction can be moved into commit/")
        # a name leaving or entering a read-only tree would change it: EROFS, as on a read-only mount
        raise fail(errno.EROFS if self.read_only(old_parent) or new_parent.tree.read_only(new_parent)
                   else errno.EXDEV)

    def open_transactions(self) -> list[TxnTree]:
        return list(self.txns.values())

    def _txn(self, rid: str) -> TxnTree | None:
        """The open transaction `rid`, read from transactions/ if this mount has not opened it (a restart)."""
        tree = self.txns.get(rid)
        if tree is None:
            path = self.archive.transactions / rid
            if not (path / "txn.db").exists():
                return None
            staging = Staging.reopen(path, self._base_loader(rid))
            tree = self.txns[rid] = TxnTree(self.services, OpenTxn(self.archive, rid, staging))
        return tree

    def _base_loader(self, rid: str):
        return lambda iid: self.archive.state(rid, iid)

    def _idle_txn(self, rid: str) -> TxnTree:
        """The open transaction `rid` for a rollback or a commit: ENOENT if none, EBUSY while committing."""
        tree = self._txn(rid) if is_rid(rid) else None
        if tree is None:
            raise fail(errno.ENOENT)
        if tree.txn.committing:
            raise fail(errno.EBUSY)
        return tree

    async def _open_transaction(self, rid: str, ctx) -> Node:
        if not is_rid(rid):
            raise fail(errno.EINVAL, f"invalid resource id {rid!r}")
        if self._txn(rid) is not None:
            raise fail(errno.EEXIST)
        if self.services.closing:
            raise fail(errno.EBUSY)

        def create():
            head = self.archive.head(rid)         # (on an object store: a request)
            root = self.archive.state(rid, head).root if head else None   # the root starts as recorded
            staging = Staging.create(self.archive.transactions / rid, rid, head, self._base_loader(rid),
                                     ctx.uid, ctx.gid, root=root)
            staging.read_base()       # in this worker thread, not in the first request
            return staging, head

        staging, head = await trio.to_thread.run_sync(create)
        tree = self.txns[rid] = TxnTree(self.services, OpenTxn(self.archive, rid, staging))
        self.archive.events.append("transaction.opened", rid, head, uid=ctx.uid, via="mount")
        return tree.root()

    async def _rollback(self, rid: str) -> None:
        tree = self._idle_txn(rid)
        if tree.staging.has_children(tree.root().sino):
            raise fail(errno.ENOTEMPTY)
        trash = await trio.to_thread.run_sync(Staging.detach, tree.staging.path)
        self._close(tree)
        await trio.to_thread.run_sync(Staging.delete, trash)
        self.archive.events.append("transaction.rolled_back", rid, tree.txn.base, via="mount")

    def _close(self, tree: TxnTree) -> None:
        """Forget a committed or rolled-back transaction, once its directory has left transactions/:
        _txn() reopens any transaction it finds there that is not in self.txns (after a restart), and did
        so with one closed a moment too early, by a listing of transactions/ while the directory was
        being moved out (opendir is not held back by the rename). That transaction then stayed open in
        the daemon for good, its files deleted: `mkdir transactions/<rid>` failed with EEXIST from then on.

        Its nodes stay registered until the kernel forgets them (after the invalidations): their keys
        carry the transaction's token, which no later transaction has, and scanning every key here
        cost a commit 1-2 ms."""
        tree.txn.close()
        self.txns.pop(tree.txn.rid, None)

    async def _commit(self, rid: str, target: str, ctx) -> None:
        tree = self._idle_txn(rid)
        if target != rid:     # (mv transactions/x commit/y: nothing but x itself may be made in commit/)
            raise self._failed(tree.txn, Forbidden(f"a transaction is committed as commit/{rid}, not as "
                                                   f"commit/{target}"), event=True)
        if self.services.closing:
            raise fail(errno.EBUSY, "the mount is shutting down")
        tree.txn.committing = True
        self.commits.start()
        try:
            await self._commit_txn(tree, ctx.uid)
        except BaseException as e:
            # whatever went wrong (a bug included), the transaction must not stay `committing`
            if not tree.txn.closed and tree.staging.get_meta("state") in ("committing", "verifying"):
                self._failed(tree.txn, TinyfsError(f"internal error: {type(e).__name__}: {e}"[:EVENT_TEXT_MAX]))
            raise
        finally:
            tree.txn.committing = False
            self.commits.done()

    async def _commit_txn(self, tree: TxnTree, committer: int) -> None:
        txn = tree.txn
        known = self._known_failure(txn)
        if known is not None:
            raise known
        try:
            request = await self._request(tree, committer)
        except TinyfsError as e:
            raise self._failed(txn, e, event=True) from None
        try:
            result = await trio.to_thread.run_sync(commit, self.archive, request)
        except (TinyfsError, OSError) as e:
            raise self._failed(txn, e) from None     # (core.commit appended the event)
        moved_name = self.services.inodes.ino_of(tree.root().key)
        trash = await trio.to_thread.run_sync(Staging.detach, txn.staging.path)
        self._close(tree)     # (after the rename out of transactions/: see _close)
        self.services.nursery.start_soon(trio.to_thread.run_sync, Staging.delete, trash)  # bytes go after the reply
        log.info("committed %s as %s", txn.rid, result.instance)
        after_commit(self.archive, txn.rid, result.instance)
        if result.instance is not None:
            await self._show(txn.rid, result.instance)
        if moved_name is not None:
            self.services.kernel.forget_entry_later(self.services.top["commit"], txn.rid, moved_name)

    async def _request(self, tree: TxnTree, committer: int):
        """The commit request of a transaction no file of which is open for writing, once its background
        hashes are done. The walk runs in a worker: for a 10,000-file transaction it takes 70-100 ms, which
        the loop spends serving other clients (every change of this transaction fails with EBUSY meanwhile)."""
        txn = tree.txn
        check_not_writing(txn.staging, txn.open_for_writing())
        await tree.jobs.idle()
        txn.staging.set_meta("state", "committing")
        return await trio.to_thread.run_sync(txn.commit_request, committer)

    async def _show(self, rid: str, iid: str) -> None:
        """Make the mount show the committed instance before the rename is answered."""
        try:
            stale = self.states.move_head(rid, iid)
        except Exception:    # the commit is made: never answer it with an error
            log.exception("showing commit %s of %s", iid, rid)
            self.states.forget_head(rid)
            stale = [(self.services.top["resources"], rid)]
        await trio.to_thread.run_sync(self.services.kernel.forget_now, stale)

    def _failed(self, txn: OpenTxn, error: Exception, event: bool = False) -> OSError:
        """Record a failed commit (core.failures: the transaction's state and error, one warning, and with
        `event` the commit.failed event where core.commit did not append it) and return the error to
        answer with."""
        code = getattr(error, "errno", None) or errno.EIO
        if code in NEVER_FROM_COMMIT and not event:
            code = errno.EIO
        txn.failure = record_failed_commit(self.archive, txn.staging, txn.rid, error, event=event, via="mount")
        return fail(code, str(error))

    def _known_failure(self, txn: OpenTxn) -> OSError | None:
        """The failure of the transaction's last commit, when neither the transaction nor the resource's
        head has changed since and nothing else decided it: the same commit would fail the same way.

        The kernel asks twice for every commit that fails with ESTALE: the VFS retries a path-based call
        once, its lookups revalidated, when the file system answers ESTALE (one `mv`, one renameat2, two
        RENAME requests 20-30 ms apart). Answered from here, the second one is not attempted again and
        adds no warning or event: one failure, logged once."""
        known = known_failure(self.archive, txn.staging, txn.rid, txn.failure)
        if known is None:
            return None
        return fail(getattr(known.error, "errno", None) or errno.EIO, str(known.error))
