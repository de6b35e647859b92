"""One event log for all the hosts of an archive in an S3 store (docs/store.md, "Events of several hosts").

Each host appends its events to its own ROOT/events.jsonl, durably, as on a local archive; that file stays
the host's record. Its new lines are then shipped, off the caller's path, as immutable segments

    PREFIX/events/<host>/<byte offset in that host's events.jsonl, 16 digits>.jsonl

each written create-only (and retained in worm mode). The offset shipped so far is kept in
ROOT/cache/events/<host>.shipped; when that is lost or stale (a crash, two processes of one host shipping
at once), the create at an offset already taken fails and the segment there says how far it goes, so
segments follow each other without a gap or a duplicate. Reading the log merges this host's file with the
other hosts' segments (fetched once into ROOT/cache/events/<host>/, never changing), by time.
"""

from __future__ import annotations

import atexit
import heapq
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ObjectExists, StoreError
from .events import EventLog
from .model import parse_time
from .s3store import retain_until

if TYPE_CHECKING:
    from .s3store import S3Store

log = logging.getLogger(__name__)

EVENTS = "events/"
RETRY_SECONDS = 5.0


class SharedEventLog(EventLog):
    """This host's events.jsonl, shipped to the store, read merged with every other host's."""

    def __init__(self, path: Path, store: S3Store, host: str):
        super().__init__(path)
        self.store = store
        self.host = host
        self.cache = store.cache_dir / "events"
        self._shipped_file = self.cache / f"{host}.shipped"
        self._ship_lock = threading.Lock()
        self._wake = threading.Event()
        self._shipper: threading.Thread | None = None

    def append(self, event: str, resource: str | None = None, instance: str | None = None, **detail) -> dict:
        record = super().append(event, resource, instance, **detail)
        self._start_shipper()
        self._wake.set()
        return record

    def read(self, start: str | None = None) -> Iterator[dict]:
        """Every host's events at or after `start`, oldest first. A store that cannot be reached gives
        this host's events and the others' fetched before, with a warning."""
        self.sync()
        streams = [super().read(start)] + [self._read_host(h, start) for h in self._hosts() if h != self.host]
        return heapq.merge(*streams, key=lambda record: parse_time(record["time"]))

    def view(self) -> Path:
        """The merged log written to one local file (the mount's events.jsonl), replaced whole each time."""
        merged = self.cache / "merged.jsonl"
        tmp = merged.with_suffix(".tmp")
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            for record in self.read():
                out.write((json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, merged)
        return merged

    def last_view(self) -> Path:
        merged = self.cache / "merged.jsonl"
        return merged if merged.exists() else self.path

    def sync(self) -> None:
        """Ship what is not shipped yet; a store error leaves it for the next try."""
        try:
            self.ship()
        except StoreError as e:
            log.warning("events not shipped to the store yet: %s", e)

    # -- shipping this host's lines ----------------------------------------------------------------------

    def ship(self) -> None:
        with self._ship_lock:
            shipped = self._shipped()
            body = self._unshipped(shipped)
            if not body:
                return
            key = f"{EVENTS}{self.host}/{shipped:016d}.jsonl"
            try:
                self.store.objects.put_new(key, body, retain_until=retain_until(self.store.config))
                covered = len(body)
            except ObjectExists:            # shipped before a crash lost the offset: it says how far
                covered = self.store.objects.head(key).size
            self._set_shipped(shipped + covered)

    def _unshipped(self, shipped: int) -> bytes:
        """This host's whole lines from `shipped` on."""
        try:
            with open(self.path, "rb") as f:
                f.seek(shipped)
                data = f.read()
        except FileNotFoundError:
            return b""
        return data[:data.rfind(b"\n") + 1]

    def _shipped(self) -> int:
        try:
            return int(self._shipped_file.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _set_shipped(self, offset: int) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self._shipped_file.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self._shipped_file)

    def _start_shipper(self) -> None:
        if self._shipper is None:
            atexit.register(self.sync)      # a CLI command's events leave with it
            self._shipper = threading.Thread(target=self._ship_forever, name="tinyfs-events", daemon=True)
            self._shipper.start()

    def _ship_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.ship()
            except StoreError as e:
                log.warning("events not shipped to the store yet (retrying): %s", e)
                self._wake.wait(RETRY_SECONDS)
                self._wake.set()

    # -- reading the other hosts' segments --------------------------------------------------------------

    def _hosts(self) -> list[str]:
        try:
            return list(self.store.objects.list_names(EVENTS))
        except StoreError as e:
            log.warning("other hosts' events not read from the store: %s", e)
            return sorted(p.name for p in self.cache.iterdir() if p.is_dir()) if self.cache.is_dir() else []

    def _read_host(self, host: str, start: str | None) -> Iterator[dict]:
        """One host's events from its segments (were two ever to overlap, the overlap is read once)."""
        since = parse_time(start) if start else None
        covered = 0
        for offset, data in self._segments(host):
            skip = max(0, covered - offset)
            covered = max(covered, offset + len(data))
            for line in data[skip:].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("skipping a bad line in host %s's events at offset %d", host, offset)
                    continue
                if since is None or parse_time(record["time"]) >= since:
                    yield record

    def _segments(self, host: str) -> list[tuple[int, bytes]]:
        folder = self.cache / host
        folder.mkdir(parents=True, exist_ok=True)
        try:
            names = [info.key.rsplit("/", 1)[1] for info in self.store.objects.list(f"{EVENTS}{host}/")]
        except StoreError as e:
            log.warning("host %s's events not read from the store: %s", host, e)
            names = [p.name for p in folder.glob("*.jsonl")]
        found = []
        for name in names:
            stem = name.removesuffix(".jsonl")
            if not (stem.isdigit() and name.endswith(".jsonl")):
                continue
            try:
                found.append((int(stem), self._segment(host, name, folder / name)))
            except StoreError as e:
                log.warning("host %s's events from offset %s not read from the store: %s", host, stem, e)
        return sorted(found)

    def _segment(self, host: str, name: str, local: Path) -> bytes:
        """A segment's bytes, fetched once: segments never change."""
        if not local.exists():
            tmp = local.with_suffix(".part")
            tmp.unlink(missing_ok=True)
            self.store.objects.download(f"{EVENTS}{host}/{name}", tmp)
            os.replace(tmp, local)
        return local.read_bytes()
