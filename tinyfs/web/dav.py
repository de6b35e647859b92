"""The WsgiDAV provider: the mount's namespace (SPEC section 3), each top-level name served by its module.

  /resources/<rid>/...            views.py   the head of each resource        read-only
  /instances/<rid>/<iid>/...      views.py   every instance, labels           read-only
  /aip/<rid>/...                  views.py   the stored bags as they are      read-only
  /events.jsonl                   views.py   the event log                    read-only
  /transactions/<rid>/...         deposits.py open transactions               writable by their owner
  /commit/                        deposits.py MOVE a transaction here commits it

A section module has `resource(ctx, parts, path, environ)`: the DAV resource at `parts` (the path's
components below the section's name), or None when nothing is there.
"""

from __future__ import annotations

from wsgidav.dav_error import HTTP_FORBIDDEN, DAVError
from wsgidav.dav_provider import DAVCollection, DAVProvider

from .app import Context

TOP = ("resources", "instances", "aip", "transactions", "commit", "events.jsonl")


def _sections() -> dict:
    from . import deposits, views

    return {"resources": views, "instances": views, "aip": views, "events.jsonl": views,
            "transactions": deposits, "commit": deposits}


class ArchiveProvider(DAVProvider):
    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx
        self.sections = _sections()

    def is_readonly(self) -> bool:
        return False          # the sections refuse what they do not take (403)

    def get_resource_inst(self, path: str, environ: dict):
        self._count_get_resource_inst += 1
        parts = [p for p in path.split("/") if p]
        if not parts:
            return TopCollection("/", environ, self.ctx)
        module = self.sections.get(parts[0])
        if module is None:
            return None
        return module.resource(self.ctx, parts, "/" + "/".join(parts), environ)


class TopCollection(DAVCollection):
    """The root: the six top-level names, nothing can be made or removed here."""

    def __init__(self, path: str, environ: dict, ctx: Context):
        super().__init__(path, environ)
        self.ctx = ctx

    def get_member_names(self) -> list[str]:
        return list(TOP)

    def get_member(self, name: str):
        return self.provider.get_resource_inst("/" + name, self.environ) if name in TOP else None

    def get_last_modified(self):
        return self.ctx.archive.root.stat().st_mtime

    def get_etag(self):
        return None

    def support_etag(self) -> bool:
        return False

    def create_empty_resource(self, name: str):
        raise DAVError(HTTP_FORBIDDEN, "nothing can be made at the top level")

    def create_collection(self, name: str):
        raise DAVError(HTTP_FORBIDDEN, "nothing can be made at the top level")

    def delete(self):
        raise DAVError(HTTP_FORBIDDEN, "the top level cannot be removed")
