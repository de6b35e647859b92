"""Where an archive's committed instances live: the interface ArchiveRoot and commit need of a store.

Two implementations stand behind it: the archive's own directory in format
`tinyfs/1` (`tinyfs.core.localstore.LocalStore`, the default) and an S3
bucket/prefix holding the same layout as objects (`tinyfs.core.s3store.S3Store`).
ArchiveRoot always holds one as `store`; docs/store.md describes both.

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
    # Where the two truly differ, callers ask this one flag. True (LocalStore): the stored files are the
    # archive's own files on this machine: `stored_file` is the file itself, `resource_dir` the resource,
    # an instance directory's mtime its publication time, and local committers are all ordered by the
    # resource lock (no race to lose). False (S3Store): `stored_file` is a cached copy, `resource_dir`
    # holds only what fsck downloaded there (s3archive.mirrored), and another host may publish first.
    local: bool

    def resource_dir(self, rid: str) -> Path:
        """The local directory laid out as format.md's resource directory (see `local`)."""

    def exists(self, rid: str) -> bool:
        """Whether the resource exists (False for an invalid id)."""

    def resource_ids(self) -> list[str]:
        """Every resource with at least one published instance, sorted."""

    def instance_ids(self, rid: str) -> list[str]:
        """The resource's published instances, oldest first ([] for no such resource)."""

    def head(self, rid: str) -> str | None:
        """The newest published instance (None: no such resource), as of this call; an object store may
        answer with a head it confirmed within the last second (other hosts' commits show that much later)."""

    def heads(self, rids: list[str]) -> dict[str, str | None]:
        """head() of each of `rids` (an object store asks for several at once)."""

    def read_document(self, rid: str, relpath: str) -> bytes:
        """The bytes of a small stored file (instance.json, resource.json, a manifest); NotFound if absent."""

    def stored_file(self, rid: str, relpath: str) -> Path:
        """A local file holding the stored bytes (for a remote store: a copy in a bounded cache; open
        it at once, an eviction may remove it later). The caller verifies what it reads. NotFound for a
        path no published instance holds."""

    def published_files(self, rid: str, iid: str) -> list[str]:
        """Every stored path of a published instance's bag (tag files and payload), sorted; NotFound for
        an instance that is not published."""

    def forget(self, rid: str, relpath: str) -> None:
        """Drop a cached copy that failed the caller's verification, so the next read fetches it anew."""

    def publish(self, rid: str, iid: str, previous: str | None, bag: Path,
                resource_json: bytes | None = None) -> None:
        """Make the staged bag `bag` (a complete instance directory) instance `iid` of `rid`, right
        after `previous` (None: the first instance, with `resource_json`). Atomic: afterwards the
        instance is whole and visible, or invisible. Stale (ESTALE) when `previous` is no longer the
        head: another committer published first, and the caller rebases or gives up. `bag` is
        `<stage>/instances/<iid>` of a staged resource directory (for a first instance also holding
        resource.json), durable already: LocalStore renames it into place (a first instance: the whole
        stage), so it must be on the archive's file system; S3Store uploads it."""

    def restore(self, rid: str, relpath: str, source: Path) -> None:
        """Replace the stored file `relpath` of a published instance (damaged or missing) with the bytes
        of the local file `source`, which the caller verified against the bag's manifests (tinyfs
        repair, a self-healing read). Atomic: a reader sees the old file or the new one. NotFound for a
        path no published instance holds."""

    def recover(self, older_than: float = ...) -> list[str]:
        """Remove (or, where the store keeps them, list) what unpublished attempts older than `older_than`
        seconds left in the store; one line each."""

    def purge(self, rid: str) -> None:
        """Delete a resource (dynamic mode only; Forbidden otherwise)."""
