"""Finishing or undoing interrupted commits (SPEC section 6).

A commit's only atomic step is one rename into resources/. Whatever a crash
leaves in transactions/ beside it is therefore safe to delete:
  .commit-<rid>-<iid>/  staging of a commit: before the rename it is the whole
                        unfinished instance (undo); after, an empty shell
  .trash-*/             something already renamed out of resources/ to be deleted
  .opening-*/, .api-*   a transaction being opened, bytes given to the Python API
A mount transaction (transactions/<rid>/) whose commit reached the rename
(its marker names an instance that exists) is finished: it is removed.
In dynamic mode, older instances a crash left beside the new head are dropped.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from . import tree
from .commit import COMMIT_PREFIX, drop_older_instances, owner_writable
from .errors import Busy, TinyfsError
from .ids import is_rid
from .layout import LOCKS, ArchiveRoot
from .localstore import TRASH_PREFIX
from .staging import OPENING_PREFIX

API_PREFIX = ".api-"  # files of add_bytes() in the Python API
IN_USE_SECONDS = 3600

log = logging.getLogger(__name__)


def recover(archive: ArchiveRoot, *, store: bool = True, index: bool = True) -> list[str]:
    """Clean up after crashed commits; returns one line per action taken.

    `store=False` skips the object store's sweep (S3Store.recover): it reads every resource's chain and
    lists its instances, requests in proportion to the whole archive, and what it removes is invisible
    anyway; and it skips the history index (built when missing, caught up where behind), whose readers
    catch it up themselves. The mount starts without them; `tinyfs recover` does them."""
    actions: list[str] = []
    for name in sorted(os.listdir(archive.transactions)):
        path = archive.transactions / name
        if name.startswith(COMMIT_PREFIX):
            rid = name[len(COMMIT_PREFIX):-37]
            try:
                with archive.resource_lock(rid, wait=False):
                    tree.rmtree(path, force=True)
            except Busy:
                continue  # a live commit owns it
            actions.append(f"removed interrupted commit staging {name}")
        elif name.startswith((OPENING_PREFIX, API_PREFIX)):
            if time.time() - path.lstat().st_mtime < IN_USE_SECONDS:
                continue  # may belong to a live process (no lock covers these)
            if path.is_dir():
                tree.rmtree(path, force=True)
            else:
                path.unlink()
            actions.append(f"removed leftover {name}")
        elif name.startswith(TRASH_PREFIX):
            tree.rmtree(path, force=True)
            actions.append(f"removed leftover {name}")
        elif name != LOCKS and is_rid(name):
            actions.extend(_finish_mount_transaction(archive, name))
    if store:   # the store's sweep: what unpublished attempts of any host left there
        actions.extend(archive.store.recover())
    if store and index:
        actions.extend(_recover_history(archive))
    actions.extend(_recover_replicas(archive, store))
    if archive.config.mode == "dynamic":
        for rid in archive.resource_ids():
            if len(archive.instance_ids(rid)) > 1:
                drop_older_instances(archive, rid, archive.head(rid))
                actions.append(f"dropped replaced instances of {rid}")
    for line in actions:
        log.info("recover: %s", line)
    return actions


def _recover_history(archive: ArchiveRoot) -> list[str]:
    """The history index (derived data: core/history.py) built when missing, caught up where behind. A
    failure is reported, not raised: readers build the index themselves."""
    missing = archive.history.missing()
    try:
        resources, instances = archive.history.catch_up_all()
    except (TinyfsError, OSError, sqlite3.Error) as e:
        log.warning("recover: history index: %s", e)
        return [f"history index not brought up to date ({e}); readers will"]
    if not instances:
        return []
    done = "built the history index" if missing else "history index caught up"
    return [f"{done}: {instances} instances of {resources} resources"]


def _recover_replicas(archive: ArchiveRoot, store: bool) -> list[str]:
    """What interrupted copies left in each replica's own transactions/ (replicas.copy_instance stages)."""
    from .replicas import replicas_of

    actions = []
    for r in replicas_of(archive).replicas:
        try:
            actions.extend(f"store {r.name}: {line}" for line in recover(r.archive, store=store, index=False))
        except (TinyfsError, OSError) as e:
            log.warning("recover: store %s: %s", r.name, e)
    return actions


def _finish_mount_transaction(archive: ArchiveRoot, rid: str) -> list[str]:
    """Under the resource lock: a commit running in a live mount holds it (`tinyfs recover` run while the
    archive is mounted must not undo, or touch the files of, a commit in flight)."""
    try:
        with archive.resource_lock(rid, wait=False):
            return _finish_mount_transaction_locked(archive, rid)
    except Busy:
        return []


def _finish_mount_transaction_locked(archive: ArchiveRoot, rid: str) -> list[str]:
    from .staging import Staging

    path = archive.transactions / rid
    try:
        staging = Staging.open(path)
    except Exception as e:  # a transaction we cannot read is left alone for a human
        log.warning("recover: cannot read transaction %s: %s", rid, e)
        return []
    try:
        marker = staging.get_meta("committing")
        if marker and marker in archive.instance_ids(rid):
            staging.close()
            staging = None
            Staging.remove(path)
            return [f"finished commit of transaction {rid} (instance {marker})"]
        if staging.get_meta("state") in ("committing", "verifying"):
            owner_writable(staging.blobs.iterdir())
            staging.set_meta("state", "failed")
            staging.set_meta("error", "the commit was interrupted (crash); nothing was committed")
            staging.set_meta("committing", "")
            return [f"transaction {rid}: interrupted commit undone; the transaction is open again"]
        return []
    finally:
        if staging is not None:
            staging.close()
