"""A failed commit of an open transaction, as every adapter records it (the mount's rename into commit/,
the server's MOVE): the transaction stays intact, its state becomes "failed" with the error, one warning
is logged, and the commit.failed event is appended where core.commit did not append it already.

A failure that only the transaction's content and the resource's head decided (ESTALE, a label taken,
a path too long, a file whose bytes are incomplete) is remembered with those inputs: while neither
changes, the same commit would fail the same way, and is answered from here without another try (the
kernel retries a rename answered with ESTALE once; a WebDAV client may retry a MOVE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import Incomplete, LabelTaken, NameTooLong, Stale
from .layout import ArchiveRoot
from .staging import Staging

log = logging.getLogger(__name__)

# Commit failures that only the transaction's content and the resource's instances decide
DECIDED_BY_INPUTS = (Stale, LabelTaken, NameTooLong, Incomplete)


@dataclass(frozen=True)
class Failure:
    """The last failed commit of a transaction, with what decided it."""

    error: Exception
    inputs: tuple[int, str | None]      # (the staging's change count, the resource's head)


def commit_inputs(archive: ArchiveRoot, staging: Staging, rid: str) -> tuple[int, str | None]:
    """What decides a commit's outcome besides the code: the transaction (its change count) and the
    resource's head."""
    return staging.changes(), archive.head(rid)


def record_failed_commit(archive: ArchiveRoot, staging: Staging, rid: str, error: Exception, *,
                         event: bool, via: str, **detail) -> Failure | None:
    """Record a failed commit: the transaction's state and error, one warning, and (`event`) the
    commit.failed event where core.commit did not append it. Returns the failure to remember when the
    inputs alone decided it (see `known_failure`), else None."""
    message = str(error)
    staging.set_meta("state", "failed")
    staging.set_meta("error", message)
    log.warning("commit of %s failed: %s", rid, message)
    if event:
        archive.events.append("commit.failed", rid, None, error=message, via=via, **detail)
    if isinstance(error, DECIDED_BY_INPUTS):
        return Failure(error, commit_inputs(archive, staging, rid))
    return None


def known_failure(archive: ArchiveRoot, staging: Staging, rid: str, failure: Failure | None) -> Failure | None:
    """`failure` when neither the transaction nor the resource's head changed since: the same commit
    would fail the same way."""
    if failure is None or failure.inputs != commit_inputs(archive, staging, rid):
        return None
    return failure
