"""resources/, instances/, aip/ and events.jsonl over WebDAV: read-only. (Filled in by the views work.)"""

from __future__ import annotations


def resource(ctx, parts: list[str], path: str, environ: dict):
    return None
