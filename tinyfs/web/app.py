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
        bad = _bad_request(environ)
        if bad:
            return answer(start_response, 400, bad)
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


def _bad_request(environ: dict) -> str:
    """Why a request's path (or Destination) cannot name anything in the archive, or ''."""
    for where, raw in (("path", environ.get("PATH_INFO", "")), ("Destination", _destination_path(environ))):
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


def _destination_path(environ: dict) -> str | None:
    dest = environ.get("HTTP_DESTINATION")
    if not dest:
        return None
    return unquote(urlsplit(dest).path, encoding="latin-1")


def answer(start_response, status: int, text: str, headers: list | None = None) -> list[bytes]:
    """A short plain-text answer: the status and one line saying why."""
    from http import HTTPStatus

    body = (one_line(text) + "\n").encode("utf-8")
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                    *(headers or [])])
    return [body]
