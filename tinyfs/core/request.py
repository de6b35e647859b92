"""A staged transaction (core/staging.py) as a commit request (core/commit.py).

The staging records only what changed since the base: the request names every changed path with its new
entry (a NewFile for an inode with bytes of its own), every removed path with None, and the link groups
of the new state (the paths that are one inode). Whoever commits keeps the transaction from changing
while this reads it (the mount answers every change with EBUSY meanwhile), so the walk reads one state.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable, Collection

from .commit import Change, CommitRequest, NewFile
from .errors import Busy, Incomplete
from .model import link_groups
from .staging import BaseTree, Node, Staging, node_entry

# (inode, row) -> the file's size: a mount knows a newer size than the row for a file open in it
SizeOf = Callable[[int, Node], int]


def commit_request(staging: Staging, rid: str, committer: int | str, size_of: SizeOf | None = None) -> CommitRequest:
    """The changes since the base, from the staging. A transaction staged before the overlay has every
    entry as a row and no base tree to tell removals: it hands over its whole tree (`full`).
    The creator is the transaction's creator metadata, else `committer`: the name of the uid that commits
    (the mount), or the name of the user who commits (the server)."""
    changes, linked = staged_changes(staging, size_of or _recorded_size)
    meta = {k: staging.get_meta(k) for k in ("message", "creator", "label")}
    path = staging.path
    return CommitRequest(rid, staging.get_meta("base") or None, changes, full=not staging.overlay, walked=True,
                         message=meta["message"],
                         creator=meta["creator"] or _name(committer), label=meta["label"] or None,
                         before_publish=lambda iid: Staging.mark_committing(path, iid),
                         on_phase=lambda phase: Staging.mark_state(path, phase),
                         hardlinks=link_groups(linked),
                         root=staging.root_entry())


def check_not_writing(staging: Staging, writing: Collection[int]) -> None:
    """Busy (EBUSY), naming one of its paths, when an inode of the transaction is still open for writing
    (`writing`: the inodes a mount has open so): its bytes are not final, the commit must wait."""
    if writing:
        path = next((p for p, ino, _node in staging.walk() if ino in writing), "?")
        raise Busy(f"{path}: still open for writing", path=path)


def staged_changes(staging: Staging, size_of: SizeOf) -> tuple[dict[str, Change], list[list[str]]]:
    """(path -> change, the paths of each inode met more than once) from one walk of the staged tree.
    An inode untouched since the base and still at its base path is no change; a base path no longer
    in the tree is a removal (None)."""
    tree = staging.tree
    blobs = os.fspath(staging.blobs)
    xattrs = staging.all_xattrs()
    changes: dict[str, Change] = {}
    at_home: set[int] = set()
    grouped_at_home: set[str] = set()    # base paths of a base link group still at home
    first_path: dict[int, str] = {}
    linked: dict[int, list[str]] = {}    # inode -> its paths, for inodes met more than once
    for path, sino, node in staging.walk():
        first = first_path.setdefault(sino, path)
        if first is not path:
            linked.setdefault(sino, [first]).append(path)
        if node is None:                 # untouched since the base (its directory may have moved)
            group = tree.group.get(sino)
            if group is None and tree.path[sino] == path:
                at_home.add(sino)
            elif group is not None and path in group:
                grouped_at_home.add(path)
            else:
                changes[path] = tree.entry[sino]
            continue
        changes[path] = _staged_entry(path, node, xattrs, blobs, size_of)
    _add_removals(changes, tree, at_home, grouped_at_home)
    return changes, list(linked.values())


def _staged_entry(path: str, node: Node, xattrs: dict[int, dict[str, str]], blobs: str, size_of: SizeOf) -> Change:
    """The new entry of a path whose inode has a row: its recorded entry, or its blob's bytes (NewFile)."""
    x = {k: v for k, v in xattrs.get(node.id, {}).items() if k.startswith("user.")}
    entry = node_entry(node, x)
    if entry is not None:
        return entry
    if node.incomplete:
        raise Incomplete(f"{path}: its stored bytes are incomplete (a write failed); rewrite or delete it", path=path)
    digests = json.loads(node.digests) if node.digests else None
    return NewFile(f"{blobs}/{node.id}", size_of(node.id, node), node.mode, node.mtime_ns, x, digests=digests,
                   linkable=True)


def _add_removals(changes: dict[str, Change], tree: BaseTree, at_home: set[int], grouped_at_home: set[str]) -> None:
    """Every base path the walk did not find at home is removed, unless the walk gave it an entry."""
    for sino in tree.entry.keys() - at_home:
        for path in tree.group.get(sino, (tree.path[sino],)):
            if path not in grouped_at_home:
                changes.setdefault(path, None)


def _recorded_size(_sino: int, node: Node) -> int:
    return node.size


def _name(committer: int | str) -> str:
    return committer if isinstance(committer, str) else user_name(committer)


def user_name(uid: int) -> str:
    """The login name of `uid`, or the uid itself where it has none (a removed account, a container's).
    (The lookup may ask a directory service: callers run it in a worker thread.)"""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
