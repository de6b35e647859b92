"""tinyfs: a small OAIS-style archive whose everyday client is the file system."""

from .core.api import Archive, Resource, Transaction
from .core.errors import TinyfsError

__version__ = "0.1.0"
__all__ = ["Archive", "Resource", "Transaction", "TinyfsError", "__version__"]
