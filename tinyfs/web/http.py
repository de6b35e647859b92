"""Plain HTTP beside WebDAV: what a program needs that WebDAV does not say. (Filled in by the HTTP work.)

`route(ctx, environ)` returns the WSGI handler of a plain-HTTP request, or None to leave it to WebDAV.
"""

from __future__ import annotations


def route(ctx, environ: dict):
    return None
