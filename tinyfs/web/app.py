"""The WSGI application of `tinyfs serve`: checks every request, decides who asks and whether they may,
then hands it to the plain-HTTP routes (http.py) or to WsgiDAV over the archive's provider (dav.py).

WsgiDAV's own authenticator is left out of its middleware stack: this module authenticates every request
(auth.py), WebDAV or not, and tells WsgiDAV who asks (`wsgidav.auth.user_name`, the owner of locks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from wsgidav.dir_browser import WsgiDavDirBrowser
from wsgidav.error_printer import ErrorPrinter
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from ..core.layout import ArchiveRoot
from .auth import Access
from .errors import one_line, status_of

log = logging.getLogger(__name__)
USER = "tinyfs.user"          # environ key: the authenticated user, None when anonymous
REALM = "tinyfs"
MAX_XML_BODY = 1 << 20        # bytes of a request body other than a PUT's


@dataclass
class Context:
    """What every part of the server shares."""
    archive: ArchiveRoot
    access: Access
    deposits: object = None   # core.deposit.Deposits: the open transactions (None: a read-only server)
    locks: object = None      # WsgiDAV's lock manager: no commit while a client still holds a lock inside
    extra: dict = field(default_factory=dict)


def make_app(ctx: Context):
    from . import http
    from .dav import ArchiveProvider

    dav = WsgiDAVApp(_dav_config(ArchiveProvider(ctx)))
    ctx.locks = dav.lock_manager

    def app(environ, start_response):
        start_response = _with_phrase(start_response)
        refusal = _refusal(environ)
        if refusal:
            return answer(start_response, *refusal)
        decision = ctx.access.decide(environ)
        if decision.status:
            headers = [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')] \
                if decision.status == 401 else []
            return answer(start_response, decision.status, decision.reason, headers)
        environ[USER] = decision.user
        environ["wsgidav.auth.user_name"] = decision.user or "anonymous"
        environ["wsgidav.auth.realm"] = REALM
        environ["wsgidav.auth.roles"] = None
        environ["wsgidav.auth.permissions"] = None
        try:
            handler = http.route(ctx, environ)
            if handler is not None:
                return handler(environ, start_response)
        except Exception as e:          # a request never takes the server down: 500 and one line, logged
            log.exception("%s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return answer(start_response, status_of(e), str(e))
        return dav(environ, start_response)

    return app


def _dav_config(provider) -> dict:
    return {
        "provider_mapping": {"/": provider},
        "middleware_stack": [ErrorPrinter, WsgiDavDirBrowser, RequestResolver],
        "http_authenticator": {"domain_controller": None, "accept_basic": True, "accept_digest": False,
                               "default_to_digest": False},
        "simple_dc": {"user_mapping": {"*": True}},
        "lock_storage": True,               # class 2: in-memory locks (a restart drops them, as clients expect)
        "property_manager": True,           # dead properties of transaction files, in memory
        "dir_browser": {"enable": True, "response_trailer": "tinyfs", "show_user": True,
                        "davmount": False, "ms_sharepoint_support": False},
        "verbose": 1,
        "logging": {"enable_loggers": []},
        "add_header_MS_Author_Via": True,
        "hotfixes": {"emulate_win32_lastmod": False, "re_encode_path_info": True, "unquote_path_info": False},
    }


def _refusal(environ: dict) -> tuple[int, str] | None:
    """(status, why) of a request refused before anyone looks at it (its user included), or None."""
    why = _bad_names(environ) or _bad_framing(environ)
    if why:
        return 400, why
    return _too_big(environ)


def _bad_names(environ: dict) -> str:
    """Why a request's path (or Destination) cannot name anything in the archive, or ''."""
    try:
        destination = _destination_path(environ)
    except ValueError as e:
        return str(e)
    for where, raw in (("path", environ.get("PATH_INFO", "")), ("Destination", destination)):
        if raw is None:
            continue
        try:
            text = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return f"the {where} is not UTF-8"
        if "\0" in text:
            return f"the {where} holds a NUL"
        if any(part in (".", "..") for part in text.split("/")):
            return f"the {where} holds a '.' or '..' component"
    return ""


def _bad_framing(environ: dict) -> str:
    """Why the length of a request's body is unclear, or ''. cheroot takes `Content-Length: -5` (WsgiDAV
    then made an empty file of it), and a request with both headers is how requests are smuggled past a
    proxy that reads the other one."""
    length = environ.get("CONTENT_LENGTH", "")
    if length and not (length.isascii() and length.isdigit()):
        return f"Content-Length {length[:40]!r} is not a number of bytes"
    if length and environ.get("HTTP_TRANSFER_ENCODING"):
        return "a request has a Content-Length or a Transfer-Encoding, not both"
    return ""


def _too_big(environ: dict) -> tuple[int, str] | None:
    """Only a PUT's body is streamed; WsgiDAV reads any other (the XML of PROPFIND, PROPPATCH, LOCK) into
    memory whole, so its size is bounded."""
    length = environ.get("CONTENT_LENGTH", "")
    method = environ.get("REQUEST_METHOD", "")
    if method != "PUT" and length and int(length) > MAX_XML_BODY:
        return 413, f"the body of a {method} holds at most {MAX_XML_BODY >> 20} MiB"
    return None


def _destination_path(environ: dict) -> str | None:
    """The path of the Destination header (an http(s) URL or an absolute path), None without one; ValueError
    saying why for anything else (WsgiDAV answered 500 to an empty one, or to `http://[::1/x`)."""
    dest = environ.get("HTTP_DESTINATION")
    if dest is None:
        return None
    why = f"the Destination {dest[:80]!r} is not an http(s) URL or an absolute path"
    if any(ord(c) < 32 or ord(c) == 127 for c in dest):
        raise ValueError(why)
    try:
        url = urlsplit(dest)
        _ = url.port                       # a port that is not one raises too
    except ValueError as e:
        raise ValueError(f"{why}: {e}") from None
    if not _names_this_server(url):
        raise ValueError(why)
    return unquote(url.path, encoding="latin-1")


def _names_this_server(url) -> bool:
    """Whether a URL may name something here: http(s) with a host (WsgiDAV compares the host), or a path."""
    if url.scheme:
        return url.scheme in ("http", "https") and bool(url.netloc)
    return url.path.startswith("/")


def _with_phrase(start_response):
    """WsgiDAV names the statuses it does not know "Status" ("507 Status", "408 Status"): their standard
    phrase instead."""
    from http import HTTPStatus

    def start(status: str, headers: list, exc_info=None):
        code, _, phrase = status.partition(" ")
        if phrase == "Status" and code.isdigit():
            try:
                status = f"{code} {HTTPStatus(int(code)).phrase}"
            except ValueError:
                pass
        return start_response(status, headers, exc_info)
    return start


def answer(start_response, status: int, text: str, headers: list | None = None) -> list[bytes]:
    """A short plain-text answer: the status and one line saying why."""
    from http import HTTPStatus

    body = (one_line(text) + "\n").encode("utf-8")
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                    *(headers or [])])
    return [body]
