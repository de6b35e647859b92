"""tinyfs: a small OAIS-style archive whose everyday client is the file system."""

from .core.api import Archive, Resource, Transaction
from .core.errors import TinyfsError
from .core.fixity import FixityError

__version__ = "0.1.0"
__all__ = ["Archive", "FixityError", "Resource", "Transaction", "TinyfsError", "__version__"]
