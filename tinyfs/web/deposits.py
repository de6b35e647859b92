"""transactions/ and commit/ over WebDAV. (Filled in by the deposits work.)"""

from __future__ import annotations


def resource(ctx, parts: list[str], path: str, environ: dict):
    return None
