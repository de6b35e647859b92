"""The event log, events.jsonl (SPEC section 7): one JSON object a line, O_APPEND + fsync."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from .durable import append_line
from .limits import bounded
from .model import parse_time, utc_now

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, event: str, resource: str | None = None, instance: str | None = None,
               **detail) -> dict:
        record = {"time": utc_now(), "event": event, "resource": resource, "instance": instance,
                  "detail": bounded(detail)}
        append_line(self.path, (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
        log.info("event %s %s %s", event, resource or "", instance or "")
        return record

    def view(self) -> Path:
        """The file the mount shows as events.jsonl: this one (a store's log merges hosts: s3events)."""
        return self.path

    def last_view(self) -> Path:
        return self.path

    def read(self, start: str | None = None) -> Iterator[dict]:
        """Every event at or after `start` (inclusive), oldest first."""
        since = parse_time(start) if start else None
        try:
            f = open(self.path, encoding="utf-8")
        except FileNotFoundError:
            return
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("skipping a torn line in %s", self.path)
                    continue
                if since is None or parse_time(record["time"]) >= since:
                    yield record
