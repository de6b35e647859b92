"""tinyfs: a small OAIS-style archive whose everyday client is the file system."""

from .core import api
from .core.api import Archive, Resource, Transaction
from .core.errors import TinyfsError
from .core.fixity import FixityError

__version__ = "0.1.0"


def _open_url(url: str, **options):
    from .web.client import HttpArchive  # (requests: the [web] extra)

    return HttpArchive(url, **options)


api.URL_OPENERS.update(http=_open_url, https=_open_url)
__all__ = ["Archive", "FixityError", "Resource", "Transaction", "TinyfsError", "__version__"]
