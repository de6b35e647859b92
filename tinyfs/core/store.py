"""Where an archive's committed instances live: the interface ArchiveRoot and commit need of a store.

Two implementations are meant to stand behind it: the local directory of
format `tinyfs/1` (today's ArchiveRoot and commit.publish, not yet behind
this interface) and an S3 bucket/prefix holding the same layout as objects
(`tinyfs.core.s3store.S3Store`). docs/store.md says how the next step plugs
them in.

Paths handed to a store are relative to the resource's directory, exactly as
the `stored` values of instance.json are: `instances/<iid>/data/a.txt`,
`instances/<iid>/instance.json`, `resource.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class StoreConfig:
    """What the archive marker records: written once at init, never changed."""

    mode: str
    digests: tuple[str, ...]
    created: str
    retention_days: int = 0     # worm on an object store: each object's COMPLIANCE retention

    @property
    def primary(self) -> str:
        return self.digests[0]


class Store(Protocol):
    """The committed side of an archive. Every method may raise a TinyfsError (with an errno)."""

    config: StoreConfig

    def resource_ids(self) -> list[str]:
        """Every resource with at least one published instance, sorted."""

    def instance_ids(self, rid: str) -> list[str]:
        """The resource's published instances, oldest first ([] for no such resource)."""

    def head(self, rid: str) -> str | None:
        """The newest published instance (None: no such resource), as of this call."""

    def read_document(self, rid: str, relpath: str) -> bytes:
        """The bytes of a small stored file (instance.json, resource.json); NotFound if absent."""

    def stored_file(self, rid: str, relpath: str) -> Path:
        """A local file holding the stored bytes (for a remote store: a copy in a bounded cache; open
        it at once, an eviction may remove it later). The caller verifies what it reads."""

    def forget(self, rid: str, relpath: str) -> None:
        """Drop a cached copy that failed the caller's verification, so the next read fetches it anew."""

    def publish(self, rid: str, iid: str, previous: str | None, bag: Path,
                resource_json: bytes | None = None) -> None:
        """Make the staged bag `bag` (a complete instance directory) instance `iid` of `rid`, right
        after `previous` (None: the first instance, with `resource_json`). Atomic: afterwards the
        instance is whole and visible, or invisible. Stale (ESTALE) when `previous` is no longer the
        head: another committer published first, and the caller rebases or gives up."""

    def recover(self) -> list[str]:
        """Remove (or, where the store keeps them, list) what unpublished attempts left; one line each."""

    def purge(self, rid: str) -> None:
        """Delete a resource (dynamic mode only; Forbidden otherwise)."""
